"""Exact and near-duplicate detection for instructions (de-duplication and the leakage check).

Similarity — one function for both uses:

* **Features.** ``formats.normalize`` the text, split into words, fold plurals with a light stemmer
  (``oceans`` -> ``ocean``, ``cities`` -> ``city``), drop the articles *a, an, the* (so "a quiet
  morning" and "quiet mornings" match), and take word **unigrams + bigrams**. Bigrams
  keep some word order; unigrams keep short instructions (4–8 words) from having almost no
  features, which is what makes word trigrams or 5-grams useless here.
* **Weights.** Each feature is weighted by its smoothed inverse document frequency over the
  collection being compared (``ln((1 + N) / (1 + df)) + 1``, distinct texts only). Template frames
  ("what is the capital of", "write one sentence about") occur in many instructions and weigh
  little; the words that fill the slots weigh a lot.
* **Similarity** is weighted Jaccard: ``W(A ∩ B) / W(A ∪ B)``; a pair with similarity >= threshold
  (default 0.7) is a near-duplicate.

Why not plain Jaccard: with unweighted unigrams+bigrams, two instructions from one template that
differ in one slot word score 0.69 at 6 words ("What is the capital of France?" / "... Spain?") and
over 0.7 from about 8 words on, so every long template would collapse into one item. The IDF
weights keep them apart (France/Spain scores about 0.6 even for a collection of just those two,
below 0.5 inside the built-in pool), while "Write one sentence about the ocean." and "... the
oceans." have identical features (similarity 1.0). The price: a similarity depends on the
collection the weights are fitted on, so ``deduplicate`` fits them on its input and
``near_duplicate_pairs`` on the union of its two inputs.

Speed: candidates come from an inverted index over a *prefix* of each indexed record's features
(rarest first), chosen so that a pair that shares none of them cannot reach the threshold
(prefix filtering, as in AllPairs). Frequent frame words are never looked up, so ~5,000
instructions take well under a second instead of 12.5 million comparisons.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..formats import normalize

DEFAULT_THRESHOLD = 0.7
_EPS = 1e-9


def _stem(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


_ARTICLES = frozenset({"a", "an", "the"})


def tokens(text: str) -> list[str]:
    """Normalised, plural-folded words without articles (unless the text is nothing else)."""
    words = [_stem(w) for w in normalize(text).split()]
    content = [w for w in words if w not in _ARTICLES]
    return content or words


def shingles(text: str) -> frozenset[str]:
    """Word unigrams and bigrams (a bigram is the two words joined by a space)."""
    words = tokens(text)
    return frozenset(words) | frozenset(f"{a} {b}" for a, b in zip(words, words[1:]))


def idf_weights(feature_sets: Iterable[frozenset[str]]) -> dict[str, float]:
    """Smoothed IDF of every feature over a collection of feature sets."""
    df: dict[str, int] = defaultdict(int)
    n = 0
    for features in feature_sets:
        n += 1
        for f in features:
            df[f] += 1
    return {f: math.log((1 + n) / (1 + d)) + 1.0 for f, d in df.items()}


def weighted_jaccard(a: frozenset[str], b: frozenset[str], weights: dict[str, float]) -> float:
    if not a and not b:
        return 1.0
    inter = math.fsum(weights[f] for f in a & b)  # fsum: exact, so the result is symmetric
    union = math.fsum(weights[f] for f in a | b)
    return inter / union if union > 0 else 0.0


def similarity(a: str, b: str, corpus: Iterable[str] | None = None) -> float:
    """Similarity of two texts, with weights fitted on ``corpus`` (default: just the two texts)."""
    texts = [a, b] if corpus is None else [*corpus, a, b]
    return weighted_jaccard(shingles(a), shingles(b), fit_weights(texts))


def fit_weights(texts: Iterable[str]) -> dict[str, float]:
    """IDF weights fitted on a collection of texts (each distinct normalised text counted once)."""
    distinct = {normalize(t): t for t in texts}
    return idf_weights(shingles(t) for t in distinct.values())


class _Index:
    """Inverted index over the prefix features of the records added so far."""

    def __init__(self, weights: dict[str, float], threshold: float):
        self.weights = weights
        self.threshold = threshold
        self.postings: dict[str, list[int]] = defaultdict(list)
        self.features: list[frozenset[str]] = []

    def prefix(self, features: frozenset[str]) -> list[str]:
        # Rarest first; the prefix is long enough that the features after it weigh less than
        # threshold * W(features): a pair sharing no prefix feature cannot reach the threshold.
        ordered = sorted(features, key=lambda f: (-self.weights[f], f))
        rest = sum(self.weights[f] for f in ordered)
        bound = self.threshold * rest - _EPS
        out = []
        for f in ordered:
            if rest < bound:
                break
            out.append(f)
            rest -= self.weights[f]
        return out

    def add(self, features: frozenset[str]) -> int:
        i = len(self.features)
        self.features.append(features)
        for f in self.prefix(features):
            self.postings[f].append(i)
        return i

    def matches(self, features: frozenset[str]) -> list[tuple[int, float]]:
        """Indexed items with similarity >= threshold, in insertion order."""
        candidates: set[int] = set()
        for f in features:
            candidates.update(self.postings.get(f, ()))
        out = []
        for i in sorted(candidates):
            sim = weighted_jaccard(features, self.features[i], self.weights)
            if sim >= self.threshold:
                out.append((i, sim))
        return out


class Duplicate(NamedTuple):
    record: Any
    reason: str  # "exact" | "near"
    duplicate_of: str  # id of the kept record it duplicates
    similarity: float


@dataclass
class DedupResult:
    kept: list[Any] = field(default_factory=list)
    dropped: list[Duplicate] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """Dropped records by reason, for the manifest."""
        out = {"exact": 0, "near": 0}
        for d in self.dropped:
            out[d.reason] += 1
        return out


def _instruction(record: Any) -> str:
    return record.instruction


def deduplicate(
    records: Sequence[Any],
    threshold: float = DEFAULT_THRESHOLD,
    text: Callable[[Any], str] = _instruction,
) -> DedupResult:
    """Drop exact (after ``formats.normalize``) and near duplicates; the first occurrence wins.

    Order is priority: a record is compared with the records kept before it, and dropped with
    the id of its most similar kept record. Records need an ``id``; ``text`` picks the string.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    texts = [text(r) for r in records]
    index = _Index(fit_weights(texts), threshold)
    result = DedupResult()
    by_norm: dict[str, str] = {}
    kept_ids: list[str] = []
    for rec, t in zip(records, texts):
        key = normalize(t)
        if key in by_norm:
            result.dropped.append(Duplicate(rec, "exact", by_norm[key], 1.0))
            continue
        features = shingles(t)
        hits = index.matches(features)
        if hits:
            i, sim = max(hits, key=lambda h: (h[1], -h[0]))
            result.dropped.append(Duplicate(rec, "near", kept_ids[i], sim))
            continue
        by_norm[key] = rec.id
        index.add(features)
        kept_ids.append(rec.id)
        result.kept.append(rec)
    return result


def near_duplicate_pairs(
    a_records: Sequence[Any],
    b_records: Sequence[Any],
    threshold: float = DEFAULT_THRESHOLD,
    text: Callable[[Any], str] = _instruction,
) -> list[tuple[str, str, float]]:
    """Every (a.id, b.id, similarity) with similarity >= threshold (exact duplicates give 1.0).

    Weights are fitted on a and b together. Pairs come in a's order, then b's.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    a_texts = [text(r) for r in a_records]
    b_texts = [text(r) for r in b_records]
    index = _Index(fit_weights([*a_texts, *b_texts]), threshold)
    b_by_norm: dict[str, list[int]] = defaultdict(list)
    for j, t in enumerate(b_texts):
        index.add(shingles(t))
        b_by_norm[normalize(t)].append(j)
    pairs = []
    for rec, t in zip(a_records, a_texts):
        found = dict(index.matches(shingles(t)))
        for j in b_by_norm.get(normalize(t), ()):
            found[j] = 1.0
        for j in sorted(found):
            pairs.append((rec.id, b_records[j].id, found[j]))
    return pairs
