"""DPO with a LoRA adapter through TRL's ``DPOTrainer``: two runs, one set of hyperparameters.

``init="sft"``: the policy starts from the base model with the SFT adapter *merged* into its weights
(on a quantized base, ``train_quantization`` 8bit/4bit, the SFT adapter stays unmerged on top instead:
:mod:`~cai_bootstrap.models.adapters`), plus a fresh LoRA adapter; ``init="base"`` (the DPO-only
baseline): the same fresh LoRA on the base model. Everything else comes from one ``dpo:`` config
block through :func:`trainer_arguments`, the one place that builds TRL's ``DPOConfig``.

**Parity.** Each run records the facts that make the two runs' comparison fair (``parity_facts`` in
``training.json``): its trainer and LoRA arguments, process count, precision and the sha256 of the
pairs it was given (known before training), and the sha256 of the pairs it trained on, the optimizer
steps, the pairs and tokens it saw (known after). The second run compares its facts with the first
run's: before loading anything and again after training, and fails (:class:`ParityError`) on any
difference but the output path and the *declared* ones: ``dpo.dpo_only_learning_rate`` gives the
DPO-only run its own learning rate, an explicit override that the check reports as a declared
difference. Each run's learning curve is its ``history`` (loss, reward accuracy and margin per
logged step), which the report plots for both runs side by side.

**The reference model.** With a PEFT policy and no ``ref_model``, TRL 1.16 keeps no second model: it
computes the reference log-probabilities with the adapter disabled (``use_adapter(model, None)`` ->
``PeftModel.disable_adapter()``, in ``compute_ref_log_probs`` and ``_compute_loss``). The model under
the adapter is the starting model, so the reference is the SFT model (merged, or the unmerged SFT
adapter, which is not a PEFT layer and stays on) for ``init="sft"`` and the base model for
``init="base"``. LoRA's B matrices start at zero, so at step 0 the policy equals
the reference exactly (tested).

**Plain-text data in TRL 1.16** (``DPOTrainer._prepare_dataset``, non-conversational branch):

* no chat template: a string prompt goes through ``tokenizer(text=...)``, not ``apply_chat_template``;
* EOS: ``tokenizer.eos_token`` is appended *as text* to ``chosen`` and to ``rejected`` unless the text
  already ends with it (so both completions end in exactly one EOS id);
* BOS: whatever the tokenizer adds by itself with ``add_special_tokens=True`` (SmolLM2: nothing;
  Llama-style tokenizers: BOS). We want no implicit BOS, ``add_bos`` decides: when it is set and the
  tokenizer adds none, the BOS text is prepended to the prompt; when it is not set and the tokenizer
  adds one, it is stripped from ``prompt_ids`` after TRL's tokenization;
* the prompt is tokenized alone and with each completion; the completion starts where the two
  diverge (``common_prefix_length``), so a token merged across the boundary silently moves the end of
  the prompt into the completion (TRL warns once);
* ``max_length`` truncation happens in the collator, ``keep_start``: the end of a long completion,
  its END and EOS included, is cut off; rows whose prompt alone fills ``max_length`` are dropped.

Every tokenized row is then checked against our own encoding (the one of
:mod:`~cai_bootstrap.training.masking` and :mod:`~cai_bootstrap.training.logprobs`): ``prompt_ids ==
[BOS if add_bos] + tok(prompt)`` and ``chosen_ids == tok(chosen) + [EOS]`` (the same for rejected),
tokenized with ``add_special_tokens=False``. Pairs that cannot be trained on as written are dropped
with a reason (counted in ``training.json``): ``special_token_text`` (a text spells a special token,
which the tokenizer would turn into a real EOS/BOS), ``boundary_merged`` (no token boundary after the
prompt), ``too_long`` (prompt + chosen + EOS exceed ``max_length``: the chosen END/EOS would be cut),
``prompt_too_long`` (dropped by TRL). A rejected completion may be truncated (counted).

**Reference log-probabilities** are precomputed once (TRL's ``precompute_ref_log_probs=True``, which
adds ``ref_chosen_logps`` / ``ref_rejected_logps`` columns that the collator passes to the loss) and
cached on disk as ``cache_dir/ref-<key>.pt``. The key hashes the reference weights
(:func:`~cai_bootstrap.models.loading.fingerprint`), the pairs (prompt, chosen, rejected), the token
ids TRL produced, ``max_length``, ``add_bos``, the autocast precision and the TRL version; not beta, the
loss or anything else that does not change the reference. On a hit the columns are attached without
a single reference forward pass. TRL's own cache of these columns never hits for in-memory datasets
(a random file name in a temporary folder), hence ours.

**Dropout**: TRL's ``disable_dropout=True`` (kept, so that policy and reference log-probabilities are
compared without noise) sets every ``nn.Dropout`` to 0 after the adapter is added, LoRA's included:
``dpo.lora.dropout`` has no effect in DPO (recorded).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import DPOConfig
from ..cpu_backend import CPUBackend, Setting
from ..files import atomic_save_folder, atomic_write_bytes, atomic_write_json, sha256_path, sha256_text
from ..schemas import PreferencePair
from . import tracking as tracking_mod

Init = Literal["sft", "base"]

# Our loss names -> TRL's ``loss_type`` values (the same words in TRL 1.16).
TRL_LOSS_TYPES: dict[str, str] = {"sigmoid": "sigmoid", "ipo": "ipo", "hinge": "hinge", "robust": "robust"}

# Keys that may differ between the two runs: where they write, and cosmetics.
PARITY_EXEMPT: frozenset[str] = frozenset({"output_dir", "run_name", "logging_dir", "disable_tqdm", "report_to",
                                           "project", "trackio_static_space_id"})

# Reasons a pair is dropped before training (keys of ``pairs_dropped`` in training.json).
SPECIAL_TOKEN_TEXT = "special_token_text"
BOUNDARY_MERGED = "boundary_merged"
TOO_LONG = "too_long"
PROMPT_TOO_LONG = "prompt_too_long"

TRAINING_JSON = "training.json"


# What makes the comparison of the two runs fair: known before training ...
PLANNED_FACTS: tuple[str, ...] = ("trainer_args", "lora_args", "num_processes", "precision", "pairs_sha256")
# ... and what each run actually consumed, known after it.
TRAINED_FACTS: tuple[str, ...] = ("pairs_used_sha256", "steps", "pairs_seen", "tokens_seen")
RUN_NAMES: dict[str, str] = {"sft": "dpo", "base": "dpo_only"}


class ParityError(ValueError):
    """The second DPO run differs from the first in more than the output path and declared overrides."""

    def __init__(self, differences: list[str]):
        self.differences = differences
        super().__init__(
            "the two DPO runs must share pairs, budget and hyperparameters; they differ in:\n  "
            + "\n  ".join(differences)
        )


class DPODataError(ValueError):
    """The preference data cannot be trained on (nothing left, or tokenized unlike documented)."""


@dataclass
class DPOResult:
    adapter_dir: Path
    metrics: dict[str, Any]
    trainer_args: dict[str, Any]
    lora_args: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Arguments


def mixed_precision(cfg: DPOConfig) -> tuple[str, str]:
    """(``"bf16"`` or ``"no"``, why): autocast for this device (:mod:`..models.precision`)."""
    from ..models.loading import default_device
    from ..models.precision import resolve_mixed_precision

    return resolve_mixed_precision(cfg.mixed_precision, default_device())


def learning_rate(cfg: DPOConfig, init: Init) -> float:
    """The run's learning rate: ``dpo_only_learning_rate`` for the DPO-only run when it is set."""
    if init == "base" and cfg.dpo_only_learning_rate is not None:
        return cfg.dpo_only_learning_rate
    return cfg.learning_rate


def declared_differences(cfg: DPOConfig) -> dict[str, str]:
    """Trainer arguments the two runs may differ in, each with the option that declares it."""
    return {"learning_rate": "dpo.dpo_only_learning_rate"} if cfg.dpo_only_learning_rate is not None else {}


def trainer_arguments(cfg: DPOConfig, *, out_dir: Path, seed: int, init: Init = "sft", tracking: str = "none",
                      run_name: str | None = None, backend: CPUBackend | None = None) -> dict[str, Any]:
    """The keyword arguments of TRL's ``DPOConfig`` for one run: the one place they are built.

    Only ``output_dir``, ``run_name`` and, when declared, the learning rate (:func:`learning_rate`)
    depend on the run; the device decides ``use_cpu``, and with ``cfg.mixed_precision`` ``bf16``
    (autocast); ``tracking`` is TRL's ``report_to`` (training curves, :mod:`.tracking`). Without the CPU
    backend (``backend``, by default :func:`cai_bootstrap.cpu_backend.for_this_process` of ``auto``)
    ``dpo.packing`` asks TRL for its own ``padding_free`` and Liger's kernels are used where installed
    (CUDA). JSON-serialisable, so ``training.json`` records exactly what was used.
    """
    from ..cpu_backend import for_this_process, liger_kernel_available
    from ..models.loading import default_device

    device = default_device()
    cuda = device == "cuda"
    libraries = not (backend or for_this_process("auto")).used
    precision, _ = mixed_precision(cfg)
    return {
        "output_dir": str(out_dir),
        "seed": seed,
        "data_seed": seed,
        # DPO
        "beta": cfg.beta,
        "loss_type": [TRL_LOSS_TYPES[cfg.loss_type]],
        "label_smoothing": cfg.label_smoothing if cfg.loss_type == "robust" else 0.0,
        "max_length": cfg.max_length,
        "truncation_mode": "keep_start",
        "precompute_ref_log_probs": cfg.precompute_ref_log_probs,
        "precompute_ref_batch_size": cfg.batch_size,
        "disable_dropout": True,
        "pad_to_multiple_of": None,
        "padding_free": cfg.packing and libraries,  # with the CPU backend, packing is ours (training/packing.py)
        "use_liger_kernel": libraries and liger_kernel_available(device),
        # optimisation
        "learning_rate": learning_rate(cfg, init),
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps if cfg.max_steps is not None else -1,
        "per_device_train_batch_size": cfg.batch_size,
        "per_device_eval_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "warmup_steps": cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        "lr_scheduler_type": "cosine",
        "weight_decay": 0.0,
        "max_grad_norm": cfg.max_grad_norm if cfg.max_grad_norm is not None else 0.0,  # 0: no clipping
        "optim": "adamw_torch",
        "activation_checkpointing": False,  # transformers 5 name of gradient_checkpointing (TRL's default: on)
        # precision and device
        "use_cpu": not cuda,
        "bf16": precision == "bf16",
        "fp16": False,
        # logging and saving: the adapter is saved once, at the end, by train_dpo
        "logging_strategy": "steps",
        "logging_steps": cfg.logging_steps,
        "logging_first_step": True,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": tracking,
        "run_name": run_name,
        # trackio: a local project, never a Space on the Hub
        **({"project": tracking_mod.PROJECT, "trackio_static_space_id": False} if tracking == "trackio" else {}),
        "disable_tqdm": not sys.stderr.isatty(),
        "dataloader_num_workers": 0,
        "ddp_find_unused_parameters": False,  # every LoRA weight is used: spare DDP its extra graph traversal
        "remove_unused_columns": True,
    }


def lora_arguments(cfg: DPOConfig) -> dict[str, Any]:
    """Keyword arguments of ``peft.LoraConfig`` for the fresh DPO adapter."""
    target = cfg.lora.target_modules
    return {
        "r": cfg.lora.r,
        "lora_alpha": cfg.lora.alpha,
        "lora_dropout": cfg.lora.dropout,
        "target_modules": target if isinstance(target, str) else list(target),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }


def parity_check(args_a: dict[str, Any], args_b: dict[str, Any], *, prefix: str = "") -> list[str]:
    """Every difference between two runs' arguments other than the output path (and cosmetics)."""
    diffs: list[str] = []
    for key in sorted(set(args_a) | set(args_b)):
        if key in PARITY_EXEMPT:
            continue
        name = f"{prefix}{key}"
        if key not in args_a:
            diffs.append(f"{name}: missing in the first run (second: {args_b[key]!r})")
        elif key not in args_b:
            diffs.append(f"{name}: missing in the second run (first: {args_a[key]!r})")
        elif isinstance(args_a[key], dict) and isinstance(args_b[key], dict):
            diffs.extend(parity_check(args_a[key], args_b[key], prefix=f"{name}."))
        elif _normal(args_a[key]) != _normal(args_b[key]):
            diffs.append(f"{name}: {args_a[key]!r} != {args_b[key]!r}")
    return diffs


def launched_processes() -> int:
    """How many processes ``accelerate launch`` / torchrun started (1 outside a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def planned_facts(
    cfg: DPOConfig,
    init: Init,
    pairs: Sequence[PreferencePair] | None,
    *,
    out_dir: Path,
    seed: int,
    dtype: str,
    quantization: str,
    processes: int | None,
    tracking: str = "none",
    run_name: str | None = None,
    backend: CPUBackend | None = None,
) -> dict[str, Any]:
    """The run's facts known before training (``PLANNED_FACTS``; ``pairs`` / ``processes`` None: not
    known here, as in the parent of launched processes, which check them themselves)."""
    return {
        "init": init,
        "trainer_args": trainer_arguments(cfg, out_dir=out_dir, seed=seed, init=init, tracking=tracking,
                                          run_name=run_name, backend=backend),
        "lora_args": lora_arguments(cfg),
        "num_processes": processes,
        "precision": {"mixed_precision": mixed_precision(cfg)[0], "dtype": dtype, "quantization": quantization},
        "pairs_sha256": None if pairs is None else pairs_sha(pairs),
    }


@dataclass
class Parity:
    """What the check compared, for ``training.json`` and the manifest."""

    checked_against: str | None = None
    same: list[str] = field(default_factory=list)
    declared_differences: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_parity(
    reference: dict[str, Any] | None,
    facts: dict[str, Any],
    keys: Sequence[str],
    cfg: DPOConfig,
    parity: Parity | None = None,
) -> Parity:
    """Compare ``keys`` of this run's facts with the other run's (``reference``, None: this run is the
    first) and add the result to ``parity``; :class:`ParityError` listing every undeclared difference.
    A fact that one side could not know (None, e.g. the process count before a launch) is skipped."""
    parity = parity or Parity()
    if reference is None:
        return parity
    parity.checked_against = RUN_NAMES.get(reference.get("init"), reference.get("init"))
    declared = declared_differences(cfg)
    diffs: list[str] = []
    for key in keys:
        a, b = reference.get(key), facts.get(key)
        if a is None or b is None:
            if key not in reference:
                diffs.append(f"{key}: not recorded by the {parity.checked_against} run (re-run it)")
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            found = parity_check(a, b, prefix={"trainer_args": "", "lora_args": "lora."}.get(key, f"{key}."))
        else:
            found = [] if _normal(a) == _normal(b) else [f"{key}: {a!r} != {b!r}"]
        ours = [d for d in found if key == "trainer_args" and d.split(":")[0] in declared]
        parity.declared_differences += [f"{d} (declared by {declared[d.split(':')[0]]})" for d in ours]
        found = [d for d in found if d not in ours]
        if key == "num_processes" and found:
            found = [f"num_processes: {a} != {b} (the global batch differs)"]
        diffs += found
        if not found and not ours:
            parity.same.append(key)
    if diffs:
        raise ParityError(diffs)
    return parity


def _normal(value: Any) -> Any:
    # A JSON round trip turns tuples into lists: compare what would be recorded.
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------------------------------
# Data


def pairs_sha(pairs: Sequence[PreferencePair]) -> str:
    """Hash of the pairs' texts, in order (what the reference log-probabilities depend on)."""
    return sha256_text(json.dumps([[p.prompt, p.chosen, p.rejected] for p in pairs], ensure_ascii=False))


def _dataset(pairs: Sequence[PreferencePair], prompt_prefix: str):
    from datasets import Dataset

    return Dataset.from_list(
        [{"id": p.id, "prompt": prompt_prefix + p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    )


def _implicit_specials(tok) -> tuple[list[int], list[int]]:
    """Token ids the tokenizer adds around plain text by itself (before, after)."""
    probe = "Instruction: x"
    plain = list(tok(probe, add_special_tokens=False)["input_ids"])
    full = list(tok(text=probe)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    raise DPODataError(f"cannot tell which special tokens {type(tok).__name__} adds to plain text")


@dataclass
class _DataPolicy:
    """Our side of the tokenization contract with TRL (see the module docstring)."""

    tok: Any
    add_bos: bool
    max_length: int
    implicit_prefix: list[int]
    texts: dict[str, tuple[str, str, str]]  # pair id -> (prompt, chosen, rejected) as given
    report: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_pairs(cls, tok, pairs: Sequence[PreferencePair], *, add_bos: bool, max_length: int) -> _DataPolicy:
        if tok.eos_token is None or tok.eos_token_id is None:
            raise DPODataError("the tokenizer has no EOS token: TRL appends EOS to every completion")
        if add_bos and tok.bos_token_id is None:
            raise DPODataError("add_bos=True but the tokenizer has no BOS token")
        prefix, suffix = _implicit_specials(tok)
        if suffix:
            raise DPODataError(
                f"the tokenizer appends special tokens {suffix} to plain text; TRL's prompt/completion split "
                f"cannot work with that"
            )
        return cls(tok, add_bos, max_length, prefix, {p.id: (p.prompt, p.chosen, p.rejected) for p in pairs})

    @property
    def prompt_prefix(self) -> str:
        """Text prepended to every prompt before TRL tokenizes it."""
        bos_added = self.implicit_prefix == [self.tok.bos_token_id]
        return self.tok.bos_token if self.add_bos and not bos_added else ""

    def _enc(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def apply(self, dataset, n_in: int):
        """Fix the BOS, check every row against our encoding, drop what cannot be trained on."""
        tok, eos = self.tok, int(self.tok.eos_token_id)
        bos = [int(tok.bos_token_id)] if self.add_bos else []
        specials = [s for s in tok.all_special_tokens if s]
        strip = 0 if self.add_bos else len(self.implicit_prefix)
        cols = dataset.select_columns(["id", "prompt_ids", "chosen_ids", "rejected_ids"])
        reasons: Counter[str] = Counter()
        keep: list[int] = []
        fixed_prompt_ids: list[list[int]] = []
        rejected_truncated = 0
        for i, row in enumerate(cols):
            p_ids = list(row["prompt_ids"])
            if strip and p_ids[:strip] == self.implicit_prefix:
                p_ids = p_ids[strip:]
            fixed_prompt_ids.append(p_ids)
            # the texts as given (TRL has appended the EOS text to its chosen/rejected columns)
            prompt, chosen, rejected = self.texts[row["id"]]
            if any(s in text for s in specials for text in (prompt, chosen, rejected)):
                reasons[SPECIAL_TOKEN_TEXT] += 1
                continue
            want_p = bos + self._enc(prompt)
            want_c = self._enc(chosen) + [eos]
            want_r = self._enc(rejected) + [eos]
            got_c, got_r = list(row["chosen_ids"]), list(row["rejected_ids"])
            if (p_ids, got_c, got_r) != (want_p, want_c, want_r):
                joint_c = bos + self._enc(prompt + chosen) + [eos]
                joint_r = bos + self._enc(prompt + rejected) + [eos]
                if p_ids + got_c == joint_c and p_ids + got_r == joint_r:
                    reasons[BOUNDARY_MERGED] += 1
                    continue
                raise DPODataError(
                    f"TRL tokenized pair {i} unlike documented (trl version changed?): prompt_ids={p_ids[-5:]}..., "
                    f"chosen_ids={got_c[:5]}..., expected prompt ...{want_p[-5:]}, chosen {want_c[:5]}..."
                )
            if len(want_p) + len(want_c) > self.max_length:
                reasons[TOO_LONG] += 1
                continue
            rejected_truncated += len(want_p) + len(want_r) > self.max_length
            keep.append(i)
        if n_in > len(dataset):
            reasons[PROMPT_TOO_LONG] += n_in - len(dataset)
        if strip:
            dataset = dataset.remove_columns("prompt_ids").add_column("prompt_ids", fixed_prompt_ids)
        if len(keep) < len(dataset):
            dataset = dataset.select(keep)
        used = [self.texts[cols[i]["id"]] for i in keep]
        self.report = {
            "pairs_in": n_in,
            "pairs_used": len(keep),
            "pairs_used_sha256": sha256_text(json.dumps([list(t) for t in used], ensure_ascii=False)),
            "pairs_dropped": dict(sorted(reasons.items())),
            "rejected_truncated": int(rejected_truncated),
            "eos_token_id": eos,
            "bos_token_id": bos[0] if bos else None,
            "implicit_bos_stripped": bool(strip),
        }
        if not keep:
            raise DPODataError(f"no preference pair is left to train on: dropped {dict(reasons)}")
        return dataset


# ---------------------------------------------------------------------------------------------
# Reference log-probability cache


def ref_cache_key(
    *,
    ref_fingerprint: str,
    pairs_digest: str,
    tokens_digest: str,
    max_length: int,
    add_bos: bool,
    precision: str,
) -> tuple[str, dict[str, Any]]:
    """(key, its parts): what the reference log-probabilities depend on, and nothing else."""
    import trl

    parts = {
        "ref_fingerprint": ref_fingerprint,
        "pairs_sha": pairs_digest,
        "tokens_sha": tokens_digest,
        "max_length": max_length,
        "add_bos": add_bos,
        "precision": precision,
        "trl_version": trl.__version__,
    }
    return sha256_text(json.dumps(parts, sort_keys=True))[:24], parts


def _tokens_digest(dataset) -> str:
    cols = dataset.select_columns(["id", "prompt_ids", "chosen_ids", "rejected_ids"]).to_dict()
    return sha256_text(json.dumps([cols["id"], cols["prompt_ids"], cols["chosen_ids"], cols["rejected_ids"]]))


@dataclass
class _RefCache:
    cache_dir: Path | None
    ref_fingerprint: str
    pairs_digest: str
    add_bos: bool
    max_length: int
    precision: str
    info: dict[str, Any] = field(default_factory=lambda: {"hit": None, "key": None, "path": None})

    def key(self, dataset) -> tuple[str, dict[str, Any]]:
        return ref_cache_key(
            ref_fingerprint=self.ref_fingerprint, pairs_digest=self.pairs_digest,
            tokens_digest=_tokens_digest(dataset), max_length=self.max_length, add_bos=self.add_bos,
            precision=self.precision,
        )

    def path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else Path(self.cache_dir) / f"ref-{key}.pt"

    def load(self, path: Path | None, key: str, ids: list[str]):
        import torch

        if path is None or not path.is_file():
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache file is recomputed, never trusted
            return None
        if blob.get("key") != key or blob.get("ids") != ids:
            return None
        return blob["ref_chosen_logps"], blob["ref_rejected_logps"]

    def save(self, path: Path | None, key: str, parts: dict[str, Any], ids: list[str], chosen, rejected) -> None:
        import torch

        if path is None:
            return
        buf = io.BytesIO()
        torch.save({"key": key, "parts": parts, "ids": ids, "ref_chosen_logps": chosen,
                    "ref_rejected_logps": rejected}, buf)
        atomic_write_bytes(path, buf.getvalue())


def _on_every_process(accelerator, flag: bool) -> bool:
    import torch

    n = accelerator.reduce(torch.tensor([int(flag)], device=accelerator.device), reduction="sum")
    return int(n.item()) == accelerator.num_processes


def _with_ref_columns(dataset, chosen, rejected):
    from datasets import Dataset, Features, Value, concatenate_datasets

    cols = Dataset.from_dict(
        {"ref_chosen_logps": [float(x) for x in chosen], "ref_rejected_logps": [float(x) for x in rejected]},
        features=Features({"ref_chosen_logps": Value("float32"), "ref_rejected_logps": Value("float32")}),
    )
    return concatenate_datasets([dataset, cols], axis=1)


def _trainer_class():
    from transformers import TrainerCallback
    from trl import DPOTrainer

    from .fused_lora import use_fused_lora
    from .packing import install_packed_lm_head

    class LogLastStep(TrainerCallback):
        """Log at the last step too, so the final reward accuracy and margin are recorded."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True
            return control

    class CachedRefDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer with our data checks and an on-disk reference log-probability cache, and
        with the CPU backend (``cpu_backend.used``): fused LoRA layers and the packed forward."""

        def __init__(self, *args, data_policy: _DataPolicy, ref_cache: _RefCache, packing: bool,
                     cpu_backend: CPUBackend, **kwargs):
            self.data_policy = data_policy
            self.ref_cache = ref_cache
            self.cpu_backend = cpu_backend
            self.packing = packing and cpu_backend.used
            self.packed = False
            self.ref_forward_batches = 0
            self.seen = {"pairs": 0, "tokens": 0, "completion_tokens": 0}  # by this process's training forwards
            kwargs.setdefault("callbacks", []).append(LogLastStep())
            super().__init__(*args, **kwargs)
            self.fused_lora_layers = use_fused_lora(self.model) if self._whole_weights() else 0
            # With tqdm off (not a terminal) transformers prints every log dict; the history is
            # kept in training.json and the step prints its own summary.
            from transformers.trainer_callback import PrinterCallback

            self.remove_callback(PrinterCallback)

        def _whole_weights(self) -> bool:
            """The CPU backend reads whole weights: never under DeepSpeed or FSDP (sharded), whatever
            the backend decided from the environment."""
            return self.cpu_backend.used and not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            n_in = len(dataset)
            prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            return self.data_policy.apply(prepared, n_in)

        def _packed_model(self):
            """The model whose forward TRL patched (the base under PEFT), with packed forwards
            (training/packing.py) installed on first use; None when packing is off or unsupported."""
            from peft import PeftModel

            model = self.accelerator.unwrap_model(self.model)
            model = model.get_base_model() if isinstance(model, PeftModel) else model
            if self.packing and not self.packed and self._whole_weights():
                fields = ("log_probs", "entropy", "mean_logits", "is_top1") + (
                    ("log_sum_sq_probs",) if self.use_weighting else ())
                self.packed = install_packed_lm_head(model, fields)
            return model if self.packed else None

        def _compute_loss(self, model, inputs, return_outputs):
            self._packed_model()
            # the budget actually trained on (the parity check compares it): rows are [chosen, rejected]
            self.seen["pairs"] += int(inputs["input_ids"].shape[0]) // 2
            self.seen["tokens"] += int(inputs["attention_mask"].sum())
            self.seen["completion_tokens"] += int(inputs["completion_mask"].sum())
            return super()._compute_loss(model, inputs, return_outputs)

        def compute_ref_log_probs(self, model, inputs):
            self.ref_forward_batches += 1
            packed = self._packed_model()
            if packed is None:
                return super().compute_ref_log_probs(model, inputs)
            fields, packed._packed_outputs = packed._packed_outputs, ("log_probs",)  # TRL reads nothing else
            try:
                return super().compute_ref_log_probs(model, inputs)
            finally:
                packed._packed_outputs = fields

        def _precompute_ref_logps(self, dataset, name, batch_size):
            cache = self.ref_cache
            key, parts = cache.key(dataset)
            path = cache.path(key)
            ids = list(dataset["id"])
            cache.info.update({"key": key, "parts": parts, "path": str(path) if path else None})
            loaded = cache.load(path, key, ids)
            if not _on_every_process(self.accelerator, loaded is not None):
                loaded = None  # the miss branch is collective: every process must take it
            cache.info["hit"] = loaded is not None
            if loaded is None:
                loaded = self._reference_logps(dataset, batch_size)
                if self.accelerator.is_main_process:
                    cache.save(path, key, parts, ids, *loaded)
                self.accelerator.wait_for_everyone()
            return _with_ref_columns(dataset, *loaded)

        def _reference_logps(self, dataset, batch_size):
            """TRL 1.16's reference pass (``DPOTrainer._precompute_ref_logps``) without its file cache: for
            an in-memory dataset TRL writes that file from the main process into a per-process temporary
            folder and reads it back on every process, which fails under several processes."""
            import torch
            from torch.utils.data import DataLoader
            from trl.models import prepare_deepspeed

            loader = self.accelerator.prepare(DataLoader(
                dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
                num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory))
            model = self.ref_model or self.model
            if self.ref_model is None and self.is_deepspeed_enabled:  # ZeRO-3: gathers the sharded weights
                if self._precompute_engine is None:
                    self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
                model = self._precompute_engine
            chosen, rejected = [], []
            for batch in loader:
                c, r = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch))
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
            return torch.cat(chosen), torch.cat(rejected)

    return CachedRefDPOTrainer


# ---------------------------------------------------------------------------------------------
# Training


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Less noise: no progress bars unless on a terminal, no advisory warnings we cannot act on."""
    import datasets
    from transformers.utils import logging as hf_logging

    tty = sys.stderr.isatty()
    old_env = os.environ.get("TQDM_DISABLE")
    old_verbosity = hf_logging.get_verbosity()
    bars = datasets.utils.logging.is_progress_bar_enabled()
    hf_bars = hf_logging.is_progress_bar_enabled()
    if not tty:
        os.environ["TQDM_DISABLE"] = "1"  # TRL's reference precompute bar reads it
        datasets.utils.logging.disable_progress_bar()
        hf_logging.disable_progress_bar()  # "Loading weights"
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*use_cache=True.*")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", category=FutureWarning, module="trl")
            warnings.filterwarnings("ignore", message=".*torch.utils.checkpoint.*")
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(old_verbosity)
        if old_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old_env
        if bars:
            datasets.utils.logging.enable_progress_bar()
        if hf_bars:
            hf_logging.enable_progress_bar()


@dataclass
class DPOSetup:
    """A trainer ready to train, and what it was built from."""

    trainer: Any
    trainer_args: dict[str, Any]
    lora_args: dict[str, Any]
    provenance: dict[str, Any]


def build_trainer(
    init: Init,
    model_spec: str,
    pairs: Sequence[PreferencePair],
    cfg: DPOConfig,
    *,
    out_dir: str | Path,
    seed: int,
    sft_adapter: str | Path | None = None,
    quantization: str = "none",
    dtype: str = "float32",
    add_bos: bool = False,
    cache_dir: str | Path | None = None,
    trainer_args: dict[str, Any] | None = None,
    cpu_backend: Setting = "auto",
) -> DPOSetup:
    """Load the starting model, wrap it with TRL's DPOTrainer and a fresh LoRA; reference log-probs
    are precomputed (or loaded from the cache) here, before any training step."""
    from peft import LoraConfig
    from trl import DPOConfig as TRLDPOConfig

    from ..models.adapters import apply_adapters
    from ..models.loading import fingerprint, load_model

    if init not in ("sft", "base"):
        raise ValueError(f"init must be 'sft' or 'base', not {init!r}")
    if init == "sft" and sft_adapter is None:
        raise ValueError("init='sft' needs the SFT adapter (sft_adapter)")
    if init == "base" and sft_adapter is not None:
        raise ValueError("init='base' starts from the base model: pass no sft_adapter")
    if not pairs:
        raise DPODataError("no preference pairs")
    out_dir = Path(out_dir)
    from ..cpu_backend import for_this_process

    backend = for_this_process(cpu_backend)
    args = trainer_args if trainer_args is not None else trainer_arguments(cfg, out_dir=out_dir, seed=seed,
                                                                           init=init, backend=backend)
    lora = lora_arguments(cfg)

    with _quiet():
        loaded = load_model(model_spec, quantization=quantization, dtype=dtype, trainable=False)
    model, tok = loaded.model, loaded.tokenizer
    base_fp = fingerprint(model)
    provenance: dict[str, Any] = {**loaded.provenance, "base_fingerprint": base_fp}
    if init == "sft":
        # The SFT adapter applied as load_model applies it (merged, or unmerged on a quantized base):
        # the policy starts here and the reference is this model (the fresh DPO adapter disabled).
        # Loaded in two steps so that the base fingerprint is recorded too.
        with _quiet():
            model, applied = apply_adapters(model, [str(sft_adapter)])
        provenance["adapters"] = [str(sft_adapter)]
        provenance["adapters_applied"] = applied
        provenance["sft_adapter_sha256"] = sha256_path(sft_adapter)
    start_fp = fingerprint(model) if init == "sft" else base_fp
    provenance["start_fingerprint"] = start_fp
    model.train()

    if len({p.id for p in pairs}) != len(pairs):
        raise DPODataError("pair ids must be unique")
    policy = _DataPolicy.for_pairs(tok, pairs, add_bos=add_bos, max_length=cfg.max_length)
    precision = "bf16" if args.get("bf16") else ("fp16" if args.get("fp16") else "none")
    cache = _RefCache(
        cache_dir=Path(cache_dir) if cache_dir is not None else None, ref_fingerprint=start_fp,
        pairs_digest=pairs_sha(pairs), add_bos=add_bos, max_length=cfg.max_length,
        precision=f"{provenance['dtype']}/{precision}",
    )
    trl_args = TRLDPOConfig(**args)
    # transformers takes the autocast from an accelerate config's environment unless bf16/fp16 is set;
    # ours is resolved by mixed_precision and must hold under `accelerate launch` too
    trl_args.mixed_precision = "bf16" if args.get("bf16") else "no"
    with _quiet():
        trainer = _trainer_class()(
            model=model,
            args=trl_args,
            train_dataset=_dataset(pairs, policy.prompt_prefix),
            processing_class=tok,
            peft_config=LoraConfig(**lora),
            data_policy=policy,
            ref_cache=cache,
            packing=cfg.packing,
            cpu_backend=backend,
        )
    return DPOSetup(trainer, args, lora, provenance)


def _summed(accelerator, counts: dict[str, int]) -> dict[str, int]:
    """Counts summed over every process (each counted its own batches)."""
    import torch

    keys = sorted(counts)
    total = accelerator.reduce(torch.tensor([counts[k] for k in keys], device=accelerator.device), reduction="sum")
    return {k: int(v) for k, v in zip(keys, total.tolist())}


def _final(history: list[dict[str, Any]], key: str) -> float | None:
    for entry in reversed(history):
        if key in entry:
            return float(entry[key])
    return None


def train_dpo(
    init: Init,
    model_spec: str,
    pairs: Sequence[PreferencePair],
    cfg: DPOConfig,
    *,
    out_dir: str | Path,
    seed: int,
    sft_adapter: str | Path | None = None,
    quantization: str = "none",
    dtype: str = "float32",
    add_bos: bool = False,
    cache_dir: str | Path | None = None,
    reference: dict[str, Any] | None = None,
    tracking: str = "none",
    log_dir: str | Path | None = None,
    run_name: str | None = None,
    cpu_backend: Setting = "auto",
) -> DPOResult:
    """Train one DPO run; save the adapter and ``training.json`` in ``out_dir``.

    ``reference``: the other run's recorded ``parity_facts`` (None: this run is the first). An
    undeclared difference in the planned facts raises :class:`ParityError` before anything is loaded,
    one in the trained facts after training, before anything is saved. Under ``accelerate launch``
    every process trains; only the main one writes (adapter, ``training.json``, reference cache).

    ``tracking``: TRL reports the training curves there (``report_to``), TensorBoard's event files and
    wandb's run files in ``log_dir`` (emptied first: a new run's curves replace the previous run's).
    """
    import peft
    import torch
    import transformers
    import trl

    from ..cpu_backend import for_this_process

    out_dir = Path(out_dir)
    facts = planned_facts(cfg, init, pairs, out_dir=out_dir, seed=seed, dtype=dtype, quantization=quantization,
                          processes=launched_processes(), tracking=tracking, run_name=run_name,
                          backend=for_this_process(cpu_backend))
    parity = check_parity(reference, facts, PLANNED_FACTS, cfg)
    args, lora = facts["trainer_args"], facts["lora_args"]
    if tracking != "none" and log_dir is None:
        raise ValueError(f"tracking: {tracking} needs a log_dir")
    if tracking != "none" and int(os.environ.get("RANK", "0")) == 0:
        tracking_mod.clear(Path(log_dir))

    started = time.perf_counter()
    with tracking_mod.trainer_environment(tracking, log_dir=Path(log_dir or out_dir), run_name=run_name or init):
        setup = build_trainer(
            init, model_spec, pairs, cfg, out_dir=out_dir, seed=seed, sft_adapter=sft_adapter,
            quantization=quantization, dtype=dtype, add_bos=add_bos, cache_dir=cache_dir, trainer_args=args,
            cpu_backend=cpu_backend,
        )
        trainer = setup.trainer
        with _quiet():
            output = trainer.train()
    wall = time.perf_counter() - started

    history = [
        {k: v for k, v in entry.items() if isinstance(v, (int, float))}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    data = trainer.data_policy.report
    ref = trainer.ref_cache.info
    seen = _summed(trainer.accelerator, trainer.seen)
    facts.update({"pairs_used_sha256": data["pairs_used_sha256"], "steps": int(trainer.state.global_step),
                  "pairs_seen": seen["pairs"], "tokens_seen": seen["tokens"],
                  "completion_tokens_seen": seen["completion_tokens"]})
    parity = check_parity(reference, facts, TRAINED_FACTS, cfg, parity)
    metrics: dict[str, Any] = {
        "train_loss": float(output.training_loss),
        "steps": int(trainer.state.global_step),
        "pairs_seen": seen["pairs"],
        "tokens_seen": seen["tokens"],
        "learning_rate": args["learning_rate"],
        "final_reward_accuracy": _final(history, "rewards/accuracies"),
        "final_reward_margin": _final(history, "rewards/margins"),
        "pairs_used": data["pairs_used"],
        "pairs_dropped": data["pairs_dropped"],
        "rejected_truncated": data["rejected_truncated"],
        "ref_cache_hit": ref["hit"],
        "ref_forward_batches": trainer.ref_forward_batches,
        "num_processes": trainer.accelerator.num_processes,
        "wall_time_s": round(wall, 3),
    }
    accelerator = trainer.accelerator
    # A collective under ZeRO-3 / FSDP (the adapter's shards are gathered): every process calls it.
    state_dict = accelerator.get_state_dict(trainer.model_wrapped)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        with _quiet():
            atomic_save_folder(out_dir, lambda tmp: accelerator.unwrap_model(trainer.model).save_pretrained(
                tmp, state_dict=state_dict))  # each file whole, old or new, if the process is killed
    del state_dict
    record = {
        "init": init,
        "base_model": model_spec,
        "base_fingerprint": setup.provenance["base_fingerprint"],
        "sft_adapter": str(sft_adapter) if sft_adapter is not None else None,
        "sft_adapter_sha256": setup.provenance.get("sft_adapter_sha256"),
        "start_fingerprint": setup.provenance["start_fingerprint"],
        "reference": (f"the starting model (SFT adapter {setup.provenance['adapters_applied']})" if init == "sft"
                      else "the starting model (base)"),
        "model": {k: setup.provenance.get(k) for k in (
            "path", "kind", "quantization", "quantization_requested", "full_precision_fallback", "dtype",
            "device", "adapters_applied", "eos_token", "eos_token_id", "pad_token", "pad_token_id")},
        "add_bos": add_bos,
        "seed": seed,
        "loss_type": cfg.loss_type,
        "mixed_precision": dict(zip(("setting", "used", "reason"), (cfg.mixed_precision, *mixed_precision(cfg)))),
        "trainer_args": setup.trainer_args,
        "lora_args": setup.lora_args,
        "lora_dropout_effective": 0.0,  # TRL's disable_dropout=True zeroes every nn.Dropout, LoRA's included
        "lora_layers": (f"training.fused_lora ({trainer.fused_lora_layers} layers)" if trainer.fused_lora_layers
                        else "peft"),
        "cpu_backend": {"setting": cpu_backend, **trainer.cpu_backend.as_dict()},
        "forward": ("training.packing (prompt trees, training.token_logprobs)" if trainer.packed
                    else f"trl (padding_free {trainer.padding_free}, use_liger_kernel {trainer.args.use_liger_kernel})"),
        "resolved_trainer_arguments": json.loads(json.dumps(trainer.args.to_dict(), default=str)),
        "tokenization": {
            "chat_template": False,
            "completion_suffix": "EOS appended by TRL (tokenizer.eos_token) to chosen and rejected",
            **{k: data[k] for k in ("eos_token_id", "bos_token_id", "implicit_bos_stripped")},
        },
        "history": history,
        "parity_facts": facts,
        "parity": parity.as_dict(),
        **metrics,
        "ref_cache": {"hit": ref["hit"], "key": ref["key"], "path": ref["path"], "parts": ref.get("parts"),
                      "forward_batches": trainer.ref_forward_batches},
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "torch": torch.__version__},
    }
    if accelerator.is_main_process:
        atomic_write_json(out_dir / TRAINING_JSON, record)
    accelerator.wait_for_everyone()  # no process returns before the artifacts exist
    result = DPOResult(out_dir, metrics, setup.trainer_args, setup.lora_args)
    trainer.model = trainer.model_wrapped = None
    del setup, trainer
    from ..models.loading import free

    free(None)
    return result
