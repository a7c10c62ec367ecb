"""training.packing.prompt_tree: each distinct prompt once, completions attending to it and themselves."""

from __future__ import annotations

import torch

from cai_bootstrap.models.loading import load_model
from cai_bootstrap.training import packing
from cai_bootstrap.training.packing import cheapest_rows, prompt_tree

SEQUENCES = [[1, 2, 3, 10, 11], [1, 2, 3, 20], [4, 5, 30, 31], [1, 2, 3, 40, 41, 42]]
PROMPTS = [3, 3, 2, 3]


def test_layout_shares_each_prompt_and_continues_positions():
    tree = prompt_tree(SEQUENCES, PROMPTS, pad_id=0)
    assert tree.input_ids.tolist() == [[1, 2, 3, 10, 11, 20, 40, 41, 42, 4, 5, 30, 31]]  # 13 tokens, not 18
    assert tree.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 3, 4, 5, 0, 1, 2, 3]]
    m = tree.mask[0, 0]
    assert m[5].nonzero().flatten().tolist() == [0, 1, 2, 5]  # "20" sees its prompt and itself, not 10/11
    assert m[8].nonzero().flatten().tolist() == [0, 1, 2, 6, 7, 8]
    assert m[12].nonzero().flatten().tolist() == [9, 10, 11, 12]  # the other segment sees nothing of the first
    seq, col = torch.tensor([1, 1, 3, 2]), torch.tensor([2, 3, 5, 3])
    assert tree.flat_index(seq, col, torch.tensor(PROMPTS)[seq]).tolist() == [2, 5, 8, 12]


def test_cheapest_rows_trade_padding_against_attention_width(monkeypatch):
    assert cheapest_rows([137, 130, 120, 118, 117, 110, 95, 90]) == [[0, 7], [1, 6], [2, 5], [3, 4]]  # 4 x ~227
    assert cheapest_rows([60, 30, 30]) == [[0], [1, 2]]  # no padding, and narrower than one row
    monkeypatch.setattr(packing, "ATTENTION_COST", 1.0)  # attention dear: a row each
    assert cheapest_rows([50] * 3) == [[0], [1], [2]]


def test_padding_sees_only_itself(monkeypatch):
    monkeypatch.setattr(packing, "ATTENTION_COST", 1.0)
    tree = prompt_tree(SEQUENCES, PROMPTS, pad_id=0)
    rows, width = tree.input_ids.shape
    assert rows == 2 and width == 9  # segments of 9 and 4 tokens, a row each
    pad = tree.input_ids == 0
    eye = torch.eye(width, dtype=torch.bool)
    assert bool((tree.mask[:, 0][pad] == eye.expand(rows, width, width)[pad]).all())


def test_tree_rows_compute_what_separate_sequences_compute(tiny_model_folder):
    model = load_model(str(tiny_model_folder)).model
    tree = prompt_tree(SEQUENCES, PROMPTS, pad_id=0)
    with torch.no_grad():
        packed = model(input_ids=tree.input_ids, position_ids=tree.position_ids, attention_mask=tree.mask).logits
        packed = packed.reshape(-1, packed.shape[-1])
        for i, seq in enumerate(SEQUENCES):
            alone = model(input_ids=torch.tensor([seq])).logits[0]
            cols = torch.arange(len(seq))
            flat = tree.flat_index(torch.full_like(cols, i), cols, torch.full_like(cols, PROMPTS[i]))
            torch.testing.assert_close(packed[flat], alone, rtol=1e-5, atol=1e-5)
        # and the mask is what makes it so: one causal mask over the row lets completions see each other
        leaky = model(input_ids=tree.input_ids, position_ids=tree.position_ids).logits.reshape(-1, packed.shape[-1])
    assert not torch.allclose(leaky[5], packed[5], atol=1e-3)
