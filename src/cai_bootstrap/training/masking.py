"""Response-only loss masks for supervised fine-tuning, and the collator that pads them.

The training text is ``Instruction: {instruction}\\nResponse: {response}\\nEND`` followed by EOS
(see :mod:`cai_bootstrap.formats`). The prompt, everything up to and including ``Response:``, is
context: its labels are ``-100``. The completion, `` {response}\\nEND`` and the EOS token, is
supervised. Base-model hygiene: no chat template, no special token added implicitly
(``add_special_tokens=False`` everywhere), BOS only when ``add_bos=True``, EOS appended by id.

Two ways in:

* :func:`encode_pair` — structured ``(prompt, response)``. Prompt and completion are tokenized
  separately, so the boundary is exact by construction and the prompt ids are exactly what the
  model sees at inference time.
* :func:`encode_raw` — a whole formatted text, tokenized once. The boundary is found by searching
  the token ids for the token sequences the separator ``\\nResponse:`` can take (see
  :func:`separator_variants`), choosing the occurrence that ends at the *last* ``\\nResponse:``
  before the final ``\\nEND``, and confirming it by decoding. Why the last one: a cleaned response
  never contains ``\\nResponse:`` (generations are cut at that marker, and ``Response:`` is a
  template marker that cleaning rejects), whereas an instruction may quote it ("Explain what
  '\\nResponse:' means"), and a few-shot prompt contains earlier separators. So the last separator
  is the only one that can start the response. The flip side, documented and tested: a raw text
  whose *response* contains ``\\nResponse:`` is split at that inner separator; use the structured
  path for such data.

Truncation policy (both paths): the completion (response, ``\\nEND`` and EOS) is never truncated.
When BOS + prompt + completion exceed ``max_length``, tokens are dropped from the *left* of the
prompt, so the end of the prompt, the instruction's tail and ``\\nResponse:``, is kept; the kept
prompt must still have at least ``min_prompt_tokens`` tokens (and never fewer than the separator's
own tokens). If it cannot, the example is dropped with reason ``too_long``: a response whose END or
EOS was cut off is never trained on.

Every encoded example is checked to decode back to its own text. Tokenizers are not always
lossless: SmolLM2's byte-level vocabulary lacks the bytes 0xF1, 0xF2 (characters of Unicode planes
4-11) and a few control characters, and silently drops them; such an example is dropped as
``lossy_tokenization`` rather than trained on tokens that spell a different response.

Whatever cannot be encoded with a mask known to be right comes back as :class:`Dropped` with a
reason; :func:`encode_dataset` counts the reasons and raises :class:`MaskingError` past a limit.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..formats import END_SUFFIX, RESPONSE_SEPARATOR, completion_for
from .packing import IGNORE_INDEX, pack


DEFAULT_MIN_PROMPT_TOKENS = 16

# Reasons an example is dropped (the keys of encode_dataset's counts).
TOO_LONG = "too_long"
NO_END = "no_end"  # raw text does not end with "\nEND"
NO_SEPARATOR = "no_separator"  # no "\nResponse:" before the final "\nEND"
EMPTY_RESPONSE = "empty_response"
BAD_PROMPT = "bad_prompt"  # structured prompt does not end with "\nResponse:"
SPECIAL_TOKEN_TEXT = "special_token_text"  # text spells a special token such as <|im_end|>
BOUNDARY_MERGED = "boundary_merged"  # no token boundary right after the separator
BOUNDARY_UNVERIFIED = "boundary_unverified"  # decoding does not give back the text
LOSSY_TOKENIZATION = "lossy_tokenization"  # the tokenizer cannot represent the text (see below)
INVARIANT = "invariant"  # a mask invariant failed (a tokenizer we do not understand)

# Contexts the separator is tokenized in to collect the token sequences it can take.
_PREFIXES = ("", "x", "x ", "x.", "x:", "x!", "x)", "x\n", "x\n\n", "x\t", "x\r", " ", "\n", "1", "Instruction: x")
_SUFFIXES = ("", " ", " x", "x", "\n", " \n", "  x", "!", ".", ":", "1", " 1", "\nx")


class MaskingError(ValueError):
    """Too many examples could not be masked, or an item is malformed."""


@dataclass
class Encoded:
    """One example ready for the collator. ``n_prompt_tokens`` counts BOS and the kept prompt."""

    input_ids: list[int]
    labels: list[int]
    attention_mask: list[int]
    n_prompt_tokens: int
    n_supervised_tokens: int
    truncated_prompt_tokens: int = 0


@dataclass(frozen=True)
class Dropped:
    """An example that was not encoded, and why."""

    reason: str
    detail: str = ""


# --------------------------------------------------------------------------------------------
# tokenizer helpers


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _decodes_to(tokenizer: Any, ids: Sequence[int], text: str) -> str | None:
    """None if ids decode back to text, else what they decode to. SentencePiece decoders drop the
    leading space of a sequence; that, and nothing else, is tolerated."""
    decoded = _decode(tokenizer, ids)
    if decoded == text or (text.startswith(" ") and decoded == text[1:]):
        return None
    return decoded


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MaskingError("the tokenizer has no EOS token; the completion must end with one")
    return int(eos)


def _bos_ids(tokenizer: Any, add_bos: bool) -> list[int]:
    if not add_bos:
        return []
    if tokenizer.bos_token_id is None:
        raise MaskingError("add_bos=True but the tokenizer has no BOS token")
    return [int(tokenizer.bos_token_id)]


def _special_texts(tokenizer: Any) -> list[str]:
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            texts.add(str(tok.content))
    return sorted(t for t in texts if t)


def _find_special(tokenizer: Any, *texts: str) -> str | None:
    for special in _special_texts(tokenizer):
        if any(special in t for t in texts):
            return special
    return None


_VARIANTS: "weakref.WeakKeyDictionary[Any, tuple[tuple[int, ...], ...]]" = weakref.WeakKeyDictionary()


def separator_variants(tokenizer: Any) -> tuple[tuple[int, ...], ...]:
    """The token sequences ``\\nResponse:`` can take inside a text, longest first.

    The separator is tokenized in many contexts (``prefix + "\\nResponse:" + suffix``: letters,
    spaces, punctuation, newlines on either side). In each, the run of tokens lying wholly inside
    the separator and ending exactly at its end is one variant: a newline that merges with the
    text before it (``ĊĊ``, ``ĠĊ``, ``:Ċ`` in some vocabularies) leaves the variant ``Response:``
    without it; a merge with the text after the colon (``::``) leaves no clean end, and that
    context adds nothing (an example like that is dropped as ``boundary_merged``). The shorter
    run covering only ``Response:`` is added too, so an unforeseen newline merge still yields a
    candidate. Candidates are only candidates: :func:`encode_raw` confirms each by decoding.
    """
    try:
        return _VARIANTS[tokenizer]
    except (KeyError, TypeError):
        pass
    found: set[tuple[int, ...]] = set()
    for prefix in _PREFIXES:
        for suffix in _SUFFIXES:
            ids = _ids(tokenizer, prefix + RESPONSE_SEPARATOR + suffix)
            start, end = len(prefix), len(prefix) + len(RESPONSE_SEPARATOR)
            word_start = start + 1  # where "Response:" begins
            ends = [len(_decode(tokenizer, ids[: i + 1])) for i in range(len(ids))]
            begins = [0, *ends[:-1]]
            if end not in ends:
                continue  # the colon merged with what follows
            last = ends.index(end)
            for lo in (start, word_start):
                first = next((i for i in range(last + 1) if begins[i] >= lo), None)
                if first is not None and first <= last:
                    found.add(tuple(ids[first : last + 1]))
    variants = tuple(sorted(found, key=lambda v: (-len(v), v)))
    if not variants:
        raise MaskingError("could not tokenize the separator '\\nResponse:' with this tokenizer")
    try:
        _VARIANTS[tokenizer] = variants
    except TypeError:
        pass
    return variants


def _diff(decoded: str, text: str) -> str:
    """Where decoded text first departs from the original, for drop details."""
    i = next((j for j, (a, b) in enumerate(zip(decoded, text)) if a != b), min(len(decoded), len(text)))
    return f"{decoded[max(0, i - 10) : i + 20]!r} instead of {text[max(0, i - 10) : i + 20]!r} (at character {i})"


def _occurrences(ids: Sequence[int], pattern: Sequence[int]) -> Iterable[int]:
    """End indices (exclusive) of every occurrence of pattern in ids."""
    n = len(pattern)
    first = pattern[0]
    for i in range(len(ids) - n + 1):
        if ids[i] == first and tuple(ids[i : i + n]) == tuple(pattern):
            yield i + n


# --------------------------------------------------------------------------------------------
# the shared tail: truncation, assembly, invariants


def _assemble(
    tokenizer: Any,
    prompt_ids: list[int],
    completion_ids: list[int],
    *,
    max_length: int,
    add_bos: bool,
    min_prompt_tokens: int,
) -> Encoded | Dropped:
    """BOS + prompt (left-truncated if needed) + completion (with EOS, never truncated)."""
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    bos = _bos_ids(tokenizer, add_bos)
    floor = max(min_prompt_tokens, len(_ids(tokenizer, RESPONSE_SEPARATOR)), 1)
    budget = max_length - len(bos) - len(completion_ids)
    truncated = 0
    if len(prompt_ids) > budget:
        if budget < min(floor, len(prompt_ids)):
            return Dropped(
                TOO_LONG,
                f"completion {len(completion_ids)} tokens (EOS included) + BOS {len(bos)} leave "
                f"{max(budget, 0)} of max_length={max_length} for a prompt of {len(prompt_ids)} "
                f"tokens; at least {min(floor, len(prompt_ids))} must be kept",
            )
        truncated = len(prompt_ids) - budget
        prompt_ids = prompt_ids[truncated:]
    context = bos + prompt_ids
    enc = Encoded(
        input_ids=context + completion_ids,
        labels=[IGNORE_INDEX] * len(context) + list(completion_ids),
        attention_mask=[1] * (len(context) + len(completion_ids)),
        n_prompt_tokens=len(context),
        n_supervised_tokens=len(completion_ids),
        truncated_prompt_tokens=truncated,
    )
    problem = check_invariants(tokenizer, enc)
    return Dropped(INVARIANT, problem) if problem else enc


def check_invariants(tokenizer: Any, enc: Encoded) -> str | None:
    """What is wrong with a mask, or None: prompt unsupervised, completion supervised, END and EOS in it."""
    n = len(enc.input_ids)
    if not (len(enc.labels) == len(enc.attention_mask) == n):
        return "input_ids, labels and attention_mask differ in length"
    p = enc.n_prompt_tokens
    if any(label != IGNORE_INDEX for label in enc.labels[:p]):
        return "a prompt token is supervised"
    supervised = enc.labels[p:]
    if supervised != enc.input_ids[p:] or IGNORE_INDEX in supervised:
        return "the completion is not supervised token for token"
    if len(supervised) != enc.n_supervised_tokens or len(supervised) < 2:
        return f"{len(supervised)} supervised tokens; END and EOS need at least 2"
    if supervised[-1] != _eos_id(tokenizer):
        return "the last supervised token is not EOS"
    if not _decode(tokenizer, supervised[:-1]).endswith(END_SUFFIX):
        return "the supervised tokens before EOS do not end with '\\nEND'"
    return None


# --------------------------------------------------------------------------------------------
# the two ways in


def encode_pair(
    tokenizer: Any,
    prompt: str,
    response: str,
    *,
    max_length: int,
    add_bos: bool = False,
    min_prompt_tokens: int = DEFAULT_MIN_PROMPT_TOKENS,
) -> Encoded | Dropped:
    """Encode a structured example: prompt ids + ids of `` {response}\\nEND`` + [EOS].

    ``prompt`` must end with ``\\nResponse:`` (``formats.prompt_for`` builds it; a few-shot prompt
    works too). ``response`` is the bare response, without the leading space or END.
    """
    if not prompt.endswith(RESPONSE_SEPARATOR):
        return Dropped(BAD_PROMPT, f"prompt does not end with {RESPONSE_SEPARATOR!r}: ...{prompt[-40:]!r}")
    if not response.strip():
        return Dropped(EMPTY_RESPONSE, "the response is empty or white space only")
    special = _find_special(tokenizer, prompt, response)
    if special is not None:
        return Dropped(SPECIAL_TOKEN_TEXT, f"the text contains the special token {special!r}")
    prompt_ids = _ids(tokenizer, prompt)
    completion = completion_for(response)
    completion_ids = _ids(tokenizer, completion)
    for part, ids, text in (("prompt", prompt_ids, prompt), ("completion", completion_ids, completion)):
        decoded = _decodes_to(tokenizer, ids, text)
        if decoded is not None:
            return Dropped(
                LOSSY_TOKENIZATION,
                f"the {part} tokens decode to {_diff(decoded, text)}: the tokenizer cannot represent it",
            )
    completion_ids.append(_eos_id(tokenizer))
    return _assemble(
        tokenizer,
        prompt_ids,
        completion_ids,
        max_length=max_length,
        add_bos=add_bos,
        min_prompt_tokens=min_prompt_tokens,
    )


def split_raw(text: str) -> tuple[str, str] | Dropped:
    """Character-space split of a formatted text into (prompt, completion).

    The text must end with ``\\nEND`` (trailing white space after it is ignored). The prompt ends
    at the last ``\\nResponse:`` that ends before that final ``\\nEND``; the completion is the rest.
    """
    text = text.rstrip()
    if not text.endswith(END_SUFFIX):
        return Dropped(NO_END, f"the text does not end with {END_SUFFIX!r}: ...{text[-40:]!r}")
    body_end = len(text) - len(END_SUFFIX)
    at = text.rfind(RESPONSE_SEPARATOR, 0, body_end)
    if at == -1:
        return Dropped(NO_SEPARATOR, f"no {RESPONSE_SEPARATOR!r} before the final {END_SUFFIX!r}")
    cut = at + len(RESPONSE_SEPARATOR)
    prompt, completion = text[:cut], text[cut:]
    if not completion[: -len(END_SUFFIX)].strip():
        return Dropped(EMPTY_RESPONSE, "nothing between the separator and END")
    return prompt, completion


def encode_raw(
    tokenizer: Any,
    text: str,
    *,
    max_length: int,
    add_bos: bool = False,
    min_prompt_tokens: int = DEFAULT_MIN_PROMPT_TOKENS,
) -> Encoded | Dropped:
    """Encode a whole ``Instruction: …\\nResponse: …\\nEND`` text, tokenized once.

    The boundary is the end of the last ``\\nResponse:`` before the final ``\\nEND`` (see the
    module notes for why). It is located in token space by searching every separator variant,
    kept only where the prompt tokens decode exactly to the prompt text and the completion tokens
    to the completion text, and dropped otherwise — never trained with its prompt supervised.
    """
    split = split_raw(text)
    if isinstance(split, Dropped):
        return split
    prompt, completion = split
    text = prompt + completion
    special = _find_special(tokenizer, text)
    if special is not None:
        return Dropped(SPECIAL_TOKEN_TEXT, f"the text contains the special token {special!r}")
    ids = _ids(tokenizer, text)
    decoded = _decodes_to(tokenizer, ids, text)
    if decoded is not None:
        return Dropped(
            LOSSY_TOKENIZATION,
            f"the tokens decode to {_diff(decoded, text)}: the tokenizer cannot represent it",
        )
    candidates = sorted(
        {k for variant in separator_variants(tokenizer) for k in _occurrences(ids, variant)},
        reverse=True,
    )
    boundary = None
    for k in candidates:  # last first; at most one can decode to the prompt exactly
        decoded = _decode(tokenizer, ids[:k])
        if decoded == prompt:
            boundary = k
            break
        if len(decoded) < len(prompt):
            break  # every remaining candidate ends even earlier
    if boundary is None:
        return Dropped(
            BOUNDARY_MERGED,
            f"no token boundary right after the last {RESPONSE_SEPARATOR!r} "
            f"({len(candidates)} separator candidates in {len(ids)} tokens); the completion starts "
            f"{completion[:12]!r}",
        )
    completion_ids = ids[boundary:]
    decoded = _decodes_to(tokenizer, completion_ids, completion)
    if decoded is not None:
        return Dropped(BOUNDARY_UNVERIFIED, f"the completion tokens decode to {_diff(decoded, completion)}")
    return _assemble(
        tokenizer,
        ids[:boundary],
        completion_ids + [_eos_id(tokenizer)],
        max_length=max_length,
        add_bos=add_bos,
        min_prompt_tokens=min_prompt_tokens,
    )


def _field(item: Any, name: str) -> Any:
    if isinstance(item, Mapping):
        return item.get(name)
    return getattr(item, name, None)


def encode_item(
    tokenizer: Any,
    item: Any,
    *,
    max_length: int,
    add_bos: bool = False,
    min_prompt_tokens: int = DEFAULT_MIN_PROMPT_TOKENS,
) -> Encoded | Dropped:
    """Encode a record (a mapping or an object): ``text`` if present, else ``prompt`` + ``response``.

    Note: for an ``SFTRecord`` whose ``prompt`` holds a few-shot prefix, pass
    ``{"prompt": formats.prompt_for(r.instruction), "response": r.response}`` to train on the
    canonical zero-shot format.
    """
    kwargs = dict(max_length=max_length, add_bos=add_bos, min_prompt_tokens=min_prompt_tokens)
    text = _field(item, "text")
    if isinstance(text, str):
        return encode_raw(tokenizer, text, **kwargs)
    prompt, response = _field(item, "prompt"), _field(item, "response")
    if isinstance(prompt, str) and isinstance(response, str):
        return encode_pair(tokenizer, prompt, response, **kwargs)
    raise MaskingError(
        f"record {_field(item, 'id')!r} has neither a 'text' field nor 'prompt' and 'response' strings"
    )


def encode_dataset(
    tokenizer: Any,
    items: Iterable[Any],
    *,
    max_length: int,
    add_bos: bool = False,
    max_drop_share: float = 0.01,
    min_prompt_tokens: int = DEFAULT_MIN_PROMPT_TOKENS,
) -> tuple[list[Encoded], dict[str, int]]:
    """Encode every item; return the encoded examples and the drop counts by reason.

    Raises :class:`MaskingError` when the share of dropped examples exceeds ``max_drop_share``.
    """
    encoded: list[Encoded] = []
    drops: Counter[str] = Counter()
    examples: dict[str, str] = {}
    total = 0
    for item in items:
        total += 1
        result = encode_item(
            tokenizer, item, max_length=max_length, add_bos=add_bos, min_prompt_tokens=min_prompt_tokens
        )
        if isinstance(result, Dropped):
            drops[result.reason] += 1
            name = _field(item, "id") or f"item {total - 1}"
            examples.setdefault(result.reason, f"{name}: {result.detail}")
        else:
            encoded.append(result)
    dropped = sum(drops.values())
    if total and dropped / total > max_drop_share:
        reasons = ", ".join(f"{r}: {c}" for r, c in drops.most_common())
        first = "; ".join(f"[{r}] {examples[r]}" for r, _ in drops.most_common())
        raise MaskingError(
            f"dropped {dropped} of {total} examples ({dropped / total:.1%}) while masking — "
            f"{reasons}; the limit is max_drop_share={max_drop_share:.1%}. First of each: {first}"
        )
    return encoded, dict(drops)


# --------------------------------------------------------------------------------------------
# batching


@dataclass
class ResponseOnlyCollator:
    """Right-pads a list of examples: input_ids with ``pad_token_id``, labels with -100, mask 0.

    Takes :class:`Encoded` objects or mappings with ``input_ids``, ``labels`` (and optionally
    ``attention_mask``); returns ``torch.long`` tensors. Padding is never supervised, even when the
    pad id is the EOS id (as for SmolLM2): supervision is carried by the labels, not the ids.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Any]) -> dict[str, Any]:
        import torch

        if not features:
            raise ValueError("cannot collate an empty batch")
        rows = []
        for f in features:
            ids, labels = list(_field(f, "input_ids")), list(_field(f, "labels"))
            mask = _field(f, "attention_mask")
            mask = [1] * len(ids) if mask is None else list(mask)
            if not (len(ids) == len(labels) == len(mask)):
                raise ValueError("input_ids, labels and attention_mask differ in length")
            rows.append((ids, labels, mask))
        width = max(len(r[0]) for r in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = -(-width // m) * m
        out = {
            "input_ids": [r[0] + [self.pad_token_id] * (width - len(r[0])) for r in rows],
            "labels": [r[1] + [IGNORE_INDEX] * (width - len(r[1])) for r in rows],
            "attention_mask": [r[2] + [0] * (width - len(r[2])) for r in rows],
        }
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


@dataclass
class PackedCollator:
    """Packs examples end to end into rows of at most ``row_tokens`` tokens: padding-free batches.

    Rows are balanced (``packing.balanced_rows``): as many as ``row_tokens`` requires, each with
    near-equal token counts, so the padding to the widest row is small. Each example's
    ``position_ids`` restart at 0, and no attention mask is returned to the model: transformers
    then reads the restarts as sequence boundaries and attends within each example only (a
    block-diagonal causal mask), so a packed row computes what separate padded rows compute
    (tested). The tail padding is one more block that no real token sees. ``attention_mask`` (1 on
    real tokens) is returned for counting only.

    The position after an example's last token is the next example's first token, which must be
    unsupervised (it is: every example starts with its prompt), or one example would be trained
    to predict another.
    """

    pad_token_id: int
    row_tokens: int

    def __call__(self, features: Sequence[Any]) -> dict[str, Any]:
        import torch

        if not features:
            raise ValueError("cannot collate an empty batch")
        examples = [(list(_field(f, "input_ids")), list(_field(f, "labels"))) for f in features]
        for n, (ids, labels) in enumerate(examples):
            if len(ids) != len(labels):
                raise ValueError(f"example {n}: input_ids and labels differ in length")
            if not labels or labels[0] != IGNORE_INDEX:
                raise ValueError(f"example {n}: its first token is supervised, so it cannot be packed")
        ids, positions, starts = pack([example_ids for example_ids, _ in examples], self.row_tokens, self.pad_token_id)
        labels = torch.full_like(ids, IGNORE_INDEX)
        attention = torch.zeros_like(ids)
        for (_, example_labels), start in zip(examples, starts, strict=True):
            labels.view(-1)[start:start + len(example_labels)] = torch.tensor(example_labels)
            attention.view(-1)[start:start + len(example_labels)] = 1
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": attention}


def supervised_token_count(batch: Mapping[str, Any]) -> int:
    """How many label positions in a batch carry loss (labels != -100)."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


# --------------------------------------------------------------------------------------------
# inspection


def _inspect(
    tokenizer: Any, records: Iterable[Any], n: int | None, **kwargs: Any
) -> list[tuple[dict[str, Any], Encoded | Dropped]]:
    out: list[tuple[dict[str, Any], Encoded | Dropped]] = []
    for i, record in enumerate(records):
        if n is not None and i >= n:
            break
        result = encode_item(tokenizer, record, **kwargs)
        row: dict[str, Any] = {"id": _field(record, "id") or f"item {i}"}
        if isinstance(result, Dropped):
            row.update(
                supervised_text=None,
                n_prompt_tokens=0,
                n_supervised_tokens=0,
                truncated_prompt_tokens=0,
                dropped=result.reason,
                detail=result.detail,
            )
        else:
            row.update(
                supervised_text=_decode(tokenizer, result.input_ids[result.n_prompt_tokens :]),
                n_prompt_tokens=result.n_prompt_tokens,
                n_supervised_tokens=result.n_supervised_tokens,
                truncated_prompt_tokens=result.truncated_prompt_tokens,
                dropped=None,
                detail="",
            )
        out.append((row, result))
    return out


def inspect_masks(
    tokenizer: Any,
    records: Iterable[Any],
    n: int | None = 5,
    *,
    max_length: int = 2048,
    add_bos: bool = False,
    min_prompt_tokens: int = DEFAULT_MIN_PROMPT_TOKENS,
) -> list[dict[str, Any]]:
    """Per example (the first ``n``; all if None): id, supervised_text (decoded supervised tokens,
    EOS included), n_prompt_tokens, n_supervised_tokens, truncated_prompt_tokens, dropped (the
    reason, or None) and detail. JSON-serialisable."""
    kwargs = dict(max_length=max_length, add_bos=add_bos, min_prompt_tokens=min_prompt_tokens)
    return [row for row, _ in _inspect(tokenizer, records, n, **kwargs)]


def _visible(piece: str) -> str:
    return piece.replace("\n", "↵\n").replace("\t", "→")


def render_masks(
    tokenizer: Any,
    records: Iterable[Any],
    n: int | None = 5,
    *,
    console: Any = None,
    max_length: int = 2048,
    add_bos: bool = False,
    min_prompt_tokens: int = DEFAULT_MIN_PROMPT_TOKENS,
) -> list[dict[str, Any]]:
    """Print each example with rich: prompt tokens dim, supervised tokens highlighted (token
    boundaries shown by alternating shades, newlines as ↵); returns the :func:`inspect_masks` rows."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.text import Text

    console = console or Console()
    kwargs = dict(max_length=max_length, add_bos=add_bos, min_prompt_tokens=min_prompt_tokens)
    pairs = _inspect(tokenizer, records, n, **kwargs)
    for row, result in pairs:
        if isinstance(result, Dropped):
            body = Text(f"DROPPED ({result.reason}): {result.detail}", style="bold red")
            console.print(Panel(body, title=str(row["id"]), border_style="red"))
            continue
        body = Text()
        for j, (tid, label) in enumerate(zip(result.input_ids, result.labels)):
            piece = _visible(_decode(tokenizer, [tid]))
            if label == IGNORE_INDEX:
                body.append(piece, style="dim" if j % 2 else "dim italic")
            else:
                body.append(piece, style="bold black on green" if j % 2 else "bold black on bright_green")
        subtitle = (
            f"prompt {row['n_prompt_tokens']} tokens (left-truncated by {row['truncated_prompt_tokens']}), "
            f"supervised {row['n_supervised_tokens']}"
        )
        console.print(Panel(body, title=str(row["id"]), subtitle=subtitle, border_style="green"))
    return [row for row, _ in pairs]
