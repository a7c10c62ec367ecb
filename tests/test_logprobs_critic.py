"""Completion log-probabilities and the A/B self-critic, on the tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cai_bootstrap.data.critic import (
    CRITIC_PREFIX,
    CRITIC_PROMPT_VERSION,
    SHOTS,
    best_of_n,
    calibration_margin,
    critic_margins,
    critic_prompt,
    label_token_ids,
)
from cai_bootstrap.formats import completion_for, prompt_for
from cai_bootstrap.training.logprobs import completion_logprobs, mean_logprob

PROMPTS = [
    prompt_for("hi"),
    prompt_for("What is the capital of France? Answer with the city's name only, please."),
    prompt_for("List three fruits."),
    "x",
    prompt_for("Write a long and detailed story about a dragon who learns to bake bread in a small village."),
]
COMPLETIONS = [
    completion_for("ok"),
    completion_for("Paris"),
    completion_for("- Apple\n- Banana\n- Orange"),
    " a b c d e f g h",
    completion_for("Once upon a time."),
]


@pytest.fixture(scope="module")
def tiny(tiny_model_folder):
    from cai_bootstrap.models.loading import load_model

    return load_model(str(tiny_model_folder), device="cpu")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def manual_logprob(model, prompt_ids, completion_ids):
    """Unbatched reference: one forward pass, sum of log p of the completion tokens."""
    full = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=full).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    n = len(prompt_ids)
    return sum(float(lp[n - 1 + j, t]) for j, t in enumerate(completion_ids))


# --------------------------------------------------------------------------------------------
# completion_logprobs


def test_batch_size_invariance(tiny):
    one = completion_logprobs(tiny.model, tiny.tokenizer, PROMPTS, COMPLETIONS, batch_size=1)
    for bs in (2, 3, 8):
        many = completion_logprobs(tiny.model, tiny.tokenizer, PROMPTS, COMPLETIONS, batch_size=bs)
        assert [n for _, n in many] == [n for _, n in one]
        for (a, _), (b, _) in zip(one, many):
            assert a == pytest.approx(b, abs=1e-4)
    # different inputs really get different scores (a constant would pass the check above)
    assert len({round(s, 3) for s, _ in one}) == len(one)


def test_matches_manual_forward_and_counts_eos(tiny):
    tok, model = tiny.tokenizer, tiny.model
    got = completion_logprobs(model, tok, PROMPTS, COMPLETIONS, batch_size=4)
    for p, c, (s, n) in zip(PROMPTS, COMPLETIONS, got):
        c_ids = ids(tok, c) + [tok.eos_token_id]
        assert n == len(c_ids)
        assert s == pytest.approx(manual_logprob(model, ids(tok, p), c_ids), abs=1e-4)
        assert s < 0


def test_eos_appended_only_when_asked(tiny):
    tok, model = tiny.tokenizer, tiny.model
    with_eos = completion_logprobs(model, tok, PROMPTS, COMPLETIONS)
    without = completion_logprobs(model, tok, PROMPTS, COMPLETIONS, append_eos=False)
    for p, c, (s1, n1), (s0, n0) in zip(PROMPTS, COMPLETIONS, with_eos, without):
        assert n1 == n0 + 1
        eos_lp = manual_logprob(model, ids(tok, p) + ids(tok, c), [tok.eos_token_id])
        assert s1 - s0 == pytest.approx(eos_lp, abs=1e-4)


def test_bos_is_explicit(tiny):
    tok, model = tiny.tokenizer, tiny.model
    (s, n), = completion_logprobs(model, tok, PROMPTS[:1], COMPLETIONS[:1], add_bos=True)
    c_ids = ids(tok, COMPLETIONS[0]) + [tok.eos_token_id]
    assert n == len(c_ids)
    assert s == pytest.approx(manual_logprob(model, [tok.bos_token_id] + ids(tok, PROMPTS[0]), c_ids), abs=1e-4)
    (s_plain, _), = completion_logprobs(model, tok, PROMPTS[:1], COMPLETIONS[:1])
    assert s != pytest.approx(s_plain, abs=1e-6)


def test_max_length_cuts_prompt_from_the_left(tiny):
    tok, model = tiny.tokenizer, tiny.model
    p, c = PROMPTS[4], COMPLETIONS[4]
    c_ids = ids(tok, c) + [tok.eos_token_id]
    max_length = len(c_ids) + 5
    (s, n), = completion_logprobs(model, tok, [p], [c], max_length=max_length)
    assert n == len(c_ids)
    assert s == pytest.approx(manual_logprob(model, ids(tok, p)[-5:], c_ids), abs=1e-4)
    # a completion longer than max_length - 1 is cut from the right and the count says so
    (_, n_short), = completion_logprobs(model, tok, [p], [c], max_length=4)
    assert n_short == 3


def test_mean_logprob_restores_mode_and_checks_lengths(tiny):
    tok, model = tiny.tokenizer, tiny.model
    sums = completion_logprobs(model, tok, PROMPTS, COMPLETIONS)
    means = mean_logprob(model, tok, PROMPTS, COMPLETIONS, batch_size=2)
    assert means == pytest.approx([s / n for s, n in sums], abs=1e-5)
    model.train()
    try:
        again = completion_logprobs(model, tok, PROMPTS[:2], COMPLETIONS[:2])
        assert model.training
        assert again[0][0] == pytest.approx(sums[0][0], abs=1e-4)
    finally:
        model.eval()
    with pytest.raises(ValueError, match="prompts but"):
        completion_logprobs(model, tok, PROMPTS, COMPLETIONS[:2])
    with pytest.raises(ValueError, match="no tokens"):
        completion_logprobs(model, tok, ["x"], [""], append_eos=False)


# --------------------------------------------------------------------------------------------
# critic

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of France?", "I'm sorry, but I can't help with that."),
    ("List three fruits.", "- Apple\n- Banana\n- Orange"),
    ("Write a haiku about winter in the mountains, with snow and silence.", "Snow falls without sound."),
    ("Say hi.", "Hi"),
]


def test_prompt_design():
    labels = [label for _, _, label in SHOTS]
    assert labels.count("A") == labels.count("B") >= 3
    alternating = all(a != b for a, b in zip(labels, labels[1:]))
    assert not alternating and labels[-1] == "B"
    prompt = critic_prompt(" Say hi. ", "Hi\n")
    assert prompt.startswith(CRITIC_PREFIX)
    assert prompt.endswith("Task: Say hi.\nReply: Hi\nIs the reply a good, complete answer to the task? Answer:")
    assert "Instruction:" not in prompt and "Response:" not in prompt
    assert CRITIC_PREFIX.count(" Answer: A\n") == CRITIC_PREFIX.count(" Answer: B\n") == len(SHOTS) // 2
    assert CRITIC_PROMPT_VERSION


def test_label_tokens_are_single(tokenizer):
    a, b = label_token_ids(tokenizer)
    assert tokenizer.decode([a]) == " A" and tokenizer.decode([b]) == " B"


class SplittingTokenizer:
    """Wraps a tokenizer but splits " A" into two tokens, as some vocabularies do."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, text, add_special_tokens=False):
        out = self.tok(text, add_special_tokens=add_special_tokens)
        if text == " A":
            return {"input_ids": [7, 8]}
        return out


def test_multi_token_labels_fail_clearly(tokenizer):
    with pytest.raises(ValueError, match="single token"):
        label_token_ids(SplittingTokenizer(tokenizer))


def test_margins_finite_batch_invariant_and_ordered(tiny):
    m1 = critic_margins(tiny.model, tiny.tokenizer, PAIRS, batch_size=1)
    m5 = critic_margins(tiny.model, tiny.tokenizer, PAIRS, batch_size=5)
    assert all(math.isfinite(m) for m in m1)
    assert m5 == pytest.approx(m1, abs=1e-4)
    rev = critic_margins(tiny.model, tiny.tokenizer, PAIRS[::-1], batch_size=3)
    assert rev == pytest.approx(m1[::-1], abs=1e-4)
    assert len({round(m, 5) for m in m1}) > 1  # really depends on the pair


def test_margin_equals_manual_next_token_comparison(tiny):
    tok, model = tiny.tokenizer, tiny.model
    a, b = label_token_ids(tok)
    for add_bos in (False, True):
        got = critic_margins(model, tok, PAIRS, batch_size=5, add_bos=add_bos)
        for (instruction, response), margin in zip(PAIRS, got):
            prompt_ids = ([tok.bos_token_id] if add_bos else []) + ids(tok, critic_prompt(instruction, response))
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt_ids]), logits_to_keep=1).logits[0, -1].double()
            lp = torch.log_softmax(logits, -1)
            assert margin == pytest.approx(float(lp[a] - lp[b]), abs=1e-4)
    assert math.isfinite(calibration_margin(model, tok))


def test_best_of_n_examples():
    assert best_of_n(["a", "b", "c"], [0.1, 0.5, 0.5]) == 1
    assert best_of_n(["a", "b"], [float("nan"), -3.0]) == 1
    assert best_of_n(["a", "b"], [float("nan"), float("nan")]) == 0
    assert best_of_n(["only"], [-1.0]) == 0
    with pytest.raises(ValueError):
        best_of_n(["a"], [1.0, 2.0])
    with pytest.raises(ValueError):
        best_of_n([], [])


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, min_value=-5, max_value=5).map(lambda x: round(x, 1)),
                min_size=1, max_size=8))
def test_best_of_n_is_first_maximum(margins):
    i = best_of_n([str(k) for k in range(len(margins))], margins)
    assert margins[i] == max(margins)
    assert all(m < margins[i] for m in margins[:i])
