"""Seeded, category-stratified sampling of records."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def stratified_sample(records: Sequence[T], n: int | None, seed: int, salt: str) -> list[T]:
    """n records, each category keeping its share (largest remainder), returned in input order."""
    if n is None or n >= len(records):
        return list(records)
    rng = random.Random(f"{salt}:{seed}")
    by_cat: dict[str, list[T]] = {}
    for r in records:
        by_cat.setdefault(r.category, []).append(r)  # type: ignore[attr-defined]
    quotas = {c: len(v) * n / len(records) for c, v in by_cat.items()}
    counts = {c: int(q) for c, q in quotas.items()}
    for c in sorted(quotas, key=lambda c: (-(quotas[c] - counts[c]), c))[: n - sum(counts.values())]:
        counts[c] += 1
    chosen = {id(r) for c, v in by_cat.items() for r in rng.sample(v, counts[c])}
    return [r for r in records if id(r) in chosen]
