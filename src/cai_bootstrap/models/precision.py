"""Training precision: bf16 autocast (fp32 weights and LoRA, bf16 matmuls) where the device computes
bf16 natively, fp32 elsewhere.

On a CPU without AVX-512 BF16 or AMX, bf16 matmuls are emulated and run several times slower than
fp32 (``bench/matmul.py``), so ``auto`` keeps such CPUs in fp32. SFT and both DPO runs resolve the
same way and record the decision with its reason in ``training.json``.
"""

from __future__ import annotations

from ..config import MixedPrecision


def native_bf16(device: str) -> str | None:
    """What makes bf16 native on ``device`` ("cuda", "cuda:1", "cpu", ...), or None if it is not."""
    import torch

    if device.startswith("cuda"):
        return "CUDA device with bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    if device == "cpu":
        if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
            return "CPU with AMX"
        if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
            return "CPU with AVX-512 BF16"
    return None


def resolve_mixed_precision(setting: MixedPrecision, device: str) -> tuple[str, str]:
    """(``"bf16"`` or ``"no"``, why) for a training run on ``device``."""
    if setting == "no":
        return "no", "configured"
    native = native_bf16(device)
    if setting == "bf16":
        return "bf16", f"configured ({native})" if native else f"configured (emulated on this {device}: slower than fp32)"
    if setting != "auto":
        raise ValueError(f"mixed_precision must be auto, no or bf16, not {setting!r}")
    if native:
        return "bf16", f"auto: {native}"
    return "no", f"auto: {device} has no native bf16 (CPUs need AVX-512 BF16 or AMX)"
