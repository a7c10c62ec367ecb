"""The vocabulary projection in slices: MKL's sgemm with a 49k-wide output runs at about half its
speed on this AMD CPU, and the slice width matters as much. Measured here (GFLOP/s, 576 x 49152,
slice widths interleaved in one process):

    tokens    full   512-wide   4096-wide
      64        38         79          62
     128        58         99          68
     256         -        111          70
    2048         -         83         105

Probably because a 512-column slice of the weight (1.2 MB) is about the size of this CPU's 1 MB L2
cache; past ~1k tokens the wider slice wins. Used by the decode loop (a batch of rows) and by the
training log-prob kernel (256-token tiles)."""

from __future__ import annotations

from contextlib import contextmanager

import torch


def vocab_slice(tokens: int) -> int:
    """Columns per sgemm call for ``tokens`` rows (the table above)."""
    return 512 if tokens <= 1024 else 4096


def project(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = hidden @ weight.T`` ([N, H] x [V, H] -> [N, V]), one vocabulary slice at a time."""
    width = vocab_slice(hidden.shape[0])
    for start in range(0, weight.shape[0], width):
        torch.mm(hidden, weight[start:start + width].t(), out=out[:, start:start + width])
    return out


@contextmanager
def sliced_lm_head(model):
    """Within the block, the model's output embedding projects in vocabulary slices, where it is a
    plain bias-free fp32 ``nn.Linear`` on the CPU (elsewhere nothing changes). Same logits up to
    fp32 summation order."""
    head = model.get_output_embeddings()
    if not (type(head) is torch.nn.Linear and head.bias is None and head.weight.dtype == torch.float32
            and head.weight.device.type == "cpu"):
        yield
        return

    def forward(x):
        flat = x.reshape(-1, x.shape[-1])
        out = project(flat, head.weight, torch.empty((flat.shape[0], head.out_features), dtype=x.dtype))
        return out.view(*x.shape[:-1], head.out_features)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def plain_lm_head(model) -> bool:
    """Whether the model's logits are exactly ``output_embeddings(hidden)``: a linear head with no
    scaling or soft-capping applied after it."""
    config = model.config.get_text_config()
    return (isinstance(model.get_output_embeddings(), torch.nn.Linear)
            and not any(getattr(config, k, None) is not None for k in SCALED_LOGITS))
