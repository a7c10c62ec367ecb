"""A failing command changes nothing, and a run survives its commands being killed: the run lock,
a DPO killed while saving its adapter, hand-edited outputs, names that would be paths, and
--debug. Commands run through the CLI (in-process; in a subprocess where a process must hold a
lock or die)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cai_bootstrap.cli import app
from cai_bootstrap.files import sha256_file, write_jsonl
from cai_bootstrap.run import RunStateError
from cai_bootstrap.schemas import InstructionRecord, PreferencePair

runner = CliRunner()
HERE = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def tree(root: Path, without: tuple[str, ...] = ()) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and str(p.relative_to(root)) not in without}


def error_line(output: str) -> str:
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


def ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def instructions_config(tmp: Path, model: Path | str = "smollm2-135m") -> Path:
    cfg = tmp / "cfg.yaml"
    cfg.write_text(f"model: {{base: {model}}}\nbaseline: {{n_probes: 2, max_new_tokens: 2}}\n"
                   f"instructions: {{builtin: 40, test_size: 4}}\n")
    return cfg


# ---------------------------------------------------------------- the lock

def test_a_second_command_on_a_run_is_refused_naming_the_first(tmp_path):
    cfg, run_dir = instructions_config(tmp_path), tmp_path / "run"
    ok(["instructions", str(cfg), "--run-dir", str(run_dir)])
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom cai_bootstrap.locking import RunLock\n"
         "with RunLock(Path(sys.argv[1]), 'run cfg.yaml'):\n    print('locked', flush=True)\n    time.sleep(600)",
         str(run_dir)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree(run_dir)
        result = runner.invoke(app, ["instructions", str(cfg), "--run-dir", str(run_dir), "--force"])
        assert result.exit_code == 1
        line = error_line(result.output)
        assert f"{run_dir} is in use by pid {holder.pid} on {socket.gethostname()} (`cai-bootstrap run cfg.yaml`" in line
        assert "wait for it to finish" in line
        assert tree(run_dir) == before
        assert f"in use by pid {holder.pid}" in ok(["status", str(run_dir)])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # killed: the kernel released its lock; the record it left is taken over with a note
    assert (run_dir / ".lock").exists()
    out = ok(["instructions", str(cfg), "--run-dir", str(run_dir)])
    assert f"was held by pid {holder.pid}" in out and "ended without releasing it" in out
    assert not (run_dir / ".lock").exists()


def test_a_lock_held_before_its_record_is_written_is_still_a_lock(tmp_path):
    cfg, run_dir = instructions_config(tmp_path), tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True)\ntime.sleep(600)", str(run_dir / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = runner.invoke(app, ["instructions", str(cfg), "--run-dir", str(run_dir)])
        assert result.exit_code == 1
        assert "is in use by another command (starting or ending just now)" in error_line(result.output)
        assert tree(run_dir) == {".lock": sha256_file(run_dir / ".lock")}
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_on_another_machine_is_reported_with_how_to_clear_it(tmp_path):
    cfg, run_dir = instructions_config(tmp_path), tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(json.dumps({"pid": 4242, "host": "gpu-node-7", "command": "dpo --init sft",
                                               "started": "2026-01-02T03:04:05+00:00"}))
    before = tree(run_dir)
    result = runner.invoke(app, ["instructions", str(cfg), "--run-dir", str(run_dir)])
    assert result.exit_code == 1
    line = error_line(result.output)
    assert "was left by pid 4242 on gpu-node-7 (`cai-bootstrap dpo --init sft`, started 2026-01-02" in line
    assert f"if it does not, delete {run_dir / '.lock'} and try again" in line
    assert tree(run_dir) == before


# ---------------------------------------------------------------- killed while saving

def _dpo_run(tmp: Path, model: Path) -> tuple[Path, Path]:
    cfg = tmp / "cfg.yaml"
    cfg.write_text(f"""model: {{base: {model}}}
dpo: {{max_steps: 1, batch_size: 2, max_length: 64, logging_steps: 1, warmup_ratio: 0.0, mixed_precision: "no",
      lora: {{r: 4, alpha: 8, dropout: 0.0}}}}
evaluation: {{models: [base, dpo_only], max_new_tokens: 4, batch_size: 4}}
""")
    run_dir = tmp / "run"
    facts = [("What is the capital of France?", "Paris."), ("What is 2 + 2?", "4."),
             ("What do bees make?", "Honey."), ("What is frozen water called?", "Ice.")]
    write_jsonl(run_dir / "data/pairs.jsonl", [PreferencePair(
        id=f"p{i}", instruction_id=f"i{i}", category="qa", prompt=f"Instruction: {q}\nResponse:", chosen=f" {a}\nEND",
        rejected=" Well, that is a big question and", negative_type="verbose_vague", chosen_source="sft_model")
        for i, (q, a) in enumerate(facts)])
    write_jsonl(run_dir / "data/test.jsonl", [InstructionRecord(id=f"t{i}", instruction=q, category="qa",
                                                                source="user") for i, (q, _) in enumerate(facts[:2])])
    return cfg, run_dir


def test_dpo_killed_while_saving_leaves_its_adapter_whole_and_evaluate_refuses(tmp_path, tiny_model_folder):
    cfg, run_dir = _dpo_run(tmp_path, tiny_model_folder)
    dpo = ["dpo", str(cfg), "--run-dir", str(run_dir), "--init", "base"]
    ok(dpo)
    adapter = run_dir / "models/dpo_only"
    saved = tree(adapter)

    killed = subprocess.run([sys.executable, str(HERE / "_kill_while_saving_driver.py"), *dpo, "--force"],
                            capture_output=True, text=True, env=ENV, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    orphans = [p for p in adapter.iterdir() if p.name.startswith(".save.") and p.name.endswith(".tmp")]
    assert len(orphans) == 1 and (orphans[0] / "adapter_model.safetensors").is_file()  # the half-written file
    assert {k: v for k, v in tree(adapter).items() if not k.startswith(".save.")} == saved  # the old adapter, whole
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["steps"]["dpo_only"]["status"] == "running"

    status = ok(["status", str(run_dir)])
    assert "interrupted" in status
    assert f"`cai-bootstrap dpo {run_dir / 'config.yaml'} --run-dir {run_dir} --init base`" in status

    before = tree(run_dir, without=(".lock",))  # the lock record of the killed process is taken over
    result = runner.invoke(app, ["evaluate", str(cfg), "--run-dir", str(run_dir)])
    assert result.exit_code == 1
    line = error_line(result.output)
    pid = manifest["steps"]["dpo_only"]["pid"]
    assert f"evaluate needs models/dpo_only from step dpo_only, which was interrupted (started " in line
    assert f"pid {pid} on {socket.gethostname()} is gone): run `cai-bootstrap dpo {cfg} --run-dir {run_dir} " \
           f"--init base` first" in line
    assert tree(run_dir) == before

    out = ok(dpo)  # no --force needed: an interrupted step is not done
    assert "removed 1 temporary file(s) left by an interrupted write" in out
    assert not any(p.name.endswith(".tmp") for p in run_dir.rglob("*"))
    ok(["evaluate", str(cfg), "--run-dir", str(run_dir)])
    assert (run_dir / "eval/responses/dpo_only.jsonl").is_file()


# ---------------------------------------------------------------- hand-edited outputs

def test_hand_edited_instructions_are_reported_then_kept_or_rebuilt(tmp_path, tiny_model_folder):
    cfg, run_dir = instructions_config(tmp_path, tiny_model_folder), tmp_path / "run"
    run = ["run", str(cfg), "--run-dir", str(run_dir), "--until", "instructions"]
    ok(run)
    path = run_dir / "data/instructions.jsonl"
    written = path.read_text()
    path.write_text("".join(written.splitlines(keepends=True)[1:]))  # the user drops an item they dislike
    edited = sha256_file(path)

    before = tree(run_dir)
    for args in (run, ["sft-data", str(cfg), "--run-dir", str(run_dir)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1
        line = error_line(result.output)
        assert "data/instructions.jsonl (sha256" in line and "changed after step instructions wrote it" in line
        assert "add --keep-edits to use it as it is" in line
        assert f"`cai-bootstrap instructions {cfg} --run-dir {run_dir} --force`" in line
        assert "set instructions.train_file" in line
        assert tree(run_dir) == before

    out = ok([*run, "--keep-edits"])
    assert "keeping your edited data/instructions.jsonl" in out
    entry = json.loads((run_dir / "manifest.json").read_text())["steps"]["instructions"]
    assert entry["outputs"]["data/instructions.jsonl"] == edited == sha256_file(path)
    assert entry["edited"]["data/instructions.jsonl"]["kept"] == edited
    ok(run)  # adopted: the next run goes on with the edited file
    assert sha256_file(path) == edited

    ok([*run, "--force"])
    assert path.read_text() == written


# ---------------------------------------------------------------- names and paths

def test_a_model_name_is_never_a_path(tmp_path):
    cfg = instructions_config(tmp_path)
    before = tree(tmp_path)
    result = runner.invoke(app, ["evaluate", str(cfg), "--run-dir", str(tmp_path / "a/b/c/run"),
                                 "--set", "evaluation.extra_models={'../../../../escaped': smollm2-135m}"])
    assert result.exit_code == 1
    line = error_line(result.output)
    assert "evaluation.extra_models: '../../../../escaped' is not a valid name: it becomes a file name" in line
    assert tree(tmp_path) == before and not (tmp_path / "a").exists()


def test_a_local_folder_named_like_a_hub_id_is_reported(tmp_path, tiny_model_folder, monkeypatch):
    (tmp_path / "SomeOrg").mkdir()
    (tmp_path / "SomeOrg/some-model").symlink_to(tiny_model_folder)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "a", "prompt": "Instruction: hi\nResponse:", "response": " hello\nEND"}) + "\n")
    monkeypatch.chdir(tmp_path)
    out = ok(["inspect-masks", str(data), "--model", "SomeOrg/some-model", "--n", "1"])
    assert "note: model 'SomeOrg/some-model' is the local folder" in out and "not the hub model of that name" in out


# ---------------------------------------------------------------- --debug

def _truncated_manifest(tmp: Path) -> Path:
    (tmp / "run").mkdir()
    (tmp / "run/manifest.json").write_text('{"steps": {')
    return tmp / "run"


def test_debug_shows_the_traceback(tmp_path):
    run_dir = _truncated_manifest(tmp_path)
    for args, env in ((["--debug", "status", str(run_dir)], {}), (["status", str(run_dir)], {"CAI_BOOTSTRAP_DEBUG": "1"})):
        result = runner.invoke(app, args, env=env)
        assert result.exit_code == 1 and isinstance(result.exception, RunStateError)
        assert "error:" not in result.output


def test_an_unexpected_error_is_one_line_that_points_to_debug(tmp_path, monkeypatch):
    from cai_bootstrap import run as run_module

    def broken(*args, **kwargs):
        raise KeyError("steps")

    monkeypatch.setattr(run_module.Run, "open_existing", broken)
    result = runner.invoke(app, ["status", str(_truncated_manifest(tmp_path))])
    assert result.exit_code == 1
    line = error_line(result.output)
    assert "KeyError: 'steps' (unexpected: `cai-bootstrap --debug …` or CAI_BOOTSTRAP_DEBUG=1 shows the traceback)" in line
