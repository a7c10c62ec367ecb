"""Train/test split of the instruction pool, stratified by category, and the leakage check.

The ``instructions`` step does, in this order::

    train, test = split(pool, test_size, seed)
    train, purged = purge_leaks(train, test, threshold)   # count len(purged) in the manifest
    check_leakage(train, test, threshold)                  # must pass; raises LeakageError if not

Templates produce similar instructions, so some training items can be near-duplicates of test
items; rather than fail, the step drops those *training* items (the test set is never changed,
so it stays a stratified sample) and records how many it dropped. ``check_leakage`` is then the
guard: it fails loudly, listing ids and similarities, for anything that still leaks — e.g. a
user-supplied test file that contains training instructions.

Similarity is ``dedup``'s (IDF-weighted Jaccard of word unigrams + bigrams; exact duplicates
after ``formats.normalize`` always count).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, NamedTuple

from ..errors import UserError
from .dedup import DEFAULT_THRESHOLD, near_duplicate_pairs


class Leak(NamedTuple):
    train_id: str
    test_id: str
    similarity: float


class Purged(NamedTuple):
    record: Any  # the training record dropped
    test_id: str  # the test item it was too similar to
    similarity: float


class LeakageError(UserError, ValueError):
    """Test items that are (near-)duplicates of training items; ``pairs`` lists every one."""

    def __init__(self, pairs: list[Leak], threshold: float):
        self.pairs = pairs
        self.threshold = threshold
        shown = "\n".join(
            f"  test {p.test_id} ~ train {p.train_id}: similarity {p.similarity:.3f}" for p in pairs[:20]
        )
        more = f"\n  ... and {len(pairs) - 20} more" if len(pairs) > 20 else ""
        n_test = len({p.test_id for p in pairs})
        super().__init__(
            f"{n_test} test item(s) leak from the training set ({len(pairs)} pair(s) with "
            f"similarity >= {threshold}):\n{shown}{more}"
        )


def _n_test(test_size: int | float, n: int) -> int:
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)):
        raise TypeError(f"test_size must be an int or a float, got {test_size!r}")
    if isinstance(test_size, float):
        if not 0.0 < test_size < 1.0:
            raise ValueError(f"a fractional test_size must be in (0, 1), got {test_size}")
        k = round(test_size * n)
    else:
        k = test_size
    if not 1 <= k < n:
        raise ValueError(f"test_size {test_size!r} gives {k} test items out of {n}; need 1 <= k < {n}")
    return k


def allocate(counts: dict[str, int], n_test: int) -> dict[str, int]:
    """Test items per category: proportional (largest remainder), then at least one for every
    category with >= 2 items where ``n_test`` allows it, and at least one item left for training
    in such categories. Deterministic (ties go to the larger category, then by name)."""
    total = sum(counts.values())
    cats = sorted(counts)
    cap = {c: counts[c] - 1 if counts[c] >= 2 else counts[c] for c in cats}
    quota = {c: n_test * counts[c] / total for c in cats}
    alloc = {c: min(math.floor(quota[c]), cap[c]) for c in cats}
    by_remainder = sorted(cats, key=lambda c: (-(quota[c] - math.floor(quota[c])), -counts[c], c))
    while sum(alloc.values()) < n_test:
        progressed = False
        for c in by_remainder:
            if sum(alloc.values()) < n_test and alloc[c] < cap[c]:
                alloc[c] += 1
                progressed = True
        if not progressed:
            break
    for c in sorted(cats, key=lambda c: (-counts[c], c)):
        if counts[c] >= 2 and alloc[c] == 0:
            donors = [d for d in cats if alloc[d] > 1]
            if not donors:
                break
            donor = max(donors, key=lambda d: (alloc[d] - quota[d], counts[d], d))
            alloc[donor] -= 1
            alloc[c] = 1
    return alloc


def split(records: Sequence[Any], test_size: int | float, seed: int) -> tuple[list[Any], list[Any]]:
    """Seeded split stratified by ``category``; both parts keep the input order.

    ``test_size``: a count (int) or a fraction of all records (float in (0, 1)). Each category's
    share of the test set follows its share of the input (see ``allocate``). The same records and
    seed always give the same split; the pick inside a category depends only on the seed, the
    category and that category's records.
    """
    n_test = _n_test(test_size, len(records))
    by_cat: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        by_cat.setdefault(rec.category, []).append(i)
    alloc = allocate({c: len(v) for c, v in by_cat.items()}, n_test)
    test_idx: set[int] = set()
    for c, idx in by_cat.items():
        rng = random.Random(f"{seed}:{c}")
        test_idx.update(rng.sample(idx, alloc[c]))
    train = [r for i, r in enumerate(records) if i not in test_idx]
    test = [r for i, r in enumerate(records) if i in test_idx]
    return train, test


def find_leaks(train: Sequence[Any], test: Sequence[Any], threshold: float = DEFAULT_THRESHOLD) -> list[Leak]:
    """Every (train, test) pair at or above the threshold, exact duplicates included."""
    return [Leak(a, b, s) for a, b, s in near_duplicate_pairs(train, test, threshold)]


def check_leakage(train: Sequence[Any], test: Sequence[Any], threshold: float = DEFAULT_THRESHOLD) -> None:
    """Raise LeakageError if any test item is a (near-)duplicate of a training item."""
    leaks = find_leaks(train, test, threshold)
    if leaks:
        raise LeakageError(leaks, threshold)


def purge_leaks(
    train: Sequence[Any], test: Sequence[Any], threshold: float = DEFAULT_THRESHOLD
) -> tuple[list[Any], list[Purged]]:
    """Drop training items that are (near-)duplicates of a test item; the test set is untouched.

    Repeats until ``check_leakage(train_kept, test, threshold)`` passes: the similarity weights
    are fitted on train + test, so removing items can shift other pairs a little.
    Returns the kept training records (in order) and, per dropped record, the closest test item.
    """
    kept = list(train)
    purged: list[Purged] = []
    while True:
        best: dict[str, tuple[str, float]] = {}
        for leak in find_leaks(kept, test, threshold):
            if leak.train_id not in best or leak.similarity > best[leak.train_id][1]:
                best[leak.train_id] = (leak.test_id, leak.similarity)
        if not best:
            return kept, purged
        purged.extend(Purged(r, *best[r.id]) for r in kept if r.id in best)
        kept = [r for r in kept if r.id not in best]
