"""The nine evaluation criteria: deterministic pass/fail judgements of one response to one item.

Each criterion is a function ``(item: InstructionRecord, r: EvalResponse) -> bool | None`` where
None means "does not apply to this item" (it is left out of that criterion's rate). They are
built from the shared predicates in ``cai_bootstrap.quality`` and the IFEval checks in
``cai_bootstrap.constraints``, so data quality control and evaluation judge text the same way;
two judgements are evaluation's own: ``degenerate`` (answers that do not attempt the task) and
``answers`` (reading a factual answer out of a response).

``score`` applies all of them in ``CRITERIA`` order; ``score_checks`` gives IFEval's prompt-level
(strict, loose) verdict on the item's instructions.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import constraints, quality
from ..formats import END_SUFFIX, cut_response, first_stop, words
from ..schemas import EvalResponse, InstructionRecord
from . import answers, degenerate

# --------------------------------------------------------------------------------------------
# Bounds and thresholds
# --------------------------------------------------------------------------------------------

# Share of the instruction's topic words a response must use to count as on topic: one shared
# word is enough for the typical 2-6 topic-word instruction; longer instructions need more.
TOPIC_OVERLAP_MIN = 0.15
# Below this many content words a response that shares no topic word is not judged off topic:
# short answers ("Blue.", "- Apple - Pear") name things without repeating the question's words.
ON_TOPIC_MIN_CONTENT_WORDS = 6
# An instruction with at most this many topic words ("Tell me a joke") cannot be judged by word
# overlap; addresses_instruction then gives a coherent, non-refusing answer the benefit of doubt.
FEW_TOPIC_WORDS = 1
# Typical word-count bounds per category when the item states none (min, max). A short factual
# answer is 1 word; an open request rarely needs more than a few paragraphs.
CATEGORY_WORD_BOUNDS: dict[str, tuple[int, int]] = {
    "qa": (1, 120),
    "completion": (1, 60),
    "constrained": (1, 150),
    "transformation": (1, 150),
    "format": (1, 250),
    "open": (1, 250),
}
# A stated "at least N words" raises the category upper bound to at least this multiple of it, so that
# "at least 300 words" on an open item (bound 250) can be met without being "too long".
MIN_WORDS_HEADROOM = 2
# IFEval instructions that state a length; appropriate_length honours them (checked loosely).
LENGTH_CONSTRAINTS: tuple[str, ...] = constraints.LENGTH_TYPES
_WORDS = "length_constraints:number_words"


def _references_matched(item: InstructionRecord, r: EvalResponse) -> bool:
    return bool(item.reference_answers) and quality.matches_reference(r.response, item.reference_answers)


# --------------------------------------------------------------------------------------------
# The criteria
# --------------------------------------------------------------------------------------------


def ends_with_end(item: InstructionRecord, r: EvalResponse) -> bool:
    """The model closed its answer with END: judged on raw_text, the first stop marker in it is
    "\\nEND" (as a whole word, not "\\nENDING") or the raw text starts with END."""
    if cut_response(r.raw_text).marker != END_SUFFIX:
        return False
    i, marker = first_stop(r.raw_text)
    if marker != END_SUFFIX:  # cut_response's "starts with END" rule
        return True
    after = r.raw_text[i + len(END_SUFFIX):i + len(END_SUFFIX) + 1]
    return not after.isalnum()


def proper_structure(item: InstructionRecord, r: EvalResponse) -> bool:
    """A non-empty response body without leftover template markers or chat special tokens."""
    return bool(r.response.strip()) and not quality.has_template_residue(r.response)


def no_rambling(item: InstructionRecord, r: EvalResponse) -> bool:
    """The model neither started a new instruction/turn (a runaway marker cut it, per stop_string
    or per raw_text) nor ran into the token limit."""
    if r.finish_reason == "length":
        return False
    return not (quality.is_runaway(r.stop_string) or quality.is_runaway(cut_response(r.raw_text).marker))


def addresses_instruction(item: InstructionRecord, r: EvalResponse) -> bool:
    """The response attempts the task.

    Fails when empty, a refusal, or a copy of the instruction. Passes when a reference answer is
    matched (a wrong answer is still an attempt; factually_correct judges it). Fails a copy or
    near-copy of the instruction's input text, a bare fragment of the prompt, (without an input
    text) a tautology that only restates the instruction's words, and a one-sentence circular
    definition ("The elevator is a type of elevator ...") (``degenerate``).
    Otherwise passes when any of: the item's constraints pass loosely; a completion item's
    response adds a word the instruction lacks (it continues the sentence); topic overlap is at
    least TOPIC_OVERLAP_MIN; the instruction has at most FEW_TOPIC_WORDS topic words and the
    response is coherent (word overlap cannot judge it).
    """
    text = r.response
    if not text.strip() or quality.is_refusal(text) or quality.copies_instruction(item.instruction, text):
        return False
    if _references_matched(item, r):
        return True
    if (degenerate.copies_input(item.instruction, text) or degenerate.is_prompt_fragment(item.instruction, text)
            or degenerate.restates_instruction(item.instruction, text) or degenerate.defines_by_itself(text)):
        return False
    if item.constraints and constraints.check_all(item.constraints, text)[1]:
        return True
    if item.category == "completion":
        return bool(set(words(text)) - set(words(item.instruction)))
    if quality.topic_overlap(item.instruction, text) >= TOPIC_OVERLAP_MIN:
        return True
    return len(quality.topic_words(item.instruction)) <= FEW_TOPIC_WORDS and quality.is_coherent(text)


def appropriate_length(item: InstructionRecord, r: EvalResponse) -> bool:
    """The response is neither too short nor too long for the item.

    Stated bounds (IFEval's number_words and number_sentences) must hold, judged loosely so that a
    one-line preamble is forgiven; a side without a stated word bound uses CATEGORY_WORD_BOUNDS
    (the upper one raised to MIN_WORDS_HEADROOM x a stated "at least" word count),
    except that a reference-matching answer has no category upper bound (a correct answer does
    not fail for being long). Empty fails.
    """
    text = r.response
    if not text.strip():
        return False
    stated = [c for c in item.constraints if c["type"] in LENGTH_CONSTRAINTS]
    if not all(constraints.check(c, text, loose=True) for c in stated):
        return False
    words = [c for c in stated if c["type"] == _WORDS]
    low, high = CATEGORY_WORD_BOUNDS[item.category]
    for c in words:
        if c["relation"] == "at least":
            high = max(high, MIN_WORDS_HEADROOM * c["num_words"])
    n = constraints.count_words(text)
    if not any(c["relation"] == "at least" for c in words) and n < low:
        return False
    if not any(c["relation"] == "less than" for c in words) and not _references_matched(item, r) and n > high:
        return False
    return True


def no_unwarranted_refusal(item: InstructionRecord, r: EvalResponse) -> bool:
    """The response does not refuse (every test instruction is benign)."""
    return not quality.is_refusal(r.response)


def factually_correct(item: InstructionRecord, r: EvalResponse) -> bool | None:
    """The response's answer is a reference answer (``answers.is_correct``: hedged lists of
    candidates, negated mentions and answers that take themselves back fail; numbers compare as
    numbers); None when the item has no reference."""
    if not item.reference_answers:
        return None
    return answers.is_correct(r.response, item.reference_answers, item.instruction)


def coherent(item: InstructionRecord, r: EvalResponse) -> bool:
    """Non-empty, not looping, not symbol soup or gibberish (quality.is_coherent)."""
    return quality.is_coherent(r.response)


def on_topic(item: InstructionRecord, r: EvalResponse) -> bool | None:
    """The response is about the instruction's subject.

    True when a reference is matched or topic overlap is at least TOPIC_OVERLAP_MIN; False for an
    empty response, or one with at least ON_TOPIC_MIN_CONTENT_WORDS content words and (almost) no
    overlap. None where words cannot tell: the instruction has no topic words, the item is a
    completion (a continuation need not repeat the stem), or the response is short.
    """
    text = r.response
    if not text.strip():
        return False
    if _references_matched(item, r):
        return True
    if not quality.topic_words(item.instruction):
        return None
    if quality.topic_overlap(item.instruction, text) >= TOPIC_OVERLAP_MIN:
        return True
    if item.category == "completion" or len(quality.content_words(text)) < ON_TOPIC_MIN_CONTENT_WORDS:
        return None
    return False


Criterion = Callable[[InstructionRecord, EvalResponse], "bool | None"]

_FUNCTIONS: dict[str, Criterion] = {
    "ends_with_end": ends_with_end,
    "proper_structure": proper_structure,
    "no_rambling": no_rambling,
    "addresses_instruction": addresses_instruction,
    "appropriate_length": appropriate_length,
    "no_unwarranted_refusal": no_unwarranted_refusal,
    "factually_correct": factually_correct,
    "coherent": coherent,
    "on_topic": on_topic,
}
CRITERIA: tuple[str, ...] = tuple(_FUNCTIONS)


def score(item: InstructionRecord, r: EvalResponse) -> dict[str, bool | None]:
    """Every criterion, in CRITERIA order."""
    if r.id != item.id:
        raise ValueError(f"response {r.id!r} scored against item {item.id!r}")
    return {name: _FUNCTIONS[name](item, r) for name in CRITERIA}


def score_checks(item: InstructionRecord, r: EvalResponse) -> tuple[bool | None, bool | None]:
    """IFEval's prompt-level (strict, loose) verdict on r.response; (None, None) without instructions."""
    return constraints.check_all(item.constraints, r.response, item.instruction)

