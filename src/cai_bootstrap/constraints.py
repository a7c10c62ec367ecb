"""Verifiable constraints carried by instructions as data: IFEval's 25 instructions, checked by IFEval.

A constraint is one IFEval instruction: ``{"type": <instruction id>, **kwargs}``, where the id and
the kwargs are exactly IFEval's (``instruction_id_list[i]`` and ``kwargs[i]`` of its
``input_data.jsonl``), e.g. ``{"type": "length_constraints:number_words", "relation": "less than",
"num_words": 50}``. ``validate_spec`` checks the shape without importing anything heavy; ``check``
and ``check_all`` run Google's own checks (``official_ifeval``), strict or loose as IFEval defines
them. The sft-data QC, the negatives and the evaluation all use these verdicts: there is no second
implementation to disagree with the benchmark.

Every kwarg is required. The official code fills a missing or falsy kwarg with a *random* value
(a random word count, a random keyword), so a spec without it would be checked against something
nobody asked for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

RELATIONS: tuple[str, ...] = ("less than", "at least")
# instructions_util.LANGUAGE_CODES (tests/test_ifeval.py checks that they are the official ones).
LANGUAGES: tuple[str, ...] = (
    "en", "es", "pt", "ar", "hi", "fr", "ru", "de", "ja", "it", "bn", "uk", "th", "ur", "ta", "te", "bg",
    "ko", "pl", "he", "fa", "vi", "ne", "sw", "kn", "mr", "gu", "pa", "ml", "fi",
)

# id -> {kwarg: kind}. Kinds: int (>= 1), str (non-blank), regex (a str that compiles: IFEval
# matches it as a regular expression), regex_list (a non-empty list of those), relation, language,
# letter (one ASCII letter).
CONSTRAINT_PARAMS: dict[str, dict[str, str]] = {
    "keywords:existence": {"keywords": "regex_list"},
    "keywords:frequency": {"keyword": "regex", "frequency": "int", "relation": "relation"},
    "keywords:forbidden_words": {"forbidden_words": "regex_list"},
    "keywords:letter_frequency": {"letter": "letter", "let_frequency": "int", "let_relation": "relation"},
    "language:response_language": {"language": "language"},
    "length_constraints:number_sentences": {"num_sentences": "int", "relation": "relation"},
    "length_constraints:number_paragraphs": {"num_paragraphs": "int"},
    "length_constraints:number_words": {"num_words": "int", "relation": "relation"},
    "length_constraints:nth_paragraph_first_word": {"num_paragraphs": "int", "nth_paragraph": "int",
                                                     "first_word": "str"},
    "detectable_content:number_placeholders": {"num_placeholders": "int"},
    "detectable_content:postscript": {"postscript_marker": "regex"},
    "detectable_format:number_bullet_lists": {"num_bullets": "int"},
    "detectable_format:constrained_response": {},
    "detectable_format:number_highlighted_sections": {"num_highlights": "int"},
    "detectable_format:multiple_sections": {"section_spliter": "regex", "num_sections": "int"},
    "detectable_format:json_format": {},
    "detectable_format:title": {},
    "combination:two_responses": {},
    "combination:repeat_prompt": {"prompt_to_repeat": "str"},
    "startend:end_checker": {"end_phrase": "str"},
    "change_case:capital_word_frequency": {"capital_frequency": "int", "capital_relation": "relation"},
    "change_case:english_capital": {},
    "change_case:english_lowercase": {},
    "punctuation:no_comma": {},
    "startend:quotation": {},
}
CONSTRAINT_TYPES: tuple[str, ...] = tuple(CONSTRAINT_PARAMS)
# Instructions that state a length; criteria.appropriate_length honours them.
LENGTH_TYPES: tuple[str, ...] = ("length_constraints:number_words", "length_constraints:number_sentences")


def _regex_ok(value: str) -> bool:
    try:
        re.compile(value)
    except re.error:
        return False
    return True


def _param_problem(kind: str, value: Any) -> str | None:
    """Why value is not a valid kwarg of this kind, or None."""
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        return None if ok else "must be a positive integer"
    if kind == "relation":
        return None if value in RELATIONS else f"must be one of {list(RELATIONS)}"
    if kind == "language":
        return None if value in LANGUAGES else f"must be an IFEval language code, one of {list(LANGUAGES)}"
    if kind == "letter":
        ok = isinstance(value, str) and len(value) == 1 and value.isascii() and value.isalpha()
        return None if ok else "must be one ASCII letter"
    if kind == "regex_list":
        if not isinstance(value, list) or not value:
            return "must be a non-empty list of strings"
        return next((p for p in (_param_problem("regex", v) for v in value) if p), None)
    if not isinstance(value, str) or not value.strip():
        return "must be a non-empty string"
    if kind == "regex" and not _regex_ok(value):
        return "is matched as a regular expression by IFEval and does not compile"
    return None


def validate_spec(spec: Any) -> dict[str, Any]:
    """Return the spec if well formed, else raise ValueError naming what is wrong."""
    if not isinstance(spec, dict):
        raise ValueError(f"constraint must be an object, got {type(spec).__name__}")
    kind = spec.get("type")
    if kind not in CONSTRAINT_PARAMS:
        raise ValueError(f"unknown constraint type {kind!r}; known: the IFEval instruction ids {list(CONSTRAINT_PARAMS)}")
    params = CONSTRAINT_PARAMS[kind]
    extra = set(spec) - {"type"} - set(params)
    if extra:
        raise ValueError(f"constraint {kind!r} has unknown keys {sorted(extra)}; it takes {sorted(params)}")
    for name, param_kind in params.items():
        if name not in spec:
            raise ValueError(f"constraint {kind!r} needs {name!r}")
        problem = _param_problem(param_kind, spec[name])
        if problem:
            raise ValueError(f"constraint {kind!r}: {name!r} {problem}")
    if kind == "length_constraints:nth_paragraph_first_word" and spec["nth_paragraph"] > spec["num_paragraphs"]:
        raise ValueError(f"constraint {kind!r}: 'nth_paragraph' must not exceed 'num_paragraphs'")
    return spec


def from_ifeval(instruction_id: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The spec of one IFEval instruction; a kwarg that is null is absent (IFEval's HF release
    lists every kwarg of every instruction, null where unused)."""
    if not isinstance(kwargs, dict):
        raise ValueError(f"kwargs must be an object, got {type(kwargs).__name__}")
    return validate_spec({"type": instruction_id, **{k: v for k, v in kwargs.items() if v is not None}})


def to_ifeval(specs: Iterable[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """(instruction_id_list, kwargs) in IFEval's input format."""
    specs = list(specs)
    return [s["type"] for s in specs], [{k: v for k, v in s.items() if k != "type"} for s in specs]


def verdicts(specs: Iterable[dict[str, Any]], response: str, prompt: str = "") -> tuple[list[bool], list[bool]]:
    """Per constraint: (strict, loose) from the official IFEval functions. An empty response fails
    everything (IFEval's rule). ``prompt`` is the instruction (IFEval passes it to instructions that
    take one; none of the 25 do)."""
    specs = [validate_spec(s) for s in specs]
    if not specs:
        return [], []
    from .official_ifeval import follows

    ids, kwargs = to_ifeval(specs)
    return follows(ids, kwargs, prompt, response)


def check(spec: dict[str, Any], response: str, *, loose: bool = False) -> bool:
    """Whether response follows one constraint, strict or loose (IFEval's response variants).

    Raises ValueError for a malformed spec; never raises for any response text.
    """
    strict, loose_ = verdicts([spec], response)
    return (loose_ if loose else strict)[0]


def check_all(specs: Iterable[dict[str, Any]], response: str, prompt: str = "") -> tuple[bool | None, bool | None]:
    """(strict, loose): every constraint followed, per mode (IFEval's prompt-level verdicts);
    (None, None) when there are none. Loose is decided per instruction, each on its best variant."""
    strict, loose = verdicts(specs, response, prompt)
    if not strict:
        return None, None
    return all(strict), all(loose)


def count_words(text: str) -> int:
    """Words as IFEval counts them (runs of word characters)."""
    from .official_ifeval import official

    return official().util.count_words(text)
