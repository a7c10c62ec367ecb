"""Train/test split of the instruction pool, stratified by category, and the leakage checks.

Two ways to split (``instructions.split_by``):

- ``template`` (the default): :func:`split_by_template` holds out whole built-in templates, so
  the test set asks new *kinds* of instruction, not new fillers of trained ones; no template has
  items on both sides (:func:`check_template_leakage` is the guard).
- ``item``: :func:`split` draws items one by one, so fillers of one template land on both sides
  (an in-distribution test).

The ``instructions`` step does, in this order::

    train, test, surplus = split_by_template(pool, test_size, seed)   # or split(pool, ...)
    train, purged = purge_leaks(train, test, threshold)   # count len(purged) in the manifest
    check_leakage(train, test, threshold)                  # must pass; raises LeakageError if not
    check_template_leakage(train, test)                    # template split: must pass too

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


class Held(NamedTuple):
    """A template-disjoint split: ``surplus`` holds the items of held-out templates that were not
    drawn for the test set (neither trained on nor tested, so that no template is on both sides)."""

    train: list[Any]
    test: list[Any]
    surplus: list[Any]


def unit(record: Any) -> str:
    """What a template-disjoint split keeps together: the record's template, or the record itself
    when it has none (user items, self-instruct)."""
    return record.template or f"item:{record.id}"


def split_by_template(records: Sequence[Any], test_size: int | float, seed: int) -> Held:
    """Seeded split that holds out whole templates, stratified by ``category``.

    Each category's number of test items follows its share of the input (``allocate``). Within a
    category the templates are shuffled by (seed, category); the first ones go to the test side —
    as many as the category's share of its templates, at least two where three or more exist (so
    that a category is not tested on a single template), and more while they hold too few items —
    always leaving one template for training. The test items are drawn from the held-out
    templates' items; the rest of those items is the surplus. A category with a single template
    gets no test items (its items stay in training). Every part keeps the input order.
    """
    n_test = _n_test(test_size, len(records))
    by_cat: dict[str, dict[str, list[int]]] = {}
    for i, rec in enumerate(records):
        by_cat.setdefault(rec.category, {}).setdefault(unit(rec), []).append(i)
    alloc = allocate({c: sum(len(v) for v in units.values()) for c, units in by_cat.items()}, n_test)
    test_idx: set[int] = set()
    held_idx: set[int] = set()
    for c, units in by_cat.items():
        if alloc[c] == 0 or len(units) < 2:
            continue
        rng = random.Random(f"{seed}:{c}:templates")
        order = sorted(units)
        rng.shuffle(order)
        n_items = sum(len(v) for v in units.values())
        k = max(1, round(len(units) * alloc[c] / n_items), min(2, len(units) - 1) if len(units) >= 3 else 1)
        k = min(k, len(units) - 1)
        while k < len(units) - 1 and sum(len(units[u]) for u in order[:k]) < alloc[c]:
            k += 1
        held = sorted(i for u in order[:k] for i in units[u])
        held_idx.update(held)
        test_idx.update(rng.sample(held, min(alloc[c], len(held))))
    train = [r for i, r in enumerate(records) if i not in held_idx]
    test = [r for i, r in enumerate(records) if i in test_idx]
    surplus = [r for i, r in enumerate(records) if i in held_idx and i not in test_idx]
    return Held(train, test, surplus)


class TemplateLeakageError(ValueError):
    """Templates with items on both sides of a split that should be template-disjoint."""

    def __init__(self, shared: dict[str, tuple[list[str], list[str]]]):
        self.shared = shared
        shown = "\n".join(f"  template {t}: train {_ids(a)}, test {_ids(b)}" for t, (a, b) in list(shared.items())[:20])
        more = f"\n  ... and {len(shared) - 20} more" if len(shared) > 20 else ""
        super().__init__(f"{len(shared)} template(s) have items in both the training and the test set:\n{shown}{more}")


def _ids(ids: list[str], k: int = 3) -> str:
    return ", ".join(ids[:k]) + (f" (+{len(ids) - k})" if len(ids) > k else "")


def shared_templates(train: Sequence[Any], test: Sequence[Any]) -> dict[str, tuple[list[str], list[str]]]:
    """Template -> (training ids, test ids) for every template with items on both sides."""
    on_train: dict[str, list[str]] = {}
    for r in train:
        if r.template:
            on_train.setdefault(r.template, []).append(r.id)
    shared: dict[str, tuple[list[str], list[str]]] = {}
    for r in test:
        if r.template in on_train:
            shared.setdefault(r.template, (on_train[r.template], []))[1].append(r.id)
    return shared


def check_template_leakage(train: Sequence[Any], test: Sequence[Any]) -> None:
    """Raise TemplateLeakageError if any template has items in both train and test."""
    shared = shared_templates(train, test)
    if shared:
        raise TemplateLeakageError(shared)


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
