"""Sequence log-probabilities of completions given prompts: log p(completion | prompt).

Tokenization follows :mod:`cai_bootstrap.training.masking` (base-model hygiene): prompt and
completion are tokenized separately as plain text (``add_special_tokens=False``), so the boundary is
exact and the prompt ids are what the model sees at inference time; BOS is prepended only when
``add_bos``; EOS is appended to the completion by id when ``append_eos`` (as in training, where the
completion `` {response}\\nEND`` is followed by EOS).

Batches are right padded with an attention mask; real tokens never attend to the padding (it comes
after them), so a sequence's score does not depend on what it is batched with (up to float
rounding, well under 1e-4). Sequences are batched in order of length to waste little padding;
results come back in input order.

Truncation (``max_length``): the prompt is cut from the left, keeping at least one prompt token,
because the completion is what is scored. Only if the completion alone does not fit
(``max_length - 1`` tokens) is it cut from the right; the returned token count then says how many
tokens were scored.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pad_id(tokenizer: Any) -> int:
    for cand in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0  # pragma: no cover


def _device(model: Any):
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        import torch

        return torch.device("cpu")


def supports_logits_to_keep(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def encode_for_scoring(
    tokenizer: Any,
    prompt: str,
    completion: str,
    *,
    add_bos: bool = False,
    append_eos: bool = True,
    max_length: int | None = None,
) -> tuple[list[int], int]:
    """(input ids, number of prompt tokens incl. BOS) for one (prompt, completion)."""
    prompt_ids = _ids(tokenizer, prompt)
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("add_bos=True but the tokenizer has no BOS token")
        prompt_ids = [int(tokenizer.bos_token_id)] + prompt_ids
    completion_ids = _ids(tokenizer, completion)
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("append_eos=True but the tokenizer has no EOS token")
        completion_ids.append(int(tokenizer.eos_token_id))
    if not prompt_ids:
        raise ValueError("empty prompt: log p(first completion token) needs at least one context token")
    if not completion_ids:
        raise ValueError(f"completion {completion!r} has no tokens to score")
    if max_length is not None:
        if max_length < 2:
            raise ValueError("max_length must be >= 2 (one prompt and one completion token)")
        if len(completion_ids) > max_length - 1:
            completion_ids = completion_ids[: max_length - 1]
        room = max_length - len(completion_ids)
        if len(prompt_ids) > room:
            prompt_ids = prompt_ids[len(prompt_ids) - room:]
    return prompt_ids + completion_ids, len(prompt_ids)


def completion_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    batch_size: int = 8,
    add_bos: bool = False,
    append_eos: bool = True,
    max_length: int | None = None,
) -> list[tuple[float, int]]:
    """For each (prompt, completion): (sum of log p(completion tokens | prompt), token count).

    The model is put in eval mode for the call (dropout off) and restored afterwards.
    """
    import torch

    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    encoded = [
        encode_for_scoring(tokenizer, p, c, add_bos=add_bos, append_eos=append_eos, max_length=max_length)
        for p, c in zip(prompts, completions)
    ]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]), i))
    results: list[tuple[float, int] | None] = [None] * len(encoded)
    pad, device = _pad_id(tokenizer), _device(model)
    keep_ok = supports_logits_to_keep(model)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                width = max(len(encoded[i][0]) for i in idx)
                input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids = encoded[i][0]
                    input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    mask[row, : len(ids)] = 1
                # The first position whose logits are needed: the one predicting the first
                # completion token of the row with the shortest prompt.
                first = min(encoded[i][1] for i in idx) - 1
                kwargs: dict[str, Any] = {}
                if keep_ok and first > 0:
                    kwargs["logits_to_keep"] = width - first
                out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
                logits = out.logits
                offset = width - logits.shape[1]  # logits[:, j] belong to position offset + j
                for row, i in enumerate(idx):
                    ids, n_prompt = encoded[i]
                    lo, hi = n_prompt - 1, len(ids) - 1  # positions predicting the completion
                    row_logits = logits[row, lo - offset: hi - offset].float()
                    targets = torch.tensor(ids[n_prompt:], dtype=torch.long, device=row_logits.device)
                    lp = torch.log_softmax(row_logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
                    results[i] = (float(lp.double().sum()), len(targets))
    finally:
        model.train(was_training)
    return [r for r in results if r is not None]


def mean_logprob(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    **kwargs: Any,
) -> list[float]:
    """Per-token log-probability of each completion: sum / token count (same arguments as
    :func:`completion_logprobs`)."""
    return [s / n for s, n in completion_logprobs(model, tokenizer, prompts, completions, **kwargs)]
