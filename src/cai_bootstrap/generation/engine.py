"""Batched generation: KV cache, left padding, batches of similar length, stop strings, progress.

Prompts are tokenized as plain text (never through a chat template); BOS is prepended only when
asked. Results come back in input order whatever the batching.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..formats import STOP_STRINGS, first_stop


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 96
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int = 0
    stop_strings: tuple[str, ...] = STOP_STRINGS

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed, "stop_strings": list(self.stop_strings),
                "strategy": "greedy" if self.greedy else "sample"}


@dataclass(frozen=True)
class Generation:
    text: str  # cut at the first stop string, stripped
    raw_text: str  # as decoded, stop string included
    stop_string: str | None
    finish_reason: str  # stop | eos | length
    prompt_tokens: int
    completion_tokens: int


@dataclass
class GenerationStats:
    prompts: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    batches: int = 0
    padded_prompt_tokens: int = 0
    prompt_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "completion_tokens": self.completion_tokens,
                "seconds": round(self.seconds, 3), "tokens_per_s": round(self.tokens_per_s, 2),
                "batches": self.batches, "prompt_padding_share": round(
                    1 - self.prompt_tokens / self.padded_prompt_tokens, 4) if self.padded_prompt_tokens else 0.0}


def encode_prompts(tokenizer, prompts: Sequence[str], add_bos: bool) -> list[list[int]]:
    """Plain-text token ids; special tokens are never added implicitly."""
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("add_bos_token is set but the tokenizer has no BOS token")
        encoded = [[tokenizer.bos_token_id, *ids] for ids in encoded]
    return encoded


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar prompt length (longest first, stable)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def finish(tokenizer, completion_ids: Sequence[int], stops: Sequence[str], prompt_tokens: int) -> Generation:
    """Turn generated ids (padding already removed) into a Generation with its finish reason."""
    ids = list(completion_ids)
    eos_ids = _eos_ids(tokenizer)
    hit_eos = False
    for j, t in enumerate(ids):
        if t in eos_ids:
            ids, hit_eos = ids[:j], True
            break
    raw = tokenizer.decode(ids, skip_special_tokens=False)
    i, marker = first_stop(raw, stops)
    if marker is not None:
        return Generation(raw[:i].strip(), raw, marker, "stop", prompt_tokens, len(ids))
    reason = "eos" if hit_eos else "length"
    return Generation(raw.strip(), raw, None, reason, prompt_tokens, len(ids) + (1 if hit_eos else 0))


def _eos_ids(tokenizer) -> set[int]:
    ids = tokenizer.eos_token_id
    return set(ids) if isinstance(ids, list) else {ids}


def _stop_criteria(tokenizer, stops: Sequence[str], prompt_width: int):
    """Stop a sequence once its completion's decoded tail contains a stop string.

    Decoding only a tail window keeps this cheap; the window is wide enough for the longest stop
    string even at one character per token.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    window = max(len(s) for s in stops) + 2

    class StopOnStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            tails = tokenizer.batch_decode(input_ids[:, max(prompt_width, input_ids.shape[1] - window):])
            return torch.tensor([any(s in t for s in stops) for t in tails], device=input_ids.device)

    return StoppingCriteriaList([StopOnStrings()])


@dataclass
class Engine:
    """Generation over one loaded model. ``progress`` is called with (done_prompts, new_tokens)."""

    model: Any
    tokenizer: Any
    batch_size: int = 16
    add_bos: bool = False
    stats: GenerationStats = field(default_factory=GenerationStats)

    def generate(self, prompts: Sequence[str], decoding: Decoding,
                 progress: Callable[[int, int], None] | None = None) -> list[Generation]:
        import torch

        encoded = encode_prompts(self.tokenizer, prompts, self.add_bos)
        results: list[Generation | None] = [None] * len(prompts)
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        stops = tuple(decoding.stop_strings)
        for b, batch in enumerate(length_batches([len(e) for e in encoded], self.batch_size)):
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids = encoded[i]
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention[row, width - len(ids):] = 1
            kwargs: dict[str, Any] = dict(
                max_new_tokens=decoding.max_new_tokens,
                do_sample=not decoding.greedy,
                pad_token_id=pad,
                eos_token_id=sorted(_eos_ids(self.tokenizer)),
                use_cache=True,
            )
            if stops:
                kwargs["stopping_criteria"] = _stop_criteria(self.tokenizer, stops, width)
            if decoding.greedy:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            else:
                kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=0)
                torch.manual_seed(decoding.seed * 100003 + b)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs
                )
            elapsed = time.perf_counter() - t0
            new_tokens = 0
            for row, i in enumerate(batch):
                gen = out[row, width:].tolist()
                while gen and gen[-1] == pad:  # finished rows are padded to the batch's length
                    gen.pop()
                results[i] = finish(self.tokenizer, gen, stops, len(encoded[i]))
                new_tokens += results[i].completion_tokens
            self.stats.prompts += len(batch)
            self.stats.completion_tokens += new_tokens
            self.stats.seconds += elapsed
            self.stats.batches += 1
            self.stats.prompt_tokens += sum(len(encoded[i]) for i in batch)
            self.stats.padded_prompt_tokens += width * len(batch)
            if progress:
                progress(len(batch), new_tokens)
        return results  # type: ignore[return-value]
