"""LoRA dropout with cheaper masks, swapped into a CPU PEFT model's ``lora_dropout`` slots.

PEFT gives every adapted layer its own ``nn.Dropout``; on a CPU each call draws one Bernoulli
sample per element through torch's Mersenne Twister (~6.6 ns an element here), which was 13% of an
SFT step on 2 cores (``bench/training.py``). This module takes 32 random bits per element from
numpy's PCG64 (~1.4 ns) and keeps an element when its low 31 bits, as an integer, are at or above
``round(p * 2**31)``: the same inverted dropout (kept values scaled by ``1 / (1 - p)``, a fresh
independent mask per call), with the drop probability exact to 2**-31. Each call seeds its
generator with one draw from torch's, so torch's RNG state alone (``set_seed``, and what a
checkpoint restores) still determines every mask.
"""

from __future__ import annotations

import torch

_BITS = 31


def keep_mask(shape, p: float, bits) -> torch.Tensor:
    """A bool mask, True with probability ``1 - p`` (to 2**-31), independently per element;
    ``bits`` is a numpy bit generator."""
    import numpy as np

    n = int(np.prod(shape))
    raw = bits.random_raw((n + 1) // 2)  # uint64: two 32-bit lanes per draw
    lanes = torch.from_numpy(raw.view(np.int32)[:n]).bitwise_and_((1 << _BITS) - 1)
    return torch.ge(lanes, round(p * (1 << _BITS))).view(shape)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


class LoRADropout(torch.nn.Module):
    """Drop-in for ``nn.Dropout(p)`` on CPU tensors (identity in eval mode or at p = 0)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        import numpy as np

        bits = np.random.PCG64(int(torch.randint(0, 2**62, ())))  # seeded from torch's state: see above
        return _MaskedScale.apply(x, keep_mask(x.shape, self.p, bits), 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_lora_dropout(model) -> int:
    """Replace every ``nn.Dropout`` in the ``lora_dropout`` dicts of a model on the CPU; returns
    how many (0 on other devices, whose own dropout kernels are fast)."""
    if next(model.parameters()).device.type != "cpu":
        return 0
    swapped = 0
    for module in model.modules():
        slots = getattr(module, "lora_dropout", None)
        if not isinstance(slots, torch.nn.ModuleDict):
            continue
        for name, dropout in list(slots.items()):
            if isinstance(dropout, torch.nn.Dropout):
                slots[name] = LoRADropout(dropout.p)
                slots[name].train(dropout.training)
                swapped += 1
    return swapped
