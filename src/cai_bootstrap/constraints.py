"""Machine-checkable constraints carried by instructions as data, IFEval-style.

A constraint is a dict such as ``{"type": "max_words", "n": 10}``. ``validate_spec`` checks its
shape; the checks themselves live beside it so that QC and evaluation use one implementation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any

# type -> {param: python type}
CONSTRAINT_PARAMS: dict[str, dict[str, type]] = {
    "max_words": {"n": int},
    "min_words": {"n": int},
    "num_list_items": {"n": int},
    "num_sentences": {"n": int},
    "no_commas": {},
    "all_lowercase": {},
    "all_uppercase": {},
    "json_format": {},
    "ends_with": {"phrase": str},
    "starts_with": {"phrase": str},
    "contains_keyword": {"keyword": str},
}


def validate_spec(spec: Any) -> dict[str, Any]:
    """Return the spec if well formed, else raise ValueError naming what is wrong."""
    if not isinstance(spec, dict):
        raise ValueError(f"constraint must be an object, got {type(spec).__name__}")
    kind = spec.get("type")
    if kind not in CONSTRAINT_PARAMS:
        raise ValueError(f"unknown constraint type {kind!r}; known: {sorted(CONSTRAINT_PARAMS)}")
    params = CONSTRAINT_PARAMS[kind]
    extra = set(spec) - {"type"} - set(params)
    if extra:
        raise ValueError(f"constraint {kind!r} has unknown keys {sorted(extra)}")
    for name, typ in params.items():
        if name not in spec:
            raise ValueError(f"constraint {kind!r} needs {name!r}")
        value = spec[name]
        if typ is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"constraint {kind!r}: {name!r} must be a positive integer")
        if typ is str and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"constraint {kind!r}: {name!r} must be a non-empty string")
    return spec


# --------------------------------------------------------------------------------------------
# The checks.
#
# ``check(spec, response)`` is strict: the response as it is. ``check(spec, response, loose=True)``
# follows IFEval's loose mode: it passes if any of these variants passes (empty variants skipped):
# the response, the response without its first line, without its last line, without both, and each
# of those with every markdown ``*`` removed. That forgives a chatty preamble ("Sure, here it is:")
# or sign-off line and bold/italic markup, and nothing else.
#
# Decisions (documented here because IFEval leaves some of them to its tokenizers):
#   words       runs of letters/digits, joined by ' - . , inside the run: "don't", "well-known",
#               "3.14" and "1,000" are one word each. Whitespace-separated text is additive.
#   list items  lines that start (after indentation) with "-", "*", "•" or "1." / "1)" numbering,
#               followed by white space and some text. "**bold**" lines are not items.
#   sentences   text split at newlines and after . ! ? (and any closing quotes/brackets) followed
#               by white space; a few abbreviations (Mr. Dr. e.g. i.e. vs. ...) and single capital
#               initials ("J. K.") do not end a sentence; pieces without a letter or digit are
#               dropped. ``num_sentences`` and ``num_list_items`` ask for exactly n.
#   JSON        strict: the whole response (white space stripped) parses as a JSON object or array
#               (a bare number or string is not "an answer in JSON format"). Loose also accepts a
#               fenced ```json ... ``` (or plain ```) block anywhere in a variant.
#   starts_with / ends_with
#               case-insensitive, white space folded. starts_with ignores leading white space and
#               needs a word boundary after the phrase ("Yes" does not start "Yesterday").
#               ends_with ignores trailing white space and trailing punctuation/quotes on both the
#               response and the phrase ("... goodbye!" ends with "Goodbye."), and needs a word
#               boundary before the phrase ("bobcat" does not end with "cat").
#   contains_keyword
#               case-insensitive, white space folded, whole words: not preceded or followed by a
#               letter/digit ("cat" is not in "category"; plurals do not count).
#   all_lowercase / all_uppercase
#               the text equals its lower (upper) case and has at least one letter that has case.
#   no_commas   neither "," nor the full-width "，".
#   empty       an empty or white-space-only response fails every check, strict and loose (as in
#               IFEval: otherwise "say nothing" would satisfy max_words, no_commas, ...).
# --------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+(?:[.'’,-]\w+)*")
_LIST_ITEM = re.compile(r"[ \t]*(?:[-*•]|\d+[.)])[ \t]+\S")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+")
# A piece ending in one of these does not end a sentence: titles, Latin abbreviations, initials.
_ABBREVIATION = re.compile(
    r"(?<![\w.])(?:mr|mrs|ms|dr|prof|st|vs|jr|sr|e\.g|i\.e|cf|approx)\.$", re.IGNORECASE
)
_INITIAL = re.compile(r"(?<![\w.])[A-Z]\.$")  # case-sensitive: "J." yes, "a." no
_FENCE = re.compile(r"```[ \t]*(?:json|JSON|Json)?[ \t]*\n?(.*?)```", re.DOTALL)
_EDGE_PUNCT = " \t\r\n.,;:!?\"'“”‘’()[]{}"


def count_words(text: str) -> int:
    """Number of words (see the decisions above)."""
    return len(_WORD.findall(text))


def list_items(text: str) -> list[str]:
    """The lines of text that are bullet or numbered list items, stripped."""
    return [line.strip() for line in text.splitlines() if _LIST_ITEM.match(line)]


def split_sentences(text: str) -> list[str]:
    """Sentences of text: split at newlines and at . ! ? followed by white space."""
    sentences: list[str] = []
    for line in text.splitlines():
        pieces = _SENTENCE_BREAK.split(line.strip())
        merged: list[str] = []
        for piece in pieces:
            if merged and _is_abbreviation_end(merged[-1]):
                merged[-1] = f"{merged[-1]} {piece}"
            else:
                merged.append(piece)
        sentences.extend(p.strip() for p in merged if re.search(r"\w", p))
    return sentences


def _is_abbreviation_end(piece: str) -> bool:
    piece = piece.rstrip("\"'”’)]")
    return bool(_INITIAL.search(piece) or _ABBREVIATION.search(piece))


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def _fold(text: str) -> str:
    return " ".join(text.split()).lower()


def _parses_as_json_container(text: str) -> bool:
    try:
        value = json.loads(text.strip())
    except (ValueError, RecursionError):
        return False
    return isinstance(value, (dict, list))


def _json_strict(text: str) -> bool:
    return _parses_as_json_container(text)


def _json_loose(text: str) -> bool:
    return _parses_as_json_container(text) or any(
        _parses_as_json_container(m.group(1)) for m in _FENCE.finditer(text)
    )


def _starts_with(text: str, phrase: str) -> bool:
    text, phrase = _fold(text), _fold(phrase)
    if not phrase or not text.startswith(phrase):
        return False
    nxt = text[len(phrase):len(phrase) + 1]
    return not (phrase[-1].isalnum() and nxt.isalnum())


def _ends_with(text: str, phrase: str) -> bool:
    if not _fold(phrase).rstrip(_EDGE_PUNCT):  # a phrase of punctuation only, e.g. "?"
        return _fold(text).endswith(_fold(phrase))
    text, phrase = _fold(text).rstrip(_EDGE_PUNCT), _fold(phrase).rstrip(_EDGE_PUNCT)
    if not text.endswith(phrase):
        return False
    prev = text[-len(phrase) - 1:-len(phrase)] if len(text) > len(phrase) else ""
    return not (phrase[0].isalnum() and prev.isalnum())


def _contains_keyword(text: str, keyword: str) -> bool:
    words = keyword.split()
    if not words:
        return False
    pattern = r"(?<![^\W_])" + r"\s+".join(re.escape(w) for w in words) + r"(?![^\W_])"
    return re.search(pattern, text, re.IGNORECASE) is not None


def _has_case(text: str) -> bool:
    return any(c.lower() != c.upper() for c in text)


_Check = Callable[[dict[str, Any], str], bool]

_STRICT: dict[str, _Check] = {
    "max_words": lambda s, t: count_words(t) <= s["n"],
    "min_words": lambda s, t: count_words(t) >= s["n"],
    "num_list_items": lambda s, t: len(list_items(t)) == s["n"],
    "num_sentences": lambda s, t: count_sentences(t) == s["n"],
    "no_commas": lambda s, t: "," not in t and "，" not in t,
    "all_lowercase": lambda s, t: t == t.lower() and _has_case(t),
    "all_uppercase": lambda s, t: t == t.upper() and _has_case(t),
    "json_format": lambda s, t: _json_strict(t),
    "ends_with": lambda s, t: _ends_with(t, s["phrase"]),
    "starts_with": lambda s, t: _starts_with(t.lstrip(), s["phrase"]),
    "contains_keyword": lambda s, t: _contains_keyword(t, s["keyword"]),
}
# Loose mode differs from strict only through the variants, except JSON, which also takes a fence.
_LOOSE: dict[str, _Check] = {**_STRICT, "json_format": lambda s, t: _json_loose(t)}
assert set(_STRICT) == set(CONSTRAINT_PARAMS), "every constraint type needs a check"


def loose_variants(response: str) -> list[str]:
    """IFEval's loose variants of a response (the response itself first), empty ones dropped."""
    lines = response.split("\n")
    base = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    variants = base + [v.replace("*", "") for v in base]
    out: list[str] = []
    for v in variants:
        if v.strip() and v not in out:
            out.append(v)
    return out


def check(spec: dict[str, Any], response: str, *, loose: bool = False) -> bool:
    """Whether response satisfies one constraint; strict, or loose in IFEval's sense.

    Raises ValueError for a malformed spec; never raises for any response text.
    """
    spec = validate_spec(spec)
    if not response.strip():
        return False
    if not loose:
        return bool(_STRICT[spec["type"]](spec, response))
    fn = _LOOSE[spec["type"]]
    return any(fn(spec, v) for v in loose_variants(response))


def check_all(
    specs: Iterable[dict[str, Any]], response: str
) -> tuple[bool | None, bool | None]:
    """(strict, loose): every constraint passes, per mode; (None, None) when there are none.

    Loose is decided per constraint (each may pick its own variant), as in IFEval; strict implies
    loose.
    """
    specs = list(specs)
    if not specs:
        return None, None
    strict = all(check(s, response) for s in specs)
    loose = strict or all(check(s, response, loose=True) for s in specs)
    return strict, loose
