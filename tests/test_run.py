import json
import os
import socket
import subprocess
import sys

import pytest

from cai_bootstrap.config import load_config
from cai_bootstrap.files import PathOutside, atomic_write_text, sha256_file
from cai_bootstrap.run import Run, RunStateError, StepFailed


def _step(run, params="p1", force=False):
    if not force and run.is_current("make", params, ["in.txt"]):
        return False
    with run.step("make", params, ["in.txt"], ["out.txt"]) as rec:
        text = run.path("in.txt").read_text()
        atomic_write_text(run.path("out.txt"), text.upper())
        rec.kept = 3
        rec.drop("too_short", 2)
        rec.metrics["x"] = 1.5
    return True


def test_step_records_hashes_counts_and_provenance(tmp_path):
    run = Run(tmp_path, load_config(None))
    run.path("in.txt").write_text("abc")
    assert _step(run)
    m = json.loads((tmp_path / "manifest.json").read_text())
    s = m["steps"]["make"]
    assert s["status"] == "done"
    assert s["inputs"]["in.txt"] == sha256_file(tmp_path / "in.txt")
    assert s["outputs"]["out.txt"] == sha256_file(tmp_path / "out.txt")
    assert s["counts"] == {"kept": 3, "dropped": {"too_short": 2}}
    assert s["metrics"] == {"x": 1.5}
    assert s["environment"]["versions"]["torch"]
    assert m["config_hash"] == load_config(None).hash()
    assert (tmp_path / "config.yaml").is_file()


def test_skip_when_unchanged_rerun_when_input_params_or_output_change(tmp_path):
    run = Run(tmp_path, load_config(None))
    run.path("in.txt").write_text("abc")
    assert _step(run)
    assert not _step(run)  # unchanged: skipped
    assert _step(run, force=True)
    assert _step(run, params="p2")  # params changed
    run.path("in.txt").write_text("abd")
    assert _step(run, params="p2")  # input changed
    run.path("out.txt").unlink()
    assert _step(run, params="p2")  # output missing: rebuilt


def test_an_edited_output_is_refused_kept_or_forced(tmp_path):
    """An output changed after its step wrote it is never silently rebuilt: the step refuses, names
    the file and both ways on; --keep-edits adopts it (recorded), --force rebuilds it."""
    run = Run(tmp_path, load_config(None))
    run.path("in.txt").write_text("abc")
    assert _step(run)
    run.path("out.txt").write_text("my own words")
    before = (tmp_path / "manifest.json").read_bytes()
    with pytest.raises(RunStateError, match=r"out.txt \(sha256 .* changed after step make wrote it: add --keep-edits"):
        _step(run)
    assert (tmp_path / "manifest.json").read_bytes() == before
    kept = Run(tmp_path, load_config(None), keep_edits=True)
    assert not _step(kept)  # adopted: current, not re-run
    entry = kept.steps()["make"]
    assert entry["outputs"]["out.txt"] == sha256_file(tmp_path / "out.txt")
    assert set(entry["edited"]["out.txt"]) == {"written", "kept", "at"}
    assert run.path("out.txt").read_text() == "my own words"
    with pytest.raises(RunStateError, match="must run again .* which would replace out.txt that you edited"):
        _step(kept, params="p2")  # config changed since: it must run again, so the edit cannot be kept
    run.path("out.txt").write_text("edited again")
    assert _step(run, force=True)
    assert run.path("out.txt").read_text() == "ABC"


def test_a_step_waits_for_the_steps_that_write_its_inputs(tmp_path):
    run = Run(tmp_path, load_config(None))
    run.path("in.txt").write_text("abc")
    with pytest.raises(RuntimeError):
        with run.step("make", "p", ["in.txt"], ["mid.txt"]):
            raise RuntimeError("boom")
    run.path("mid.txt").write_text("left by the failed run")
    with pytest.raises(RunStateError, match=r"read needs mid.txt from step make, which failed \(RuntimeError: boom\)"):
        with run.step("read", "p", ["mid.txt"], []):
            pass


def test_interrupted_step_is_named_with_the_command_to_run(tmp_path):
    run = Run(tmp_path, load_config(None))
    run.path("in.txt").write_text("abc")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run.manifest["steps"]["make"] = {"status": "running", "started": "2026-01-01T00:00:00+00:00", "params_hash": "p",
                                     "pid": int(dead.stdout), "host": socket.gethostname(),
                                     "outputs": {"mid.txt": None}}
    assert run.state("make") == "interrupted"
    with pytest.raises(RunStateError, match=rf"step make, which was interrupted \(started 2026-01-01.*pid {dead.stdout.strip()} "
                                            rf"on .* is gone\): run `cai-bootstrap make .*config.yaml --run-dir"):
        with run.step("read", "p", ["mid.txt"], []):
            pass
    run.manifest["steps"]["make"]["pid"] = os.getpid()
    assert run.state("make") == "running"  # this very process


def test_orphaned_temporary_files_go_when_a_step_starts(tmp_path, capsys):
    run = Run(tmp_path, load_config(None))
    run.path("in.txt").write_text("abc")
    (tmp_path / ".out.txt.k2j4x.tmp").write_text("half")
    (tmp_path / "models/m/.save.ab12.tmp").mkdir(parents=True)
    (tmp_path / "models/m/.save.ab12.tmp/adapter_model.safetensors").write_text("half")
    (tmp_path / ".hidden-but-mine").write_text("kept")
    assert _step(run)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        ".hidden-but-mine", "config.yaml", "in.txt", "manifest.json", "out.txt"]
    assert "removed 2 temporary file(s) left by an interrupted write" in capsys.readouterr().err


def test_paths_never_leave_the_run_directory(tmp_path):
    run = Run(tmp_path / "run", load_config(None))
    assert run.path("data/x.jsonl") == tmp_path / "run/data/x.jsonl"
    for bad in ("../escaped.jsonl", "eval/responses/../../../x", "/etc/passwd"):
        with pytest.raises(PathOutside, match="is outside"):
            run.path(bad)


def test_failed_step_is_recorded_and_not_current(tmp_path):
    run = Run(tmp_path, load_config(None))
    run.path("in.txt").write_text("abc")
    with pytest.raises(RuntimeError):
        with run.step("make", "p", ["in.txt"], ["out.txt"]):
            raise RuntimeError("boom")
    s = run.steps()["make"]
    assert s["status"] == "failed" and "boom" in s["error"]
    assert not run.is_current("make", "p", ["in.txt"])


def test_ctrl_c_is_recorded_as_interrupted(tmp_path):
    run = Run(tmp_path, load_config(None))
    run.path("in.txt").write_text("abc")
    with pytest.raises(KeyboardInterrupt):
        with run.step("make", "p", ["in.txt"], ["out.txt"]):
            raise KeyboardInterrupt
    assert run.state("make") == "interrupted"
    with pytest.raises(RunStateError, match=r"step make, which was interrupted \(Ctrl-C, at "):
        with run.step("read", "p", ["out.txt"], []):
            pass


def test_missing_input_and_missing_output_fail_clearly(tmp_path):
    run = Run(tmp_path, load_config(None))
    with pytest.raises(RunStateError, match="missing input"):
        with run.step("make", "p", ["nope.txt"], []):
            pass
    run.path("in.txt").write_text("x")
    with pytest.raises(StepFailed, match="did not write"):
        with run.step("make", "p", ["in.txt"], ["out.txt"]):
            pass


def test_run_reopens_from_manifest_with_the_config_of_its_latest_step(tmp_path):
    Run(tmp_path, load_config(None, ["seed=7"]))
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "manifest.json").exists()
    run = Run(tmp_path, load_config(None, ["seed=7"]))
    run.path("in.txt").write_text("abc")
    assert _step(run)
    assert Run(tmp_path).config.seed == 7


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import os

    target = tmp_path / "a.txt"
    target.write_text("old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
