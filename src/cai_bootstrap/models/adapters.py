"""Frozen LoRA adapters on a base model: merged into full-precision weights, never into quantized ones.

Merging a LoRA into 8-bit or 4-bit weights de-quantizes each matrix, adds ``s·B·A`` and quantizes
the sum again: most of the adapter's change is smaller than one quantization step of its row and
is rounded away (a simulation on the demo's SFT adapter lost ~40% of its effect in int8, more in
4-bit). So on a quantized base each adapter stays *unmerged*: the quantized layer computes ``W_q x``
and a forward hook adds the adapter's own ``s·B(A x)`` from full-precision A and B, exactly what the
adapter was trained to add. The hooks are not PEFT layers, so a fresh PEFT adapter trained on top
(DPO from SFT) sees them as part of the base: disabling that adapter (TRL's reference) leaves the
model it started from. A and B are buffers of the layer they change, so the weight fingerprint,
``state_dict`` and ``.to(device)`` see them.

PEFT reads the adapter folder (key names, target modules, scaling) and is then unloaded; only plain
LoRA (no DoRA or other variant, no LoRA bias, no ``modules_to_save``) is supported unmerged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .embedded import ModelNotAvailable


def is_quantized(model) -> bool:
    """Whether the model's weights were loaded 8-/4-bit (bitsandbytes through transformers)."""
    return bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
                or getattr(model, "hf_quantizer", None) is not None)


def apply_adapters(model, adapter_dirs: list[str | Path]) -> tuple[Any, str]:
    """Apply adapters in order, frozen: (model, how) with how ``merged`` (full precision) or
    ``unmerged`` (quantized base). The result is a plain transformers model either way."""
    how = "unmerged" if is_quantized(model) else "merged"
    for adapter_dir in adapter_dirs:
        model = attach_unmerged(model, adapter_dir) if how == "unmerged" else merge(model, adapter_dir)
    return model, how


def _peft_model(model, adapter_dir: str | Path):
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ModelNotAvailable(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    return PeftModel.from_pretrained(model, str(adapter_dir))


def merge(model, adapter_dir: str | Path):
    """The adapter merged into full-precision weights (refused on a quantized model)."""
    if is_quantized(model):
        raise ValueError(f"refusing to merge {adapter_dir} into quantized weights (the sum would be "
                         f"re-quantized and most of the adapter lost): use attach_unmerged")
    return _peft_model(model, adapter_dir).merge_and_unload()


class _LowRankDelta:
    """Forward hook: adds ``scaling · B(A x)`` of the adapter stored as buffers ``{prefix}_A/_B``."""

    def __init__(self, prefix: str, scaling: float):
        self.prefix, self.scaling = prefix, scaling

    def __call__(self, module, args, output):
        a, b = getattr(module, f"{self.prefix}_A"), getattr(module, f"{self.prefix}_B")
        x = args[0]
        delta = (x.to(a.dtype) @ a.t()) @ b.t()
        return output + (delta * self.scaling).to(output.dtype)


def attach_unmerged(model, adapter_dir: str | Path):
    """The adapter as frozen full-precision hooks on its target layers; the weights are untouched."""
    import torch
    from peft.tuners.lora import LoraLayer

    peft_model = _peft_model(model, adapter_dir)
    config = peft_model.peft_config["default"]
    unsupported = [what for what, bad in (
        ("use_dora", getattr(config, "use_dora", False)), ("lora_bias", getattr(config, "lora_bias", False)),
        ("modules_to_save", bool(getattr(config, "modules_to_save", None))),
        ("fan_in_fan_out", getattr(config, "fan_in_fan_out", False))) if bad]
    if unsupported:
        raise ValueError(f"{adapter_dir}: {', '.join(unsupported)} cannot be applied unmerged on a quantized base")
    deltas: dict[str, tuple[Any, Any, float]] = {}
    for name, layer in peft_model.base_model.model.named_modules():
        if isinstance(layer, LoraLayer) and "default" in layer.lora_A:
            a, b = layer.lora_A["default"], layer.lora_B["default"]
            if not isinstance(a, torch.nn.Linear) or "default" in layer.lora_variant:
                raise ValueError(f"{adapter_dir}: {name} is not a plain linear LoRA; cannot apply it unmerged")
            deltas[name] = (a.weight.detach().clone(), b.weight.detach().clone(), float(layer.scaling["default"]))
    if not deltas:
        raise ValueError(f"{adapter_dir}: the adapter changes no layer of this model")
    model = peft_model.unload()  # the LoRA layers out again, nothing merged
    for name, (a, b, scaling) in deltas.items():
        module = model.get_submodule(name)
        index = getattr(module, "_unmerged_adapters", 0)
        prefix = f"unmerged_lora_{index}"
        module.register_buffer(f"{prefix}_A", a)
        module.register_buffer(f"{prefix}_B", b)
        module.register_forward_hook(_LowRankDelta(prefix, scaling))
        module._unmerged_adapters = index + 1
    return model
