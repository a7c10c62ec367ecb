"""Pair diagnostics: do the pairs teach content, or can a trivial cue tell chosen from rejected?

Each diagnostic is a number with its definition (``DEFINITIONS``, written next to the numbers in
``data/pairs_report.json`` and the report), computed from the pairs alone:

* ``surface_separable``: the share of pairs a surface rule tells apart (see :func:`surface_rule`);
* ``length``: the share whose rejected response is longer (and chosen longer, same length);
* ``margin``: the distribution of the SFT model's margin recorded on each pair before DPO, the
  share it already ranks right and the share it ranks confidently;
* ``sources``: pairs per negative type.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ..formats import END_SUFFIX, words
from ..schemas import NEGATIVE_TYPES, PreferencePair

# A stock opening: the first OPENING_WORDS words of a rejected response, shared by at least
# STOCK_MIN rejected responses and opening no chosen response (so "opens with it" never errs).
OPENING_WORDS = 3
STOCK_MIN = 3
MARGIN_QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)

DEFINITIONS = {
    "surface_separable": (
        "share of pairs told apart by a surface rule: the chosen side ends with END and the rejected side "
        f"does not, or the rejected side opens with a stock opening (its first {OPENING_WORDS} words, lower "
        f"case, punctuation dropped, shared by at least {STOCK_MIN} rejected responses and opening no chosen "
        "response)"),
    "length": ("share of pairs whose rejected response is longer than the chosen one, in characters of the "
               "response (END and the white space around it not counted)"),
    "margin": ("the SFT model's length-normalised margin before DPO: mean log-probability per token of the "
               "chosen completion minus that of the rejected one; already_ranked: share > 0; confident: "
               "share > pairs.confident_margin"),
    "sources": "pairs per negative type (on_policy: a worse sample of the SFT model itself; others: rule-built)",
}


def response_length(completion: str) -> int:
    """Characters of a completion's response: END at the end and the white space around it dropped."""
    return len(completion.rstrip().removesuffix(END_SUFFIX).strip())


def ends_with_end(completion: str) -> bool:
    return completion.rstrip().endswith(END_SUFFIX)


def opening(completion: str) -> str:
    """The first OPENING_WORDS words, lower case, punctuation and in-word apostrophes dropped."""
    return " ".join(words(re.sub(r"(?<=\w)['’](?=\w)", "", completion))[:OPENING_WORDS])


def stock_openings(pairs: Sequence[PreferencePair]) -> set[str]:
    """Openings shared by at least STOCK_MIN rejected responses and opening no chosen response."""
    rejected = Counter(opening(p.rejected) for p in pairs)
    chosen = {opening(p.chosen) for p in pairs}
    return {o for o, n in rejected.items() if o and n >= STOCK_MIN and o not in chosen}


def surface_rule(pair: PreferencePair, stock: set[str]) -> str | None:
    """Which surface rule separates the pair (``missing_end`` first, then ``stock_opening``), or None."""
    if ends_with_end(pair.chosen) and not ends_with_end(pair.rejected):
        return "missing_end"
    if opening(pair.rejected) in stock:
        return "stock_opening"
    return None


def _share(n: int, total: int) -> float | None:
    return round(n / total, 4) if total else None


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def margin_summary(pairs: Sequence[PreferencePair], confident_margin: float) -> dict[str, Any]:
    values = sorted(p.margin for p in pairs if p.margin is not None)
    out: dict[str, Any] = {"n": len(values), "confident_margin": confident_margin}
    if not values:
        return {**out, "quantiles": None, "mean": None, "already_ranked": None, "confident": None}
    return {
        **out,
        "quantiles": {f"q{round(q * 100):02d}": round(_quantile(values, q), 4) for q in MARGIN_QUANTILES},
        "mean": round(sum(values) / len(values), 4),
        "already_ranked": _share(sum(v > 0 for v in values), len(values)),
        "confident": _share(sum(v > confident_margin for v in values), len(values)),
    }


def diagnose(pairs: Sequence[PreferencePair], confident_margin: float) -> dict[str, Any]:
    """Every diagnostic of the module docstring, with counts, shares and definitions."""
    n = len(pairs)
    stock = stock_openings(pairs)
    rules = Counter(r for r in (surface_rule(p, stock) for p in pairs) if r is not None)
    lengths = [(response_length(p.chosen), response_length(p.rejected)) for p in pairs]
    longer = sum(r > c for c, r in lengths)
    shorter = sum(r < c for c, r in lengths)
    kinds = Counter(p.negative_type for p in pairs)
    return {
        "pairs": n,
        "surface_separable": {"share": _share(sum(rules.values()), n), "count": sum(rules.values()),
                              "by_rule": {k: rules.get(k, 0) for k in ("missing_end", "stock_opening")},
                              "stock_openings": sorted(stock)},
        "length": {"rejected_longer": _share(longer, n), "chosen_longer": _share(shorter, n),
                   "same_length": _share(n - longer - shorter, n),
                   "counts": {"rejected_longer": longer, "chosen_longer": shorter, "same_length": n - longer - shorter}},
        "margin": margin_summary(pairs, confident_margin),
        "sources": {k: kinds.get(k, 0) for k in NEGATIVE_TYPES},
        "definitions": DEFINITIONS,
    }
