"""Paired statistics for comparing models on the same held-out items.

Every model answers the same test items, and each criterion gives a pass/fail per item (or
``None`` where the criterion does not apply to that item). Because the items are shared, the
comparisons between two models are *paired*:

- :func:`summarize` gives one model's pass rate with a Wilson score interval.
- :func:`compare_pair` compares two models on the items where the criterion applies to both:
  difference in pass rate with a paired bootstrap interval, McNemar's test and Cohen's h.
- :func:`adjust_all` applies the Benjamini-Hochberg correction across all comparisons of a report,
  so that it can show raw and adjusted p-values and a ``significant`` flag after correction.
- :func:`min_detectable_difference` says how large a difference the test set can detect at all.

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
    ci_low: float  # paired percentile bootstrap interval of the difference
    ci_high: float
    mcnemar: McNemarResult
    cohens_h: float  # h(rate_a, rate_b)
    p_adjusted: float | None = None
    significant: bool | None = None


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _check_probability(value: float, name: str) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value}")


def _two_sided_z(confidence: float) -> float:
    """The normal quantile z with P(-z < Z < z) = confidence."""
    _check_probability(confidence, "confidence")
    return float(stats.norm.ppf(0.5 + confidence / 2.0))


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


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n.

    With p = k/n and z the two-sided normal quantile::

        centre    = (p + z^2 / 2n) / (1 + z^2 / n)
        halfwidth = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

    Unlike the normal (Wald) interval it stays inside [0, 1] and is sensible at k = 0 and k = n.
    With no observations (n = 0) nothing is known: the interval is (0.0, 1.0).
    """
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    z = _two_sided_z(confidence)
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    halfwidth = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At k = 0 (k = n) the lower (upper) end is exactly 0 (1); avoid rounding residue there.
    low = 0.0 if k == 0 else max(0.0, centre - halfwidth)
    high = 1.0 if k == n else min(1.0, centre + halfwidth)
    return low, high


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> McNemarResult:
    """McNemar's test of equal pass rates for paired outcomes ``a[i]``, ``b[i]`` on item i.

    With d = b_only_a + b_only_b discordant pairs:

    - d == 0: no evidence of a difference, p = 1.0 (reported as ``exact``);
    - d < 25: exact two-sided binomial test of b_only_a ~ Binomial(d, 1/2)
      (``scipy.stats.binomtest``), ``statistic`` is None;
    - d >= 25: chi2 = (|b_only_a - b_only_b| - 1)^2 / d with 1 degree of freedom (Edwards'
      continuity correction).
    """
    a_arr, b_arr = _paired(a, b)
    only_a = int(np.sum(a_arr & ~b_arr))
    only_b = int(np.sum(~a_arr & b_arr))
    discordant = only_a + only_b
    n = int(a_arr.size)
    if discordant == 0:
        return McNemarResult(n, only_a, only_b, None, 1.0, "exact")
    if discordant < EXACT_BELOW:
        p = stats.binomtest(only_a, discordant, 0.5, alternative="two-sided").pvalue
        return McNemarResult(n, only_a, only_b, None, min(1.0, float(p)), "exact")
    statistic = (abs(only_a - only_b) - 1) ** 2 / discordant
    p = stats.chi2.sf(statistic, df=1)
    return McNemarResult(n, only_a, only_b, float(statistic), float(p), "chi2_cc")


def paired_bootstrap_diff(
    a: Sequence[bool],
    b: Sequence[bool],
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Observed difference in pass rate (a - b) and a paired percentile bootstrap interval.

    The bootstrap resamples *items* with replacement, keeping each item's pair of outcomes
    together. Per item the paired difference ``a[i] - b[i]`` is +1, 0 or -1, so a resample of n
    items is fully described by how many of each it drew: a multinomial draw with the observed
    proportions. Drawing those counts directly (``numpy.random.default_rng(seed).multinomial``)
    gives exactly the same bootstrap distribution as drawing n indices per resample, in
    O(n_resamples) memory instead of O(n_resamples * n). Returns ``(difference, low, high)``;
    deterministic for a seed.
    """
    a_arr, b_arr = _paired(a, b)
    n = int(a_arr.size)
    if n == 0:
        raise ValueError("need at least one paired item")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    _check_probability(confidence, "confidence")

    d = a_arr.astype(np.int64) - b_arr.astype(np.int64)
    counts = np.array([np.sum(d == 1), np.sum(d == 0), np.sum(d == -1)], dtype=np.int64)
    observed = float((counts[0] - counts[2]) / n)

    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, counts / n, size=n_resamples)  # (n_resamples, 3)
    resampled = (draws[:, 0] - draws[:, 2]) / n
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return observed, float(low), float(high)


def cohens_h(p1: float, p2: float) -> float:
    """Cohen's h effect size between two proportions: 2 asin(sqrt(p1)) - 2 asin(sqrt(p2)).

    Rough guide (Cohen 1988): 0.2 small, 0.5 medium, 0.8 large; the range is [-pi, pi].
    """
    for name, p in (("p1", p1), ("p2", p2)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    return 2.0 * math.asin(math.sqrt(p1)) - 2.0 * math.asin(math.sqrt(p2))


def benjamini_hochberg(
    p_values: Sequence[float], q: float = 0.05
) -> tuple[list[float], list[bool]]:
    """Benjamini-Hochberg false discovery rate control over m p-values.

    With the p-values sorted ascending, p_(1) <= ... <= p_(m), the adjusted value of p_(i) is
    ``min_{j >= i} m * p_(j) / j``, capped at 1 (the same as
    ``scipy.stats.false_discovery_control(p, method="bh")``). Adjusted values are returned in the
    input order; a hypothesis is rejected when its adjusted p-value is <= q, which is exactly the
    BH step-up rule "reject p_(1..k) for the largest k with p_(k) <= k q / m".
    """
    _check_probability(q, "q")
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"p_values must be one-dimensional, got shape {p.shape}")
    if np.any(np.isnan(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("p_values must be in [0, 1]")
    m = p.size
    if m == 0:
        return [], []
    order = np.argsort(p, kind="stable")
    ranks = np.arange(1, m + 1)
    scaled = p[order] * m / ranks
    adjusted_sorted = np.minimum.accumulate(scaled[::-1])[::-1]  # running min from the largest
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(adjusted_sorted, 1.0)
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
    holds whatever the two models' agreement; pass the observed discordant rate for a tighter,
    pair-specific figure. Note |delta| <= psi always, so a result above psi means no attainable
    difference is detectable at that discordance. The result is capped at 1.0, which is also
    returned when n is too small for any difference to be detectable.

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
# What the report uses
# --------------------------------------------------------------------------------------------


def summarize(passes: Sequence[bool | None], confidence: float = 0.95) -> RateSummary:
    """Pass rate and Wilson interval over the items where the criterion applies (not None)."""
    applied = [bool(v) for v in passes if v is not None]
    n, k = len(applied), sum(applied)
    low, high = wilson_interval(k, n, confidence)
    return RateSummary(n=n, k=k, rate=k / n if n else 0.0, ci_low=low, ci_high=high)


def compare_pair(
    a: Sequence[bool | None],
    b: Sequence[bool | None],
    *,
    seed: int = 0,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
) -> PairComparison:
    """Compare model ``a`` with model ``b`` on the same items (position i is item i in both).

    Positions where either outcome is None are dropped: the comparison covers the items where the
    criterion applies to both. With no such item the result is uninformative: rates and
    difference 0.0, interval (-1.0, 1.0), p-value 1.0.
    """
    if len(a) != len(b):
        raise ValueError(f"paired outcomes must have the same length, got {len(a)} and {len(b)}")
    kept = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    a_kept = [bool(x) for x, _ in kept]
    b_kept = [bool(y) for _, y in kept]
    n = len(kept)
    test = mcnemar(a_kept, b_kept)
    if n == 0:
        return PairComparison(0, 0.0, 0.0, 0.0, -1.0, 1.0, test, 0.0)
    rate_a, rate_b = sum(a_kept) / n, sum(b_kept) / n
    difference, low, high = paired_bootstrap_diff(
        a_kept, b_kept, n_resamples=n_resamples, confidence=confidence, seed=seed
    )
    return PairComparison(
        n=n,
        rate_a=rate_a,
        rate_b=rate_b,
        difference=difference,
        ci_low=low,
        ci_high=high,
        mcnemar=test,
        cohens_h=cohens_h(rate_a, rate_b),
    )


def adjust_all(comparisons: Sequence[PairComparison], q: float = 0.05) -> list[PairComparison]:
    """Benjamini-Hochberg over the McNemar p-values of all comparisons in one report.

    Returns copies, in the same order, with ``p_adjusted`` and ``significant`` (adjusted p <= q)
    filled in; the raw p-value stays in ``comparison.mcnemar.p_value``.
    """
    adjusted, rejected = benjamini_hochberg([c.mcnemar.p_value for c in comparisons], q)
    return [
        replace(c, p_adjusted=p, significant=r)
        for c, p, r in zip(comparisons, adjusted, rejected)
    ]
