"""Pooling a paired comparison of two models over several seeds (or rounds, or data splits).

Each seed s answers the same kind of question as one run: models ``a`` and ``b`` answered the same
held-out items, and a criterion gives pass/fail per item. Within a seed the outcomes are *paired*
(item i under a and under b), so the single-run test is McNemar's (:mod:`.statistics`).

Which stratified test is right for paired binary outcomes
---------------------------------------------------------
- The Cochran-Mantel-Haenszel test on each seed's *model x outcome* table (2 x 2 counts of passes
  and fails per model) is wrong here: it treats the 2n responses of a seed as independent samples,
  while a and b answered the *same* items. Positively correlated pairs make its variance too large.
- The Cochran-Mantel-Haenszel test on each seed's *agreement* table (a pass/fail x b pass/fail)
  tests whether a's outcome is associated with b's, which is not the question (it nearly always is).
- McNemar's test **is** the CMH test with every matched pair as its own stratum (a 2 x 2 table with
  one response of a and one of b). Stratifying by seed as well gives the CMH test over all
  (seed, item) pairs. Concordant pairs contribute nothing to its numerator or variance, so it reduces
  to the pooled discordant counts: chi2 = (sum b_s - sum c_s)^2 / (sum b_s + sum c_s), and the
  Mantel-Haenszel common odds ratio is sum b_s / sum c_s with the Robins-Breslow-Greenland interval
  exp(log OR +- z sqrt(1/sum b_s + 1/sum c_s)). :func:`mantel_haenszel_paired` computes this;
  the tests check it against ``statsmodels.stats.contingency_tables.StratifiedTable`` built from the
  per-pair tables.
- That CMH test assumes the strata are independent. With training seeds on one data split the
  seeds answer the *same* test items, and an item that is hard for a is hard for a in every seed:
  the pairs are clustered by item, and the CMH variance is then too small (it rejects too often;
  ``tests/test_pooling.py`` measures this by simulation). The test used for the pooled answer,
  :func:`pool`, therefore treats each **item as a cluster** of its pairs across seeds (clustered
  matched pairs, Durkalski et al. 2003; Obuchowski 1998): with d_k the sum over seeds of
  (a passes) - (b passes) on item k, the statistic is T = sum_k d_k and its null distribution is
  that of sum_k e_k |d_k| with independent signs e_k = +-1 (swapping a and b on an item, in all
  its seeds at once, changes nothing under "no difference"). The p-value is computed exactly (the
  distribution of an integer sum, by convolution), so no large-sample approximation is needed.
  When no item appears in more than one stratum (one seed, or disjoint test sets) every |d_k| is 1
  and this is exactly McNemar's exact test on the pooled discordant counts, the exact form of the
  CMH test above.
- The interval of the pooled difference in pass rate, sum_k d_k / N over the N pairs, is Tango's
  score interval for paired proportions (Tango 1998), with the counts divided by the design effect
  of the clustering (Rao and Scott 1992): deff = sum_k (d_k - m_k D)^2 / (N (psi - D^2)), the
  clustered variance of the sum over the variance it would have with independent pairs (m_k pairs
  of item k, D the pooled difference, psi the share of discordant pairs; at least 1). A score
  interval, unlike a percentile bootstrap, does not collapse to [0, 0] when no pair is discordant
  (16 concordant pairs leave +-19 points open, not none), and seeds that merely repeat each other
  (identical outcomes) give the interval of one seed, as they add no information.

A random-effects (mixed) model over seeds would generalise to unseen seeds, but with the 2-5 seeds
an experiment affords its seed variance is hardly estimable; the report shows the spread over seeds
and how many seeds agree in direction instead, and the pooled test is conditional on the seeds run.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

from .statistics import McNemarResult, mcnemar


@dataclass(frozen=True)
class Stratum:
    """One seed's paired outcomes: position i is the item ``keys[i]`` under model a and model b.

    ``keys`` name the items across strata (the same key in two strata is the same test item); None
    outcomes (the criterion does not apply) are dropped pairwise.
    """

    label: str
    keys: Sequence[str]
    a: Sequence[bool | None]
    b: Sequence[bool | None]

    def __post_init__(self) -> None:
        if not len(self.keys) == len(self.a) == len(self.b):
            raise ValueError(f"stratum {self.label!r}: keys, a and b differ in length "
                             f"({len(self.keys)}, {len(self.a)}, {len(self.b)})")
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"stratum {self.label!r}: an item key appears twice")

    def pairs(self) -> list[tuple[str, bool, bool]]:
        return [(k, bool(x), bool(y)) for k, x, y in zip(self.keys, self.a, self.b) if x is not None and y is not None]


@dataclass(frozen=True)
class MantelHaenszel:
    """The CMH test over matched pairs (every (stratum, item) pair its own stratum)."""

    n_pairs: int
    only_a: int  # pairs where a passes and b fails, summed over strata
    only_b: int
    statistic: float | None  # chi2 without continuity correction; None without discordant pairs
    p_value: float
    odds_ratio: float | None  # Mantel-Haenszel: only_a / only_b (inf when only_b is 0)
    or_ci_low: float | None  # Robins-Breslow-Greenland interval; None when a count is 0
    or_ci_high: float | None


@dataclass(frozen=True)
class StratumResult:
    label: str
    n: int
    rate_a: float
    rate_b: float
    difference: float
    mcnemar: McNemarResult


@dataclass(frozen=True)
class PooledComparison:
    """a against b pooled over strata; ``difference`` = pooled rate(a) - rate(b)."""

    n_strata: int
    n_pairs: int
    n_items: int  # clusters: distinct item keys
    rate_a: float
    rate_b: float
    difference: float
    ci_low: float  # Tango's score interval on the design-effect-adjusted counts
    ci_high: float
    design_effect: float  # of the clustering by item (1: pairs as good as independent)
    p_value: float  # exact clustered sign-flip test (= exact McNemar when no item repeats)
    items_repeated: bool  # some item is paired in more than one stratum
    only_a: int
    only_b: int
    cmh: MantelHaenszel  # for reference: assumes independent strata
    strata: list[StratumResult]
    positive: int  # strata with difference > 0
    negative: int
    zero: int

    @property
    def agree(self) -> int:
        """Strata whose difference has the pooled difference's sign (0 when the pooled one is 0)."""
        if self.difference > 0:
            return self.positive
        if self.difference < 0:
            return self.negative
        return self.zero


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(stats.norm.ppf(0.5 + confidence / 2.0))


def mantel_haenszel_paired(strata: Sequence[Stratum], confidence: float = 0.95) -> MantelHaenszel:
    """CMH chi2 (no continuity correction), its p-value, and the MH odds ratio with the RBG interval."""
    pairs = [p for s in strata for p in s.pairs()]
    only_a = sum(1 for _, x, y in pairs if x and not y)
    only_b = sum(1 for _, x, y in pairs if y and not x)
    discordant = only_a + only_b
    if discordant == 0:
        return MantelHaenszel(len(pairs), 0, 0, None, 1.0, None, None, None)
    statistic = (only_a - only_b) ** 2 / discordant
    p = float(stats.chi2.sf(statistic, df=1))
    odds = only_a / only_b if only_b else math.inf
    low = high = None
    if only_a and only_b:
        half = _z(confidence) * math.sqrt(1 / only_a + 1 / only_b)
        low, high = math.exp(math.log(odds) - half), math.exp(math.log(odds) + half)
    return MantelHaenszel(len(pairs), only_a, only_b, float(statistic), p, odds, low, high)


def _clusters(strata: Sequence[Stratum]) -> tuple[np.ndarray, np.ndarray]:
    """Per item key: d_k (sum over strata of a - b) and m_k (its number of pairs)."""
    d: dict[str, int] = defaultdict(int)
    m: dict[str, int] = defaultdict(int)
    for s in strata:
        for key, x, y in s.pairs():
            d[key] += int(x) - int(y)
            m[key] += 1
    keys = sorted(m)
    return np.array([d[k] for k in keys], dtype=np.int64), np.array([m[k] for k in keys], dtype=np.int64)


def sign_flip_p_value(d: Sequence[int]) -> float:
    """Exact two-sided p-value of T = sum(d) against the distribution of sum(e_k |d_k|), e_k = +-1
    independent and equally likely: P(|T*| >= |T|). Computed by convolving the integer weights, so
    it is exact for any number of clusters."""
    weights = np.abs(np.asarray(d, dtype=np.int64))
    weights = weights[weights > 0]
    if weights.size == 0:
        return 1.0
    observed = abs(int(np.sum(d)))
    total = int(weights.sum())
    # probabilities of sum(e_k w_k) + total, which lies in [0, 2 * total] and has the parity of total
    dist = np.zeros(2 * total + 1)
    dist[total] = 1.0
    for w in weights:
        shifted = np.zeros_like(dist)
        shifted[: dist.size - w] += 0.5 * dist[w:]
        shifted[w:] += 0.5 * dist[: dist.size - w]
        dist = shifted
    values = np.abs(np.arange(-total, total + 1))
    return float(min(1.0, dist[values >= observed].sum()))


def tango_score(delta: float, only_a: float, only_b: float, n: float) -> float:
    """Tango's (1998) score statistic of a paired difference delta = P(a only) - P(b only):
    (only_a - only_b - n delta) / sqrt(n (2 q + delta (1 - delta))), with q the maximum-likelihood
    P(b only) under the constraint (root of 2n q^2 + W q - only_b delta (1 - delta) = 0,
    W = -only_a - only_b + (2n - only_a + only_b) delta). Counts may be fractional (see pool)."""
    w = -only_a - only_b + (2 * n - only_a + only_b) * delta
    q = (math.sqrt(max(w * w + 8 * n * only_b * delta * (1 - delta), 0.0)) - w) / (4 * n)
    variance = n * (2 * q + delta * (1 - delta))
    numerator = only_a - only_b - n * delta
    if variance <= 0:
        return math.copysign(math.inf, numerator) if numerator else 0.0
    return numerator / math.sqrt(variance)


def tango_interval(only_a: float, only_b: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Tango's score interval for a paired difference in proportions: every delta whose score
    statistic lies within +-z (the statistic falls as delta grows). Well behaved with few or no
    discordant pairs."""
    if n <= 0:
        return -1.0, 1.0
    z = _z(confidence)
    estimate = (only_a - only_b) / n
    edge = 1.0 - 1e-12

    def score(delta: float) -> float:
        return tango_score(delta, only_a, only_b, n)

    low = -1.0 if estimate <= -edge or score(-edge) <= z else \
        float(optimize.brentq(lambda x: score(x) - z, -edge, estimate, xtol=1e-12))
    high = 1.0 if estimate >= edge or score(edge) >= -z else \
        float(optimize.brentq(lambda x: score(x) + z, estimate, edge, xtol=1e-12))
    return low, high


def design_effect(d: np.ndarray, m: np.ndarray, discordant: int) -> float:
    """Variance of sum(d) with items as clusters over its variance with independent pairs, at least 1."""
    n = int(m.sum())
    if n == 0 or discordant == 0:
        return 1.0
    delta = float(d.sum()) / n
    independent = n * (discordant / n - delta * delta)
    if independent <= 0:
        return 1.0
    clustered = float(np.sum((d - m * delta) ** 2))
    return max(1.0, clustered / independent)


def _stratum_result(s: Stratum) -> StratumResult:
    pairs = s.pairs()
    n = len(pairs)
    a = [x for _, x, _ in pairs]
    b = [y for _, _, y in pairs]
    ra, rb = (sum(a) / n, sum(b) / n) if n else (0.0, 0.0)
    return StratumResult(s.label, n, ra, rb, ra - rb, mcnemar(a, b))


def pool(strata: Sequence[Stratum], *, confidence: float = 0.95) -> PooledComparison:
    """Pool a vs b over strata (see the module docstring): the pooled difference in pass rate, its
    design-effect-adjusted score interval, the exact clustered sign-flip p-value, the CMH test for
    reference, each stratum's own result, and how many strata point each way."""
    if not strata:
        raise ValueError("nothing to pool: no strata")
    if len({s.label for s in strata}) != len(strata):
        raise ValueError("strata labels must be distinct")
    _z(confidence)
    d, m = _clusters(strata)
    per = [_stratum_result(s) for s in strata]
    n_pairs = int(m.sum())
    pairs = [p for s in strata for p in s.pairs()]
    cmh = mantel_haenszel_paired(strata, confidence)
    deff = design_effect(d, m, cmh.only_a + cmh.only_b)
    if n_pairs == 0:
        difference, low, high, p = 0.0, -1.0, 1.0, 1.0
        rate_a = rate_b = 0.0
    else:
        rate_a = sum(x for _, x, _ in pairs) / n_pairs
        rate_b = sum(y for _, _, y in pairs) / n_pairs
        difference = float(d.sum() / n_pairs)
        low, high = tango_interval(cmh.only_a / deff, cmh.only_b / deff, n_pairs / deff, confidence)
        p = sign_flip_p_value(d)
    return PooledComparison(
        n_strata=len(strata), n_pairs=n_pairs, n_items=int(d.size), rate_a=rate_a, rate_b=rate_b,
        difference=difference, ci_low=low, ci_high=high, design_effect=deff, p_value=p,
        items_repeated=bool((m > 1).any()),
        only_a=cmh.only_a, only_b=cmh.only_b, cmh=cmh, strata=per,
        positive=sum(r.difference > 0 for r in per if r.n), negative=sum(r.difference < 0 for r in per if r.n),
        zero=sum(r.difference == 0 for r in per if r.n),
    )
