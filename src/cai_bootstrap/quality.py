"""Primitive text predicates shared by data quality control and the evaluation criteria.

Each predicate is a small deterministic function of plain strings, so that filtering the base
model's SFT responses and scoring a model's test responses judge text the same way. They are
lexical heuristics: cheap, reproducible and auditable, not semantic judges. Every threshold is a
module constant with the reason for its value.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from .formats import RUNAWAY_MARKERS, TEMPLATE_MARKERS, normalize, words

# --------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------

# copies_instruction: a response that holds this share of the instruction's distinct words and adds
# no content word of its own is the instruction echoed back (dropping a word or two still counts).
COPY_MIN_COVERAGE = 0.8
# is_coherent: above this repetition_ratio the text loops; a sentence said twice (about 0.33 on a
# short text) is tolerated, three times is not.
MAX_REPETITION_RATIO = 0.5
# is_coherent: share of non-space characters that may be soup symbols (#@%&~^|\<>`$ and anything
# outside letters, digits and ordinary punctuation); JSON, markdown and arithmetic stay below it.
# Judged only from SYMBOL_MIN_COUNT such symbols on, so that "1 < 2" is not soup.
MAX_SYMBOL_FRACTION = 0.3
SYMBOL_MIN_COUNT = 5
# is_coherent: a run of one non-space character this long ("aaaa...", "!!!!...") is degenerate;
# markdown rules and ellipses are shorter.
MAX_CHAR_RUN = 20
# is_coherent: share of Latin-letter words that do not look like words (no vowel at 4+ letters and
# not an acronym, or longer than GIBBERISH_WORD_LENGTH); above it the text is keyboard mashing.
MAX_GIBBERISH_FRACTION = 0.3
GIBBERISH_WORD_LENGTH = 30  # longer than any common English word ("antidisestablishmentarianism" is 28)
# repetition_ratio: texts with fewer words than this are measured on words, longer ones on trigrams.
TRIGRAM_MIN_WORDS = 6

# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------

_CANT_SHORT = r"(?:cannot|can't|can ?not|won't|am unable|'m unable|am not able|'m not able)"
_CANT = (
    r"(?:cannot|can't|can ?not|won't|will not|am unable to|'m unable to|am not able to|"
    r"'m not able to|am not allowed to|'m not allowed to|must decline to|refuse to|"
    r"do not feel comfortable|don't feel comfortable)"
)
_HELP_VERBS = (
    r"(?:help|assist|provide|answer|respond|comply|fulfil|fulfill|do that|do this|create|generate|"
    r"write|complete|share|give|engage|support|discuss|participate|offer|produce)"
)
# Anywhere in the text: self-descriptions as an AI and explicit declines.
_REFUSAL_ANYWHERE = re.compile(
    "|".join(
        [
            r"\bas an? (?:ai|artificial intelligence)\b",
            r"\bas an? (?:ai |large |helpful )?(?:language model|chatbot)\b",
            r"\bi(?:'m| am) (?:just |only )?an? (?:ai|language model|chatbot|computer program)\b",
            rf"\bi {_CANT}\s+{_HELP_VERBS}\b",
            r"\bi (?:must|have to|need to) (?:respectfully |politely )?(?:decline|refuse)\b",
            r"\b(?:i'm|i am|we're|we are) (?:so |very |really )?sorry,? but\b",
            r"\bi apologi[sz]e,? but\b",
            rf"\bsorry,? (?:but )?i {_CANT_SHORT}\b",
            r"\b(?:cannot|can't|unable to) (?:help|assist) (?:you )?with (?:that|this|your request)\b",
            r"\bi(?:'m| am) not (?:able|allowed|permitted|comfortable) to\b",
            r"\bagainst my (?:programming|guidelines|policy|policies)\b",
        ]
    )
)
# At the very start: an apology (other than sympathy) or a bare "I cannot." / "I can't."
_REFUSAL_OPENING = re.compile(
    r"^[\W_]*(?:"
    r"(?:i'm |i am )?(?:so |very |really |terribly )?sorry\b(?! to hear| for your loss| about your| that you)"
    r"|i apologi[sz]e\b"
    rf"|unfortunately,? i {_CANT_SHORT}\b"
    r"|i (?:cannot|can't|can ?not|won't|will not)\s*[.!]*\s*$"
    r")"
)


def _fold_refusal(text: str) -> str:
    return " ".join(text.replace("’", "'").replace("‘", "'").lower().split())


def is_refusal(text: str) -> bool:
    """Whether text declines the task: "I'm sorry, but...", "As an AI...", "I can't help with that".

    Every instruction in the pool and the test set is benign, so any refusal is unwarranted.
    Sympathy ("I'm sorry to hear that") and ordinary uses ("I cannot believe it") are not refusals:
    "cannot" counts only before a verb of helping, or as the whole answer.
    """
    t = _fold_refusal(text)
    return bool(_REFUSAL_ANYWHERE.search(t) or _REFUSAL_OPENING.search(t))


# --------------------------------------------------------------------------------------------
# Words, stemming, topic
# --------------------------------------------------------------------------------------------

STOPWORDS: frozenset[str] = frozenset(
    """
    a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing done down during each either else even
    ever every few for from further get gets got had has have having he her here hers herself him
    himself his how however i if in into is it its itself just let lets like may me might mine more
    most much must my myself neither no nor not now of off on once only or other ought our ours
    ourselves out over own per quite rather really same shall she should so some such than that the
    their theirs them themselves then there these they this those though through thus to too under
    until up upon us very via was we well were what whatever when where whether which while who whom
    whose why will with within without would yet you your yours yourself yourselves
    im ive id ill youre youve youd youll hes shes its were weve theyre theyve isnt arent wasnt
    werent dont doesnt didnt cant cannot couldnt wont wouldnt shouldnt hasnt havent hadnt thats
    theres whats lets oh ok okay yes yeah sure um uh
    """.split()
)

# Words that say what to do rather than what about: ignored on the instruction side of topic
# overlap ("Write three sentences about volcanoes" is about volcanoes).
_INSTRUCTION_WORDS = """
    answer answers ask begin brief briefly bullet bullets comma commas complete
    concise create describe detail details end ending example examples exactly explain fewer
    following format generate give include including json keyword least list lowercase make
    mention name one two three four five six seven eight nine ten paragraph paragraphs phrase please
    point points provide question respond response rewrite say sentence sentences short simple
    simply start starting state summarize summarise tell text translate uppercase use using word
    words write
"""


def stem(word: str) -> str:
    """A light, deterministic suffix stripper: plural -s/-es/-ies, -ing, -ed, final -e.

    It only needs to map the forms of one word to the same key ("planets"/"planet",
    "chased"/"chase", "running"/"run", "flies"/"fly"), not to produce real words.
    """
    w = word.lower()
    if w.isdigit() or len(w) <= 3:
        return w
    if w.endswith("ies") and len(w) > 4:
        w = w[:-3] + "y"
    elif w.endswith(("sses", "xes", "zes", "ches", "shes")):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith(("ss", "us", "is")):
        w = w[:-1]
    for suffix in ("ing", "ed"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            w = w[: -len(suffix)]
            if len(w) >= 3 and w[-1] == w[-2] and w[-1] not in "lsz":
                w = w[:-1]
            break
    if w.endswith("e") and len(w) > 3:
        w = w[:-1]
    return w


_INSTRUCTION_STEMS = frozenset(stem(w) for w in _INSTRUCTION_WORDS.split())


def folded_words(text: str) -> list[str]:
    """Lower-case word tokens with apostrophes dropped inside words ("don't" -> "dont")."""
    return words(re.sub(r"(?<=\w)['’](?=\w)", "", text))


def content_words(text: str) -> set[str]:
    """Stemmed words of text without stopwords and without single letters (digits are kept)."""
    out = set()
    for tok in folded_words(text):
        if tok in STOPWORDS or (len(tok) < 2 and not tok.isdigit()):
            continue
        out.add(stem(tok))
    return out


def topic_words(instruction: str) -> set[str]:
    """The instruction's content words minus words that only say what to do ("write", "list")."""
    return content_words(instruction) - _INSTRUCTION_STEMS


def topic_overlap(instruction: str, response: str) -> float:
    """Share of the instruction's topic words that the response uses, in [0, 1].

    0.0 when the instruction has no topic words (callers that need to tell "nothing to compare"
    apart check ``topic_words`` first).
    """
    topic = topic_words(instruction)
    if not topic:
        return 0.0
    return len(topic & content_words(response)) / len(topic)


# --------------------------------------------------------------------------------------------
# Copies, template residue, runaways
# --------------------------------------------------------------------------------------------


def copies_instruction(instruction: str, response: str) -> bool:
    """Whether the response is the instruction repeated, or nearly so, adding nothing.

    True when the normalised texts are equal, or when the response covers at least
    COPY_MIN_COVERAGE of the instruction's distinct words and has no content word that the
    instruction lacks. An echo followed by an answer ("What is the capital of France? Paris.")
    adds a word and is not a copy; a transformation that reuses the instruction's text
    ("Rewrite in lower case: THE CAT" -> "the cat") covers too little of it to be one.
    """
    resp = folded_words(response)
    instr = folded_words(instruction)
    if not resp or not instr:
        return False
    if resp == instr:
        return True
    coverage = len(set(resp) & set(instr)) / len(set(instr))
    return coverage >= COPY_MIN_COVERAGE and not (content_words(response) - content_words(instruction))


# Special tokens of common chat templates, beyond formats.TEMPLATE_MARKERS.
CHAT_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|begin_of_text|>",
    "[INST]",
    "[/INST]",
    "<s>",
    "</s>",
)
# Role labels at the start of a line ("### Instruction:", "Response:") and a bare END line.
_TEMPLATE_LINE = re.compile(r"^[ \t]*(?:#+[ \t]*)?(?:instruction|response)[ \t]*:", re.I | re.M)
_END_LINE = re.compile(r"^[ \t]*END[ \t]*$", re.M)


def has_template_residue(text: str) -> bool:
    """Whether text still holds prompt-format pieces: "Instruction:", "Response:", chat special
    tokens, a "### Instruction" style header, or a line that is just END."""
    if any(m in text for m in TEMPLATE_MARKERS) or any(t in text for t in CHAT_SPECIAL_TOKENS):
        return True
    return bool(_TEMPLATE_LINE.search(text) or _END_LINE.search(text))


def is_runaway(stop_string: str | None) -> bool:
    """Whether generation stopped because the model began a new instruction or turn."""
    return stop_string in RUNAWAY_MARKERS


# --------------------------------------------------------------------------------------------
# Coherence
# --------------------------------------------------------------------------------------------

_COMMON_PUNCT = set(".,;:!?'\"()[]{}-–—/&%$#@+=*_<>`~|^\\’‘“”…•")
_SYMBOL_SOUP = set("#@%&~^|\\<>`$")
_LATIN_WORD = re.compile(r"[A-Za-z]+")


def repetition_ratio(text: str) -> float:
    """Share of repeated units, in [0, 1]: 0 for no repetition, near 1 for a loop.

    Units are word trigrams when the text has at least TRIGRAM_MIN_WORDS words, else words:
    1 - distinct / total.
    """
    toks = folded_words(text)
    if len(toks) >= TRIGRAM_MIN_WORDS:
        units: list[object] = list(zip(toks, toks[1:], toks[2:]))
    else:
        units = list(toks)
    if not units:
        return 0.0
    return 1.0 - len(set(units)) / len(units)


def _longest_char_run(text: str) -> int:
    best, run, prev = 0, 0, None
    for c in text:
        if c.isspace():
            run, prev = 0, None
            continue
        run = run + 1 if c == prev else 1
        prev = c
        best = max(best, run)
    return best


def _is_gibberish_word(word: str) -> bool:
    if len(word) > GIBBERISH_WORD_LENGTH:
        return True
    if word.isupper():  # acronyms: HTML, NASA
        return False
    return len(word) >= 4 and not re.search(r"[aeiouyAEIOUY]", word)


def is_coherent(text: str) -> bool:
    """Whether text reads as language rather than degenerate output.

    Fails when it has no letter or digit, repeats itself (repetition_ratio > MAX_REPETITION_RATIO),
    has a run of MAX_CHAR_RUN identical characters, is symbol soup (see MAX_SYMBOL_FRACTION), or is
    mostly non-words (> MAX_GIBBERISH_FRACTION of its Latin words).
    """
    chars = [c for c in text if not c.isspace()]
    if not any(c.isalnum() for c in chars):
        return False
    if repetition_ratio(text) > MAX_REPETITION_RATIO:
        return False
    if _longest_char_run(text) >= MAX_CHAR_RUN:
        return False
    soup = sum(1 for c in chars if c in _SYMBOL_SOUP or not (c.isalnum() or c in _COMMON_PUNCT))
    if soup >= SYMBOL_MIN_COUNT and soup / len(chars) > MAX_SYMBOL_FRACTION:
        return False
    latin = _LATIN_WORD.findall(text)
    if latin and sum(map(_is_gibberish_word, latin)) / len(latin) > MAX_GIBBERISH_FRACTION:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Reference answers
# --------------------------------------------------------------------------------------------

_UNITS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen".split()
    )
}
_TENS = {
    w: 10 * i
    for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split())
    if i >= 2
}
_SCALES = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
_ARTICLES = frozenset({"a", "an", "the"})


def number_words_to_digits(tokens: list[str]) -> list[str]:
    """Replace each well-formed run of English number words by its value.

    "twenty one" -> "21", "one hundred and five" -> "105", "two thousand" -> "2000"; a run ends
    where the next word cannot continue it, so "one two" stays two numbers ("1 2").
    """
    out: list[str] = []
    i = 0
    while i < len(tokens):
        total, current, last, j = 0, 0, None, i
        while j < len(tokens):
            t = tokens[j]
            if t in _UNITS and (
                last in (None, "hundred", "scale") or (last == "tens" and 0 < _UNITS[t] < 10)
            ):
                current += _UNITS[t]
                last = "unit"
            elif t in _TENS and last in (None, "hundred", "scale"):
                current += _TENS[t]
                last = "tens"
            elif t == "hundred" and last in (None, "unit", "tens") and current < 100:
                current = max(current, 1) * 100
                last = "hundred"
            elif t in _SCALES and t != "hundred" and last in (None, "unit", "tens", "hundred"):
                total += max(current, 1) * _SCALES[t]
                current, last = 0, "scale"
            elif (
                t == "and"
                and last in ("hundred", "scale")
                and j + 1 < len(tokens)
                and (tokens[j + 1] in _UNITS or tokens[j + 1] in _TENS)
            ):
                pass  # "one hundred and five"
            else:
                break
            j += 1
        if j == i:
            out.append(tokens[i])
            i += 1
        else:
            out.append(str(total + current))
            i = j
    return out


def normalize_answer(text: str) -> str:
    """Key for comparing short answers: accents, case, punctuation, possessive 's and articles
    dropped, number words as digits, thousands separators removed ("1,000" -> "1000",
    "Twelve" -> "12")."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    text = re.sub(r"(?<=\w)['’]s\b", "", text)  # possessive: "Shakespeare's" -> "Shakespeare"
    text = re.sub(r"(?<=\w)['’](?=\w)", "", text)
    toks = [t for t in normalize(text.replace("-", " ")).split() if t not in _ARTICLES]
    return " ".join(number_words_to_digits(toks))


def matches_reference(response: str, references: Iterable[str]) -> bool:
    """Whether a reference answer appears in the response as a whole-word span (after
    normalize_answer on both), or equals it. References that normalise to nothing are ignored.

    A lexical match: "It is not Paris" matches "Paris". Fine for short factual answers.
    """
    resp = normalize_answer(response)
    if not resp:
        return False
    padded = f" {resp} "
    for ref in references:
        key = normalize_answer(ref)
        if key and (key == resp or f" {key} " in padded):
            return True
    return False
