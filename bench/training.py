"""Training throughput: plain TRL trainers vs ours (``train_sft``, ``train_dpo``), in one process.

Both sides of each benchmark use the same model (loaded fresh per run), the same data (built here,
deterministically), the same LoRA (r=16, alpha 32, all-linear), batch size, max_length, learning
rate, cosine schedule with warmup, seed and number of optimizer steps. The data is exactly
``--steps x --batch-size`` examples (pairs), so each run is one epoch over the same set: both sides
train on exactly the same examples, in their own order.

SFT: TRL ``SFTTrainer`` on a prompt/completion dataset (completion-only loss; TRL appends EOS) vs
``train_sft``. Throughput = supervised tokens (response + END + EOS, summed over the epoch) / wall
time of the training loop only (TRL: ``on_train_begin`` -> ``on_train_end``; ours: the loop timer
of ``train_sft``); model load, tokenization and saving excluded. Matched settings where TRL's
defaults differ from ours: the same autocast on both sides (``--mixed-precision``; auto is bf16 only
where the device computes it natively, where TRL defaults to bf16 everywhere), no activation
checkpointing (TRL defaults to it), gradient clipping at ``sft.max_grad_norm`` (1.0) on both,
``logging_steps=1`` on both.

DPO: TRL ``DPOTrainer`` with TRL's default ``precompute_ref_log_probs=False`` (a reference forward,
adapter disabled, inside every step) vs ``train_dpo`` (reference log-probs precomputed before the
loop, cached on disk): cold (empty cache: precomputed) and warm (cache hit: loaded). Everything
else is ``trainer_arguments`` (ours) for both. Two throughputs: pairs / loop time, and pairs / (loop
+ reference precompute or cache load), the fair one, since TRL's reference cost is inside its loop.

Peak RSS: the process's resident set, sampled every 10 ms by a thread from the start of a run's
model load to the end of the run (one process, so it includes the interpreter, libraries and
whatever earlier runs left to the allocator; the "+MB" column is the rise over the RSS at the start
of that run). On CUDA, peak allocated GPU memory is shown too.

    .venv/bin/python bench/training.py [--model smollm2-135m|tiny|PATH] [--steps 8] [--batch-size 8]
        [--max-length 256] [--repeats 3] [--only sft|dpo|all] [--threads N] [--mixed-precision auto|no|bf16]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from cai_bootstrap.config import DPOConfig, SFTConfig
from cai_bootstrap.data.pool import builtin_pool
from cai_bootstrap.data.sampling import stratified_sample
from cai_bootstrap.formats import completion_for, prompt_for
from cai_bootstrap.models.loading import default_device, load_model, load_tokenizer, resolve
from cai_bootstrap.models.precision import resolve_mixed_precision
from cai_bootstrap.schemas import PreferencePair
from cai_bootstrap.training import dpo as dpo_mod
from cai_bootstrap.training.masking import encode_dataset
from cai_bootstrap.training.sft import train_sft

SEED = 0

# --------------------------------------------------------------------------------------------
# data


FILLERS = (
    "It is a short and clear answer.",
    "The main point comes first.",
    "Each sentence stays on the topic of the request.",
    "Details are added only where they help the reader.",
    "Nothing else needs to be said here.",
    "This keeps the reply easy to check.",
)
RAMBLE = (
    "well, it depends on a lot of things, really",
    "and there are many other points one could make about this",
    "as I was saying before, it is hard to be sure",
    "some people would say otherwise, of course",
    "anyway, let me go on a little longer about it",
    "which brings me to another thing entirely",
)


def _sample(n: int) -> list[Any]:
    """n instructions of the built-in pool, stratified; cycled (with new ids) if n exceeds the pool."""
    pool = builtin_pool()
    items = stratified_sample(pool, min(n, len(pool)), SEED, "bench-training")
    return [(f"{items[i % len(items)].id}#{i // len(items)}", items[i % len(items)]) for i in range(n)]


def _response(item: Any) -> str:
    rng = random.Random(f"bench-response:{item.id}")
    head = (f"The answer is {item.reference_answers[0]}." if item.reference_answers
            else f"Here is a response to this {item.category} request.")
    return " ".join([head, *rng.sample(FILLERS, k=rng.randint(1, 4))])


def sft_examples(n: int) -> list[dict[str, str]]:
    return [{"id": rid, "prompt": prompt_for(it.instruction), "response": _response(it)} for rid, it in _sample(n)]


def preference_pairs(n: int) -> list[PreferencePair]:
    out = []
    for rid, it in _sample(n):
        rng = random.Random(f"bench-rejected:{rid}")
        rambling = " " + ", ".join(["Well, " + _response(it).lower().rstrip(".")]
                                   + rng.sample(RAMBLE, k=rng.randint(2, 5))) + ", and"  # no END: runs on
        out.append(PreferencePair(
            id=rid, instruction_id=it.id, category=it.category, prompt=prompt_for(it.instruction),
            chosen=completion_for(_response(it)), rejected=rambling, negative_type="verbose_vague",
            chosen_source="sft_data",
        ))
    return out


# --------------------------------------------------------------------------------------------
# measuring


class PeakRSS:
    """Samples the process RSS every ``interval`` s in a thread (torch releases the GIL in its ops)."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.proc = interval, psutil.Process()
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.proc.memory_info().rss
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.gpu_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _loop_timer():
    """A TrainerCallback timing the training loop (on_train_begin -> on_train_end)."""
    from transformers import TrainerCallback

    class LoopTimer(TrainerCallback):
        begin = end = None

        def on_train_begin(self, args, state, control, **kwargs):
            _sync()
            self.begin = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            _sync()
            self.end = time.perf_counter()

        @property
        def seconds(self) -> float:
            return self.end - self.begin

    return LoopTimer()


@dataclass
class Run:
    loop_s: float  # the training loop only
    ref_s: float  # reference log-prob precompute or cache load before the loop (DPO; 0 otherwise)
    wall_s: float  # the whole call: model load, data preparation, loop, saving
    steps: int
    last_loss: float | None
    mean_loss: float | None
    rss_peak: int
    rss_start: int
    gpu_peak: int | None
    extra: dict[str, Any] = field(default_factory=dict)


def _free() -> None:
    """Between runs: collect garbage, and forget accelerate's process-wide state, so that no run inherits
    the previous one's mixed precision (``train_sft``'s ``Accelerator()`` passes none and would keep a
    bf16 state left by a DPO trainer; TrainingArguments resets it the same way)."""
    from accelerate.state import AcceleratorState

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    AcceleratorState._reset_state(reset_partial_state=True)


def _measure(fn: Callable[[], dict[str, Any]]) -> Run:
    _free()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
    _free()
    return Run(wall_s=wall, rss_peak=rss.peak, rss_start=rss.start, gpu_peak=rss.gpu_peak, **out)


def _history(log_history: list[dict[str, Any]], key: str) -> list[float]:
    return [float(e[key]) for e in log_history if key in e and "train_runtime" not in e]


def _drop_printer(trainer) -> None:
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # prints every log dict when tqdm is off


# --------------------------------------------------------------------------------------------
# SFT


def sft_config(args) -> SFTConfig:
    return SFTConfig(max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                     eval_share=0.0, save_steps=10**9, logging_steps=1, max_drop_share=0.0,
                     mixed_precision=args.mixed_precision)


def trl_sft_arguments(cfg: SFTConfig, out_dir: Path) -> dict[str, Any]:
    return {
        "output_dir": str(out_dir), "seed": SEED, "data_seed": SEED,
        "max_length": cfg.max_length, "completion_only_loss": True, "packing": False, "padding_free": False,
        "learning_rate": cfg.learning_rate, "lr_scheduler_type": "cosine", "warmup_steps": cfg.warmup_ratio,
        "weight_decay": cfg.weight_decay, "optim": "adamw_torch",
        "max_grad_norm": cfg.max_grad_norm or 0.0,  # as train_sft clips
        "max_steps": cfg.max_steps, "per_device_train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "activation_checkpointing": False,  # TRL's default is on; ours never checkpoints
        "bf16": resolve_mixed_precision(cfg.mixed_precision, default_device())[0] == "bf16",
        "fp16": False,  # the same autocast as train_sft (TRL's default is bf16 wherever it runs)
        "use_cpu": not torch.cuda.is_available(),
        "logging_strategy": "steps", "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no",
        "report_to": "none", "disable_tqdm": True, "dataloader_num_workers": 0,
    }


def run_trl_sft(model: str, examples: list[dict], cfg: SFTConfig, out_dir: Path, check: dict) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    loaded = load_model(model, trainable=True)
    tok = AutoTokenizer.from_pretrained(loaded.resolved.path)  # plain, as a TRL user would
    data = Dataset.from_list([{"prompt": e["prompt"], "completion": completion_for(e["response"])} for e in examples])
    lora = cfg.lora
    timer = _loop_timer()
    with dpo_mod._quiet():
        trainer = SFTTrainer(
            model=loaded.model, args=TRLSFTConfig(**trl_sft_arguments(cfg, out_dir)), train_dataset=data,
            processing_class=tok, callbacks=[timer],
            peft_config=LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                   target_modules=lora.target_modules, task_type="CAUSAL_LM"),
        )
        _drop_printer(trainer)
        prepared = trainer.train_dataset
        check["trl_rows"] = [(list(r["input_ids"]), list(r["labels"])) for r in prepared]
        output = trainer.train()
    losses = _history(trainer.state.log_history, "loss")
    out = {"loop_s": timer.seconds, "ref_s": 0.0, "steps": int(trainer.state.global_step),
           "last_loss": losses[-1] if losses else None, "mean_loss": float(output.training_loss)}
    trainer.model = trainer.model_wrapped = None
    del trainer, loaded
    return out


def run_our_sft(model: str, examples: list[dict], cfg: SFTConfig, out_dir: Path) -> dict[str, Any]:
    m = train_sft(model, examples, cfg, out_dir=out_dir, seed=SEED, progress=False).metrics
    losses = [h["loss"] for h in m["history"]]
    loop_s = m["tokens"]["supervised_tokens"] / m["supervised_tokens_per_s"]  # train_sft's loop timer
    steps = [h["step"] for h in m["history"]]  # logging_steps=1: one entry per optimizer step done
    if steps != list(range(1, len(steps) + 1)):
        raise SystemExit(f"train_sft logged steps {steps}; expected one entry per step")
    return {"loop_s": loop_s, "ref_s": 0.0, "steps": len(steps),
            "last_loss": losses[-1] if losses else None, "mean_loss": statistics.fmean(losses) if losses else None,
            "extra": {"supervised_tokens": m["tokens"]["supervised_tokens"], "tokens": m["tokens"]["tokens"]}}


def bench_sft(args, tmp: Path) -> None:
    cfg = sft_config(args)
    n = args.steps * args.batch_size
    examples = sft_examples(n)
    tok = load_tokenizer(resolve(args.model).path)
    encoded, drops = encode_dataset(tok, examples, max_length=cfg.max_length, max_drop_share=0.0)
    sup = sum(e.n_supervised_tokens for e in encoded)
    tokens = sum(len(e.input_ids) for e in encoded)

    runs: dict[str, list[Run]] = {"TRL SFTTrainer": [], "ours train_sft": []}
    check: dict[str, Any] = {}
    for rep in range(args.repeats):
        order = list(runs) if rep % 2 == 0 else list(reversed(runs))  # alternate who goes first
        for name in order:
            out_dir = tmp / f"sft-{name.split()[0]}-{rep}"
            if name.startswith("TRL"):
                run = _measure(lambda: run_trl_sft(args.model, examples, cfg, out_dir, check))
            else:
                run = _measure(lambda: run_our_sft(args.model, examples, cfg, out_dir))
                got = (run.extra["supervised_tokens"], run.extra["tokens"])
                if got != (sup, tokens):
                    raise SystemExit(f"train_sft processed {got} (supervised, total) tokens, expected {(sup, tokens)}")
            if run.steps != args.steps:
                raise SystemExit(f"{name} did {run.steps} optimizer steps, expected {args.steps}")
            runs[name].append(run)

    trl_rows = check["trl_rows"]
    ours_rows = [(e.input_ids, e.labels) for e in encoded]
    trl_sup = sum(sum(1 for x in labels[1:] if x != -100) for _, labels in trl_rows)
    trl_tokens = sum(len(ids) for ids, _ in trl_rows)
    same = sorted(map(repr, trl_rows)) == sorted(map(repr, ours_rows))

    print(f"\nSFT: {args.steps} optimizer steps x batch {args.batch_size} = {n} examples, one epoch on each side; "
          f"max_length {cfg.max_length}; LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} dropout={cfg.lora.dropout} "
          f"{cfg.lora.target_modules}; lr {cfg.learning_rate:g} cosine, warmup {cfg.warmup_ratio:g}; "
          f"autocast {resolve_mixed_precision(cfg.mixed_precision, default_device())[0]}; "
          f"median of {args.repeats}")
    print(f"data: {len(encoded)} kept of {n} (dropped {drops or 0}); {tokens} non-pad tokens, {sup} supervised "
          f"(response+END+EOS); TRL's tokenization: {trl_tokens} tokens, {trl_sup} supervised, "
          f"identical ids and labels to ours: {'yes' if same else 'NO'}")
    sup_of = {"TRL SFTTrainer": trl_sup, "ours train_sft": sup}
    tok_of = {"TRL SFTTrainer": trl_tokens, "ours train_sft": tokens}
    rate = {k: [sup_of[k] / r.loop_s for r in v] for k, v in runs.items()}
    total_rate = {k: [tok_of[k] / r.loop_s for r in v] for k, v in runs.items()}
    _table(
        runs, rate, "sup tok/s",
        extra_cols={"tok/s": lambda k, v: f"{statistics.median(total_rate[k]):.1f}"},
    )
    med = {k: statistics.median(v) for k, v in rate.items()}
    print(f"ratio ours / TRL (supervised tokens/s): {med['ours train_sft'] / med['TRL SFTTrainer']:.2f}x")


# --------------------------------------------------------------------------------------------
# DPO


def dpo_config(args) -> DPOConfig:
    return DPOConfig(max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, logging_steps=1,
                     mixed_precision=args.mixed_precision)


def _timed(cls, timer, ref_time: list[float]):
    """``cls`` with the loop timer attached and its reference precompute (or cache load) timed."""

    class Timed(cls):
        def __init__(self, *a, **kw):
            kw["callbacks"] = [*(kw.get("callbacks") or []), timer]
            super().__init__(*a, **kw)

        def _precompute_ref_logps(self, *a, **kw):
            _sync()
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **kw)
            _sync()
            ref_time.append(time.perf_counter() - t0)
            return out

    return Timed


def run_trl_dpo(model: str, pairs: list[PreferencePair], cfg: DPOConfig, out_dir: Path) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    targs = {**dpo_mod.trainer_arguments(cfg, out_dir=out_dir, seed=SEED),
             "precompute_ref_log_probs": False, "disable_tqdm": True}  # TRL's default: reference inside each step
    loaded = load_model(model, trainable=False)
    loaded.model.train()
    data = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])
    timer, ref_time = _loop_timer(), []
    with dpo_mod._quiet():
        trainer = _timed(DPOTrainer, timer, ref_time)(
            model=loaded.model, args=TRLDPOConfig(**targs), train_dataset=data, processing_class=loaded.tokenizer,
            peft_config=LoraConfig(**dpo_mod.lora_arguments(cfg)),
        )
        _drop_printer(trainer)
        n_rows = len(trainer.train_dataset)
        output = trainer.train()
    log = trainer.state.log_history
    losses, acc = _history(log, "loss"), _history(log, "rewards/accuracies")
    out = {"loop_s": timer.seconds, "ref_s": sum(ref_time), "steps": int(trainer.state.global_step),
           "last_loss": losses[-1] if losses else None, "mean_loss": float(output.training_loss),
           "extra": {"pairs": n_rows, "accuracy": acc[-1] if acc else None, "ref_cache_hit": None}}
    trainer.model = trainer.model_wrapped = None
    del trainer, loaded
    return out


def run_our_dpo(model: str, pairs: list[PreferencePair], cfg: DPOConfig, out_dir: Path, cache: Path) -> dict[str, Any]:
    timer, ref_time = _loop_timer(), []
    original = dpo_mod._trainer_class
    dpo_mod._trainer_class = lambda: _timed(original(), timer, ref_time)  # timing only; behaviour unchanged
    try:
        result = dpo_mod.train_dpo("base", model, pairs, cfg, out_dir=out_dir, seed=SEED, cache_dir=cache)
    finally:
        dpo_mod._trainer_class = original
    m = result.metrics
    rec = json.loads((out_dir / dpo_mod.TRAINING_JSON).read_text(encoding="utf-8"))
    losses = [h["loss"] for h in rec["history"]]
    return {"loop_s": timer.seconds, "ref_s": sum(ref_time), "steps": m["steps"],
            "last_loss": losses[-1] if losses else None, "mean_loss": m["train_loss"],
            "extra": {"pairs": m["pairs_used"], "accuracy": m["final_reward_accuracy"],
                      "ref_cache_hit": m["ref_cache_hit"], "ref_forward_batches": m["ref_forward_batches"]}}


def bench_dpo(args, tmp: Path) -> None:
    cfg = dpo_config(args)
    n = args.steps * args.batch_size
    pairs = preference_pairs(n)
    names = ("TRL DPOTrainer", "ours cold", "ours warm")
    runs: dict[str, list[Run]] = {k: [] for k in names}
    for rep in range(args.repeats):
        cache = tmp / f"ref-cache-{rep}"  # empty: the cold run fills it, the warm run hits it
        order = names if rep % 2 == 0 else (names[1], names[2], names[0])
        for name in order:
            out_dir = tmp / f"dpo-{name.replace(' ', '-')}-{rep}"
            if name.startswith("TRL"):
                run = _measure(lambda: run_trl_dpo(args.model, pairs, cfg, out_dir))
            else:
                run = _measure(lambda: run_our_dpo(args.model, pairs, cfg, out_dir, cache))
                want_hit = name == "ours warm"
                if run.extra["ref_cache_hit"] is not want_hit:
                    raise SystemExit(f"{name}: reference cache hit = {run.extra['ref_cache_hit']}, expected {want_hit}")
            if run.steps != args.steps or run.extra["pairs"] != n:
                raise SystemExit(f"{name} did {run.steps} steps on {run.extra['pairs']} pairs, "
                                 f"expected {args.steps} on {n}")
            runs[name].append(run)

    print(f"\nDPO: {args.steps} optimizer steps x batch {args.batch_size} = {n} pairs, one epoch on each side; "
          f"beta {cfg.beta} {cfg.loss_type}; max_length {cfg.max_length}; LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} "
          f"{cfg.lora.target_modules}; lr {cfg.learning_rate:g} cosine, warmup {cfg.warmup_ratio:g}; "
          f"median of {args.repeats}")
    print("TRL: reference forward (adapter disabled) inside every step; ours cold: reference log-probs "
          "precomputed before the loop (cache empty); ours warm: loaded from the on-disk cache")
    rate = {k: [n / (r.loop_s + r.ref_s) for r in v] for k, v in runs.items()}
    loop_rate = {k: [n / r.loop_s for r in v] for k, v in runs.items()}
    _table(
        runs, rate, "pairs/s",
        extra_cols={
            "loop pairs/s": lambda k, v: f"{statistics.median(loop_rate[k]):.2f}",
            "ref s": lambda k, v: f"{statistics.median(r.ref_s for r in v):.2f}",
            "acc": lambda k, v: _fmt(v[-1].extra["accuracy"], ".3f"),
        },
        fmt=".2f",
    )
    med = {k: statistics.median(v) for k, v in rate.items()}
    loop_med = {k: statistics.median(v) for k, v in loop_rate.items()}
    print("pairs/s = pairs / (loop + reference precompute or cache load); loop pairs/s = pairs / loop only")
    for k in names[1:]:
        print(f"ratio {k} / TRL: {med[k] / med[names[0]]:.2f}x (loop only: {loop_med[k] / loop_med[names[0]]:.2f}x)")


# --------------------------------------------------------------------------------------------
# output


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _table(runs: dict[str, list[Run]], rate: dict[str, list[float]], unit: str,
           extra_cols: dict[str, Callable[[str, list[Run]], str]], fmt: str = ".1f") -> None:
    gpu = torch.cuda.is_available()
    cols = [unit, *extra_cols, "runs", "loop s", "wall s", "peak RSS MB", "+MB",
            *(["peak GPU MB"] if gpu else []), "steps", "last loss", "mean loss"]
    rows = []
    for k, v in runs.items():
        mb = 1 << 20
        rows.append([
            k, format(statistics.median(rate[k]), fmt), *(f(k, v) for f in extra_cols.values()),
            ", ".join(format(x, fmt) for x in rate[k]),
            f"{statistics.median(r.loop_s for r in v):.2f}", f"{statistics.median(r.wall_s for r in v):.2f}",
            f"{max(r.rss_peak for r in v) / mb:.0f}", f"{max(r.rss_peak - r.rss_start for r in v) / mb:.0f}",
            *([f"{max(r.gpu_peak for r in v) / mb:.0f}"] if gpu else []),
            ",".join(sorted({str(r.steps) for r in v})),
            _fmt(statistics.median(r.last_loss for r in v) if all(r.last_loss is not None for r in v) else None, ".4f"),
            _fmt(statistics.median(r.mean_loss for r in v) if all(r.mean_loss is not None for r in v) else None, ".4f"),
        ])
    header = ["run", *cols]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def machine_line(args) -> str:
    import accelerate
    import peft
    import transformers
    import trl

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return (f"machine: {platform.machine()}, {os.cpu_count()} logical cores "
            f"({psutil.cpu_count(logical=False)} physical), {torch.get_num_threads()} torch threads, device {dev}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
            f"peft {peft.__version__}, accelerate {accelerate.__version__}; model {args.model} (fp32 weights); "
            f"autocast on both sides: {' / '.join(resolve_mixed_precision(args.mixed_precision, default_device()))}")


def tiny_model(folder: Path) -> str:
    """The tests' 2-layer, hidden-64 random Llama with the real SmolLM2 tokenizer (for smoke runs)."""
    from cai_bootstrap.models.tiny import save_tiny_llama

    return str(save_tiny_llama(folder, resolve("smollm2-135m").path))


def _quiet_libraries() -> None:
    """No progress bars or advisory warnings in the tables' way (what is measured is unaffected)."""
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="embedded name, local folder, hub id, or 'tiny'")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=("sft", "dpo", "all"), default="all")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--mixed-precision", choices=("auto", "no", "bf16"), default="auto",
                    help="training autocast, the same on both sides (auto: bf16 where native, see models/precision.py)")
    args = ap.parse_args()
    _quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        tmp = Path(tmp)
        if args.model == "tiny":
            args.model = tiny_model(tmp / "tiny-llama")
        print(machine_line(args))
        if args.only in ("sft", "all"):
            bench_sft(args, tmp)
        if args.only in ("dpo", "all"):
            bench_dpo(args, tmp)


if __name__ == "__main__":
    main()
