"""Rule-built rejected completions: five kinds of "what a good answer is not", for one item.

Every builder takes the training item, its chosen response (clean text, no END), a seeded
``random.Random`` and a pool of other ``(item, response)`` pairs, and returns the rejected
COMPLETION — the exact text that follows the prompt, starting with a space like
:func:`formats.completion_for` — with ``how``, a short record of the rule applied; or ``None`` when
the kind does not apply to the item.

=================  ===================================================================================
``refusal``        an unwarranted refusal (several templates; each one is caught by quality.is_refusal)
``format_violation`` one of: ``constraint:<IFEval id>`` (the response changed to break one of the
                   item's IFEval instructions, checked with the official check), ``truncated`` (cut mid-sentence, no
                   END), ``missing_end`` (the response without END), ``ramble_no_end`` (a new
                   ``Instruction:`` turn instead of END). Each is an ending generation can produce
                   (generation stops at END, so nothing after END is ever seen).
                   When the item has a breakable constraint it is chosen half of the time; otherwise
                   the structural sub-kinds are drawn uniformly among those that apply.
``incorrect_fact`` only for items with reference answers: every occurrence of the reference in the
                   response replaced by a plausible wrong answer of the same type (the opposite of
                   yes/no, a nearby number, or a sibling item's answer — same template first, then
                   same category); a standalone wrong answer when the response does not spell the
                   reference literally. The result never matches a reference (quality.matches_reference).
``off_topic``      the response to another item with a different template, whose response shares at
                   most OFF_TOPIC_MAX_OVERLAP of this instruction's topic words (quality.topic_overlap);
                   a different category is preferred.
``verbose_vague``  filler that never answers: an opener, three hedges and a closer drawn from fixed
                   lists, written without number words or yes/no so it cannot match a reference.
=================  ===================================================================================

All text is built with real newlines; a negative equal to the chosen completion is never returned.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

from ..constraints import check, count_words
from ..formats import completion_for, normalize
from ..quality import matches_reference, normalize_answer, topic_overlap
from ..schemas import InstructionRecord

Others = Sequence[tuple[InstructionRecord, str]]
Built = tuple[str, str] | None
Builder = Callable[[InstructionRecord, str, random.Random, Others], Built]

# off_topic: the borrowed response may share at most this share of the instruction's topic words.
OFF_TOPIC_MAX_OVERLAP = 0.2
# off_topic: how many random candidates from the pool are examined (keeps the cost per item bounded).
OFF_TOPIC_CANDIDATES = 64
# format_violation: probability of breaking a stated constraint when the item has one.
CONSTRAINT_SHARE = 0.5


def _end(text: str) -> str:
    return completion_for(text)


# --------------------------------------------------------------------------------------------
# refusal

REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I cannot assist with that request.",
    "As an AI language model, I am unable to help with this request.",
    "I apologize, but I won't be able to provide that.",
    "Unfortunately, I can't help with this request.",
    "I'm afraid I cannot comply with that request. Please ask me something else.",
    "Sorry, I can't do that.",
    "I must decline to answer this question.",
)


def refusal(item: InstructionRecord, chosen: str, rng: random.Random, others: Others) -> Built:
    k = rng.randrange(len(REFUSALS))
    return _end(REFUSALS[k]), f"refusal:template={k}"


# --------------------------------------------------------------------------------------------
# format_violation

_PADDING = (
    "There is also a great deal more that could be said about this, and many further details are "
    "worth adding here for completeness."
)
_EXTRA_SENTENCE = "This is an extra sentence that was not asked for."
_SIGN_OFF = "Thanks for reading this reply."
_EXTRA_ITEM = "- Another item that was not asked for"
_DEFAULT_CONTINUATION = ("Write a short poem about the sea.", "The sea is wide and blue.")


def _sentence_case(text: str) -> str:
    return re.sub(r"(^|[.!?]\s+|\n)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


def _sentences(text: str) -> list[str]:
    return [p for p in re.split(r"(?<=[.!?])\s+", text) if p.strip()]


def _pad_words(text: str, n: int) -> str:
    while count_words(text) < n:
        text = f"{text} {_PADDING}"
    return text


def _keep_words(text: str, n: int) -> str | None:
    ws = re.findall(r"\S+", text)
    keep = max(1, min(n - 1, len(ws) // 2, 8))
    return " ".join(ws[:keep]).rstrip(",;:") if ws else None


def _without(pattern: str, text: str, by: str = "something") -> str:
    return re.sub(pattern, by, text, flags=re.IGNORECASE)


def _break_constraint(spec: dict, response: str) -> str | None:
    """The response changed so that it breaks spec (verified by the caller with the official check);
    None where no simple edit breaks it (an answer that must be in English)."""
    kind = spec["type"].split(":", 1)[1]
    text = response.strip()
    if kind == "existence":
        for keyword in spec["keywords"]:
            text = _without(keyword, text)
        return text
    if kind == "frequency":
        if spec["relation"] == "at least":
            return _without(spec["keyword"], text, "that")
        return f"{text} {' '.join([spec['keyword']] * spec['frequency'])}"
    if kind == "forbidden_words":
        return f"{text} This mentions {spec['forbidden_words'][0]}."
    if kind == "letter_frequency":
        if spec["let_relation"] == "at least":
            return _without(spec["letter"], text, "")
        return f"{text} {spec['letter'] * spec['let_frequency']}"
    if kind in ("number_sentences", "number_words"):
        n = spec.get("num_sentences", spec.get("num_words"))
        if spec["relation"] == "less than":
            if kind == "number_words":
                return _pad_words(text, n)
            sep = " " if text.endswith((".", "!", "?")) else ". "
            return f"{text}{sep}{' '.join([_EXTRA_SENTENCE] * n)}"
        return _keep_words(text, n) if kind == "number_words" else " ".join(_sentences(text)[:max(1, n - 1)])
    if kind == "number_paragraphs":
        return f"{text}\n***\n{_EXTRA_SENTENCE}"
    if kind == "nth_paragraph_first_word":
        return f"{text}\n\n{_EXTRA_SENTENCE}"
    if kind == "number_placeholders":
        return re.sub(r"\[(.*?)\]", r"\1", text)
    if kind == "postscript":
        marker = spec["postscript_marker"].lower().rstrip(".")
        return "\n".join(line for line in text.split("\n") if marker not in line.lower()).strip()
    if kind == "number_bullet_lists":
        return f"{text}\n{_EXTRA_ITEM}"
    if kind == "constrained_response":
        return _without(r"my answer is", text, "I would say")
    if kind == "number_highlighted_sections":
        return text.replace("*", "")
    if kind == "multiple_sections":
        return _without(spec["section_spliter"] + r"\s?\d+", text, "")
    if kind == "json_format":
        return f"Here is the answer: {text} I hope this helps."
    if kind == "title":
        return text.replace("<<", "").replace(">>", "")
    if kind == "two_responses":
        return text.replace("******", "\n")
    if kind in ("repeat_prompt", "quotation"):
        return f"Sure! {text}"
    if kind == "end_checker":
        return f"{text} {_SIGN_OFF}"
    if kind == "capital_word_frequency":
        if spec["capital_relation"] == "at least":
            return text.lower()
        return f"{text} {' '.join(['NOTE'] * spec['capital_frequency'])}"
    if kind == "english_capital":
        return _sentence_case(text.lower())
    if kind == "english_lowercase":
        return _sentence_case(text) if _sentence_case(text) != text else text.title()
    if kind == "no_comma":
        return f"Well, here it is, in short: {text}"
    if kind == "response_language" and spec["language"] != "en":
        return _PADDING  # an English answer to "answer in French"
    return None


def constraint_violations(item: InstructionRecord, chosen: str) -> list[tuple[str, str]]:
    """(broken text, constraint type) for each of the item's constraints that can be broken."""
    out = []
    for spec in item.constraints:
        broken = _break_constraint(spec, chosen)
        if broken and broken.strip() and not check(spec, broken) and broken.strip() != chosen.strip():
            out.append((broken, spec["type"]))
    return out


def _truncate(chosen: str, rng: random.Random) -> str | None:
    spans = [m.span() for m in re.finditer(r"\S+", chosen.strip())]
    if len(spans) < 3:
        return None
    k = rng.randint(max(1, len(spans) // 3), max(1, (2 * len(spans)) // 3))
    cut = chosen.strip()[: spans[k - 1][1]].rstrip(".,;:!?")
    return cut if cut.strip() else None


def format_violation(item: InstructionRecord, chosen: str, rng: random.Random, others: Others) -> Built:
    response = chosen.strip()
    violations = constraint_violations(item, response)
    if violations and rng.random() < CONSTRAINT_SHARE:
        broken, kind = violations[rng.randrange(len(violations))]
        return _end(broken), f"format_violation:constraint:{kind}"
    subs = ["missing_end", "ramble_no_end"]
    truncated = _truncate(response, rng)
    if truncated is not None:
        subs.insert(0, "truncated")
    sub = subs[rng.randrange(len(subs))]
    if sub == "truncated":
        return f" {truncated}", "format_violation:truncated"
    if sub == "missing_end":
        return f" {response}", "format_violation:missing_end"
    pool = [(o, r) for o, r in others if o.id != item.id and r.strip()]
    if pool:
        other, other_response = pool[rng.randrange(len(pool))]
        next_instruction, next_response = other.instruction, other_response.strip()
    else:
        next_instruction, next_response = _DEFAULT_CONTINUATION
    turn = f"\nInstruction: {next_instruction}\nResponse: {next_response}"
    return f" {response}{turn}", "format_violation:ramble_no_end"


# --------------------------------------------------------------------------------------------
# incorrect_fact

_OPPOSITES = {"yes": "no", "no": "yes", "true": "false", "false": "true"}


def _alias_pattern(alias: str) -> re.Pattern[str] | None:
    parts = [p for p in re.split(r"[\s-]+", alias.strip()) if p]
    if not parts:
        return None
    return re.compile(r"(?<!\w)" + r"[\s-]+".join(re.escape(p) for p in parts) + r"(?!\w)", re.IGNORECASE)


def _numeric_value(refs: Sequence[str]) -> int | None:
    for ref in refs:
        key = normalize_answer(ref)
        if key.isdigit():
            return int(key)
    return None


def _wrong_number(value: int, rng: random.Random) -> int:
    spread = max(3, value // 10)
    delta = 0
    while delta == 0 or value + delta < 0:
        delta = rng.randint(-spread, spread)
    return value + delta


def _wrong_answer(item: InstructionRecord, rng: random.Random, others: Others) -> tuple[str, str] | None:
    """(wrong answer, how it was chosen), never matching one of the item's references."""
    refs = item.reference_answers
    keys = {normalize_answer(r) for r in refs}

    def ok(candidate: str) -> bool:
        key = normalize_answer(candidate)
        return bool(key) and key not in keys and not matches_reference(candidate, refs)

    for ref in refs:
        opposite = _OPPOSITES.get(normalize_answer(ref))
        if opposite and ok(opposite):
            return opposite, "opposite"
    value = _numeric_value(refs)
    if value is not None:
        for _ in range(20):
            wrong = str(_wrong_number(value, rng))
            if ok(wrong):
                return wrong, "number"

    def pick(pool: list[str]) -> str | None:
        unique = sorted({c for c in pool if ok(c)})
        return unique[rng.randrange(len(unique))] if unique else None

    candidates = [(o, o.reference_answers[0]) for o, _ in others if o.id != item.id and o.reference_answers]
    if item.template is not None:
        wrong = pick([c for o, c in candidates if o.template == item.template])
        if wrong is not None:
            return wrong, "sibling_template"
    wrong = pick([c for o, c in candidates if o.category == item.category and _numeric_value([c]) is None])
    if wrong is not None:
        return wrong, "sibling_category"
    return None


def _word_before(text: str, index: int) -> str:
    found = re.search(r"(\w+)\W*$", text[:index])
    return found.group(1).lower() if found else ""


def _match_case(found: str, replacement: str) -> str:
    if found[:1].isupper() and replacement[:1].islower():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def incorrect_fact(item: InstructionRecord, chosen: str, rng: random.Random, others: Others) -> Built:
    if not item.reference_answers:
        return None
    picked = _wrong_answer(item, rng, others)
    if picked is None:
        return None
    wrong, source = picked
    text = chosen.strip()
    patterns = [p for p in map(_alias_pattern, item.reference_answers) if p is not None]
    value = _numeric_value(item.reference_answers)
    if value is not None:
        patterns += [re.compile(rf"(?<![\w,.]){v}(?![\w]|[,.]\d)") for v in {str(value), f"{value:,}"}]
    replaced = text
    for pattern in patterns:
        # An occurrence that echoes the instruction (same word before it, as in "All's well that
        # ends well" for "Complete: All's well that ends") is kept; if that leaves the reference in
        # place, the wrong answer is given standalone instead.
        echoes = {_word_before(item.instruction, m.start()) for m in pattern.finditer(item.instruction)} - {""}

        def sub(m: re.Match[str]) -> str:
            if _word_before(m.string, m.start()) in echoes:
                return m.group(0)
            return _match_case(m.group(0), wrong)

        replaced = pattern.sub(sub, replaced)
    if replaced != text and not matches_reference(replaced, item.reference_answers):
        return _end(replaced), f"incorrect_fact:replaced:{source}:{wrong}"
    standalone = _match_case(text or "X", wrong)
    standalone = standalone if standalone.endswith((".", "!", "?")) else f"{standalone}."
    if matches_reference(standalone, item.reference_answers):  # pragma: no cover - ok() rules it out
        return None
    return _end(standalone), f"incorrect_fact:standalone:{source}:{wrong}"


# --------------------------------------------------------------------------------------------
# off_topic


def off_topic(item: InstructionRecord, chosen: str, rng: random.Random, others: Others) -> Built:
    key = normalize(chosen)
    indices = list(range(len(others)))
    rng.shuffle(indices)
    candidates = []
    for i in indices[:OFF_TOPIC_CANDIDATES * 4]:
        other, response = others[i]
        if other.id == item.id or not response.strip() or normalize(response) == key:
            continue
        if item.template is not None and other.template == item.template:
            continue
        if topic_overlap(item.instruction, response) > OFF_TOPIC_MAX_OVERLAP:
            continue
        if item.reference_answers and matches_reference(response, item.reference_answers):
            continue
        candidates.append((other, response))
        if len(candidates) >= OFF_TOPIC_CANDIDATES:
            break
    if not candidates:
        return None
    different = [c for c in candidates if c[0].category != item.category]
    other, response = (different or candidates)[0]
    return _end(response.strip()), f"off_topic:from={other.id}"


# --------------------------------------------------------------------------------------------
# verbose_vague

# No number words, no yes/no, no topic words: nothing here can match a reference answer.
VAGUE_OPENERS: tuple[str, ...] = (
    "That is a really interesting question, and there is a lot that could be said about it.",
    "Well, this is something that people think about in many different ways.",
    "There are many factors to consider here, and it really depends on various aspects of the situation.",
    "It is hard to give a simple answer, because so much depends on the context.",
)
VAGUE_MIDDLES: tuple[str, ...] = (
    "Some people see it from a certain angle, while others prefer a different perspective entirely.",
    "It is important to keep in mind that every situation is unique in its own way.",
    "Various aspects come into play, and each of them matters to some extent.",
    "Depending on how you look at it, the answer could be quite different.",
    "Of course, there are exceptions, and things are not always as they seem.",
    "Many experts have discussed topics like this over the years, with varying conclusions.",
    "It is worth thinking carefully about all the different considerations involved.",
    "There are arguments on every side, and each of them has its own merits.",
)
VAGUE_CLOSERS: tuple[str, ...] = (
    "In the end, it really depends on what matters most to you.",
    "Ultimately, there is not a simple answer, and it is best to keep an open mind.",
    "So it is worth exploring further before coming to any firm conclusions.",
    "All things considered, it is a complex matter with many sides to it.",
)
VAGUE_MIDDLE_COUNT = 3


def verbose_vague(item: InstructionRecord, chosen: str, rng: random.Random, others: Others) -> Built:
    o = rng.randrange(len(VAGUE_OPENERS))
    ms = rng.sample(range(len(VAGUE_MIDDLES)), VAGUE_MIDDLE_COUNT)
    c = rng.randrange(len(VAGUE_CLOSERS))
    text = " ".join([VAGUE_OPENERS[o], *(VAGUE_MIDDLES[m] for m in ms), VAGUE_CLOSERS[c]])
    if item.reference_answers and matches_reference(text, item.reference_answers):
        return None
    return _end(text), f"verbose_vague:opener={o}:middles={','.join(map(str, ms))}:closer={c}"


# --------------------------------------------------------------------------------------------

NEGATIVE_BUILDERS: dict[str, Builder] = {
    "refusal": refusal,
    "format_violation": format_violation,
    "incorrect_fact": incorrect_fact,
    "off_topic": off_topic,
    "verbose_vague": verbose_vague,
}


def build_negative(
    kind: str, item: InstructionRecord, chosen: str, rng: random.Random, others: Others
) -> tuple[str, str] | None:
    """(rejected completion, how) of the given kind, or None where the kind does not apply or the
    result would equal the chosen completion."""
    if kind not in NEGATIVE_BUILDERS:
        raise KeyError(f"unknown negative kind {kind!r}; known: {', '.join(NEGATIVE_BUILDERS)}")
    built = NEGATIVE_BUILDERS[kind](item, chosen, rng, others)
    if built is None:
        return None
    completion, how = built
    if not completion.strip() or completion.strip() == completion_for(chosen.strip()).strip():
        return None
    return completion, how
