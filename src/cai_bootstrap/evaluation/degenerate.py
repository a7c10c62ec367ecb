"""Responses that look like answers but do not attempt the task.

``addresses_instruction`` fails them besides refusals and copies of the whole instruction
(``quality.copies_instruction``):

- :func:`copies_input` — the instruction's input text handed back: "Rewrite this sentence to
  sound more formal: hey whats up" answered "hey whats up", or "Here it is: hey whats up";
- :func:`is_prompt_fragment` — a bare piece of the prompt: "Curiosity killed the" for "Complete
  the proverb: Curiosity killed the" (picking one of the options the instruction offers, "no" for
  "Answer with yes or no: ...", is an answer, not a fragment);
- :func:`restates_instruction` — a tautology that only restates the instruction's subject: "The
  baby dragon is a baby dragon who meets a stranger on a train." asked for a story about a baby
  dragon who meets a stranger on a train. Only judged where the instruction has no input text: a
  correct transformation ("The cats sit." for "Change to the plural: The cat sits.") reuses the
  input's words by design;
- :func:`defines_by_itself` — a one-sentence answer built on a circular definition: "The elevator
  is a type of elevator that moves up." asked how an elevator works (seen in the demo). An answer
  that goes on with more sentences is an attempt and is left to the other criteria.

Word-level rules on plain strings, like ``quality``'s predicates.
"""

from __future__ import annotations

import re

from ..quality import STOPWORDS, folded_words

# "<directive>: <input>" carries an input text when the directive is at most this many words
# ("Rewrite in the past tense:", "Respond to this message:", "Answer in one word:"); a longer
# head is a sentence that happens to contain a colon.
INPUT_DIRECTIVE_MAX_WORDS = 12
# Instructions about letter case: a copy is then judged with case, so that "THE CAT" for "Rewrite
# in lower case: THE CAT" is a copy and "the cat" is not.
_CASE_TASK = re.compile(r"\b(?:lower ?case|upper ?case|capital letters|capitali[sz]e)\b", re.IGNORECASE)
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_APOSTROPHE = re.compile(r"(?<=\w)['’](?=\w)")
_ARTICLES = frozenset({"a", "an", "the"})
# "X is a type of X": the same one to three words on both sides (case aside)
_SELF_DEFINITION = re.compile(
    r"\b(?P<x>[^\W\d_]+(?:\s+[^\W\d_]+){0,2})\s+(?:is|are)\s+(?:(?:a|an|the|one)\s+)?"
    r"(?:type|kind|sort|form|variety|example)s?\s+of\s+(?:(?:a|an|the)\s+)?(?P=x)\b",
    re.IGNORECASE)
_SENTENCE_BREAK = re.compile(r"[.!?](?:\s+|$)")


def input_text(instruction: str) -> str | None:
    """The text after "<directive>:" that the task transforms, continues or answers; None when
    the instruction has no such part."""
    head, sep, tail = instruction.partition(":")
    if not sep or not tail.strip() or len(head.split()) > INPUT_DIRECTIVE_MAX_WORDS:
        return None
    return tail.strip()


def _words(text: str, keep_case: bool) -> list[str]:
    return [_APOSTROPHE.sub("", w) for w in _WORD.findall(text)] if keep_case else folded_words(text)


def _contains_run(haystack: list[str], needle: list[str]) -> bool:
    k = len(needle)
    return any(haystack[i:i + k] == needle for i in range(len(haystack) - k + 1))


def _content(text: str) -> set[str]:
    """Lower-case words without stopwords and single letters; not stemmed, so that "meets" and
    "met" differ (a tense change is new content, a repeated word is not)."""
    return {w for w in folded_words(text) if w not in STOPWORDS and (len(w) > 1 or w.isdigit())}


def copies_input(instruction: str, response: str) -> bool:
    """The response is the instruction's input text, unchanged or nearly: the same words in the
    same order (punctuation and spacing aside; case aside unless the task is about case), alone
    or inside a frame that adds no content word the instruction lacks."""
    given = input_text(instruction)
    if given is None:
        return False
    keep_case = bool(_CASE_TASK.search(instruction))
    said, source = _words(response, keep_case), _words(given, keep_case)
    if not said or not source:
        return False
    if said == source:
        return True
    return _contains_run(said, source) and not (_content(response) - _content(instruction))


def picks_option(instruction: str, response: str) -> bool:
    """The response is one of the words the instruction offers as choices, either side of an "or"
    ("no" for "yes or no", "A mouse." for "an elephant or a mouse"): an answer, right or wrong."""
    words = [w for w in folded_words(instruction) if w not in _ARTICLES]
    options = {words[i + d] for i, w in enumerate(words) if w == "or" for d in (-1, 1) if 0 <= i + d < len(words)}
    said = [w for w in folded_words(response) if w not in _ARTICLES]
    return len(said) == 1 and said[0] in options


def is_prompt_fragment(instruction: str, response: str) -> bool:
    """The response is a run of the instruction's own words, shorter than the instruction (case
    aside unless the task is about case), and not one of the options it offers."""
    if picks_option(instruction, response):
        return False
    keep_case = bool(_CASE_TASK.search(instruction))
    said, prompt = _words(response, keep_case), _words(instruction, keep_case)
    return bool(said) and len(said) < len(prompt) and _contains_run(prompt, said)


def restates_instruction(instruction: str, response: str) -> bool:
    """The response has content words and all of them are the instruction's: it restates the
    subject and adds nothing. Not judged (False) when the instruction has an input text or the
    response picks an offered option."""
    if input_text(instruction) is not None or picks_option(instruction, response):
        return False
    said = _content(response)
    return bool(said) and said <= _content(instruction)


def defines_by_itself(response: str) -> bool:
    """The response is one sentence and defines its subject by itself ("X is a kind of X")."""
    sentences = [p for p in _SENTENCE_BREAK.split(response.strip()) if p.strip()]
    return len(sentences) == 1 and _SELF_DEFINITION.search(response) is not None
