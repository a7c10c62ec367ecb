"""Known-answer tests for the paired statistics (against scipy, published values and hand computations)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from cai_bootstrap.evaluation.statistics import (
    EXACT_BELOW,
    PairComparison,
    PairedTable,
    adjust_all,
    benjamini_hochberg,
    cohens_h,
    compare_pair,
    mcnemar,
    min_detectable_difference,
    paired_difference_interval,
    summarize,
    wilson_interval,
)

Z95 = 1.959963984540054


def pairs(only_a: int, only_b: int, both: int = 0, neither: int = 0) -> tuple[list, list]:
    """Paired outcomes with the given cell counts of the 2x2 table."""
    a = [True] * only_a + [False] * only_b + [True] * both + [False] * neither
    b = [False] * only_a + [True] * only_b + [True] * both + [False] * neither
    return a, b


# ---------------------------------------------------------------------------------- Wilson


def wilson_reference(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The quadratic-root form of the Wilson interval (a different algebraic route)."""
    root = z * math.sqrt(z * z + 4 * k * (n - k) / n)
    return (2 * k + z * z - root) / (2 * (n + z * z)), (2 * k + z * z + root) / (2 * (n + z * z))


def test_wilson_hand_value():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=5e-5)
    assert high == pytest.approx(0.9433, abs=5e-5)


@given(n=st.integers(1, 500), data=st.data())
def test_wilson_matches_reference_formula(n, data):
    k = data.draw(st.integers(0, n))
    assert wilson_interval(k, n) == pytest.approx(wilson_reference(k, n), abs=1e-12)


def test_wilson_other_confidence():
    z = stats.norm.ppf(0.995)
    assert wilson_interval(3, 20, 0.99) == pytest.approx(wilson_reference(3, 20, z), abs=1e-12)
    assert wilson_interval(3, 20, 0.99)[1] > wilson_interval(3, 20, 0.95)[1]


def test_wilson_edges():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(Z95**2 / (10 + Z95**2))
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(10 / (10 + Z95**2))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(1, 10, confidence=1.0)


# --------------------------------------------------------------------------------- McNemar


@pytest.mark.parametrize("only_a,only_b", [(1, 0), (7, 2), (0, 9), (12, 12), (20, 4)])
def test_mcnemar_exact_matches_binomtest(only_a, only_b):
    a, b = pairs(only_a, only_b, both=30, neither=11)
    result = mcnemar(a, b)
    expected = stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
    assert result.method == "exact" and result.statistic is None
    assert (result.n, result.b_only_a, result.b_only_b) == (len(a), only_a, only_b)
    assert result.p_value == pytest.approx(expected, rel=1e-12)


def test_mcnemar_exact_hand_value():
    # 7 vs 2 discordant: p = 2 * P(X <= 2 | Bin(9, 1/2)) = 2 * (1 + 9 + 36) / 512
    assert mcnemar(*pairs(7, 2)).p_value == pytest.approx(92 / 512, rel=1e-12)


def test_mcnemar_chi2_hand_value():
    result = mcnemar(*pairs(20, 10, both=5, neither=5))
    assert result.method == "chi2_cc"
    assert result.statistic == pytest.approx((10 - 1) ** 2 / 30)  # 2.7
    assert result.p_value == pytest.approx(stats.chi2.sf(2.7, df=1), rel=1e-12)
    assert result.p_value == pytest.approx(0.10034, abs=1e-5)


def test_mcnemar_switches_at_25_discordant():
    assert EXACT_BELOW == 25
    below = mcnemar(*pairs(17, 7, both=50))
    at = mcnemar(*pairs(18, 7, both=50))
    assert below.method == "exact" and at.method == "chi2_cc"
    assert at.statistic == pytest.approx((11 - 1) ** 2 / 25)


def test_mcnemar_zero_discordant_and_symmetry():
    result = mcnemar(*pairs(0, 0, both=5, neither=3))
    assert result.p_value == 1.0 and result.b_only_a == result.b_only_b == 0
    assert mcnemar([], []).p_value == 1.0
    forward, backward = mcnemar(*pairs(9, 3)), mcnemar(*reversed(pairs(9, 3)))
    assert forward.p_value == backward.p_value
    assert (forward.b_only_a, forward.b_only_b) == (backward.b_only_b, backward.b_only_a)


def test_mcnemar_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        mcnemar([True, False], [True])
    with pytest.raises(ValueError, match="None"):
        mcnemar([True, None], [True, False])


# ---------------------------------------------------------------------- Benjamini-Hochberg


@pytest.mark.parametrize("seed", range(6))
def test_bh_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 40))
    # a mix of tiny (true effects), uniform (nulls) and tied p-values
    p = np.concatenate([rng.uniform(0, 0.01, m // 3), rng.uniform(0, 1, m - m // 3)])
    p = np.concatenate([p, p[:2]])
    rng.shuffle(p)
    adjusted, rejected = benjamini_hochberg(list(p), q=0.05)
    expected = stats.false_discovery_control(p, method="bh")
    np.testing.assert_allclose(adjusted, expected, rtol=1e-12, atol=0)
    assert rejected == [bool(x <= 0.05) for x in expected]


def test_bh_step_up_rule_by_hand():
    # sorted: 0.01 <= 1q/4=0.0125 yes, 0.03 <= 0.025 no, 0.035 <= 0.0375 yes -> reject first three
    p = [0.2, 0.035, 0.01, 0.03]
    adjusted, rejected = benjamini_hochberg(p, q=0.05)
    assert adjusted == pytest.approx([0.2, 0.04 * 35 / 30, 0.04, 0.04 * 35 / 30])
    assert rejected == [False, True, True, True]
    assert adjusted[1] == pytest.approx(0.04 * 35 / 30)  # = 4 * 0.035 / 3


def test_bh_caps_and_empty():
    adjusted, rejected = benjamini_hochberg([0.9, 1.0, 0.95])
    assert max(adjusted) <= 1.0 and not any(rejected)
    assert benjamini_hochberg([]) == ([], [])
    # the step-up rule rejects at equality: p_(k) <= k q / m
    assert benjamini_hochberg([0.025, 0.05], q=0.05) == ([0.05, 0.05], [True, True])
    with pytest.raises(ValueError):
        benjamini_hochberg([0.5, 1.5])


# ------------------------------------------------------------- Newcombe's paired interval


def test_newcombe_published_value():
    # Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables" (ch. 8, Cavo et al.
    # 2012): both 59, only first 6, only second 16, neither 80 -> -0.0621 (95% CI -0.1186 to -0.0046),
    # as the R package contingencytables' tests check.
    t = PairedTable(both=59, only_a=6, only_b=16, neither=80)
    low, high = paired_difference_interval(t)
    assert (6 - 16) / 161 == pytest.approx(-0.0621, abs=5e-5)
    assert low == pytest.approx(-0.1186, abs=5e-5)
    assert high == pytest.approx(-0.0046, abs=5e-5)


def test_newcombe_without_correlation_is_square_and_add_of_wilson():
    # A table with both*neither - only_a*only_b in [0, n/2] has phi = 0: the interval is the plain
    # square-and-add of the two Wilson intervals.
    t = PairedTable(both=10, only_a=5, only_b=4, neither=6)  # 60 - 20 = 40 > n/2 = 12.5 -> corrected
    t0 = PairedTable(both=5, only_a=5, only_b=5, neither=5)  # 25 - 25 = 0 -> phi = 0
    n = t0.n
    p_a = p_b = 10 / n
    l_a, u_a = wilson_interval(10, n)
    low, high = paired_difference_interval(t0)
    assert low == pytest.approx(0 - math.hypot(p_a - l_a, u_a - p_b))
    assert high == pytest.approx(0 + math.hypot(p_b - l_a, u_a - p_a))
    # positive correlation narrows the interval against phi = 0
    l_c, h_c = paired_difference_interval(t)
    pa, pb = 15 / 25, 14 / 25
    (la, ua), (lb, ub) = wilson_interval(15, 25), wilson_interval(14, 25)
    assert h_c - l_c < math.hypot(pa - la, ub - pb) + math.hypot(pb - lb, ua - pa)


def test_newcombe_keeps_its_width_without_discordant_items():
    # A bootstrap interval collapses to [0, 0] here; the score interval narrows only with n.
    low, high = paired_difference_interval(PairedTable(both=40, only_a=0, only_b=0, neither=0))
    assert low < 0 < high and high == pytest.approx(-low)
    assert high == pytest.approx(1 - wilson_interval(40, 40)[0])
    small = paired_difference_interval(PairedTable(both=10, only_a=0, only_b=0, neither=0))
    assert small[1] > high
    assert paired_difference_interval(PairedTable(0, 0, 0, 0)) == (-1.0, 1.0)


@settings(max_examples=80, deadline=None)
@given(cells=st.tuples(*[st.integers(0, 30)] * 4).filter(lambda c: sum(c) > 0))
def test_newcombe_contains_the_estimate_and_is_antisymmetric(cells):
    t = PairedTable(*cells)
    d = (t.only_a - t.only_b) / t.n
    low, high = paired_difference_interval(t)
    assert -1.0 <= low <= d <= high <= 1.0
    swapped = paired_difference_interval(PairedTable(t.both, t.only_b, t.only_a, t.neither))
    assert swapped == pytest.approx((-high, -low), abs=1e-12)


def test_newcombe_coverage_is_near_nominal():
    # Simulated paired outcomes with a known difference: the 95% interval covers it about 95% of
    # the time (Newcombe's method 10 is slightly conservative; a Wald interval undercovers here).
    rng = np.random.default_rng(0)
    probs = [0.55, 0.12, 0.05, 0.28]  # both, only a, only b, neither: true difference 0.07
    n, runs, covered = 60, 1500, 0
    for cells in rng.multinomial(n, probs, size=runs):
        low, high = paired_difference_interval(PairedTable(*map(int, cells)))
        covered += low <= 0.07 <= high
    assert 0.93 <= covered / runs <= 0.985


# ------------------------------------------------------------------------------- Cohen's h


def test_cohens_h_known_values():
    assert cohens_h(0.5, 0.5) == 0.0
    assert cohens_h(1.0, 0.0) == pytest.approx(math.pi)
    assert cohens_h(0.0, 1.0) == pytest.approx(-math.pi)
    assert cohens_h(0.5, 0.0) == pytest.approx(math.pi / 2)  # 2 * asin(sqrt(1/2)) = pi/2
    with pytest.raises(ValueError):
        cohens_h(1.2, 0.5)


# ------------------------------------------------------------------ Min detectable difference


def test_min_detectable_difference_hand_value():
    # n=100, psi=0.5, z_a=1.959964, z_b=0.841621:
    # delta = sqrt(.5) * (1.959964*10 + 0.841621*sqrt(100 + 0.708326 - 3.841459)) / 100.708326
    #       = 0.707107 * (19.59964 + 0.841621 * 9.842097) / 100.708326 = 0.19578
    delta = min_detectable_difference(100, discordant_rate=0.5)
    assert delta == pytest.approx(0.19578, abs=1e-5)
    # it solves Connor's sample-size equation ...
    z_a, z_b = stats.norm.ppf(0.975), stats.norm.ppf(0.80)
    n = ((z_a * math.sqrt(0.5) + z_b * math.sqrt(0.5 - delta**2)) / delta) ** 2
    assert n == pytest.approx(100, rel=1e-9)
    # ... and gives power 0.80 under Connor's power formula
    power = stats.norm.cdf((delta * 10 - z_a * math.sqrt(0.5)) / math.sqrt(0.5 - delta**2))
    assert power == pytest.approx(0.80, abs=1e-9)


def test_min_detectable_difference_default_is_worst_case():
    default = min_detectable_difference(100)
    assert default == pytest.approx(min_detectable_difference(100, discordant_rate=1.0))
    assert default == pytest.approx(math.sqrt(2) * 0.19578, abs=1e-5)  # delta goes as sqrt(psi)
    assert min_detectable_difference(100, discordant_rate=0.2) < default


def test_min_detectable_difference_shrinks_with_n():
    values = [min_detectable_difference(n) for n in (5, 10, 30, 100, 300, 1000, 10_000)]
    assert all(0.0 < v <= 1.0 for v in values)
    assert all(x > y for x, y in zip(values, values[1:]))
    # large n: ~ (z_a + z_b) / sqrt(n)
    assert values[-1] == pytest.approx((Z95 + 0.8416212335729143) / 100, rel=0.01)
    assert min_detectable_difference(0) == 1.0 and min_detectable_difference(3) == 1.0
    assert min_detectable_difference(100, alpha=0.01) > min_detectable_difference(100)
    assert min_detectable_difference(100, power=0.9) > min_detectable_difference(100)


# ----------------------------------------------------------------- compare_pair / summarize


def test_compare_pair_drops_none_positions():
    a = [True, None, True, False, True, False, None]
    b = [False, True, None, False, True, True, None]
    # kept positions 0, 3, 4, 5: a = T F T F, b = F F T T
    result = compare_pair(a, b)
    assert result.n == 4
    assert (result.rate_a, result.rate_b, result.difference) == (0.5, 0.5, 0.0)
    assert (result.mcnemar.b_only_a, result.mcnemar.b_only_b) == (1, 1)
    assert result.cohens_h == 0.0
    assert result.p_adjusted is None and result.significant is None


def test_compare_pair_values_and_json():
    a, b = pairs(20, 5, both=60, neither=15)
    result = compare_pair(a + [None], b + [True])
    assert result.n == 100
    assert (result.rate_a, result.rate_b) == (0.8, 0.65)
    assert result.difference == pytest.approx(0.15)
    assert (result.ci_low, result.ci_high) == paired_difference_interval(PairedTable(60, 20, 5, 15))
    assert result.ci_low < 0.15 < result.ci_high and result.ci_low > 0
    assert result.discordant_rate == pytest.approx(0.25)
    assert result.mcnemar == mcnemar(a, b)
    assert result.cohens_h == pytest.approx(cohens_h(0.8, 0.65))
    assert json.loads(json.dumps(asdict(result)))["mcnemar"]["method"] == "chi2_cc"


def test_compare_pair_no_common_items():
    result = compare_pair([True, None], [None, False])
    assert result.n == 0 and result.mcnemar.p_value == 1.0
    assert (result.ci_low, result.ci_high) == (-1.0, 1.0)
    with pytest.raises(ValueError):
        compare_pair([True], [True, False])


def test_summarize_ignores_none():
    summary = summarize([True, None, True, False, True, True, True, True, True, None, True, False])
    assert (summary.n, summary.k, summary.rate) == (10, 8, 0.8)
    assert (summary.ci_low, summary.ci_high) == wilson_interval(8, 10)
    empty = summarize([None, None])
    assert (empty.n, empty.k, empty.rate, empty.ci_low, empty.ci_high) == (0, 0, 0.0, 0.0, 1.0)


def test_adjust_all_fills_adjusted_p_values():
    comparisons = [
        compare_pair(*pairs(30, 2)),  # strong effect
        compare_pair(*pairs(5, 4)),  # none
        compare_pair(*pairs(12, 3)),  # p = 0.035, adjusted 3/2 * 0.035
    ]
    raw = [c.mcnemar.p_value for c in comparisons]
    assert raw[2] == pytest.approx(2 * (1 + 15 + 105 + 455) / 2**15)
    adjusted = adjust_all(comparisons, q=0.05)
    assert all(isinstance(c, PairComparison) for c in adjusted)
    assert [c.mcnemar.p_value for c in adjusted] == raw  # raw p-values kept
    expected = stats.false_discovery_control(raw, method="bh")
    assert [c.p_adjusted for c in adjusted] == pytest.approx(list(expected))
    assert adjusted[2].p_adjusted == pytest.approx(1.5 * raw[2])
    assert [c.significant for c in adjusted] == [True, False, False]  # raw 0.035 < 0.05, not after
    assert comparisons[0].p_adjusted is None  # inputs untouched
    assert adjust_all([]) == []
