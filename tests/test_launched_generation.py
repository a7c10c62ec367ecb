"""Generation steps under `accelerate launch` (2 CPU processes == 1 process, byte for byte). The vLLM
backend has its own tests (test_vllm_backend.py, test_vllm_cpu.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cai_bootstrap.cli import app
from cai_bootstrap.config import load_config
from cai_bootstrap.generation.engine import Decoding
from cai_bootstrap.run import Run
from cai_bootstrap.steps import sft_data as sft_data_step
from cai_bootstrap.steps.instructions import run_instructions

CPU_2PROC = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "cpu_2proc.yaml"

CPU_BACKEND = {"used": True, "reason": "auto: a CPU with whole weights"}


@pytest.fixture(scope="module")
def varied_model_folder(tmp_path_factory, smollm2_folder) -> Path:
    """Initialised at scale 0.1 so that greedy outputs differ between prompts (see test_distributed)."""
    from cai_bootstrap.models.tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-varied"), smollm2_folder, initializer_range=0.1)


def config_for(folder, *overrides):
    # 12 prompts in batches of 3: 4 length buckets, 2 per process
    return load_config(None, [f"model.base={folder}", "generation.batch_size=3", "instructions.builtin=120",
                              "instructions.test_size=6", "evaluation.batch_size=3", "evaluation.max_new_tokens=8",
                              *overrides])


def make_adapter(model_folder, out, seed=1):
    import torch
    from peft import LoraConfig, get_peft_model

    from cai_bootstrap.models.loading import load_model

    torch.manual_seed(seed)
    peft = get_peft_model(load_model(str(model_folder)).model,
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(out)
    return out


@pytest.mark.distributed
def test_sft_data_on_two_processes_writes_the_same_artifact(tmp_path, varied_model_folder, monkeypatch):
    """Greedy best-of-2 with the critic: both rounds go in one launch, the critic scores in this
    process afterwards, and data/sft.jsonl (texts, finish reasons, fingerprints, margins) is
    byte-identical to the one-process run."""
    monkeypatch.setattr(sft_data_step, "qc_reason", lambda *a: None)  # the random model never passes QC
    cfg = config_for(varied_model_folder, "sft_data.max_instructions=12", "sft_data.max_new_tokens=8",
                     "sft_data.temperature=0", "sft_data.best_of_n=2", "sft_data.critic.enabled=true",
                     "sft_data.critic.min_margin=-1000")
    runs = {}
    for name, launcher in (("one", None), ("two", CPU_2PROC)):
        run = Run(tmp_path / name, cfg)
        run_instructions(run)
        assert sft_data_step.run_sft_data(run, accelerate_config=launcher)
        runs[name] = run

    one, two = (runs[n].path("data/sft.jsonl").read_bytes() for n in ("one", "two"))
    assert one == two
    records = [json.loads(line) for line in two.decode().splitlines()]
    assert len(records) == 12 and all(r["critic_margin"] is not None for r in records)
    assert len({r["response"] for r in records}) > 6  # the outputs really differ per prompt
    step = runs["two"].steps()["sft-data"]
    assert step["provenance"]["generation"] == {"backend": "hf", "accelerate_config": str(CPU_2PROC), "processes": 2,
                                                "cpu_backend": CPU_BACKEND}  # the launched processes' decision
    qc_one, qc_two = (json.loads(runs[n].path("data/sft_qc.json").read_text()) for n in ("one", "two"))
    for key in ("prompts", "completion_tokens", "batches"):
        assert qc_one["generation"][key] == qc_two["generation"][key]
    assert not list(runs["two"].path("tmp").iterdir())  # launch requests and results are cleaned up


@pytest.mark.distributed
def test_evaluate_command_with_launcher_matches_one_process(tmp_path, varied_model_folder):
    """`cai-bootstrap evaluate --launcher accelerate`: the adapter model generates on 2 processes; its
    responses are byte-identical to one process and its fingerprint (taken in the launched process)
    passes the isolation checks against the base fingerprints taken here."""
    cfg = config_for(varied_model_folder, "evaluation.models=[sft]")
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    out = {}
    for name, extra in (("one", []), ("two", ["--launcher", "accelerate", "--accelerate-config", str(CPU_2PROC)])):
        run = Run(tmp_path / name, cfg)
        run_instructions(run)
        make_adapter(varied_model_folder, run.path("models/sft"))
        r = CliRunner().invoke(app, ["evaluate", str(cfg_file), "--run-dir", str(run.dir), *extra])
        assert r.exit_code == 0, r.output
        out[name] = (run.path("eval/responses/sft.jsonl").read_bytes(),
                     json.loads(run.path("eval/evaluation.json").read_text()))

    assert out["one"][0] == out["two"][0]
    assert len(out["two"][0].splitlines()) == 6
    rec_one, rec_two = out["one"][1], out["two"][1]
    assert rec_two["isolation"]["verified"]
    assert rec_two["models"]["sft"]["fingerprint"] == rec_one["models"]["sft"]["fingerprint"] \
        != rec_two["isolation"]["base_fingerprint_before"]
    assert rec_two["models"]["sft"]["runtime"]["processes"] == 2
    assert rec_one["models"]["sft"]["runtime"] == {"backend": "hf", "processes": 1, "cpu_backend": CPU_BACKEND}
    assert rec_two["models"]["sft"]["runtime"]["cpu_backend"] == CPU_BACKEND
    # the memory figures include the launched processes (the launcher and its 2 workers)
    mem_one, mem_two = rec_one["models"]["sft"]["memory"], rec_two["models"]["sft"]["memory"]
    assert mem_two["processes_peak"] >= mem_one["processes_peak"] + 2
    assert mem_two["rss_peak_mb"] > mem_one["rss_peak_mb"] + 200  # each worker holds torch and a model
    assert "gpu_peak_mb" not in mem_two  # no GPU anywhere here


def test_run_hands_the_accelerate_config_to_the_generation_steps():
    import inspect

    from cai_bootstrap.steps import pipeline

    assert {"sft-data", "pairs", "evaluate"} <= pipeline.LAUNCHABLE
    for name, fn in pipeline.STEPS:
        if name in pipeline.LAUNCHABLE:  # the real step functions take the keyword the pipeline passes
            inspect.signature(fn).bind(None, False, accelerate_config=CPU_2PROC)


@pytest.mark.distributed
def test_a_launched_generation_error_reaches_the_parent(tmp_path):
    """Every process fails to load the model: the parent raises the processes' error (once, with the
    ranks that reported it before the launcher stopped the rest), not the launcher's exit status."""
    from cai_bootstrap.generation.launched import LaunchedEngine, LaunchModel
    from cai_bootstrap.run import StepFailed

    missing = tmp_path / "no-such-model"
    engine = LaunchedEngine(LaunchModel(spec=str(missing)), accelerate_config=CPU_2PROC, work_dir=tmp_path / "work")
    with pytest.raises(StepFailed) as failed:
        engine.generate(["Instruction: Say hi.\nResponse:"], Decoding(max_new_tokens=4))
    message = str(failed.value)
    assert message.startswith(f"generation with {missing} failed under accelerate launch (exit status ")
    lines = re.findall(r"\n  process ([0-9, ]+): (\w+): ", message)  # the launcher may stop one rank first
    assert len(lines) == 1 and lines[0][1] == "ModelNotAvailable" and set(lines[0][0].split(", ")) <= {"0", "1"}
    assert "neither an embedded name" in message
    assert not list((tmp_path / "work").glob("generate-*"))  # the request (and any result) cleaned up
