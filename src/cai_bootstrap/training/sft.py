"""Supervised fine-tuning of a LoRA adapter: one explicit training loop, driven by accelerate.

Read top to bottom, :func:`train_sft` does what a torchtune recipe does, in the open:

1. **Data.** Each example (``prompt`` = ``formats.prompt_for(instruction)``, ``response``) is encoded
   by :func:`masking.encode_dataset` (response-only labels; drops counted by reason; too many drops
   raise :class:`masking.MaskingError` before any model is loaded). A seeded share of the kept
   examples is held out for the eval loss (at least one when ``eval_share > 0`` and there are two or
   more).
2. **Model.** The base is loaded fresh with :func:`models.loading.load_model` (``trainable=True``);
   its :func:`fingerprint` is taken *before* LoRA is attached. 8-/4-bit bases go through
   ``peft.prepare_model_for_kbit_training``. LoRA is attached with ``peft.get_peft_model`` after
   seeding, so the adapter's initial weights depend on ``seed`` only.
3. **Data order.** Epoch ``e`` is a permutation drawn from ``torch.Generator().manual_seed(seed + e)``.
   It is cut into optimizer steps of ``global batch = batch_size * gradient_accumulation_steps *
   num_processes`` examples; *inside* a step the examples are sorted by length and cut into
   micro-batches of ``batch_size`` (less padding, and the set of examples in a step — hence the maths
   of the step — does not depend on how it is split). Micro-batch ``j`` of a step goes to process
   ``j % num_processes``. The order is a pure function of (seed, epoch, step), so the position in the
   data is just the global step.
4. **Loss.** The per-token cross-entropy is computed here, from the model's logits (position t
   predicts label t + 1, ``reduction="sum"``, in float32; no ``labels=`` is passed to the model, and
   only supervised positions are projected onto the vocabulary, see :func:`_forward_loss`). The loss
   of an optimizer step is the **mean over every supervised token of its whole accumulation
   window** (all micro-batches, all processes): each micro-batch backpropagates
   ``sum of its token losses * num_processes / N``, where ``N`` is the window's supervised-token count
   summed over processes (one all-reduce before the first backward; DDP then averages gradients over
   processes, hence the ``num_processes`` factor). This equals a single big batch; averaging per
   micro-batch means would over-weight short responses. Non-final micro-batches run under
   ``accelerator.no_sync`` (manual accumulation; ``accelerator.backward`` for the backward pass).
5. **Optimizer.** AdamW over the trainable (LoRA) parameters, ``get_cosine_schedule_with_warmup`` with
   ``warmup = ceil(warmup_ratio * total_steps)``; ``total_steps = max_steps`` or
   ``ceil(epochs * steps_per_epoch)``. The scheduler is stepped once per optimizer step (the
   accelerator is built with ``step_scheduler_with_optimizer=False`` so it never steps it
   ``num_processes`` times). Before each optimizer step the gradient's global norm is clipped to
   ``max_grad_norm`` (``accelerator.clip_grad_norm_``, after the window's all-reduce; DeepSpeed clips
   in its engine with the same value), as TRL does for DPO; ``None``: no clipping.
6. **Checkpoints.** Every ``save_steps`` optimizer steps, ``accelerator.save_state`` writes
   ``out_dir/checkpoints/step-N/``: the adapter only (``adapter/``; a save hook drops the frozen base
   weights from the state), the optimizer, the scheduler, every process's RNG states (python, numpy,
   torch, CUDA), and ``trainer_state.json`` (step, epoch, step in epoch, history, the partial logging
   window, eval losses so far, and a key of everything that determines the run). It is written to a
   temporary folder and renamed, so a crash never leaves a half checkpoint that looks complete.
   ``resume=True`` loads the latest one (after checking the run key), which restores the adapter,
   optimizer, scheduler and RNG states; the loop then continues at epoch ``step // steps_per_epoch``,
   step ``step % steps_per_epoch`` of that epoch's (regenerated) order. An interrupted run therefore
   ends with the same adapter weights as an uninterrupted one. ``resume=False`` removes old
   checkpoints in ``out_dir`` first.
7. **Outputs.** The final adapter (``adapter_config.json`` + weights, ``save_pretrained``) in
   ``out_dir`` and ``out_dir/training.json`` (see :func:`train_sft`), both written atomically; only the
   main process writes.

It runs unchanged under ``accelerate launch --num_processes K`` (``batch_size`` is then per process).
On a CPU with whole weights the LoRA layers and their dropout come from the CPU backend
(:mod:`cai_bootstrap.cpu_backend`); elsewhere they are PEFT's and torch's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config as config_mod
from .. import cpu_backend as cpu_backend_mod
from ..console import console
from ..files import atomic_save_folder, atomic_write_json, sha256_text
from ..models.loading import default_device, fingerprint, load_model, load_tokenizer, resolve
from ..models.precision import resolve_mixed_precision
from .masking import IGNORE_INDEX, Encoded, MaskingError, PackedCollator, ResponseOnlyCollator, encode_dataset
from .tracking import EVAL_LOSS, open_tracker, require, sft_scalars
from .tracking import clear as clear_logs

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
ADAPTER_SUBDIR = "adapter"
METRICS_FILE = "training.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class SFTResult:
    adapter_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)  # the content of training.json


# --------------------------------------------------------------------------------------------
# data: split, order, sharding, collation


def eval_count(n: int, share: float) -> int:
    """How many of n examples are held out: round(share * n), at least 1 (if share > 0 and n >= 2),
    and never all of them."""
    if share <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(share * n)))


def split_indices(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, eval) split of range(n), each sorted."""
    order = list(range(n))
    random.Random(f"sft-eval-split:{seed}").shuffle(order)
    k = eval_count(n, share)
    return sorted(order[k:]), sorted(order[:k])


def steps_per_epoch(n_train: int, global_batch: int) -> int:
    return math.ceil(n_train / global_batch)


def plan_epoch(
    lengths: Sequence[int], *, global_batch: int, micro_batch: int, seed: int, epoch: int
) -> list[list[list[int]]]:
    """The optimizer steps of one epoch, each a list of micro-batches of example indices.

    The permutation comes from ``torch.Generator().manual_seed(seed + epoch)``; a step takes the next
    ``global_batch`` examples of it (the last step of an epoch may be smaller); inside a step the
    examples are sorted by length (stable, so ties keep the permutation order) and cut into
    micro-batches of ``micro_batch``.
    """
    import torch

    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    steps = []
    for start in range(0, len(order), global_batch):
        chunk = sorted(order[start : start + global_batch], key=lambda i: lengths[i])
        steps.append([chunk[j : j + micro_batch] for j in range(0, len(chunk), micro_batch)])
    return steps


def shard(micro_batches: Sequence[list[int]], num_processes: int, process_index: int) -> list[list[int] | None]:
    """This process's micro-batches of a step: every num_processes-th one. Every process gets the same
    number of micro-steps; a process with nothing left gets None (it runs a zero-weight step so that
    collective operations stay in lockstep)."""
    n = math.ceil(len(micro_batches) / num_processes)
    mine: list[list[int] | None] = list(micro_batches[process_index::num_processes])
    return mine + [None] * (n - len(mine))


def _collate(collator: ResponseOnlyCollator | PackedCollator, examples: Sequence[Encoded], idx: Sequence[int], device) -> dict[str, Any]:
    batch = collator([examples[i] for i in idx])
    return {k: v.to(device) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------
# loss


def token_loss_sum(logits, targets):
    """Sum of the cross-entropy of ``logits`` (N, vocab) against ``targets`` (N,), in float32."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.float(), targets, reduction="sum")


def supervised_targets(labels) -> int:
    """The number of loss terms of a batch: positions whose *next* label is supervised."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _forward_loss(model, batch):
    """Sum of the token losses of a batch. Position t predicts ``labels[t + 1]``; -100 (prompt,
    padding) is ignored. Only the supervised positions are projected onto the vocabulary: a boolean
    ``logits_to_keep`` mask makes the model return logits of shape (n_supervised, vocab), which spares
    the largest matmul of a small model (and its memory) on prompt and pad positions."""
    import torch

    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][keep[:, :-1]]
    # packed rows carry position_ids and must not pass a mask (see masking.PackedCollator)
    inputs = {"position_ids": batch["position_ids"]} if "position_ids" in batch else \
        {"attention_mask": batch["attention_mask"]}
    out = model(input_ids=batch["input_ids"], use_cache=False, logits_to_keep=keep, **inputs)
    logits = out.logits
    if logits.dim() == 3:  # a model that returned every position
        logits = logits[keep]
    return token_loss_sum(logits, targets)


@dataclass
class WindowStats:
    """One accumulation window, summed over its micro-batches and all processes."""

    loss_sum: float
    supervised_tokens: int
    tokens: int  # non-pad tokens

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.supervised_tokens, 1)


def train_window(
    model, micro_batches: Sequence[dict[str, Any] | None], accelerator, filler: dict[str, Any] | None = None
) -> WindowStats:
    """Forward and backward over one gradient-accumulation window (this process's micro-batches).

    Afterwards the gradients are those of the mean token loss over the whole window (all
    micro-batches of all processes). ``None`` entries run ``filler`` with weight zero.
    """
    import torch

    dev = accelerator.device
    local = torch.tensor(
        [
            sum(supervised_targets(b["labels"]) for b in micro_batches if b is not None),
            sum(int(b["attention_mask"].sum()) for b in micro_batches if b is not None),
        ],
        dtype=torch.long,
        device=dev,
    )
    n_sup, n_tok = (int(x) for x in accelerator.reduce(local, reduction="sum"))
    if n_sup == 0:
        raise RuntimeError("an accumulation window without supervised tokens (masking should prevent this)")
    scale = accelerator.num_processes / n_sup  # DDP averages gradients over processes
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            s = _forward_loss(model, batch if batch is not None else filler)
            if batch is None:
                s = s * 0.0
            accelerator.backward(s * scale)
        loss_sum += s.detach().double()
    total = float(accelerator.reduce(loss_sum, reduction="sum"))
    return WindowStats(total, n_sup, n_tok)


def evaluate_loss(model, examples: Sequence[Encoded], collator, batch_size: int, accelerator) -> float | None:
    """Mean token loss over examples (None if there are none). Every process runs the same number of
    forward passes (zero-weight fillers where its share runs out), so wrapped models stay in step."""
    import torch

    if not examples:
        return None
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    batches = [order[j : j + batch_size] for j in range(0, len(order), batch_size)]
    mine = shard(batches, accelerator.num_processes, accelerator.process_index)
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for idx in mine:
            batch = _collate(collator, examples, idx if idx is not None else batches[0], accelerator.device)
            s = _forward_loss(model, batch)
            if idx is not None:
                totals += torch.stack([s.double(), torch.tensor(float(supervised_targets(batch["labels"])),
                                                                dtype=torch.float64, device=s.device)])
    model.train(was_training)
    totals = accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1])


# --------------------------------------------------------------------------------------------
# checkpoints


def list_checkpoints(out_dir: str | Path) -> list[str]:
    """Complete checkpoints under out_dir/checkpoints (``step-N`` with its state file), by step."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), str(p)))
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(out_dir)
    return Path(found[-1]) if found else None


def _save_checkpoint(accelerator, out_dir: Path, step: int, state: dict[str, Any]) -> Path:
    root = out_dir / CHECKPOINTS_DIR
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # the save hook puts the adapter in tmp/adapter
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / STATE_FILE, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def _register_adapter_hooks(accelerator) -> None:
    """Checkpoint the adapter, not the frozen base: the save hook removes the full state dict that
    accelerate would write and saves the PEFT adapter instead; the load hook restores it. (Under
    FSDP/DeepSpeed accelerate saves the model itself and these hooks see nothing to do.)"""

    def save_hook(models, weights, output_dir):
        if not weights:
            return
        weights.clear()
        if accelerator.is_main_process:
            accelerator.unwrap_model(models[0]).save_pretrained(Path(output_dir) / ADAPTER_SUBDIR)

    def load_hook(models, input_dir):
        if not models:
            return
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        weights = load_peft_weights(str(Path(input_dir) / ADAPTER_SUBDIR), device="cpu")  # copied into place
        result = set_peft_model_state_dict(accelerator.unwrap_model(models[0]), weights)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"checkpoint adapter has unexpected keys: {unexpected[:5]}")
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# --------------------------------------------------------------------------------------------
# DeepSpeed / FSDP


def _configure_deepspeed(accelerator, cfg: config_mod.SFTConfig) -> None:
    """Fill what accelerate would take from a DataLoader, which this loop does not prepare: the
    micro-batch is ``batch_size``. Accumulation must stay 1 (this loop accumulates by hand, while
    DeepSpeed's engine steps after every backward), and DeepSpeed clips gradients to
    ``max_grad_norm`` in its engine (0: none), as the loop does on the other backends."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    if cfg.gradient_accumulation_steps != 1:
        raise ValueError(f"sft.gradient_accumulation_steps is {cfg.gradient_accumulation_steps}: under DeepSpeed "
                         f"keep it 1 and raise sft.batch_size or the number of processes instead")
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.max_grad_norm or 0.0


def _base_fingerprint(model, accelerator) -> str:
    """The base fingerprint, the same on every process (each one checks the run key on resume).
    ZeRO-3 (zero.Init) leaves each process a shard of every weight: gather them. Otherwise the main
    process's value is broadcast (FSDP's cpu_ram_efficient_loading gives the weights to it alone)."""
    from accelerate.utils import broadcast_object_list

    if any(hasattr(p, "ds_id") for p in model.parameters()):
        import deepspeed

        return fingerprint(model, gather=lambda t: deepspeed.zero.GatheredParameters(
            [t] if hasattr(t, "ds_id") else []))
    return broadcast_object_list([fingerprint(model) if accelerator.is_main_process else None])[0]


# --------------------------------------------------------------------------------------------
# the recipe


def _versions() -> dict[str, str]:
    import accelerate
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__}


def train_sft(
    model_spec: str,
    examples: list[dict],
    cfg: config_mod.SFTConfig,
    *,
    out_dir: Path,
    seed: int,
    quantization: str = "none",
    allow_full_precision_fallback: bool = False,
    dtype: str = "float32",
    add_bos: bool = False,
    resume: bool = False,
    progress: bool = True,
    tracking: str = "none",
    log_dir: Path | None = None,
    run_name: str = "sft",
    cpu_backend: cpu_backend_mod.Setting = "auto",
) -> SFTResult:
    """Train a LoRA adapter on (prompt, response) examples; save it and ``training.json`` to out_dir.

    ``training.json`` holds: base_model, base_fingerprint (of the base before LoRA), lora,
    hyperparameters (the config plus resolved values: processes, global batch, steps, warmup), seed,
    add_bos, dtype, mixed_precision (setting, used, reason), examples (given, kept, dropped by reason,
    train, eval), history (one entry per ``logging_steps``: step, epoch, loss = token-mean over the
    steps since the previous entry, lr, grad_norm = the last step's norm before clipping,
    tokens_per_s, supervised_tokens_per_s), cpu_backend (used, reason), eval_history (eval
    loss at each checkpoint), final_train_loss (the last history entry's loss), eval_loss (at the
    end), tokens, tokens_per_s, supervised_tokens_per_s and wall_time_s (of this invocation),
    resumed_from_step, checkpoints, quantization and base_provenance (what load_model did), versions.

    ``tracking`` (none | tensorboard | trackio | wandb): the main process also logs every history entry
    and eval loss as scalars (:mod:`.tracking`; TensorBoard event files go to ``log_dir``).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import get_cosine_schedule_with_warmup

    started = time.perf_counter()
    out_dir = Path(out_dir)
    require(tracking)
    if tracking != "none" and log_dir is None:
        raise ValueError(f"tracking: {tracking} needs a log_dir")
    # cpu=True where there is no GPU, so that torchrun / accelerate launch give multi-CPU (gloo) runs
    device = default_device()
    precision, precision_reason = resolve_mixed_precision(cfg.mixed_precision, device)
    # autocast around the model's forward; the config decides, not an accelerate config's mixed_precision.
    # The state is a per-process singleton that fixes the precision of the first Accelerator (an earlier
    # step's): reset it as transformers' TrainingArguments does (the process group is kept).
    AcceleratorState._reset_state()
    accelerator = Accelerator(step_scheduler_with_optimizer=False, cpu=device == "cpu", mixed_precision=precision)
    _configure_deepspeed(accelerator, cfg)
    backend = cpu_backend_mod.for_this_process(cpu_backend)
    main = accelerator.is_main_process
    nproc, pidx = accelerator.num_processes, accelerator.process_index

    # 1. data ------------------------------------------------------------------------------
    tokenizer = load_tokenizer(resolve(model_spec).path)
    encoded, drops = encode_dataset(tokenizer, examples, max_length=cfg.max_length, add_bos=add_bos,
                                    max_drop_share=cfg.max_drop_share)
    if not encoded:
        raise MaskingError(f"no example left to train on ({len(examples)} given, dropped: {drops})")
    train_idx, eval_idx = split_indices(len(encoded), cfg.eval_share, seed)
    train = [encoded[i] for i in train_idx]
    held_out = [encoded[i] for i in eval_idx]
    lengths = [len(e.input_ids) for e in train]
    global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * nproc
    spe = steps_per_epoch(len(train), global_batch)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * spe)
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)

    # 2. model -----------------------------------------------------------------------------
    loaded = load_model(model_spec, quantization=quantization,
                        allow_full_precision_fallback=allow_full_precision_fallback, dtype=dtype,
                        device=str(accelerator.device), trainable=True)
    model, prov = loaded.model, loaded.provenance
    base_fingerprint = _base_fingerprint(model, accelerator)
    if prov["quantization"] != "none":
        model = prepare_model_for_kbit_training(model)
    model.config.use_cache = False
    target = cfg.lora.target_modules
    lora_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                             target_modules=target if isinstance(target, str) else list(target),
                             task_type="CAUSAL_LM")
    set_seed(seed)  # the adapter's initial weights depend on the seed only
    model = get_peft_model(model, lora_config)
    fast_dropout, fused_layers = cpu_backend_mod.use_lora_layers(model) if backend.used else (0, 0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    _register_adapter_hooks(accelerator)
    collator = (PackedCollator(tokenizer.pad_token_id, row_tokens=cfg.max_length) if cfg.packing
                else ResponseOnlyCollator(pad_token_id=tokenizer.pad_token_id))

    # Everything that determines the weights; resuming from a checkpoint with another key is refused.
    run_key = sha256_text(json.dumps({
        "base_fingerprint": base_fingerprint, "seed": seed,
        "cfg": cfg.model_dump(mode="json", exclude={"save_steps", "logging_steps"}),
        "processes": nproc, "dtype": dtype, "mixed_precision": precision, "quantization": prov["quantization"],
        "add_bos": add_bos, "cpu_backend": backend.used,
        "train": [(e.input_ids, e.labels) for e in train], "eval": [(e.input_ids, e.labels) for e in held_out],
    }, sort_keys=True))[:16]

    # 3. resume or start fresh -------------------------------------------------------------
    step, resumed_from = 0, None
    history: list[dict[str, Any]] = []
    eval_history: list[dict[str, Any]] = []
    window = {"loss_sum": 0.0, "supervised_tokens": 0, "tokens": 0}
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
        if state["run_key"] != run_key:
            raise RuntimeError(
                f"{ckpt} was written by a different run (config, seed, data, base model or process count "
                f"differ: key {state['run_key']} != {run_key}); resume with the same settings, or use "
                f"resume=False / another out_dir"
            )
        accelerator.load_state(str(ckpt))
        step, resumed_from = state["step"], state["step"]
        history, eval_history, window = state["history"], state["eval_history"], state["window"]
    elif main and not resume:
        shutil.rmtree(out_dir / CHECKPOINTS_DIR, ignore_errors=True)
    if main and ckpt is None and log_dir is not None:
        clear_logs(Path(log_dir))  # a fresh run's curves replace the previous run's
    if main:  # training.json exists only for a finished run
        (out_dir / METRICS_FILE).unlink(missing_ok=True)
    if ckpt is None:
        set_seed(seed, device_specific=True)  # dropout: seeded per process
    accelerator.wait_for_everyone()

    # 4. the loop --------------------------------------------------------------------------
    tracker = open_tracker(tracking if main else "none", log_dir=log_dir, run_name=run_name,
                           config={"seed": seed, **cfg.model_dump(mode="json")}, resumed_from=resumed_from)
    show_bar = progress and main and console.is_terminal
    log_lines = progress and main and not show_bar  # plain lines where no bar can be drawn
    bar = _progress_bar(enabled=show_bar)
    totals = {"supervised_tokens": 0, "tokens": 0}
    window_started = time.perf_counter()
    train_started = time.perf_counter()
    with bar:
        task = bar.add_task("SFT", total=total_steps, completed=step, loss=float("nan"), lr=0.0, tps=0.0)
        while step < total_steps:
            epoch, offset = divmod(step, spe)
            plan = plan_epoch(lengths, global_batch=global_batch, micro_batch=cfg.batch_size, seed=seed, epoch=epoch)
            for micro in plan[offset:]:
                if step >= total_steps:
                    break
                lr = scheduler.get_last_lr()[0]
                mine = shard(micro, nproc, pidx)
                batches = [_collate(collator, train, idx, accelerator.device) if idx is not None else None
                           for idx in mine]
                filler = _collate(collator, train, micro[0][:1], accelerator.device) if None in mine else None
                stats = train_window(model, batches, accelerator, filler)
                grad_norm = (accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                             if cfg.max_grad_norm is not None else None)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                for k in ("supervised_tokens", "tokens"):
                    totals[k] += getattr(stats, k)
                    window[k] += getattr(stats, k)
                window["loss_sum"] += stats.loss_sum

                if step % cfg.logging_steps == 0 or step == total_steps:
                    elapsed = max(time.perf_counter() - window_started, 1e-9)
                    entry = {
                        "step": step,
                        "epoch": round(step / spe, 4),
                        "loss": window["loss_sum"] / max(window["supervised_tokens"], 1),
                        "lr": lr,
                        "grad_norm": None if grad_norm is None else float(grad_norm),
                        "tokens_per_s": window["tokens"] / elapsed,
                        "supervised_tokens_per_s": window["supervised_tokens"] / elapsed,
                    }
                    history.append(entry)
                    tracker.log(sft_scalars(entry), step)
                    window = {"loss_sum": 0.0, "supervised_tokens": 0, "tokens": 0}
                    window_started = time.perf_counter()
                    if log_lines:
                        console.print(f"sft step {step}/{total_steps} loss {entry['loss']:.4f} "
                                      f"lr {lr:.2e} {entry['tokens_per_s']:.0f} tok/s")
                bar.update(task, completed=step, loss=stats.loss, lr=lr,
                           tps=totals["tokens"] / max(time.perf_counter() - train_started, 1e-9))

                if step % cfg.save_steps == 0 and step < total_steps:
                    eval_loss = evaluate_loss(model, held_out, collator, cfg.batch_size, accelerator)
                    eval_history.append({"step": step, "eval_loss": eval_loss})
                    if eval_loss is not None:
                        tracker.log({EVAL_LOSS: eval_loss}, step)
                    state = {"step": step, "epoch": epoch, "step_in_epoch": step - epoch * spe,
                             "steps_per_epoch": spe, "total_steps": total_steps, "run_key": run_key,
                             "history": history, "eval_history": eval_history, "window": window}
                    _save_checkpoint(accelerator, out_dir, step, state)

    # 5. the end ---------------------------------------------------------------------------
    train_time = max(time.perf_counter() - train_started, 1e-9)
    eval_loss = evaluate_loss(model, held_out, collator, cfg.batch_size, accelerator)
    if eval_loss is not None:
        tracker.log({EVAL_LOSS: eval_loss}, step)
    tracker.close()
    metrics = {
        "base_model": model_spec,
        "base_fingerprint": base_fingerprint,
        "adapter_dir": str(out_dir),
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                 "target_modules": target, "task_type": "CAUSAL_LM",
                 "dropout_masks": "training.lora_dropout (PCG64)" if fast_dropout else "torch",
                 "layers": f"training.fused_lora ({fused_layers} layers)" if fused_layers else "peft"},
        "hyperparameters": {
            **cfg.model_dump(mode="json"),
            "num_processes": nproc,
            "global_batch_size": global_batch,
            "steps_per_epoch": spe,
            "total_steps": total_steps,
            "warmup_steps": warmup_steps,
            "optimizer": "AdamW",
            "scheduler": "cosine_with_warmup",
            "loss": "token mean over each accumulation window (sum of token losses / supervised tokens)",
        },
        "seed": seed,
        "add_bos": add_bos,
        "dtype": dtype,
        "mixed_precision": {"setting": cfg.mixed_precision, "used": precision, "reason": precision_reason},
        "cpu_backend": {"setting": cpu_backend, **backend.as_dict()},
        "examples": {"given": len(examples), "kept": len(encoded), "dropped": drops,
                     "train": len(train), "eval": len(held_out)},
        "history": history,
        "eval_history": eval_history,
        "final_train_loss": history[-1]["loss"] if history else None,
        "eval_loss": eval_loss,
        "tokens": dict(totals),
        "tokens_per_s": totals["tokens"] / train_time,
        "supervised_tokens_per_s": totals["supervised_tokens"] / train_time,
        "wall_time_s": time.perf_counter() - started,
        "resumed_from_step": resumed_from,
        "checkpoints": list_checkpoints(out_dir),
        "quantization": {k: prov[k] for k in ("quantization_requested", "quantization",
                                              "full_precision_fallback", "fallback_reason")},
        "base_provenance": prov,
        "versions": _versions(),
    }
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3/FSDP: every process calls it
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # state_dict: the full one (ZeRO-3/FSDP: gathered); each file whole, old or new, if killed while saving
        atomic_save_folder(out_dir, lambda tmp: accelerator.unwrap_model(model).save_pretrained(
            tmp, state_dict=state_dict))
        atomic_write_json(out_dir / METRICS_FILE, metrics)
    del state_dict
    accelerator.wait_for_everyone()
    if accelerator.device.type != "cpu":  # (a full gc.collect costs ~1 s and frees nothing on CPU)
        accelerator.free_memory()
    return SFTResult(out_dir, metrics)


def _progress_bar(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("lr {task.fields[lr]:.2e}"),
        TextColumn("{task.fields[tps]:.0f} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False, disable=not enabled,
    )
