"""Reading the answer out of a response to a short factual question.

``factually_correct`` asks whether the response's *answer* is a reference answer, not whether a
reference string occurs somewhere in it: "It could be 15, 16, 17 or 18" does not answer 17,
"Not Europe, it is in Asia" does not answer Europe, "Yes. Actually no." does not answer yes.
A correct answer inside a full sentence ("The capital of France is Paris.") still counts.

Texts are folded like ``quality.normalize_answer`` (accents, case, possessives, articles, number
words as digits, "1,000" as 1000) but keep sentence and clause punctuation, and numbers compare as
numbers ("15.0" is 15). Three kinds of reference, by what the references are:

- **polar** (yes / no): the polarities the response states (a sentence that opens with yes or
  no) must be exactly the reference's; both is a contradiction.
- **numeric**: the candidate answers are the response's numbers that the instruction does not
  already hold (when it holds them all, the last one mentioned), minus negated ones. A reference
  value must be among them, and the candidates must not be a hedge: two or more different values
  listed next to each other ("16 or 17", "between 16 and 18"), offered with a hedging word
  ("maybe"), or one corrected by another ("15. Actually, 16.").
- **text**: some mention of a reference that is neither negated ("not Europe") nor one item of a
  disjunction ("Paris, Lyon or Nice"), and not retracted by a later correction ("Europe.
  Actually, Asia.").

Lexical rules, like every criterion here: they catch the common ways an answer hedges or takes
itself back, not every paraphrase.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Literal

from ..quality import number_words_to_digits

# A negator this many tokens before a mention (in the same clause) negates it: "not in Europe".
NEGATION_WINDOW = 3
NEGATORS = frozenset("not no never neither nor isnt arent wasnt werent doesnt dont didnt cannot cant wont".split())
# Open a clause that takes back what came before: "Europe. Actually, Asia."
CORRECTIONS = frozenset("actually wait sorry correction rather".split())
# Words that offer a numeric answer as one guess among others.
HEDGES = frozenset("maybe perhaps possibly probably might could".split())
# What may stand between two numbers listed as alternatives: "15, 16, 17 or 18", "16 to 18".
LIST_JOINERS = frozenset({",", "or", "and", "to", "through"})
# Skipped at the start of a sentence before a polarity word: "Well, I think yes."
LEAD_INS = frozenset("well oh so hmm um ok okay i think guess would say mean".split())
# A sentence this short that opens with yes/no states a polarity even without a comma: "Yes it is."
POLAR_SHORT_SENTENCE = 4
_POLAR = {"yes": "yes", "yeah": "yes", "yep": "yes", "no": "no", "nope": "no"}
_SENTENCE_END = frozenset(".!?;")
_ARTICLES = frozenset({"a", "an", "the"})
_TOKEN = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|[^\W\d_]+|[.!?;,]")

Kind = Literal["polar", "numeric", "text"]


def _fold(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"(?<=\w)['’]s\b", "", text)  # possessive: "Shakespeare's" -> "shakespeare"
    text = re.sub(r"(?<=\w)['’](?=\w)", "", text)  # "isn't" -> "isnt"
    return text.replace("-", " ")


def _number(token: str) -> float | None:
    try:
        return float(token.replace(",", ""))
    except ValueError:
        return None


def _canonical(token: str) -> str:
    value = _number(token) if token[0].isdigit() else None
    if value is None:
        return token
    return str(int(value)) if value.is_integer() else repr(value)


def tokens(text: str) -> list[str]:
    """Folded tokens: words, numbers (canonical, number words as digits) and the punctuation
    . ! ? ; , that bounds sentences and clauses; articles dropped."""
    raw = [t for t in _TOKEN.findall(_fold(text)) if t not in _ARTICLES]
    return [_canonical(t) for t in number_words_to_digits(raw)]


def _sentences(toks: Sequence[str]) -> list[list[str]]:
    out, current = [], []
    for t in toks:
        if t in _SENTENCE_END:
            if current:
                out.append(current)
            current = []
        else:
            current.append(t)
    if current:
        out.append(current)
    return out


def _words(toks: Sequence[str]) -> list[str]:
    return [t for t in toks if t not in _SENTENCE_END and t != ","]


def reference_kind(references: Sequence[str]) -> Kind:
    keys = [_words(tokens(r)) for r in references]
    keys = [k for k in keys if k]
    if keys and all(len(k) == 1 and k[0] in _POLAR for k in keys):
        return "polar"
    if keys and all(len(k) == 1 and _number(k[0]) is not None for k in keys):
        return "numeric"
    return "text"


# --------------------------------------------------------------------------------------------
# Mentions in a sentence: negated, listed as alternatives, retracted
# --------------------------------------------------------------------------------------------


def _negated(sentence: Sequence[str], start: int) -> bool:
    """A negator within NEGATION_WINDOW tokens before ``start``, without a comma between."""
    for k in range(start - 1, max(-1, start - 1 - NEGATION_WINDOW), -1):
        if sentence[k] == ",":
            return False
        if sentence[k] in NEGATORS:
            return True
    return False


def _in_disjunction(sentence: Sequence[str], start: int, end: int) -> bool:
    """The mention is one item of an "x, y or z" list: the sentence has "or" and the mention
    touches it or a list comma."""
    if "or" not in sentence:
        return False
    before = sentence[start - 1] if start > 0 else None
    after = sentence[end] if end < len(sentence) else None
    return before in (",", "or") or after in (",", "or")


def _corrections(sentences: Sequence[Sequence[str]]) -> list[tuple[int, int]]:
    """(sentence, position) of each clause that opens with a correction word and goes on
    ("Actually, Asia", "no, wait, Asia"); a bare "Paris, actually." corrects nothing."""
    found = []
    for s, sentence in enumerate(sentences):
        for i, t in enumerate(sentence):
            opens_clause = i == 0 or sentence[i - 1] == ","
            rest = _words(sentence[i + 1:])
            if opens_clause and rest and (t in CORRECTIONS or (t == "no" and rest[0] in CORRECTIONS)):
                found.append((s, i))
    return found


def _spans(sentence: Sequence[str], key: Sequence[str]) -> list[tuple[int, int]]:
    """Where ``key`` occurs in the sentence as a run of tokens (commas inside the sentence may
    fall between the key's words: "Washington, DC")."""
    words = [(i, t) for i, t in enumerate(sentence) if t != ","]
    out = []
    for j in range(len(words) - len(key) + 1):
        if [t for _, t in words[j:j + len(key)]] == list(key):
            out.append((words[j][0], words[j + len(key) - 1][0] + 1))
    return out


# --------------------------------------------------------------------------------------------
# The three kinds
# --------------------------------------------------------------------------------------------


def stated_polarities(response: str) -> set[str]:
    """The yes/no answers a response gives: per sentence, a yes/no that opens it (after lead-ins
    such as "well", "I think") and is followed by a comma or ends a short sentence; if no
    sentence opens so, every yes/no that closes a clause ("The answer is yes."), never one that
    goes on ("no doubt")."""
    sentences = _sentences(tokens(response))
    found = set()
    for sentence in sentences:
        k = 0
        while k < len(sentence) and (sentence[k] in LEAD_INS | CORRECTIONS or sentence[k] == ","):
            k += 1
        if k < len(sentence) and sentence[k] in _POLAR:
            after = sentence[k + 1] if k + 1 < len(sentence) else None
            if after in (None, ",") or len(_words(sentence)) <= POLAR_SHORT_SENTENCE:
                found.add(_POLAR[sentence[k]])
    if found:
        return found
    return {_POLAR[t] for s in sentences for i, t in enumerate(s)
            if t in _POLAR and (i + 1 == len(s) or s[i + 1] == ",")}


def _polar_correct(response: str, references: Sequence[str]) -> bool:
    wanted = {_POLAR[_words(tokens(r))[0]] for r in references if _words(tokens(r))}
    stated = stated_polarities(response)
    return len(stated) == 1 and stated <= wanted


def numeric_candidates(response: str, instruction: str) -> list[float]:
    """The numbers the response offers as its answer, in order: numbers the instruction does not
    hold (when every number is the instruction's own, the last one), negated ones left out."""
    sentences = _sentences(tokens(response))
    given = {_number(t) for t in _words(tokens(instruction)) if _number(t) is not None}
    mentions = []  # (value, negated)
    for sentence in sentences:
        for i, t in enumerate(sentence):
            value = _number(t)
            if value is not None:
                mentions.append((value, _negated(sentence, i)))
    new = [v for v, neg in mentions if not neg and v not in given]
    if new:
        return new
    echoed = [v for v, neg in mentions if not neg]
    return echoed[-1:]


def _numbers_listed_together(sentences: Sequence[Sequence[str]], values: set[float]) -> bool:
    """Two different candidate values with only list joiners between them: "15, 16 or 17"."""
    for sentence in sentences:
        last: float | None = None
        for t in sentence:
            value = _number(t)
            if value is not None:
                if value in values and last is not None and last != value:
                    return True
                last = value if value in values else None
            elif t not in LIST_JOINERS and t != "between":
                last = None
    return False


def _numeric_correct(response: str, references: Sequence[str], instruction: str) -> bool:
    wanted = {_number(_words(tokens(r))[0]) for r in references if _words(tokens(r))}
    candidates = numeric_candidates(response, instruction)
    if not set(candidates) & wanted:
        return False
    distinct = set(candidates)
    if len(distinct) < 2:
        return True
    sentences = _sentences(tokens(response))
    words = {t for s in sentences for t in s}
    hedged = (_numbers_listed_together(sentences, distinct) or bool(words & HEDGES)
              or bool(_corrections(sentences)))
    return not hedged


def _text_correct(response: str, references: Sequence[str]) -> bool:
    sentences = _sentences(tokens(response))
    keys = [k for k in (_words(tokens(r)) for r in references) if k]
    clean = []  # (sentence, position) of each mention that is neither negated nor listed
    for s, sentence in enumerate(sentences):
        for key in keys:
            for start, end in _spans(sentence, key):
                if not _negated(sentence, start) and not _in_disjunction(sentence, start, end):
                    clean.append((s, start))
    if not clean:
        return False
    last = max(clean)
    return not any(c > last for c in _corrections(sentences))


def is_correct(response: str, references: Sequence[str], instruction: str = "") -> bool:
    """Whether the response answers with one of the references (see the module docstring)."""
    references = [r for r in references if _words(tokens(r))]
    if not references or not _words(tokens(response)):
        return False
    kind = reference_kind(references)
    if kind == "polar":
        return _polar_correct(response, references)
    if kind == "numeric":
        return _numeric_correct(response, references, instruction)
    return _text_correct(response, references)
