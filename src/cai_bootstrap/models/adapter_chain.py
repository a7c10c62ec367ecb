"""An adapter chain as one LoRA adapter, for servers that apply one adapter per request (vLLM).

``load_model`` merges a chain in order: W + s1·B1·A1 + s2·B2·A2 + … (each adapter was trained on the
weights with the ones before it merged, so its delta is simply added). Stacking the A matrices and
the scaled B matrices gives one adapter of rank r1 + r2 + … with scaling 1 whose B·A is exactly that
sum. It is a few megabytes, where a merged checkpoint is the whole model (~64 GB at 32B).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .embedded import ModelNotAvailable

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # before each module's name in PEFT's weight keys


class AdapterNotServable(UserError, ValueError):
    """An adapter that cannot be served as a plain LoRA (vLLM's LoRA support, or a combined chain)."""


@dataclass(frozen=True)
class Lora:
    folder: Path
    config: dict[str, Any]

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def scaling(self) -> float:
        """PEFT's factor on B·A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        alpha = float(self.config["lora_alpha"])
        return alpha / math.sqrt(self.rank) if self.config.get("use_rslora") else alpha / self.rank


def read_lora(folder: str | Path) -> Lora:
    """The adapter's config, checked for what a plain LoRA server applies (one rank and alpha, no
    DoRA, biases or extra trained modules); anything else fails here, naming the field."""
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise ModelNotAvailable(f"{folder} is not a PEFT adapter folder (no {CONFIG})")
    if not (folder / WEIGHTS).is_file():
        raise ModelNotAvailable(f"{folder}: no {WEIGHTS} (adapters are saved as safetensors)")
    config = json.loads(path.read_text(encoding="utf-8"))
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type: {config.get('peft_type')!r} (only LORA)")
    for key, allowed in (("use_dora", (False, None)), ("lora_bias", (False, None)), ("bias", ("none", None)),
                         ("modules_to_save", (None, [])), ("rank_pattern", ({}, None)),
                         ("alpha_pattern", ({}, None)), ("layer_replication", (None,))):
        if config.get(key) not in allowed:
            problems.append(f"{key}: {config[key]!r} (a plain LoRA needs {allowed[0]!r})")
    if problems:
        raise AdapterNotServable(f"{path}: cannot be served as a LoRA adapter: " + "; ".join(problems))
    return Lora(folder, config)


def _pairs(folder: Path) -> dict[str, dict[str, Any]]:
    """``module prefix -> {"A": tensor, "B": tensor}`` from PEFT's ``<prefix>.lora_A.weight`` keys."""
    from safetensors.torch import load_file

    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(folder / WEIGHTS).items():
        for part in ("A", "B"):
            suffix = f".lora_{part}.weight"
            if key.endswith(suffix):
                pairs.setdefault(key[:-len(suffix)], {})[part] = tensor
                break
        else:
            raise AdapterNotServable(f"{folder / WEIGHTS}: {key}: not a lora_A/lora_B weight")
    for prefix, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterNotServable(f"{folder / WEIGHTS}: {prefix}: lora_A and lora_B must come together")
    return pairs


def combine(folders: list[str | Path], out: str | Path) -> Lora:
    """Write the chain ``folders`` (applied in order) as one adapter in ``out``; returns it.

    A module that only some adapters target gets zero blocks from the others, which add nothing.
    The sum is computed in fp32 and stored in the adapters' dtype.
    """
    import torch
    from safetensors.torch import save_file

    loras = [read_lora(f) for f in folders]
    pairs = [_pairs(lo.folder) for lo in loras]
    prefixes = list(dict.fromkeys(p for adapter in pairs for p in adapter))
    tensors = {}
    for prefix in prefixes:
        some = next(a[prefix] for a in pairs if prefix in a)
        n_in, n_out, dtype = some["A"].shape[1], some["B"].shape[0], some["A"].dtype
        blocks_a, blocks_b = [], []
        for lora, adapter in zip(loras, pairs, strict=True):
            if prefix in adapter:
                blocks_a.append(adapter[prefix]["A"].float())
                blocks_b.append(adapter[prefix]["B"].float() * lora.scaling)
            else:
                blocks_a.append(torch.zeros(lora.rank, n_in))
                blocks_b.append(torch.zeros(n_out, lora.rank))
        tensors[f"{prefix}.lora_A.weight"] = torch.cat(blocks_a, dim=0).to(dtype).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = torch.cat(blocks_b, dim=1).to(dtype).contiguous()
    rank = sum(lo.rank for lo in loras)
    config = {**loras[0].config, "r": rank, "lora_alpha": rank, "use_rslora": False, "lora_dropout": 0.0,
              "target_modules": sorted(p.removeprefix(PEFT_PREFIX) for p in prefixes)}
    # Written beside the target and renamed: a reader never sees half an adapter.
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Lora(out, config)
