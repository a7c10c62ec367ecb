"""The pooled paired test over seeds, against statsmodels, scipy, brute force and a simulation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.contingency_tables import StratifiedTable
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

from cai_bootstrap.evaluation.pooling import (
    Stratum,
    design_effect,
    mantel_haenszel_paired,
    pool,
    sign_flip_p_value,
    tango_interval,
    tango_score,
)


def outcomes(only_a: int, only_b: int, both: int, neither: int) -> tuple[list[bool], list[bool]]:
    a = [True] * only_a + [False] * only_b + [True] * both + [False] * neither
    b = [False] * only_a + [True] * only_b + [True] * both + [False] * neither
    return a, b


def stratum(label: str, cells: tuple[int, int, int, int], prefix: str = "") -> Stratum:
    a, b = outcomes(*cells)
    return Stratum(label, [f"{prefix or label}-{i}" for i in range(len(a))], a, b)


def pair_tables(strata: list[Stratum]) -> np.ndarray:
    """One 2x2 table per matched pair: rows model a / model b, columns pass / fail (2 x 2 x K)."""
    tables = [[[int(x), 1 - int(x)], [int(y), 1 - int(y)]] for s in strata for _, x, y in s.pairs()]
    return np.array(tables, dtype=float).transpose(1, 2, 0)


# Known tables: per seed (only a, only b, both pass, both fail).
KNOWN = [
    [(9, 3, 20, 8)],
    [(9, 3, 20, 8), (7, 2, 25, 6), (4, 5, 22, 9)],
    [(1, 0, 30, 9), (2, 1, 28, 9)],
    [(12, 11, 10, 7), (15, 6, 9, 10), (5, 14, 3, 18), (8, 8, 8, 16)],
]


@pytest.mark.parametrize("cells", KNOWN)
def test_cmh_over_matched_pairs_equals_statsmodels(cells):
    strata = [stratum(f"seed {i}", c) for i, c in enumerate(cells)]
    ours = mantel_haenszel_paired(strata)
    table = StratifiedTable(pair_tables(strata))
    test = table.test_null_odds(correction=False)
    assert ours.statistic == pytest.approx(float(test.statistic), rel=1e-12)
    assert ours.p_value == pytest.approx(float(test.pvalue), rel=1e-10)
    assert ours.odds_ratio == pytest.approx(float(table.oddsratio_pooled), rel=1e-12)
    low, high = table.oddsratio_pooled_confint(alpha=0.05)
    assert (ours.or_ci_low, ours.or_ci_high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))
    assert ours.only_a == sum(c[0] for c in cells) and ours.only_b == sum(c[1] for c in cells)


def test_cmh_on_one_seed_is_mcnemar_without_correction():
    s = stratum("seed 0", (9, 3, 20, 8))
    ours = mantel_haenszel_paired([s])
    sm = sm_mcnemar([[20, 9], [3, 8]], exact=False, correction=False)
    assert ours.statistic == pytest.approx(sm.statistic) and ours.p_value == pytest.approx(sm.pvalue)


def test_cmh_on_model_by_outcome_tables_is_not_the_paired_test():
    """Why the per-seed model x outcome CMH is not used: it ignores the pairing and gives another answer."""
    strata = [stratum(f"seed {i}", c) for i, c in enumerate(KNOWN[1])]
    unpaired = np.array([[[sum(s.a), len(s.a) - sum(s.a)], [sum(s.b), len(s.b) - sum(s.b)]] for s in strata],
                        dtype=float).transpose(1, 2, 0)
    wrong = StratifiedTable(unpaired).test_null_odds(correction=False).pvalue
    right = mantel_haenszel_paired(strata).p_value
    # the items both models pass (or both fail) carry no information about the difference; counted
    # as independent samples they inflate the variance: p 0.17 instead of 0.068
    assert wrong == pytest.approx(0.1664, abs=1e-4) and right == pytest.approx(0.0679, abs=1e-4)


@pytest.mark.parametrize("only_a,only_b", [(0, 0), (5, 0), (7, 2), (12, 11), (30, 14)])
def test_sign_flip_with_singleton_clusters_is_the_exact_mcnemar_test(only_a, only_b):
    s = stratum("seed 0", (only_a, only_b, 10, 5))
    pooled = pool([s])
    if only_a + only_b == 0:
        assert pooled.p_value == 1.0
        return
    sm = sm_mcnemar([[10, only_a], [only_b, 5]], exact=True)
    assert pooled.p_value == pytest.approx(sm.pvalue, rel=1e-9)
    assert pooled.p_value == pytest.approx(stats.binomtest(only_a, only_a + only_b).pvalue, rel=1e-9)
    assert not pooled.items_repeated


@pytest.mark.parametrize("d", [[2, -1, 3, 1, 0, -2, 1], [1, 1, 1, -3], [3, 3, 3, 2, 1], [-1, 2, -2, 1, 0]])
def test_sign_flip_p_value_by_brute_force(d):
    weights = [abs(x) for x in d]
    observed = abs(sum(d))
    hits = sum(abs(sum(e * w for e, w in zip(signs, weights))) >= observed
               for signs in itertools.product((1, -1), repeat=len(d)))
    assert sign_flip_p_value(d) == pytest.approx(hits / 2 ** len(d), rel=1e-12)


def test_pool_on_disjoint_items_is_the_exact_pooled_mcnemar():
    """Each seed on its own test items (no key shared): the clustered test is exact McNemar on the
    pooled discordant counts, the exact form of the CMH test over seeds."""
    strata = [stratum(f"seed {i}", c) for i, c in enumerate(KNOWN[1])]
    pooled = pool(strata)
    b, c = pooled.only_a, pooled.only_b
    assert (b, c) == (20, 10)
    assert pooled.p_value == pytest.approx(stats.binomtest(b, b + c).pvalue, rel=1e-9)
    assert pooled.n_items == pooled.n_pairs == 120
    assert pooled.difference == pytest.approx((b - c) / 120)
    assert pooled.ci_low < pooled.difference < pooled.ci_high
    assert [r.difference for r in pooled.strata] == pytest.approx([6 / 40, 5 / 40, -1 / 40])
    assert (pooled.positive, pooled.negative, pooled.zero, pooled.agree) == (2, 1, 0, 2)


def test_pool_clusters_items_shared_by_seeds():
    """The same 40 items in 3 seeds, each discordant item favouring the same model in every seed:
    3 x the pairs but the evidence of 12 clusters, not 36 independent pairs."""
    s = [stratum(f"seed {i}", (9, 3, 20, 8), prefix="item") for i in range(3)]
    pooled = pool(s)
    assert pooled.items_repeated and pooled.n_items == 40 and pooled.n_pairs == 120
    # clusters: 9 with d = +3, 3 with d = -3: the sign-flip test is the binomial test on 9 vs 3
    assert pooled.p_value == pytest.approx(stats.binomtest(9, 12).pvalue, rel=1e-9)
    assert pooled.cmh.p_value < pooled.p_value  # CMH counts 27 vs 9 independent pairs: too confident
    assert pooled.difference == pytest.approx(6 / 40)


def test_clustered_test_holds_its_level_where_cmh_does_not():
    """Simulated: 40 items shared by 3 seeds, item effects that favour a or b consistently but
    average to no difference. The CMH test over (seed, item) pairs rejects far more than 5%, the
    clustered test about 5% or less."""
    rng = np.random.default_rng(7)
    items, seeds, reps = 40, 3, 400
    reject_cmh = reject_clustered = 0
    for _ in range(reps):
        # per item: probability that a (resp. b) passes, with b's a sign-symmetric shift of a's
        base = rng.uniform(0.2, 0.8, items)
        shift = rng.choice([-0.6, 0.0, 0.6], items)
        pa, pb = np.clip(base + shift / 2, 0, 1), np.clip(base - shift / 2, 0, 1)
        strata = [Stratum(f"s{s}", [f"i{k}" for k in range(items)], list(rng.random(items) < pa),
                          list(rng.random(items) < pb)) for s in range(seeds)]
        reject_cmh += mantel_haenszel_paired(strata).p_value < 0.05
        reject_clustered += sign_flip_p_value(_d(strata)) < 0.05
    assert reject_cmh / reps > 0.12  # 15% here
    assert reject_clustered / reps < 0.07  # 4% here


def _d(strata):
    d = {}
    for s in strata:
        for k, x, y in s.pairs():
            d[k] = d.get(k, 0) + int(x) - int(y)
    return list(d.values())


def test_none_outcomes_are_dropped_pairwise_and_bad_input_refused():
    s = Stratum("seed 0", ["x", "y", "z"], [True, None, False], [False, True, None])
    pooled = pool([s])
    assert pooled.n_pairs == 1 and pooled.only_a == 1
    with pytest.raises(ValueError, match="differ in length"):
        Stratum("bad", ["x"], [True, False], [True, False])
    with pytest.raises(ValueError, match="appears twice"):
        Stratum("bad", ["x", "x"], [True, False], [True, False])
    with pytest.raises(ValueError, match="distinct"):
        pool([s, s])
    with pytest.raises(ValueError, match="no strata"):
        pool([])


def test_tango_interval_matches_the_published_value():
    """Cavo et al. 2012 (Fagerland, Lydersen and Laake, Statistical Analysis of Contingency Tables,
    ch. 8; R contingencytables): 6 vs 16 discordant of 161 pairs, Tango 95% CI -0.1240 to -0.0054."""
    low, high = tango_interval(6, 16, 161)
    assert (round(low, 4), round(high, 4)) == (-0.1240, -0.0054)
    z = stats.norm.ppf(0.975)
    assert tango_score(low, 6, 16, 161) == pytest.approx(z, abs=1e-6)
    assert tango_score(high, 6, 16, 161) == pytest.approx(-z, abs=1e-6)


def test_tango_interval_without_discordant_pairs_is_not_degenerate():
    """16 pairs that all agree leave +-z^2/(n+z^2) = +-19 points open (a bootstrap would give [0, 0])."""
    z2 = stats.norm.ppf(0.975) ** 2
    assert tango_interval(0, 0, 16) == (pytest.approx(-z2 / (16 + z2)), pytest.approx(z2 / (16 + z2)))
    assert tango_interval(20, 0, 20)[1] == 1.0 and tango_interval(0, 20, 20)[0] == -1.0


def test_tango_interval_covers_about_95_percent():
    rng = np.random.default_rng(3)
    n, p_a, p_b, reps = 40, 0.15, 0.05, 1500
    counts = rng.multinomial(n, [p_a, p_b, 1 - p_a - p_b], size=reps)
    hits = sum(lo <= p_a - p_b <= hi for lo, hi in (tango_interval(b, c, n) for b, c, _ in counts))
    assert 0.93 <= hits / reps <= 0.975


def test_seeds_that_repeat_each_other_add_no_information():
    """Three identical seeds: the design effect is 3, and interval and p-value are one seed's."""
    one = pool([stratum("seed 0", (9, 3, 20, 8), prefix="item")])
    three = pool([stratum(f"seed {i}", (9, 3, 20, 8), prefix="item") for i in range(3)])
    assert three.design_effect == pytest.approx(3.0)
    assert (three.ci_low, three.ci_high) == (pytest.approx(one.ci_low), pytest.approx(one.ci_high))
    assert three.p_value == pytest.approx(one.p_value)
    assert three.difference == pytest.approx(one.difference)
    # seeds on disjoint items are independent evidence: no inflation, a narrower interval
    disjoint = pool([stratum(f"seed {i}", (9, 3, 20, 8)) for i in range(3)])
    assert disjoint.design_effect == 1.0 and disjoint.ci_high - disjoint.ci_low < one.ci_high - one.ci_low
    assert design_effect(np.array([0, 0]), np.array([1, 1]), 0) == 1.0
