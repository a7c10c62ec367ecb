"""The CPU backend: this project's own speed code, used on a CPU and nowhere else.

On a 2-core CPU the libraries' generic paths leave a lot on the table, so the project carries its
own code for it (docs/performance.md):

* LoRA layers as one autograd node (``training/fused_lora.py``) and LoRA dropout masks drawn from
  PCG64 as geometric gaps (``training/lora_dropout.py``): SFT and DPO;
* DPO's forward padding-free as prompt trees with per-token log-probs from our own kernel
  (``training/packing.install_packed_lm_head``, ``training/token_logprobs.py``);
* the vocabulary projection in slices tuned to one CPU's cache (``models/lm_head.py``);
* the generation loop with a preallocated KV cache, rows leaving the batch as they finish
  (``generation/engine.py``).

``cpu_backend: auto`` (the default) uses all of it on a CPU whose weights are whole. Everywhere else
the libraries' own paths run, which are the ones made for that hardware: on CUDA (no benchmark on a
GPU has shown this code faster there), under DeepSpeed or FSDP (sharded weights: this code reads
whole weight tensors, where TRL gathers a partitioned LM head and handles DTensors), and with
``cpu_backend: off``. Those paths are PEFT's LoRA layers and torch's dropout, TRL's own DPO forward
(``padding_free`` as ``dpo.packing`` asks, ``use_liger_kernel`` where ``liger_kernel`` is installed on
CUDA) and transformers' ``generate``. Sampling seeds per prompt on both (``generation/engine.py``).
Every training.json and the generation provenance record which backend ran and why.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Setting = Literal["auto", "off"]


@dataclass(frozen=True)
class CPUBackend:
    """Whether this project's CPU speed code runs (``used``), and why."""

    used: bool
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {"used": self.used, "reason": self.reason}


def sharded_strategy() -> str | None:
    """``deepspeed`` or ``fsdp`` when ``accelerate launch`` set this process up for it (the variables
    accelerate and transformers read), else None."""
    for name, var in (("deepspeed", "ACCELERATE_USE_DEEPSPEED"), ("fsdp", "ACCELERATE_USE_FSDP")):
        if os.environ.get(var, "false").lower() in ("1", "true", "yes"):
            return name
    return None


def choose(setting: Setting, device: str, strategy: str | None = None) -> CPUBackend:
    """The decision for a run on ``device`` ("cpu", "cuda", "cuda:0", ...) under ``strategy``."""
    if setting not in ("auto", "off"):
        raise ValueError(f"cpu_backend must be auto or off, not {setting!r}")
    if setting == "off":
        return CPUBackend(False, "configured off")
    if device != "cpu":
        return CPUBackend(False, f"auto: {device} is not a CPU (the libraries' own paths)")
    if strategy is not None:
        return CPUBackend(False, f"auto: {strategy} shards the weights (the libraries' own paths)")
    return CPUBackend(True, "auto: a CPU with whole weights")


def this_device() -> str:
    """The device training runs on in this process ("cuda" or "cpu")."""
    from .models.loading import default_device

    return default_device()


def for_this_process(setting: Setting) -> CPUBackend:
    """The decision for training in this process: its device and the launcher's strategy."""
    return choose(setting, this_device(), sharded_strategy())


def liger_kernel_available(device: str) -> bool:
    """Whether TRL can use Liger's kernels (``use_liger_kernel``) on ``device``: a CUDA device, and
    the ``liger_kernel`` package installed."""
    return device.startswith("cuda") and importlib.util.find_spec("liger_kernel") is not None


def use_lora_layers(model) -> tuple[int, int]:
    """The backend's LoRA dropout and fused LoRA layers swapped into a PEFT model on the CPU:
    (dropouts swapped, layers fused)."""
    from .training import fused_lora, lora_dropout

    return lora_dropout.use_fast_lora_dropout(model), fused_lora.use_fused_lora(model)


def strategy_of_config(accelerate_config) -> str | None:
    """What :func:`sharded_strategy` will say in the processes ``accelerate launch`` starts with this
    config file (for checks made in the parent before launching)."""
    import yaml

    kind = (yaml.safe_load(Path(accelerate_config).read_text(encoding="utf-8")) or {}).get("distributed_type")
    return {"DEEPSPEED": "deepspeed", "FSDP": "fsdp"}.get(str(kind))
