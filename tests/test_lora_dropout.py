"""training.lora_dropout: the same inverted dropout as nn.Dropout, from cheaper masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cai_bootstrap.training.lora_dropout import LoRADropout, dropout_multiplier, use_fast_lora_dropout


def keep_mask(shape, p, bits) -> torch.Tensor:
    return dropout_multiplier(shape, p, bits) != 0


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_keep_rate_is_one_minus_p_within_sampling_error(p):
    n = 2_000_000
    rate = float(keep_mask((n,), p, np.random.PCG64(0)).float().mean())
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    # and neighbouring elements (the two halves of one 64-bit draw) are independent
    m = keep_mask((n // 2, 2), p, np.random.PCG64(1)).float()
    both = float((m[:, 0] * m[:, 1]).mean())
    assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / (n // 2))
    # drops are neither bunched nor evenly spread: per-block counts have the binomial variance
    counts = (~keep_mask((2000, 1000), p, np.random.PCG64(2))).sum(1).double()
    assert abs(float(counts.var()) / (1000 * p * (1 - p)) - 1) < 0.2  # sd of the ratio ~0.03


def test_multipliers_of_any_length_at_a_high_drop_rate():
    for n in (0, 1, 7, 100):
        multiplier = dropout_multiplier((n,), 0.9, np.random.PCG64(n))
        assert multiplier.shape == (n,) and multiplier.dtype == torch.float32
        assert all(v == 0.0 or v == pytest.approx(10.0) for v in multiplier.tolist())
    assert not keep_mask((50_000,), 0.999, np.random.PCG64(0)).all()
    torch.testing.assert_close(dropout_multiplier((3, 4), 0.0, np.random.PCG64(0)), torch.ones(3, 4))


def test_forward_and_backward_scale_kept_values_and_zero_the_rest():
    torch.manual_seed(0)
    x = torch.randn(64, 96, requires_grad=True)
    drop = LoRADropout(0.25).train()
    y = drop(x)
    kept = y != 0
    assert 0.6 < float(kept.float().mean()) < 0.9
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)


def test_masks_follow_torchs_seed_and_differ_between_calls():
    x = torch.ones(32, 32)
    drop = LoRADropout(0.5).train()
    torch.manual_seed(3)
    a, b = drop(x), drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), a) and not torch.equal(a, b)


def test_identity_in_eval_mode_or_at_zero():
    x = torch.randn(8, 8)
    assert LoRADropout(0.5).eval()(x) is x and LoRADropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        LoRADropout(1.0)


def test_swapped_into_every_lora_slot_of_a_peft_model(tiny_model_folder):
    from peft import LoraConfig, get_peft_model

    from cai_bootstrap.models.loading import load_model

    model = get_peft_model(load_model(str(tiny_model_folder), trainable=True).model,
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear",
                                      init_lora_weights=False, task_type="CAUSAL_LM"))  # B != 0: dropout shows
    keys = set(model.state_dict())
    adapted = sum(1 for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict))
    assert use_fast_lora_dropout(model) == adapted > 0
    assert all(isinstance(d, LoRADropout) and d.p == 0.1 for m in model.modules()
               if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict) for d in m.lora_dropout.values())
    assert set(model.state_dict()) == keys  # nothing new to save or load
    ids = torch.arange(1, 17)[None]
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        dropped = model(input_ids=ids).logits
    assert not torch.allclose(plain, dropped)  # the new dropout is live in training mode
