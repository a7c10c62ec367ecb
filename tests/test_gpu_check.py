"""scripts/gpu_check.sh on a machine without a GPU: its arguments, its refusal, its checks of a run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check_verify as verify  # noqa: E402


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env}, cwd=ROOT)


def test_help_names_every_path_and_option():
    r = run("--help")
    assert r.returncode == 0
    for word in ("bf16", "vllm", "zero3", "--out", "--only", "--python", "deepspeed_zero3.yaml", "exit 3"):
        assert word in r.stdout
    assert run("-h").stdout == r.stdout


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown argument: --bogus"),
    (["--out"], "--out needs a value"),
    (["--only="], "--only needs a value"),
    (["--only", "bf16,fp8"], "--only: unknown path 'fp8' (known: bf16, vllm, zero3)"),
    (["--only", ","], "--only: no path given"),
    (["--python", "/nonexistent/python"], "--python: /nonexistent/python is not an executable"),
    (["--python", "/bin/true"], "cannot import cai_bootstrap and torch"),
])
def test_bad_arguments_stop_before_anything_runs(args, message, tmp_path):
    r = run(*args, "--out", str(tmp_path / "out")) if "--out" not in args else run(*args)
    assert r.returncode == 2 and message in r.stderr and "--help" in r.stderr
    assert not (tmp_path / "out").exists()


def test_without_a_cuda_gpu_it_refuses_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    r = run("--out", str(out), "--python", sys.executable, "--only=bf16", CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 3
    assert "gpu_check: REFUSED: no CUDA GPU here" in r.stderr and "nothing was run" in r.stderr
    assert r.stdout == "" and not out.exists()


def test_the_script_is_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    r = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_make_gpu_check_runs_the_script():
    recipe = (ROOT / "Makefile").read_text().split("\ngpu-check:", 1)[1].split("\n\n", 1)[0]
    assert "scripts/gpu_check.sh --python $(BIN)/python" in recipe


# --- the checks it runs on a path's run directory -------------------------------------------------


def _training(folder: Path, record: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    (folder / "training.json").write_text(json.dumps(record))


def fake_run(tmp_path: Path, *, reason="auto: cuda is not a CPU (the libraries' paths)", precision="bf16",
             forward="trl (padding_free False, use_liger_kernel False)", processes=1) -> Path:
    run_dir = tmp_path / "run"
    backend = {"setting": "auto", "used": False, "reason": reason}
    common = {"mixed_precision": {"used": precision}, "cpu_backend": backend, "history": [{"loss": 2.0}, {"loss": 1.5}]}
    _training(run_dir / "models/sft", {**common, "hyperparameters": {"num_processes": processes}})
    for name in ("dpo", "dpo_only"):
        _training(run_dir / f"models/{name}", {**common, "forward": forward, "num_processes": processes,
                                                "final_reward_accuracy": 0.75})
    (run_dir / "manifest.json").write_text(json.dumps({"steps": {"sft": {"status": "done"}, "dpo": {"status": "done"}}}))
    (run_dir / "eval/responses").mkdir(parents=True)
    for m in verify.MODELS:
        (run_dir / f"eval/responses/{m}.jsonl").write_text(json.dumps({"id": "a", "response": m}) + "\n")
    (run_dir / "report").mkdir()
    (run_dir / "report/report.md").write_text("# report")
    (run_dir / "eval/evaluation.json").write_text(json.dumps({"models": {"base": {"runtime": {"backend": "vllm"}}}}))
    return run_dir


def test_the_checks_pass_what_each_path_promises_and_name_what_is_wrong(tmp_path, capsys):
    good = fake_run(tmp_path / "good")
    assert verify.main(["bf16", str(good)]) == 0 and "sft loss 2.000 -> 1.500" in capsys.readouterr().out
    assert verify.main(["vllm", str(good), "--hf-run", str(good)]) == 0
    assert "same greedy text as HF: base 1/1" in capsys.readouterr().out
    zero3 = fake_run(tmp_path / "zero3", reason="auto: deepspeed shards the weights (the libraries' paths)")
    assert verify.main(["zero3", str(zero3)]) == 0
    assert verify.main(["zero3", str(good)]) == 1 and "expected the libraries' paths ('deepspeed')" in capsys.readouterr().out

    for kwargs, expected in (({"precision": "no"}, "expected bf16"),
                             ({"reason": "auto: a CPU with whole weights"}, "expected the libraries' paths"),
                             ({"forward": "training.packing (prompt trees)"}, "expected TRL's")):
        bad = fake_run(tmp_path / expected.replace(" ", "_").replace("'", ""), **kwargs)
        capsys.readouterr()
        assert verify.main(["bf16", str(bad)]) == 1 and expected in capsys.readouterr().out
    two = fake_run(tmp_path / "two", reason="deepspeed", processes=2)
    assert verify.main(["zero3", str(two)]) == 1 and "2 processes, expected 1" in capsys.readouterr().out
    (good / "models/dpo/training.json").unlink()
    assert verify.main(["bf16", str(good)]) == 1 and "training.json is missing" in capsys.readouterr().out
