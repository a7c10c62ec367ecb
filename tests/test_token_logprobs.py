"""training.token_logprobs computes what TRL's ChunkedLogProbFunction computes (values and gradients)."""

from __future__ import annotations

import pytest
import torch
from trl.kernels import ChunkedLogProbFunction

from cai_bootstrap.models import lm_head
from cai_bootstrap.training import token_logprobs
from cai_bootstrap.training.token_logprobs import token_log_probs

FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def trl(hidden, weight, targets, outputs):
    return ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 1000, None, 1.0, outputs)


@pytest.fixture
def case(monkeypatch):
    # small tiles, so that several token tiles and vocabulary slices (one of them partial) are exercised
    monkeypatch.setattr(token_logprobs, "TOKEN_TILE", 64)
    monkeypatch.setattr(lm_head, "vocab_slice", lambda tokens: 700)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(150, 32, generator=g, requires_grad=True)
    weight = (torch.randn(3000, 32, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, 3000, (150,), generator=g)
    with torch.no_grad():
        targets[:20] = (hidden[:20] @ weight.t()).argmax(-1)  # some targets are the top token
    return hidden, weight, targets


def test_every_field_matches_trl(case):
    hidden, weight, targets = case
    ours, theirs = token_log_probs(hidden, weight, targets, FIELDS), trl(hidden, weight, targets, FIELDS)
    for name, a, b in zip(FIELDS, ours, theirs, strict=True):
        if name == "is_top1":
            assert torch.equal(a, b) and int(a.sum()) >= 20
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4, msg=name)


def test_unrequested_fields_are_none_and_log_probs_normalise(case):
    hidden, weight, targets = case
    log_probs, *rest = token_log_probs(hidden, weight, targets)
    assert rest == [None, None, None, None]
    every = torch.log_softmax(hidden @ weight.t(), -1)  # the plain path
    torch.testing.assert_close(log_probs, every.gather(1, targets[:, None]).squeeze(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keep", [True, False], ids=["exp-kept", "recomputed"])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_gradients_match_trl(case, with_entropy, keep, monkeypatch):
    hidden, weight, targets = case
    monkeypatch.setattr(token_logprobs, "KEEP_BYTES", 2**30 if keep else 0)
    g = torch.Generator().manual_seed(1)
    w_lp, w_h = torch.randn(150, generator=g), torch.randn(150, generator=g)
    outputs = ("log_probs", "entropy") if with_entropy else ("log_probs",)

    def grads(fn):
        out = fn(hidden, weight, targets, outputs)
        loss = (out[0] * w_lp).sum() + ((out[1] * w_h).sum() if with_entropy else 0)
        return torch.autograd.grad(loss, (hidden, weight))

    calls = []
    real = token_logprobs.project
    monkeypatch.setattr(token_logprobs, "project", lambda *a: calls.append(1) or real(*a))
    mine = grads(token_log_probs)
    tiles = -(-150 // 64)
    # the backward projects again only when it did not keep exp(logits) (or needs log p for entropy)
    assert len(calls) == tiles + (0 if keep and not with_entropy else tiles)
    for a, b in zip(mine, grads(trl), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # and the gradients are those of the plain log-softmax
    every = torch.log_softmax(hidden @ weight.t(), -1)
    plain = (every.gather(1, targets[:, None]).squeeze(1) * w_lp).sum()
    if with_entropy:
        plain = plain + (-(every.exp() * every).sum(-1) * w_h).sum()
    for a, b in zip(grads(token_log_probs), torch.autograd.grad(plain, (hidden, weight)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_second_backward_recomputes_what_the_first_used_up(case):
    hidden, weight, targets = case
    loss = token_log_probs(hidden, weight, targets)[0].sum()
    first = torch.autograd.grad(loss, hidden, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(loss, hidden)[0], first, rtol=1e-5, atol=1e-6)
