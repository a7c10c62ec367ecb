"""Paired statistics for comparing models on the same held-out items.

Every model answers the same test items, and each criterion gives a pass/fail per item (or
``None`` where the criterion does not apply to that item). Because the items are shared, the
comparisons between two models are *paired*:

- :func:`summarize` gives one model's pass rate with a Wilson score interval (statsmodels'
  ``proportion_confint``).
- :func:`compare_pair` compares two models on the items where the criterion applies to both:
  the difference in pass rate with Newcombe's hybrid score interval for paired data, McNemar's
  test (statsmodels) and Cohen's h.
- :func:`adjust_all` applies Benjamini-Hochberg (statsmodels' ``multipletests``) across one family
  of comparisons, filling in adjusted p-values and a ``significant`` flag.
- :func:`min_detectable_difference` says how large a difference a test set can detect at all.

The library does what it provides; what statsmodels lacks (a confidence interval for a paired
difference of proportions, McNemar's power) is written out here with its formula and tested
against published values.

Everything returned is plain ``int``/``float``/``bool``/``None`` (dataclasses that
``dataclasses.asdict`` turns into JSON-serialisable dictionaries).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint, proportion_effectsize

# Below this many discordant pairs McNemar's test uses the exact binomial distribution.
EXACT_BELOW = 25


@dataclass(frozen=True)
class RateSummary:
    """One model's pass rate on one criterion, with a Wilson score interval."""

    n: int  # items where the criterion applies
    k: int  # items that pass
    rate: float  # k / n (0.0 when n == 0)
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test on paired pass/fail outcomes.

    Only the discordant pairs carry information: ``b_only_a`` items pass for ``a`` and fail for
    ``b``, ``b_only_b`` the other way round.
    """

    n: int
    b_only_a: int
    b_only_b: int
    statistic: float | None  # continuity-corrected chi-squared; None for the exact test
    p_value: float
    method: Literal["exact", "chi2_cc"]


@dataclass(frozen=True)
class PairComparison:
    """Model ``a`` against model ``b`` on the items where the criterion applies to both.

    ``p_adjusted`` and ``significant`` stay ``None`` until :func:`adjust_all` fills them in.
    """

    n: int
    rate_a: float
    rate_b: float
    difference: float  # rate_a - rate_b
    ci_low: float  # Newcombe's hybrid score interval of the paired difference
    ci_high: float
    mcnemar: McNemarResult
    cohens_h: float  # h(rate_a, rate_b)
    discordant_rate: float  # share of the n items where exactly one model passes
    p_adjusted: float | None = None
    significant: bool | None = None


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _check_probability(value: float, name: str) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value}")


def _as_bools(values: Sequence[bool], name: str) -> np.ndarray:
    """A 1-D boolean array; ``None`` is refused (drop it first, as :func:`compare_pair` does)."""
    if any(v is None for v in values):
        raise ValueError(f"{name} contains None; drop the items where the criterion does not apply")
    array = np.asarray(values, dtype=bool)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def _paired(a: Sequence[bool], b: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    if len(a) != len(b):
        raise ValueError(f"paired outcomes must have the same length, got {len(a)} and {len(b)}")
    return _as_bools(a, "a"), _as_bools(b, "b")


@dataclass(frozen=True)
class PairedTable:
    """The 2x2 table of paired outcomes: items both pass, only a, only b, neither."""

    both: int
    only_a: int
    only_b: int
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.only_a + self.only_b + self.neither

    @classmethod
    def of(cls, a: Sequence[bool], b: Sequence[bool]) -> PairedTable:
        x, y = _paired(a, b)
        return cls(int(np.sum(x & y)), int(np.sum(x & ~y)), int(np.sum(~x & y)), int(np.sum(~x & ~y)))


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (statsmodels ``proportion_confint``).

    Unlike the normal (Wald) interval it stays inside [0, 1] and is sensible at k = 0 and k = n.
    With no observations (n = 0) nothing is known: the interval is (0.0, 1.0).
    """
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    _check_probability(confidence, "confidence")
    if n == 0:
        return 0.0, 1.0
    low, high = proportion_confint(k, n, alpha=1.0 - confidence, method="wilson")
    # At k = 0 (k = n) the lower (upper) end is exactly 0 (1); avoid rounding residue there.
    return (0.0 if k == 0 else float(low)), (1.0 if k == n else float(high))


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> McNemarResult:
    """McNemar's test of equal pass rates for paired outcomes ``a[i]``, ``b[i]`` on item i
    (statsmodels ``contingency_tables.mcnemar``).

    With d discordant pairs: d == 0 gives p = 1.0 (reported as ``exact``); d < 25 the exact
    two-sided binomial test of only_a ~ Binomial(d, 1/2), ``statistic`` None; from 25 on the
    chi-squared statistic with Edwards' continuity correction, (|only_a - only_b| - 1)^2 / d.
    """
    t = PairedTable.of(a, b)
    discordant = t.only_a + t.only_b
    if discordant == 0:
        return McNemarResult(t.n, t.only_a, t.only_b, None, 1.0, "exact")
    table = [[t.both, t.only_a], [t.only_b, t.neither]]
    exact = discordant < EXACT_BELOW
    result = sm_mcnemar(table, exact=exact, correction=True)
    p = min(1.0, float(result.pvalue))
    if exact:
        return McNemarResult(t.n, t.only_a, t.only_b, None, p, "exact")
    return McNemarResult(t.n, t.only_a, t.only_b, float(result.statistic), p, "chi2_cc")


def paired_difference_interval(t: PairedTable, confidence: float = 0.95) -> tuple[float, float]:
    """Newcombe's (1998) hybrid score interval ("method 10") for the difference of two paired
    proportions, p_a - p_b with p_a = (both + only_a) / n and p_b = (both + only_b) / n.

    Each proportion gets its Wilson interval (l_a, u_a), (l_b, u_b); the two are combined as a
    square-and-add with the correlation phi of the paired outcomes (continuity-corrected as
    Newcombe does: with A = both*neither - only_a*only_b, phi uses A - n/2 when A > n/2, 0 when
    0 <= A <= n/2, A when A < 0, each over sqrt of the four margins; 0 when a margin is 0)::

        low  = d - sqrt((p_a - l_a)^2 - 2 phi (p_a - l_a)(u_b - p_b) + (u_b - p_b)^2)
        high = d + sqrt((p_b - l_b)^2 - 2 phi (p_b - l_b)(u_a - p_a) + (u_a - p_a)^2)

    statsmodels has no paired interval for a difference, and a percentile bootstrap collapses
    to [0, 0] when no item is discordant, whatever n is; this interval keeps its width there
    (the Wilson widths shrink only with n). With n = 0 it is (-1, 1).
    """
    _check_probability(confidence, "confidence")
    n = t.n
    if n == 0:
        return -1.0, 1.0
    pass_a, pass_b = t.both + t.only_a, t.both + t.only_b
    p_a, p_b = pass_a / n, pass_b / n
    l_a, u_a = wilson_interval(pass_a, n, confidence)
    l_b, u_b = wilson_interval(pass_b, n, confidence)
    margins = pass_a * (n - pass_a) * pass_b * (n - pass_b)
    phi = 0.0
    if margins > 0:
        a = t.both * t.neither - t.only_a * t.only_b
        corrected = a - n / 2 if a > n / 2 else (0.0 if a >= 0 else a)
        phi = corrected / math.sqrt(margins)
    d = p_a - p_b
    low = d - math.sqrt(max(0.0, (p_a - l_a) ** 2 - 2 * phi * (p_a - l_a) * (u_b - p_b) + (u_b - p_b) ** 2))
    high = d + math.sqrt(max(0.0, (p_b - l_b) ** 2 - 2 * phi * (p_b - l_b) * (u_a - p_a) + (u_a - p_a) ** 2))
    return max(-1.0, low), min(1.0, high)


def cohens_h(p1: float, p2: float) -> float:
    """Cohen's h effect size between two proportions: 2 asin(sqrt(p1)) - 2 asin(sqrt(p2))
    (statsmodels ``proportion_effectsize``).

    Rough guide (Cohen 1988): 0.2 small, 0.5 medium, 0.8 large; the range is [-pi, pi].
    """
    for name, p in (("p1", p1), ("p2", p2)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    return float(proportion_effectsize(p1, p2))


def benjamini_hochberg(p_values: Sequence[float], q: float = 0.05) -> tuple[list[float], list[bool]]:
    """Benjamini-Hochberg false discovery rate control over m p-values (statsmodels
    ``multipletests(method="fdr_bh")``): adjusted p-values in the input order, and which are
    rejected (adjusted p <= q, the step-up rule "reject p_(1..k) for the largest k with
    p_(k) <= k q / m")."""
    _check_probability(q, "q")
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"p_values must be one-dimensional, got shape {p.shape}")
    if np.any(np.isnan(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("p_values must be in [0, 1]")
    if p.size == 0:
        return [], []
    _, adjusted, _, _ = multipletests(p, alpha=q, method="fdr_bh")
    adjusted = np.minimum(adjusted, 1.0)
    return [float(x) for x in adjusted], [bool(x <= q) for x in adjusted]


def min_detectable_difference(
    n: int,
    alpha: float = 0.05,
    power: float = 0.80,
    discordant_rate: float | None = None,
) -> float:
    """Smallest difference in paired pass rate a two-sided McNemar test on n items can detect.

    Uses Connor's (1987) normal approximation. With discordant proportion psi (the share of
    items where exactly one model passes), difference delta = P(only a) - P(only b),
    z_a = z_{1 - alpha/2} and z_b = z_{power}, the required sample size is::

        n = (z_a * sqrt(psi) + z_b * sqrt(psi - delta^2))^2 / delta^2

    Solving for delta (square once; take the root with sqrt(n) * delta >= z_a * sqrt(psi))::

        delta = sqrt(psi) * (z_a * sqrt(n) + z_b * sqrt(n + z_b^2 - z_a^2)) / (n + z_b^2)

    which is about sqrt(psi) * (z_a + z_b) / sqrt(n) for large n. Since delta grows with
    sqrt(psi), the default ``discordant_rate=None`` takes the worst case psi = 1, a bound that
    holds whatever the two models' agreement; pass a discordant rate for a pair-specific figure.
    The result is capped at 1.0, which is also returned when n is too small for any difference
    to be detectable. (statsmodels has no power function for McNemar's test.)

    ``power`` must be at least 0.5 (z_b >= 0), the range where the formula has one root.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_probability(alpha, "alpha")
    if not 0.5 <= power < 1.0:
        raise ValueError(f"power must be in [0.5, 1), got {power}")
    psi = 1.0 if discordant_rate is None else float(discordant_rate)
    if not 0.0 < psi <= 1.0:
        raise ValueError(f"discordant_rate must be in (0, 1], got {discordant_rate}")

    z_a = float(stats.norm.ppf(1.0 - alpha / 2.0))
    z_b = float(stats.norm.ppf(power))
    # Below this n even delta = sqrt(psi) (every discordant pair one way) is not detectable.
    if n == 0 or math.sqrt(n) <= z_a:
        return 1.0
    root = math.sqrt(n + z_b * z_b - z_a * z_a)  # real because n > z_a^2
    delta = math.sqrt(psi) * (z_a * math.sqrt(n) + z_b * root) / (n + z_b * z_b)
    return min(1.0, delta)


# --------------------------------------------------------------------------------------------
# What the analysis uses
# --------------------------------------------------------------------------------------------


def summarize(passes: Sequence[bool | None], confidence: float = 0.95) -> RateSummary:
    """Pass rate and Wilson interval over the items where the criterion applies (not None)."""
    applied = [bool(v) for v in passes if v is not None]
    n, k = len(applied), sum(applied)
    low, high = wilson_interval(k, n, confidence)
    return RateSummary(n=n, k=k, rate=k / n if n else 0.0, ci_low=low, ci_high=high)


def compare_pair(a: Sequence[bool | None], b: Sequence[bool | None], *, confidence: float = 0.95) -> PairComparison:
    """Compare model ``a`` with model ``b`` on the same items (position i is item i in both).

    Positions where either outcome is None are dropped: the comparison covers the items where the
    criterion applies to both. With no such item the result is uninformative: rates and
    difference 0.0, interval (-1.0, 1.0), p-value 1.0.
    """
    if len(a) != len(b):
        raise ValueError(f"paired outcomes must have the same length, got {len(a)} and {len(b)}")
    kept = [(bool(x), bool(y)) for x, y in zip(a, b) if x is not None and y is not None]
    a_kept, b_kept = [x for x, _ in kept], [y for _, y in kept]
    table = PairedTable.of(a_kept, b_kept)
    test = mcnemar(a_kept, b_kept)
    low, high = paired_difference_interval(table, confidence)
    n = table.n
    if n == 0:
        return PairComparison(0, 0.0, 0.0, 0.0, low, high, test, 0.0, 0.0)
    rate_a, rate_b = (table.both + table.only_a) / n, (table.both + table.only_b) / n
    return PairComparison(
        n=n,
        rate_a=rate_a,
        rate_b=rate_b,
        difference=(table.only_a - table.only_b) / n,
        ci_low=low,
        ci_high=high,
        mcnemar=test,
        cohens_h=cohens_h(rate_a, rate_b),
        discordant_rate=(table.only_a + table.only_b) / n,
    )


def adjust_all(comparisons: Sequence[PairComparison], q: float = 0.05) -> list[PairComparison]:
    """Benjamini-Hochberg over the McNemar p-values of one family of comparisons.

    Returns copies, in the same order, with ``p_adjusted`` and ``significant`` (adjusted p <= q)
    filled in; the raw p-value stays in ``comparison.mcnemar.p_value``.
    """
    adjusted, rejected = benjamini_hochberg([c.mcnemar.p_value for c in comparisons], q)
    return [replace(c, p_adjusted=p, significant=r) for c, p, r in zip(comparisons, adjusted, rejected)]
