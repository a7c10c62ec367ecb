"""Batched generation: KV cache, left padding, batches of similar length, stop strings, progress.

Prompts are tokenized as plain text (never through a chat template); BOS is prepended only when
asked. Results come back in input order whatever the batching. Two decoders give the same records:
with the CPU backend (:mod:`cai_bootstrap.cpu_backend`) our own loop (a preallocated KV cache, the
LM head in vocabulary slices, finished rows leaving the batch); elsewhere transformers' ``generate``.

Sampling draws each prompt's tokens from its own generator, seeded from ``Decoding.seed`` and the
prompt's position in the caller's list (:func:`prompt_seed`; sharded generation passes the global
positions), so a sampled output depends on neither the batch it ran in nor the number of processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..cpu_backend import CPUBackend, Setting, choose
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


def _hits_stop(tokenizer, completion: Sequence[int], stops: Sequence[str], window: int) -> bool:
    """Whether the decoded tail of a completion contains a stop string.

    Only a tail window is decoded (cheap); it is wide enough for the longest stop string even at
    one character per token, so a stop string split across tokens is still seen.
    """
    tail = tokenizer.decode(completion[-window:], skip_special_tokens=False)
    return any(s in tail for s in stops)


def prompt_seed(seed: int, index: int) -> int:
    """The sampling seed of the prompt at position ``index`` of a call with ``Decoding.seed`` ``seed``."""
    import numpy as np

    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)


def _pick(logits, decoding: Decoding, generators: Sequence):
    """Next token per row: argmax (greedy), or a temperature / nucleus (top-p) sample drawn with the
    row's own generator (``generators[row]``)."""
    import torch

    if decoding.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / decoding.temperature, dim=-1)
    if decoding.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always survives)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= decoding.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators, strict=True)])


class _RowSampler:
    """A transformers logits processor that samples each row with its own generator (``_pick``) and
    leaves only that token possible, so ``generate``'s greedy step takes it."""

    def __init__(self, decoding: Decoding, generators: Sequence):
        self.decoding, self.generators = decoding, generators

    def __call__(self, input_ids, scores):
        tokens = _pick(scores, self.decoding, self.generators)
        return scores.new_full(scores.shape, float("-inf")).scatter_(-1, tokens[:, None], 0.0)


def _fill_order(keep: Sequence[int], batch: int) -> list[int]:
    """The slot each row of the smaller batch comes from: surviving rows stay where they are, except
    those past the new size, which move into the finished rows' slots (so only they are copied)."""
    size = len(keep)
    movers = [s for s in keep if s >= size]
    alive = set(keep)
    order, moving = [], iter(movers)
    for s in range(size):
        order.append(s if s in alive else next(moving))
    return order


PREFILL_ROWS = 16  # prompts prefilled together: similar lengths (rows come sorted), little padding


def _preallocated_layer(capacity: int):
    """A KV-cache layer written in place into a buffer sized for the whole generation.

    transformers' DynamicLayer appends with ``torch.cat``, copying the whole cache every decode
    step (O(length) per token); here a step writes one slot and the attention sees a view.
    ``batch_select_indices`` (dropping finished rows) is the only copy.
    """
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def allocate(self, like, batch: int) -> None:
            b, h, _, d = like.shape
            self.dtype, self.device = like.dtype, like.device
            self._k = like.new_zeros((batch, h, capacity, d))
            self._v = like.new_zeros((batch, h, capacity, d))
            self.length = 0
            self.is_initialized = True

        def place(self, rows: slice, keys, values, end: int) -> None:
            """Prefilled keys/values of some rows, right-aligned to end at position ``end``."""
            self._k[rows, :, end - keys.shape[-2]:end] = keys
            self._v[rows, :, end - values.shape[-2]:end] = values
            self.length = end
            self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]

        def lazy_initialization(self, key_states, value_states) -> None:
            self.allocate(key_states, key_states.shape[0])

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[-2]
            if self.length + n > capacity:
                raise RuntimeError(f"KV cache of {capacity} positions overflowed")
            self._k[:, :, self.length:self.length + n].copy_(key_states)
            self._v[:, :, self.length:self.length + n].copy_(value_states)
            self.length += n
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def batch_select_indices(self, indices) -> None:
            """Keep rows ``indices`` (new row i is old row ``indices[i]``). Where every row that
            changes slot comes from past the new size (the order ``_fill_order`` makes), only those
            rows are copied, and only their filled positions; the batch is then cut (a view).
            Otherwise every row is gathered."""
            if not self.is_initialized:
                return
            import torch

            keep = len(indices)
            slots = torch.arange(keep, device=indices.device)
            moved = indices != slots
            if bool((indices[moved] >= keep).all()):
                holes, movers, end = slots[moved], indices[moved], self.length
                self._k[holes, :, :end] = self._k[movers, :, :end]
                self._v[holes, :, :end] = self._v[movers, :, :end]
                self._k, self._v = self._k[:keep], self._v[:keep]
            else:
                self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    return PreallocatedLayer


def _preallocated_cache(model, capacity: int):
    """Preallocated layers for plain full-attention models; None for others (sliding windows...)."""
    from transformers.cache_utils import Cache

    config = model.config.get_text_config(decoder=True)
    if set(getattr(config, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
        return None
    layer = _preallocated_layer(capacity)
    return Cache(layers=[layer() for _ in range(config.num_hidden_layers)])


def left_padded(rows: Sequence[Sequence[int]], pad: int, device):
    """(input_ids, attention_mask, position_ids) of rows left-padded to the longest."""
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), attention.to(device), positions.to(device)


@dataclass
class Engine:
    """Generation over one loaded model. ``progress`` is called with (done_prompts, new_tokens).

    With the CPU backend (``cpu_backend`` ``auto`` on a CPU) our own decode loop rather than
    ``model.generate``: a preallocated KV cache, and rows that finish (EOS or a stop string) leave
    the batch at once, so the remaining rows stop paying for them. Elsewhere ``model.generate``.
    Greedy output equals one-prompt-at-a-time output either way (tested).
    """

    model: Any
    tokenizer: Any
    batch_size: int = 16
    add_bos: bool = False
    stats: GenerationStats = field(default_factory=GenerationStats)
    cpu_backend: Setting = "auto"
    backend: CPUBackend = field(init=False)

    def __post_init__(self) -> None:
        device = next(self.model.parameters()).device
        self.backend = choose(self.cpu_backend, "cpu" if device.type == "cpu" else str(device))

    def generate(self, prompts: Sequence[str], decoding: Decoding,
                 progress: Callable[[int, int], None] | None = None,
                 indices: Sequence[int] | None = None) -> list[Generation]:
        """Results in input order; ``indices``: the prompts' positions for their sampling seeds
        (default: their positions in ``prompts``)."""
        encoded = encode_prompts(self.tokenizer, prompts, self.add_bos)
        keys = list(range(len(prompts))) if indices is None else list(indices)
        if len(keys) != len(prompts):
            raise ValueError(f"{len(keys)} indices for {len(prompts)} prompts")
        results: list[Generation | None] = [None] * len(prompts)
        stops = tuple(decoding.stop_strings)
        decode = self._decode if self.backend.used else self._decode_hf
        for batch in length_batches([len(e) for e in encoded], self.batch_size):
            t0 = time.perf_counter()
            completions = decode([encoded[i] for i in batch], decoding,
                                 seeds=[prompt_seed(decoding.seed, keys[i]) for i in batch])
            elapsed = time.perf_counter() - t0
            new_tokens = 0
            for i, completion in zip(batch, completions, strict=True):
                results[i] = finish(self.tokenizer, completion, stops, len(encoded[i]))
                new_tokens += results[i].completion_tokens
            self.stats.prompts += len(batch)
            self.stats.completion_tokens += new_tokens
            self.stats.seconds += elapsed
            self.stats.batches += 1
            self.stats.prompt_tokens += sum(len(encoded[i]) for i in batch)
            self.stats.padded_prompt_tokens += max(len(encoded[i]) for i in batch) * len(batch)
            if progress:
                progress(len(batch), new_tokens)
        return results  # type: ignore[return-value]

    def _prefill(self, rows: Sequence[Sequence[int]], capacity: int, device):
        """The prompts' KV cache and last-position logits.

        With a preallocated cache, prompts are prefilled ``PREFILL_ROWS`` at a time, each group
        padded only to its own longest prompt, and placed right-aligned in the batch's cache (the
        attention mask hides the rest): the prompt padding of one wide batch is never computed.
        """
        import torch
        from transformers.cache_utils import DynamicCache

        cache = _preallocated_cache(self.model, capacity)
        pad = self.tokenizer.pad_token_id
        if cache is None:
            cache = DynamicCache(config=self.model.config)
            ids, attention, positions = left_padded(rows, pad, device)
            logits = self.model(input_ids=ids, attention_mask=attention, position_ids=positions,
                                past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            return cache, logits
        width = max(len(r) for r in rows)
        logits = []
        for start in range(0, len(rows), PREFILL_ROWS):
            group = rows[start:start + PREFILL_ROWS]
            ids, attention, positions = left_padded(group, pad, device)
            part = DynamicCache()
            logits.append(self.model(input_ids=ids, attention_mask=attention, position_ids=positions,
                                     past_key_values=part, use_cache=True, logits_to_keep=1).logits[:, -1])
            for layer, filled in zip(cache.layers, part.layers, strict=True):
                if not layer.is_initialized:
                    layer.allocate(filled.keys, len(rows))
                layer.place(slice(start, start + len(group)), filled.keys, filled.values, end=width)
        return cache, torch.cat(logits)

    def _generators(self, seeds: Sequence[int], decoding: Decoding, device) -> list:
        import torch

        return [] if decoding.greedy else [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def _decode_hf(self, rows: Sequence[Sequence[int]], decoding: Decoding, seeds: Sequence[int]) -> list[list[int]]:
        """As :meth:`_decode`, with transformers' ``generate`` (greedy steps; a sample is drawn per
        row by :class:`_RowSampler`). Each row is cut where our loop would stop it."""
        from transformers import GenerationConfig, LogitsProcessorList

        device = next(self.model.parameters()).device
        ids, attention, _ = left_padded(rows, self.tokenizer.pad_token_id, device)
        eos, stops = _eos_ids(self.tokenizer), tuple(decoding.stop_strings)
        config = GenerationConfig(max_new_tokens=decoding.max_new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=sorted(eos),
                                  stop_strings=list(stops) or None)
        sampler = [] if decoding.greedy else [_RowSampler(decoding, self._generators(seeds, decoding, device))]
        out = self.model.generate(input_ids=ids, attention_mask=attention, generation_config=config,
                                  logits_processor=LogitsProcessorList(sampler), tokenizer=self.tokenizer)
        window = max((len(s) for s in stops), default=0) + 2
        completions = []
        for row in out[:, ids.shape[1]:].tolist():
            done: list[int] = []
            for token in row:
                done.append(token)
                if token in eos or stops and _hits_stop(self.tokenizer, done, stops, window):
                    break
            completions.append(done)
        return completions

    def _decode(self, rows: Sequence[Sequence[int]], decoding: Decoding, seeds: Sequence[int]) -> list[list[int]]:
        """Completion ids per row (an EOS that ended a row included), from one left-padded batch."""
        import torch

        from ..models.lm_head import sliced_lm_head

        device = next(self.model.parameters()).device
        width = max(len(r) for r in rows)
        _, attention, _ = left_padded(rows, self.tokenizer.pad_token_id, device)  # grows a column per step
        next_position = torch.tensor([[len(r)] for r in rows], device=device)
        generators = self._generators(seeds, decoding, device)
        eos = _eos_ids(self.tokenizer)
        stops = tuple(decoding.stop_strings)
        window = max((len(s) for s in stops), default=0) + 2
        completions: list[list[int]] = [[] for _ in rows]
        live = list(range(len(rows)))  # the original row of each row still in the batch
        with torch.inference_mode(), sliced_lm_head(self.model):
            cache, logits = self._prefill(rows, width + decoding.max_new_tokens, device)
            for step in range(decoding.max_new_tokens):
                tokens = _pick(logits, decoding, [generators[r] for r in live] if generators else [])
                keep = []
                for slot, token in enumerate(tokens.tolist()):
                    done = completions[live[slot]]
                    done.append(token)
                    if not (token in eos or stops and _hits_stop(self.tokenizer, done, stops, window)):
                        keep.append(slot)
                if not keep or step == decoding.max_new_tokens - 1:
                    break
                if len(keep) < len(live):  # finished rows leave the batch: the last live rows fill their slots
                    order = _fill_order(keep, len(live))
                    index = torch.tensor(order, device=device)
                    cache.batch_select_indices(index)
                    tokens, attention, next_position = tokens[index], attention[index], next_position[index]
                    live = [live[s] for s in order]
                attention = torch.cat([attention, attention.new_ones((len(live), 1))], dim=1)
                logits = self.model(input_ids=tokens[:, None], attention_mask=attention, position_ids=next_position,
                                    past_key_values=cache, use_cache=True).logits[:, -1]
                next_position = next_position + 1
        return completions
