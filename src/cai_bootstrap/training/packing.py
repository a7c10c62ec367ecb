"""Padding-free packing: several sequences end to end in one row, each attending to itself only.

Rows carry ``position_ids`` that restart at 0 for every sequence and no attention mask;
transformers (5.x, ``masking_utils.find_packed_sequence_indices``) reads the restarts as sequence
boundaries and builds a block-diagonal causal mask. The position after a sequence's last token is
the next sequence's first token, so that label must be unsupervised (every example here starts
with its prompt).

:func:`install_packed_lm_head` does more inside TRL's DPOTrainer: TRL pads chosen and rejected
sequences to one width and, on a CPU, projects every position onto the vocabulary; the packed
forward lays the batch out as a :class:`PromptTree` (each pair's prompt once, chosen and rejected
completions after it, an explicit 4D mask), runs the backbone on real tokens only and the LM head
on completion tokens only, then puts the per-token results back in TRL's padded layout, so TRL's
loss code is unchanged. Off Triton devices the per-token fields come from :mod:`.token_logprobs`,
not TRL's torch fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


def lpt_rows(lengths: Sequence[int], rows: int) -> list[list[int]]:
    """Indices in ``rows`` rows of near-equal token counts: longest first, each into the emptiest
    row (its fullest row exceeds the mean by less than one item); empty rows are dropped."""
    import heapq

    out: list[list[int]] = [[] for _ in range(max(1, rows))]
    heap = [(0, r) for r in range(len(out))]
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        load, r = heapq.heappop(heap)
        out[r].append(i)
        heapq.heappush(heap, (load + lengths[i], r))
    return [row for row in out if row]


def balanced_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """``ceil(total / capacity)`` rows of near-equal token counts. Rows are padded to the fullest
    one, so balanced rows waste little, where rows filled to ``capacity`` one by one leave a short
    last row whose padding every other row pays for; a row may run past ``capacity`` by less than
    one sequence."""
    return lpt_rows(lengths, -(-sum(lengths) // max(capacity, 1)))


ATTENTION_COST = 1e-3  # attention per key position, relative to a token's other work (SDPA ~11% at width 137)


def cheapest_rows(lengths: Sequence[int]) -> list[list[int]]:
    """The row count whose padded layout costs least: ``rows * width * (1 + ATTENTION_COST * width)``.
    For a few long items (DPO prompt trees) that beats a fixed capacity, where one item too many
    for a row doubles the padding; more rows mean more padding, fewer mean wider attention."""
    best, best_cost = None, float("inf")
    for n in range(1, len(lengths) + 1):
        rows = lpt_rows(lengths, n)
        width = max(sum(lengths[i] for i in row) for row in rows)
        cost = len(rows) * width * (1 + ATTENTION_COST * width)
        if cost < best_cost:
            best, best_cost = rows, cost
    return best


def pack(sequences: Sequence[Sequence[int]], capacity: int, pad_id: int):
    """(input_ids, position_ids, starts) of the packed rows, as long tensors; ``starts[i]`` is the
    flat index (row * width + offset) where sequence i begins. Row tails are padding, a block of
    their own that no real token sees."""
    import torch

    rows = balanced_rows([len(s) for s in sequences], capacity)
    width = max(sum(len(sequences[i]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    starts = [0] * len(sequences)
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            n = len(sequences[i])
            ids[r, offset:offset + n] = torch.as_tensor(list(sequences[i]))
            positions[r, offset:offset + n] = torch.arange(n)
            starts[i] = r * width + offset
            offset += n
        positions[r, offset:] = torch.arange(width - offset)
    return ids, positions, starts


@dataclass
class PromptTree:
    """Sequences packed with each distinct prompt once: a segment is a prompt followed by the
    completions of every sequence that starts with it, each completion attending to the prompt and
    to itself only (RoPE positions continue from the prompt in every completion). A DPO pair's
    chosen and rejected sequences share their prompt, so its tokens are computed once, not twice."""

    input_ids: Any  # [rows, width]
    position_ids: Any  # [rows, width]
    mask: Any  # [rows, 1, width, width] bool, True where a query (dim 2) may attend a key (dim 3)
    prompt_start: list[int]  # per sequence: flat index (row * width + offset) of its prompt's first token
    completion_start: list[int]  # per sequence: flat index of its completion's first token

    def flat_index(self, sequence, column, prompt_length):
        """Flat index in the packed rows of token ``column`` of ``sequence`` (tensors, elementwise)."""
        import torch

        device = sequence.device
        in_prompt = column < prompt_length
        return torch.where(in_prompt, torch.as_tensor(self.prompt_start, device=device)[sequence] + column,
                           torch.as_tensor(self.completion_start, device=device)[sequence] + column - prompt_length)


def prompt_tree(sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], pad_id: int) -> PromptTree:
    """Pack ``sequences`` (whose first ``prompt_lengths[i]`` tokens are the prompt) as a :class:`PromptTree`,
    segments in :func:`cheapest_rows`; padding attends to itself only."""
    import torch

    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (seq, p) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        groups.setdefault(tuple(seq[:p]), []).append(i)
    segments = list(groups.items())
    sizes = [len(prompt) + sum(len(sequences[i]) - len(prompt) for i in members) for prompt, members in segments]
    rows = cheapest_rows(sizes)
    width = max(sum(sizes[s] for s in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = -1 - torch.arange(len(rows) * width).view(len(rows), width)  # padding: a segment per token
    branch = torch.zeros((len(rows), width), dtype=torch.long)
    prompt_start, completion_start = [0] * len(sequences), [0] * len(sequences)
    for r, row in enumerate(rows):
        offset = 0
        for s in row:
            prompt, members = segments[s]
            p = len(prompt)
            ids[r, offset:offset + p] = torch.as_tensor(prompt, dtype=torch.long)
            positions[r, offset:offset + p] = torch.arange(p)
            segment[r, offset:offset + sizes[s]] = s
            start = offset
            offset += p
            for b, i in enumerate(members, start=1):
                n = len(sequences[i]) - p
                ids[r, offset:offset + n] = torch.as_tensor(list(sequences[i][p:]), dtype=torch.long)
                positions[r, offset:offset + n] = torch.arange(p, p + n)
                branch[r, offset:offset + n] = b
                prompt_start[i], completion_start[i] = r * width + start, r * width + offset
                offset += n
    order = torch.arange(width)
    mask = ((segment[:, :, None] == segment[:, None, :]) & (order[None, None, :] <= order[None, :, None])
            & ((branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])))
    return PromptTree(ids, positions, mask[:, None], prompt_start, completion_start)


def install_packed_lm_head(model: Any, outputs: tuple[str, ...]) -> bool:
    """Wrap the forward that TRL's ``add_fused_lm_head`` installed on ``model`` (the base model, under
    PEFT) so that ``fused_lm_head=True`` calls run packed. Returns False (and changes nothing) for
    models whose logits are scaled or soft-capped, which this forward does not reproduce.

    ``outputs`` are the per-token fields computed; ``model._packed_outputs`` may be narrowed for a
    while (the reference pass needs ``log_probs`` only)."""
    import types

    from ..models.lm_head import plain_lm_head

    if not plain_lm_head(model):
        return False
    if getattr(model, "_packed_lm_head", False):
        return True
    fused_forward = model.forward

    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        mask = kwargs.get("attention_mask")
        if not fused_lm_head or args or labels is None or mask is None or not _right_padded(mask) \
                or kwargs.get("position_ids") is not None or kwargs.get("shift_labels") is not None:
            return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        return _packed_fused_forward(self, kwargs.pop("input_ids"), kwargs.pop("attention_mask"), labels,
                                     self._packed_outputs, kwargs)

    model.forward = types.MethodType(forward, model)
    model._packed_lm_head = True
    model._packed_outputs = outputs
    return True


def _right_padded(mask) -> bool:
    """Every row is ones then zeros (TRL's DPO collator pads on the right)."""
    import torch

    lengths = mask.sum(dim=1, keepdim=True)
    return bool((mask == (torch.arange(mask.shape[1], device=mask.device) < lengths).to(mask.dtype)).all())


def _packed_fused_forward(model, input_ids, attention_mask, labels, outputs: tuple[str, ...], kwargs: dict):
    import torch
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, FusedCausalLMOutput

    from .token_logprobs import token_log_probs

    kwargs.pop("num_items_in_batch", None)
    kwargs["use_cache"] = False
    device = input_ids.device
    lengths = attention_mask.sum(dim=1).tolist()
    sequences = [input_ids[i, :n].tolist() for i, n in enumerate(lengths)]
    supervised = labels != IGNORE_INDEX  # the prompt: every token before the first supervised one
    prompt_lengths = torch.where(supervised.any(1), supervised.int().argmax(1), attention_mask.sum(1))
    tree = prompt_tree(sequences, prompt_lengths.tolist(), pad_id=0)
    hidden = model.base_model(input_ids=tree.input_ids.to(device), position_ids=tree.position_ids.to(device),
                              attention_mask=tree.mask.to(device), **kwargs).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    # TRL's layout: position t of row i predicts labels[i, t + 1]; score only those that are supervised
    next_labels = labels[:, 1:]
    label_mask = next_labels != IGNORE_INDEX
    rows, cols = label_mask.nonzero(as_tuple=True)
    flat = tree.flat_index(rows, cols, prompt_lengths.to(device)[rows])  # the same token in the packed rows
    lm_head = model.get_output_embeddings()
    if lm_head.bias is None and device.type not in ("cuda", "xpu"):  # TRL's Triton kernel there
        per_token = token_log_probs(hidden[flat], lm_head.weight, next_labels[label_mask], outputs)
    else:
        per_token = ChunkedLogProbFunction.apply(hidden[flat], lm_head.weight, lm_head.bias, next_labels[label_mask],
                                                 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs)
    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
        None if x is None else x.new_zeros(label_mask.shape).masked_scatter(label_mask, x) for x in per_token)
    loss = -log_probs.sum() / label_mask.sum().clamp(min=1)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
                               mean_logits=mean_logits, is_top1=is_top1, label_mask=label_mask)
