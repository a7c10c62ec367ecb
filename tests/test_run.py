import json

import pytest

from cai_bootstrap.config import load_config
from cai_bootstrap.files import atomic_write_text, sha256_file
from cai_bootstrap.run import Run, StepFailed


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
    run.path("out.txt").write_text("tampered")
    assert _step(run, params="p2")  # output changed
    run.path("out.txt").unlink()
    assert _step(run, params="p2")  # output missing


def test_failed_step_is_recorded_and_not_current(tmp_path):
    run = Run(tmp_path, load_config(None))
    run.path("in.txt").write_text("abc")
    with pytest.raises(RuntimeError):
        with run.step("make", "p", ["in.txt"], ["out.txt"]):
            raise RuntimeError("boom")
    s = run.steps()["make"]
    assert s["status"] == "failed" and "boom" in s["error"]
    assert not run.is_current("make", "p", ["in.txt"])


def test_missing_input_and_missing_output_fail_clearly(tmp_path):
    run = Run(tmp_path, load_config(None))
    with pytest.raises(StepFailed, match="missing input"):
        with run.step("make", "p", ["nope.txt"], []):
            pass
    run.path("in.txt").write_text("x")
    with pytest.raises(StepFailed, match="did not write"):
        with run.step("make", "p", ["in.txt"], ["out.txt"]):
            pass


def test_run_reopens_from_manifest(tmp_path):
    cfg = load_config(None, ["seed=7"])
    Run(tmp_path, cfg)
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
