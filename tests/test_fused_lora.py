"""training.fused_lora: one autograd node computes what PEFT's LoRA layer computes, masks included."""

from __future__ import annotations

import pytest
import torch

from cai_bootstrap.training import fused_lora
from cai_bootstrap.training.fused_lora import use_fused_lora
from cai_bootstrap.training.lora_dropout import use_fast_lora_dropout


def _lora_pair(p: float, bias: bool):
    """Two identical PEFT models of one adapted linear layer (B != 0); the second one fused."""
    from peft import LoraConfig, get_peft_model

    def build():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(24, 40, bias=bias))
        peft = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["0"],
                                              init_lora_weights=False))
        use_fast_lora_dropout(peft)
        return peft.train()

    plain, fused = build(), build()
    assert use_fused_lora(fused) == 1
    return plain, fused


def _run(model, x, seed=1):
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_output_and_gradients_equal_pefts(p, bias, monkeypatch):
    calls = []
    apply = fused_lora._LoRALinear.apply
    monkeypatch.setattr(fused_lora._LoRALinear, "apply", lambda *a: calls.append(1) or apply(*a))
    plain, fused = _lora_pair(p, bias)
    x = torch.randn(3, 5, 24)
    y0, gx0, g0 = _run(plain, x)
    assert not calls
    y1, gx1, g1 = _run(fused, x)
    assert calls == [1]  # the fused node ran, PEFT's did not
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g0.keys() and any("lora_A" in n for n in g0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-5, msg=name)
    if p:  # the same masks: another seed gives another output
        assert not torch.allclose(_run(fused, x, seed=2)[0], y0)


def test_frozen_input_gets_no_gradient_and_lora_still_learns():
    _, fused = _lora_pair(0.0, False)
    y = fused(torch.randn(4, 24))  # x needs no gradient: the input gradient is not computed
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fused.parameters() if p.requires_grad)


def test_uncovered_calls_run_pefts_forward(monkeypatch):
    plain, fused = _lora_pair(0.3, False)
    monkeypatch.setattr(fused_lora._LoRALinear, "apply", lambda *a: pytest.fail("fused path taken"))
    x = torch.randn(4, 24)
    with fused.disable_adapter(), torch.no_grad():  # the reference pass of DPO
        torch.testing.assert_close(fused(x), fused.base_model.model[0].base_layer(x))
    fused.base_model.model[0].base_layer.weight.requires_grad_(True)  # a trainable base: PEFT's node
    _, _, grads = _run(fused, x)
    assert any(n.endswith("base_layer.weight") for n in grads)


def test_torchs_own_active_dropout_runs_pefts_forward(monkeypatch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(24, 40)),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["0"])).train()
    assert use_fused_lora(model) == 1
    monkeypatch.setattr(fused_lora._LoRALinear, "apply", lambda *a: pytest.fail("fused path taken"))
    model(torch.randn(4, 24))  # nn.Dropout(0.3): PEFT's forward, torch's masks
    model.eval()
    with pytest.raises(pytest.fail.Exception):  # inactive in eval mode: the fused node
        model(torch.randn(4, 24))


def test_eval_mode_draws_no_mask():
    _, fused = _lora_pair(0.3, False)
    fused.eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        a = fused(torch.ones(2, 24))
    assert torch.equal(torch.get_rng_state(), state)
    fused.train()
    with torch.no_grad():
        assert not torch.allclose(fused(torch.ones(2, 24)), a)  # training mode drops


def test_whole_model_loss_and_adapter_gradients_equal_pefts(tiny_model_folder, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from cai_bootstrap.models.loading import load_model

    def build(fuse: bool):
        torch.manual_seed(0)
        model = get_peft_model(load_model(str(tiny_model_folder), trainable=True).model,
                               LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear",
                                          init_lora_weights=False, task_type="CAUSAL_LM"))
        use_fast_lora_dropout(model)
        keys = set(model.state_dict())
        layers = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
        if fuse:
            assert use_fused_lora(model) == layers > 0
        assert set(model.state_dict()) == keys  # nothing new to save or load
        return model.train()

    calls = []
    apply = fused_lora._LoRALinear.apply
    monkeypatch.setattr(fused_lora._LoRALinear, "apply", lambda *a: calls.append(1) or apply(*a))
    ids = torch.arange(1, 33).view(2, 16)
    results = []
    for fuse in (False, True):
        model = build(fuse)
        torch.manual_seed(5)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss0, g0), (loss1, g1) = results
    assert len(calls) == sum(1 for n in g0 if "lora_A" in n)  # every adapted layer ran fused, once
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)
