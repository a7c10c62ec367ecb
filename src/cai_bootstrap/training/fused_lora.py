"""LoRA linear layers as one autograd node on CPU, swapped into a PEFT model's ``lora.Linear`` layers.

PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as six autograd nodes. Their rank-16
matmuls, the scaling and the addition (two passes over the output) and the matching backward steps
made a LoRA fwd+bwd ~33% dearer than the frozen base layer's on 2 cores (``bench/training.py``).
Here one node does it:

- without dropout (DPO: TRL zeroes it) the adapter is merged for the call, ``W + s * B @ A`` (one
  ``out x in x r`` product), so the forward is one matmul and so is the input gradient;
- with dropout (SFT) the forward adds ``s * h @ B.T`` into the base output in place (``addmm_``),
  and the backward adds the LoRA input gradient the same way.

Only the input (``x``) and the dropout multiplier (mask / (1 - p)) are saved; the rest is recomputed
from the weights, so activation memory stays below PEFT's (which keeps ``dropout(x)``, its mask and
``h``). The masks come from the layer's :class:`~.lora_dropout.LoRADropout` in the same order as
PEFT's forward draws them, so a run's RNG stream is unchanged. A call the node does not cover
(adapter disabled or merged, several adapters, extra arguments, a trainable base weight, autocast,
a non-fp32 or non-CPU tensor, an active dropout drawing torch's own masks) runs PEFT's own forward.
"""

from __future__ import annotations

import types

import torch

from .lora_dropout import LoRADropout


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dropout):
        # dropout: None, or the mask times 1 / (1 - p) as x's dtype, shaped [tokens, in]
        flat = x.reshape(-1, x.shape[-1])
        if dropout is None:
            out = torch.nn.functional.linear(flat, torch.addmm(weight, lora_b, lora_a, alpha=scaling), bias)
        else:
            out = torch.nn.functional.linear(flat, weight, bias)
            out.addmm_((flat * dropout) @ lora_a.t(), lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, dropout)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, dropout = ctx.saved_tensors
        s = ctx.scaling
        flat = x.reshape(-1, x.shape[-1])
        g = grad.reshape(-1, grad.shape[-1])
        lora_in = flat if dropout is None else flat * dropout
        gh = (g @ lora_b).mul_(s)  # d loss / d h, h = dropout(x) @ A.T
        grad_a = gh.t() @ lora_in if ctx.needs_input_grad[3] else None
        grad_b = (g.t() @ (lora_in @ lora_a.t())).mul_(s) if ctx.needs_input_grad[4] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            if dropout is None:
                grad_x = g @ torch.addmm(weight, lora_b, lora_a, alpha=s)
            else:
                grad_x = (g @ weight).addcmul_(gh @ lora_a, dropout)
            grad_x = grad_x.view(x.shape)
        grad_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


def _fused_forward(self, x, *args, **kwargs):
    if args or kwargs or not _covered(self, x):
        return self._peft_forward(x, *args, **kwargs)
    name = self.active_adapters[0]
    base = self.base_layer
    dropout = self.lora_dropout[name]
    multiplier = None
    if dropout.training and getattr(dropout, "p", 0.0) > 0:  # nn.Identity has no p
        if not isinstance(dropout, LoRADropout):
            return self._peft_forward(x)  # torch's own masks: another RNG stream
        multiplier = dropout.multiplier(x.shape[:-1].numel(), x.shape[-1])  # fp32, as x (_covered)
    return _LoRALinear.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                             float(self.scaling[name]), multiplier)


def _covered(layer, x) -> bool:
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return False
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant or layer.lora_B[name].bias is not None \
            or not isinstance(layer.lora_dropout[name], torch.nn.Identity | torch.nn.Dropout | LoRADropout):
        return False
    weight = layer.base_layer.weight
    tensors = (x, weight, layer.lora_A[name].weight, layer.lora_B[name].weight)
    return (not weight.requires_grad and not torch.is_autocast_enabled("cpu")
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors))


def use_fused_lora(model) -> int:
    """Give every plain ``lora.Linear`` (an ``nn.Linear`` base, not fan-in-fan-out) of a CPU model
    the fused forward; returns how many (0 on other devices, where PEFT's path runs on fast kernels)."""
    from peft.tuners.lora.layer import Linear as LoRALinear

    if next(model.parameters()).device.type != "cpu":
        return 0
    fused = 0
    for module in model.modules():
        if type(module) is LoRALinear and type(module.base_layer) is torch.nn.Linear and not module.fan_in_fan_out:
            if not hasattr(module, "_peft_forward"):
                module._peft_forward = module.forward
                module.forward = types.MethodType(_fused_forward, module)
            fused += 1
    return fused
