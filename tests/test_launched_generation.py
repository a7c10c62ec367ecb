"""Generation steps under `accelerate launch` (2 CPU processes == 1 process, byte for byte), and the
vLLM backend: its clear error when vLLM is missing, and its records against the HF engine's (with a
stand-in `vllm` module that serves vLLM-shaped outputs from the same weights).
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cai_bootstrap.cli import app
from cai_bootstrap.config import load_config
from cai_bootstrap.formats import prompt_for
from cai_bootstrap.generation.engine import Decoding
from cai_bootstrap.generation.vllm_backend import BackendUnavailable
from cai_bootstrap.run import Run
from cai_bootstrap.steps import sft_data as sft_data_step
from cai_bootstrap.steps.generator import Generator
from cai_bootstrap.steps.instructions import run_instructions

CPU_2PROC = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "cpu_2proc.yaml"


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
    assert step["provenance"]["generation"] == {"backend": "hf", "accelerate_config": str(CPU_2PROC), "processes": 2}
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
    assert rec_one["models"]["sft"]["runtime"] == {"backend": "hf", "processes": 1}
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


# ------------------------------------------------------------------------------------------------
# vLLM backend


def test_vllm_backend_without_vllm_fails_at_step_start_in_one_line(tmp_path, tiny_model_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed, whatever this machine has
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"model: {{base: {tiny_model_folder}}}\ngeneration: {{backend: vllm}}\n")
    r = CliRunner().invoke(app, ["baseline", str(cfg), "--run-dir", str(tmp_path / "run")])
    assert r.exit_code == 1
    message = r.output.strip()
    assert "vllm is not installed" in message and "pip install '.[vllm]'" in message
    assert len(message.splitlines()) == 1 and "Traceback" not in message

    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))  # installed, but 8-bit weights asked for
    config = load_config(None, [f"model.base={tiny_model_folder}", "generation.backend=vllm", "model.generation_quantization=8bit"])
    with pytest.raises(BackendUnavailable, match="model.generation_quantization none"):
        Generator(config)


def fake_vllm(calls: dict) -> types.ModuleType:
    """A stand-in for the `vllm` package: LLM serves HF greedy generation of the folder it is given,
    with vLLM's output shape and stopping (token ids up to and including the EOS or the token that
    completes a stop string)."""

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)
            calls.setdefault("params", []).append(kwargs)

    class LLM:
        def __init__(self, model, **kwargs):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            calls["llm"] = {"model": model, **kwargs}
            self.model = AutoModelForCausalLM.from_pretrained(model)
            self.tokenizer = AutoTokenizer.from_pretrained(kwargs["tokenizer"])

        def generate(self, prompts, sampling_params, use_tqdm):
            import torch

            outs = []
            for prompt, p in zip(prompts, sampling_params, strict=True):
                assert p.temperature == 0  # greedy only in this stand-in
                ids = torch.tensor([prompt["prompt_token_ids"]])
                with torch.inference_mode():
                    gen = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=p.max_tokens,
                                              do_sample=False, eos_token_id=p.stop_token_ids,
                                              pad_token_id=p.stop_token_ids[0])[0, ids.shape[1]:].tolist()
                for n in range(1, len(gen) + 1):
                    if any(s in self.tokenizer.decode(gen[:n]) for s in p.stop):
                        gen = gen[:n]
                        break
                completion = types.SimpleNamespace(token_ids=gen, text=self.tokenizer.decode(gen))
                outs.append(types.SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], outputs=[completion]))
            return outs

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    return module


def test_vllm_engine_gives_the_hf_engine_records(tmp_path, varied_model_folder, monkeypatch):
    """Same weights (base + a merged adapter), same greedy decoding: the vLLM path's Generations,
    fingerprint and provenance equal the HF engine's, stop strings and lengths included."""
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(calls))
    adapter = make_adapter(varied_model_folder, tmp_path / "adapter")
    prompts = [prompt_for(i) for i in ("Name a colour.", "Why is the sky blue?", "Say hi.", "Count to five.")]
    hf_cfg = load_config(None, [f"model.base={varied_model_folder}", "generation.batch_size=1"])
    vllm_cfg = load_config(None, [f"model.base={varied_model_folder}", "generation.backend=vllm",
                                  "generation.tensor_parallel_size=2"])

    with Generator(hf_cfg, adapters=[adapter]) as hf:
        free_run = hf.generate(prompts, Decoding(max_new_tokens=10, stop_strings=()))
        # a stop string the model does write (inside prompt 0's output), so the stop path is exercised
        stops = (free_run[0].raw_text[4:7],)
        decoding = Decoding(max_new_tokens=10, stop_strings=stops)
        expected = hf.generate(prompts, decoding)
        hf_facts = (hf.fingerprint, hf.provenance)
        eos = hf.tokenizer.eos_token_id
    with Generator(vllm_cfg, adapters=[adapter], work_dir=tmp_path / "work") as gen:
        got = gen.generate(prompts, decoding)
        assert (gen.fingerprint, gen.provenance) == hf_facts
        assert gen.stats.prompts == 4 and gen.stats.completion_tokens == sum(g.completion_tokens for g in got)
        merged = Path(calls["llm"]["model"])
        assert merged.parent == tmp_path / "work" and merged.is_dir()
    assert not merged.exists()  # the merged weights are removed on close

    assert got == expected
    assert got[0].finish_reason == "stop" and got[0].stop_string == stops[0]
    assert {g.finish_reason for g in got} >= {"stop", "length"}
    assert calls["llm"]["tensor_parallel_size"] == 2
    assert calls["params"][0] == {"max_tokens": 10, "temperature": 0.0, "top_p": 1.0, "seed": None,
                                  "stop": list(stops), "include_stop_str_in_output": True, "stop_token_ids": [eos],
                                  "skip_special_tokens": False}


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
