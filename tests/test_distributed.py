"""Scale-out on CPU: prompt sharding, and 2 real processes (gloo) against 1.

(a) shard_indices is a partition (property tests); generate_sharded deals whole length buckets.
(b) greedy generation under ``accelerate launch --config_file configs/accelerate/cpu_2proc.yaml``
    writes a file byte-identical to a 1-process run.
(c) train_sft under ``torchrun --standalone --nproc_per_node 2`` with per-process batch 2 gives the
    1-process batch-4 loss history and adapter weights (same global batch, same token-mean loss);
    the DeepSpeed/ZeRO-3 parts of train_sft that can be checked without a GPU.
(d) the dpo step under ``accelerate launch`` (2 x batch 2) against train_dpo in one process (batch 4):
    reference log-probabilities, loss history and adapter; only the parent writes the manifest.

The multi-process tests start subprocesses with OMP_NUM_THREADS=1 and the tiny random model; each
takes well under a minute on a shared 2-core machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cai_bootstrap.config import SFTConfig
from cai_bootstrap.formats import prompt_for
from cai_bootstrap.generation.distributed import generate_sharded, shard_indices, write_generations
from cai_bootstrap.generation.engine import Decoding, Engine, length_batches

ROOT = Path(__file__).resolve().parents[1]
CPU_2PROC = ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"
LAUNCH_TIMEOUT_S = 300  # generous: the machine may be shared; each run takes ~20-40 s


def launch_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    return env


def run_launcher(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=launch_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


# ------------------------------------------------------------------------------------------------
# (a) sharding


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 500), k=st.integers(1, 16))
def test_shard_indices_is_a_balanced_partition(n, k):
    shards = [shard_indices(n, k, r) for r in range(k)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n))  # covers everything, disjoint
    assert len(flat) == len(set(flat))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1  # balanced
    assert all(s == sorted(s) for s in shards)
    assert shards == [shard_indices(n, k, r) for r in range(k)]  # deterministic


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 200), min_size=1, max_size=120), k=st.integers(2, 8),
       batch=st.integers(1, 16))
def test_each_process_gets_whole_buckets_of_every_length(lengths, k, batch):
    """generate_sharded's split: whole length buckets dealt round-robin. A process re-bucketing its
    own share (as Engine.generate does) gets back exactly the buckets one process would have run,
    and the longest prompts are spread over processes instead of all going to one."""
    batches = length_batches(lengths, batch)
    for r in range(k):
        mine = sorted(i for j in shard_indices(len(batches), k, r) for i in batches[j])
        rebucketed = [[mine[i] for i in b] for b in length_batches([lengths[i] for i in mine], batch)]
        assert rebucketed == [batches[j] for j in shard_indices(len(batches), k, r)]
        if r < len(batches):  # the k longest buckets go to k different processes
            assert set(batches[r]) <= set(mine)


def test_shard_indices_rejects_bad_arguments():
    with pytest.raises(ValueError):
        shard_indices(5, 0, 0)
    with pytest.raises(ValueError):
        shard_indices(5, 2, 2)
    with pytest.raises(ValueError):
        shard_indices(-1, 2, 0)


# ------------------------------------------------------------------------------------------------
# (b) generation: 2 processes == 1 process, byte for byte


@pytest.fixture(scope="module")
def varied_model_folder(tmp_path_factory, smollm2_folder) -> Path:
    """The tiny Llama of conftest with a larger init scale (0.1): its greedy outputs differ from
    prompt to prompt (at the default 0.02 every prompt gets the same repeated token, which would
    make a byte comparison meaningless)."""
    from cai_bootstrap.models.tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-varied"), smollm2_folder, initializer_range=0.1)


INSTRUCTIONS = [
    "Name a colour.", "What is 2+2?", "Write a haiku about the sea and the wind over the hills.", "Say hi.",
    "List three fruits, please, in alphabetical order.", "Why is the sky blue?", "Translate 'cat' to French.",
    "Give one word.", "Describe a long, winding road through a forest at dusk in two sentences.", "Count to five.",
    "Explain rain.",
]


def test_generate_sharded_without_launcher_is_engine_generate(varied_model_folder):
    from cai_bootstrap.models.loading import load_model

    loaded = load_model(str(varied_model_folder), device="cpu")
    prompts = [prompt_for(i) for i in INSTRUCTIONS[:5]]
    decoding = Decoding(max_new_tokens=6)
    a = generate_sharded(Engine(loaded.model, loaded.tokenizer, batch_size=2), prompts, decoding)
    b = Engine(loaded.model, loaded.tokenizer, batch_size=2).generate(prompts, decoding)
    assert a == b


@pytest.mark.distributed
def test_two_process_greedy_generation_is_byte_identical(varied_model_folder, tmp_path):
    from cai_bootstrap.models.loading import load_model

    prompts = [prompt_for(i) for i in INSTRUCTIONS]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    batch_size, new_tokens = 3, 12  # 11 prompts -> 4 buckets (3, 3, 3, 2): 2 per process, uneven sizes

    loaded = load_model(str(varied_model_folder), device="cpu")
    one = Engine(loaded.model, loaded.tokenizer, batch_size=batch_size).generate(
        prompts, Decoding(max_new_tokens=new_tokens))
    write_generations(tmp_path / "one.jsonl", prompts, one)

    proc = run_launcher([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
                         "-m", "cai_bootstrap.generation.distributed", "--model", str(varied_model_folder),
                         "--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "two.jsonl"),
                         "--max-new-tokens", str(new_tokens), "--batch-size", str(batch_size)], tmp_path)
    summary = json.loads(proc.stderr.strip().splitlines()[-1])
    assert summary["processes"] == 2  # really two processes in one group, not two lone copies
    assert summary["prompts"] == len(prompts) and summary["batches"] == 4

    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    texts = [json.loads(line)["raw_text"] for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert len(set(texts)) >= len(texts) - 2  # the outputs really differ per prompt


# ------------------------------------------------------------------------------------------------
# (c) SFT: 2 processes x batch 2 == 1 process x batch 4

WORDS = "the cat sat on a warm mat while rain fell softly over quiet green hills and old stone walls".split()


def sft_examples(n: int = 16) -> list[dict]:
    out = []
    for i in range(n):
        length = 20 if i % 4 == 0 else 1 + i % 3  # very different lengths: the token-mean matters
        response = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(length))
        out.append({"id": f"ex{i}", "prompt": prompt_for(f"Write item {i} about {WORDS[i % len(WORDS)]}."),
                    "response": response})
    return out


def sft_cfg(batch_size: int) -> dict:
    # fp32 pinned: the comparisons below are at fp32 tolerances, and `auto` is bf16 on some CPUs
    return dict(lora=dict(r=4, alpha=8, dropout=0.0, target_modules="all-linear"), learning_rate=1e-2, epochs=1,
                batch_size=batch_size, gradient_accumulation_steps=1, warmup_ratio=0.0, max_length=128,
                eval_share=0.0, max_drop_share=0.0, save_steps=1000, logging_steps=1, mixed_precision="no")


@pytest.mark.distributed
def test_two_process_sft_matches_one_process(tiny_model_folder, tmp_path):
    from safetensors.torch import load_file

    from cai_bootstrap.training.sft import train_sft

    examples = sft_examples()
    one = train_sft(str(tiny_model_folder), examples, SFTConfig.model_validate(sft_cfg(4)),
                    out_dir=tmp_path / "one", seed=0, progress=False).metrics

    spec = {"model": str(tiny_model_folder), "examples": examples, "cfg": sft_cfg(2), "seed": 0,
            "out_dir": str(tmp_path / "two")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run_launcher([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  str(ROOT / "tests" / "_dist_sft_driver.py"), str(tmp_path / "spec.json")], tmp_path)
    two = json.loads((tmp_path / "two" / "training.json").read_text())

    assert two["hyperparameters"]["num_processes"] == 2 and one["hyperparameters"]["num_processes"] == 1
    assert two["hyperparameters"]["global_batch_size"] == one["hyperparameters"]["global_batch_size"] == 4
    assert [h["step"] for h in two["history"]] == [h["step"] for h in one["history"]] == [1, 2, 3, 4]
    for a, b in zip(one["history"], two["history"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a["loss"], b["loss"])
        assert a["lr"] == b["lr"]
    assert one["tokens"] == two["tokens"]  # every supervised token seen once, whatever the split
    assert one["base_fingerprint"] == two["base_fingerprint"]  # the main process's, broadcast
    assert one["history"][-1]["loss"] < one["history"][0]["loss"]

    w1 = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=0, atol=1e-4), (k, (w1[k] - w2[k]).abs().max().item())
    assert any(w1[k].abs().max() > 1e-3 for k in w1 if "lora_B" in k)  # the adapter did train


def test_fsdp_cpu_ram_efficient_loading_gives_every_process_the_real_weights(tiny_model_folder, tmp_path):
    """configs/accelerate/fsdp.yaml sets fsdp_cpu_ram_efficient_loading; transformers could then leave
    the weights of processes other than 0 on the meta device, and load_model's ``.to(device)`` and
    fingerprint would fail there. With the pinned transformers every process loads the real weights."""
    from cai_bootstrap.models.loading import fingerprint, load_model

    env = {**launch_env(), "ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "_fsdp_load_driver.py"), str(tiny_model_folder), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    expected = fingerprint(load_model(str(tiny_model_folder)).model)
    assert ranks == [{"fsdp_loading": True, "devices": ["cpu"], "fingerprint": expected}] * 2


def test_sft_fingerprint_gathered_one_weight_at_a_time_is_the_fingerprint(tiny_model_folder):
    """The ZeRO-3 path of train_sft's base fingerprint (each weight hashed inside its own gather)
    gives the plain fingerprint, so the value does not depend on the backend."""
    import contextlib

    from cai_bootstrap.models.loading import fingerprint, load_model

    model = load_model(str(tiny_model_folder), device="cpu").model
    seen = []

    def gather(t):
        seen.append(t)
        return contextlib.nullcontext()

    assert fingerprint(model, gather=gather) == fingerprint(model)
    assert len(seen) == len(model.state_dict())


def _deepspeed_worker_plugin():
    """The DeepSpeedPlugin a worker builds from configs/accelerate/deepspeed_zero3.yaml's environment."""
    from unittest import mock

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    config = ROOT / "configs" / "accelerate" / "deepspeed_zero3.yaml"
    args, defaults, mp_from_config = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(config), "script.py"]))
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    with mock.patch.dict(os.environ, env, clear=True):
        return DeepSpeedPlugin()


def test_sft_fills_the_deepspeed_values_accelerate_takes_from_a_dataloader():
    """train_sft prepares no DataLoader: without a micro-batch size accelerate.prepare refuses a
    DeepSpeed model, and "auto" clipping becomes sft.max_grad_norm (what the loop clips to elsewhere)."""
    from types import SimpleNamespace

    from cai_bootstrap.training.sft import _configure_deepspeed

    plugin = _deepspeed_worker_plugin()
    assert plugin.is_auto("train_micro_batch_size_per_gpu")  # what accelerate's _prepare_deepspeed checks
    fake = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
    _configure_deepspeed(fake, SFTConfig(batch_size=3))
    assert not plugin.is_auto("train_micro_batch_size_per_gpu")
    assert plugin.get_value("train_micro_batch_size_per_gpu") == 3
    assert plugin.get_value("gradient_clipping") == 1.0  # the default sft.max_grad_norm
    unclipped = _deepspeed_worker_plugin()
    _configure_deepspeed(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=unclipped)),
                         SFTConfig(max_grad_norm=None))
    assert unclipped.get_value("gradient_clipping") == 0.0
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        _configure_deepspeed(fake, SFTConfig(gradient_accumulation_steps=2))
    _configure_deepspeed(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)),
                         SFTConfig(gradient_accumulation_steps=2))  # DDP/FSDP/CPU: accumulation is fine


def test_sft_step_refuses_accumulation_under_deepspeed_before_launching(tmp_path, tiny_model_folder):
    from cai_bootstrap.config import load_config
    from cai_bootstrap.files import write_jsonl
    from cai_bootstrap.run import Run, StepFailed
    from cai_bootstrap.schemas import GeneratorProvenance, SFTRecord
    from cai_bootstrap.steps.sft import run_sft

    run = Run(tmp_path, load_config(None, [f"model.base={tiny_model_folder}", "sft.gradient_accumulation_steps=2"]))
    gen = GeneratorProvenance(model="tiny", quantization="none", quantization_requested="none",
                              full_precision_fallback=False, dtype="float32", add_bos_token=False, decoding={}, seed=0)
    write_jsonl(run.path("data/sft.jsonl"), [SFTRecord(
        id="s0", instruction="Say hi.", category="qa", prompt="Instruction: Say hi.\nResponse:", response="Hi.",
        generator=gen, finish_reason="stop", stop_string="\nEND")])
    with pytest.raises(StepFailed, match="gradient_accumulation_steps is 2"):
        run_sft(run, accelerate_config=ROOT / "configs" / "accelerate" / "deepspeed_zero3.yaml")
    assert "sft" not in run.steps()


# ------------------------------------------------------------------------------------------------
# (d) DPO: 2 processes x batch 2 == 1 process x batch 4; the step under the launcher

FACTS = [("What is the capital of France?", "Paris."), ("What is 2 + 2?", "4."), ("Name a primary colour.", "Red."),
         ("What is the largest planet?", "Jupiter."), ("What do bees make?", "Honey."),
         ("What is frozen water called?", "Ice."), ("How many legs does a spider have?", "Eight."),
         ("Which animal says moo?", "A cow.")]


def dpo_pairs():
    from cai_bootstrap.schemas import PreferencePair

    return [PreferencePair(id=f"p{i}", instruction_id=f"i{i}", category="qa", prompt=f"Instruction: {q}\nResponse:",
                           chosen=f" {a}\nEND", rejected=f" Well, that is a big question about {q.split()[-1].lower()}",
                           negative_type="verbose_vague", chosen_source="sft_model")
            for i, (q, a) in enumerate(FACTS)]


def dpo_cfg(batch_size: int) -> dict:
    # fp32 pinned, as sft_cfg
    return dict(batch_size=batch_size, max_steps=2, logging_steps=1, learning_rate=1e-2, max_length=128,
                warmup_ratio=0.0, lora={"r": 4, "alpha": 8, "dropout": 0.0}, mixed_precision="no")


@pytest.mark.distributed
def test_dpo_step_on_two_processes_matches_one_process_and_the_parent_records_it(tiny_model_folder, tmp_path,
                                                                                  monkeypatch):
    """`dpo --init base` under `accelerate launch` (2 processes x 2 pairs) against train_dpo in this
    process (1 x 4 pairs), the same global batch: the same reference log-probabilities (gathered in
    input order), loss history and adapter. The workers read the manifest and never write it; the
    parent records the step from training.json in its two usual writes. The process count then
    joins the parity check of the other DPO run."""
    from safetensors.torch import load_file

    from cai_bootstrap.config import DPOConfig, load_config
    from cai_bootstrap.files import write_jsonl
    from cai_bootstrap.run import Run
    from cai_bootstrap.steps import dpo as dpo_step
    from cai_bootstrap.training.dpo import ParityError, train_dpo

    pairs = dpo_pairs()
    overrides = [f"model.base={tiny_model_folder}", "dpo.lora.r=4", "dpo.lora.alpha=8", "dpo.lora.dropout=0"]
    run = Run(tmp_path / "run", load_config(None, overrides + [f"dpo.{k}={v}" for k, v in dpo_cfg(2).items()
                                                               if k != "lora"]))
    write_jsonl(run.path("data/pairs.jsonl"), pairs)
    saves, launched = [], []
    real_save, real_launch = Run._save, dpo_step.launch
    monkeypatch.setattr(Run, "_save", lambda self: (saves.append(self.manifest["steps"]["dpo_only"]["status"]),
                                                    real_save(self)))

    def launch(*args, **kwargs):
        before = run.manifest_path.read_bytes()
        real_launch(*args, **kwargs)
        launched.append(run.manifest_path.read_bytes() == before)

    monkeypatch.setattr(dpo_step, "launch", launch)
    assert dpo_step.run_dpo(run, "base", accelerate_config=CPU_2PROC)
    monkeypatch.setattr(Run, "_save", real_save)
    assert launched == [True]  # launched once; the manifest did not change while the workers ran
    assert saves == ["running", "done"]

    step = json.loads(run.manifest_path.read_text())["steps"]["dpo_only"]
    two = json.loads(run.path("models/dpo_only/training.json").read_text())
    assert step["status"] == "done" and step["counts"]["kept"] == len(pairs)
    assert step["provenance"]["launcher"] == {"accelerate_config": str(CPU_2PROC)}
    assert step["provenance"]["num_processes"] == step["metrics"]["num_processes"] == two["num_processes"] == 2
    assert step["provenance"]["trainer_args"] == two["trainer_args"]
    assert step["metrics"]["mixed_precision"] == two["mixed_precision"]["used"] \
        == ("bf16" if two["trainer_args"]["bf16"] else "no")
    assert step["metrics"]["loss_history"] == [h["loss"] for h in two["history"]]

    train_dpo("base", str(tiny_model_folder), pairs, DPOConfig.model_validate(dpo_cfg(4)), out_dir=tmp_path / "one",
              seed=0, cache_dir=tmp_path / "cache-one")
    one = json.loads((tmp_path / "one" / "training.json").read_text())
    assert one["num_processes"] == 1
    assert one["ref_cache_hit"] is two["ref_cache_hit"] is False
    caches = [tmp_path / "cache-one", run.path("cache/ref_logps")]
    ref = [torch.load(next(d.glob("ref-*.pt")), weights_only=True) for d in caches]
    assert [sorted(p.name for p in d.iterdir()) for d in caches] == [[f"ref-{r['key']}.pt"] for r in ref]
    assert ref[0]["ids"] == ref[1]["ids"] == [p.id for p in pairs]
    for k in ("ref_chosen_logps", "ref_rejected_logps"):
        assert torch.allclose(ref[0][k], ref[1][k], rtol=0, atol=1e-4), k  # sums ~ -130: float32 ulp 1.5e-5

    assert [h["step"] for h in one["history"]] == [h["step"] for h in two["history"]] == [1, 2]
    for a, b in zip(one["history"], two["history"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["loss"], b["loss"])
        if a["step"] == 1:  # policy == reference: every reward is rounding noise, its sign (accuracy) too
            assert abs(a["rewards/margins"]) < 1e-5 and abs(b["rewards/margins"]) < 1e-5
        else:
            assert a["rewards/accuracies"] == b["rewards/accuracies"]
    assert one["history"][-1]["loss"] < one["history"][0]["loss"]  # it trained

    w1 = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    w2 = load_file(str(run.path("models/dpo_only/adapter_model.safetensors")))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=0, atol=1e-4), (k, (w1[k] - w2[k]).abs().max().item())
    assert sorted(p.name for p in run.path("models/dpo_only").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one").iterdir())

    # the other DPO run in one process would train on half the global batch: refused before loading
    run.path("models/sft").mkdir(parents=True)
    run.path("models/sft/adapter_config.json").write_text("{}")
    with pytest.raises(ParityError, match="num_processes: 2 != 1"):
        dpo_step.run_dpo(run, "sft")


@pytest.mark.distributed
def test_a_launched_workers_error_reaches_the_parent(tiny_model_folder, tmp_path, monkeypatch):
    """Launched DPO on a pairs file with a bad record: the parent raises StepFailed with the workers'
    error (file, line, field, each distinct error once with its ranks), not the launcher's exit status,
    and the manifest records it. The launcher stops the other workers when one fails, so the ranks
    that report vary from run to run."""
    from cai_bootstrap.config import load_config
    from cai_bootstrap.files import write_jsonl
    from cai_bootstrap.run import Run, StepFailed
    from cai_bootstrap.steps import dpo as dpo_step

    for k, v in launch_env().items():
        monkeypatch.setenv(k, v)
    run = Run(tmp_path / "run", load_config(None, [f"model.base={tiny_model_folder}"]))
    path = write_jsonl(run.path("data/pairs.jsonl"), dpo_pairs())
    lines = path.read_text(encoding="utf-8").splitlines()
    broken = json.loads(lines[1])
    broken["negative_type"] = "sarcasm"
    path.write_text("\n".join([lines[0], json.dumps(broken), *lines[2:]]) + "\n", encoding="utf-8")
    (run.dir / ".worker-errors").mkdir()
    (run.dir / ".worker-errors" / "dpo-base.5.json").write_text('{"stale": true}')  # an earlier launch's

    with pytest.raises(StepFailed) as failed:
        dpo_step.run_dpo(run, "base", accelerate_config=CPU_2PROC)
    message = str(failed.value)
    assert message.startswith("dpo-base failed under accelerate launch (exit status ")
    # one line for the error, whichever ranks wrote it before the launcher stopped the others
    lines = re.findall(r"\n  process ([0-9, ]+): (\w+): ", message)
    assert len(lines) == 1 and lines[0][1] == "ArtifactError" and set(lines[0][0].split(", ")) <= {"0", "1"}
    assert "pairs.jsonl:2: negative_type" in message and "stale" not in message
    step = json.loads(run.manifest_path.read_text())["steps"]["dpo_only"]
    assert step["status"] == "failed" and "pairs.jsonl:2: negative_type" in json.dumps(step)


def test_launch_failure_without_reports_points_at_the_processes_output(tmp_path):
    from cai_bootstrap.launching import launch_failure

    assert launch_failure(tmp_path, "sft", "sft", 137) == (
        "sft failed under accelerate launch (exit status 137) before any process reported an error; "
        "their output is above")
