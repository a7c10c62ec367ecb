"""The research questions' answers: every outcome of the rule, the composites, the primary family."""

from __future__ import annotations

import pytest

from cai_bootstrap.evaluation import questions as Q
from cai_bootstrap.evaluation.statistics import adjust_all, compare_pair, min_detectable_difference


def paired(only_a: int, only_b: int, both: int, neither: int) -> tuple[list[bool], list[bool]]:
    a = [True] * only_a + [False] * only_b + [True] * both + [False] * neither
    b = [False] * only_a + [True] * only_b + [True] * both + [False] * neither
    return a, b


def comparison(only_a: int, only_b: int, both: int, neither: int, m: int = 1) -> dict:
    """A comparison dict as analysis writes it, BH-adjusted in a family of m identical tests."""
    c = adjust_all([compare_pair(*paired(only_a, only_b, both, neither))] * m)[0]
    return {"n": c.n, "rate_a": c.rate_a, "rate_b": c.rate_b, "difference": c.difference, "ci_low": c.ci_low,
            "ci_high": c.ci_high, "discordant_rate": c.discordant_rate, "p_adjusted": c.p_adjusted,
            "significant": c.significant}


def test_questions_are_fixed():
    assert [(q.id, q.a, q.b) for q in Q.QUESTIONS] == [
        ("Q1", "sft", "base_fewshot"), ("Q2", "dpo", "sft"), ("Q3", "dpo", "dpo_only")]
    assert set(Q.ASPECTS) == {"format", "content"}


def test_content_composite_never_looks_at_end_or_stopping():
    assert set(Q.FORMAT_PARTS) == {"ends_with_end", "no_rambling"}
    assert not set(Q.CONTENT_PARTS) & set(Q.FORMAT_PARTS)
    assert Q.CONSTRAINTS_VERDICT in Q.CONTENT_PARTS


def test_composite_needs_every_applicable_part():
    row = {"a": True, "b": None, "c": True}
    assert Q.composite(row, ("a", "b", "c")) is True
    assert Q.composite({**row, "c": False}, ("a", "b", "c")) is False
    assert Q.composite({"b": None}, ("b",)) is None  # nothing applies
    with pytest.raises(KeyError, match="lacks"):
        Q.composite(row, ("a", "missing"))


def test_better():
    a = Q.decide(comparison(only_a=30, only_b=2, both=40, neither=28), margin=0.10, alpha=0.05)
    assert a["answer"] == "better" and "p_BH" in a["explanation"]


def test_worse():
    a = Q.decide(comparison(only_a=2, only_b=30, both=40, neither=28), margin=0.10, alpha=0.05)
    assert a["answer"] == "worse"
    assert not a["non_inferior"]


def test_equivalent_when_the_interval_lies_inside_the_margin():
    # 400 items, 6 vs 5 discordant: difference 0.25 points, interval about ±2 points.
    c = comparison(only_a=6, only_b=5, both=300, neither=89)
    assert -0.10 < c["ci_low"] and c["ci_high"] < 0.10 and not c["significant"]
    a = Q.decide(c, margin=0.10, alpha=0.05)
    assert a["answer"] == "equivalent" and "inside ±10" in a["explanation"]
    assert a["non_inferior"] and not a["underpowered"]
    # the same data with a margin narrower than the interval cannot tell
    assert Q.decide(c, margin=0.01, alpha=0.05)["answer"] == "cannot tell"


def test_cannot_tell_says_what_could_have_been_detected():
    # 40 items, 7 vs 4 discordant: not significant, interval far beyond ±10 points.
    c = comparison(only_a=7, only_b=4, both=20, neither=9)
    a = Q.decide(c, margin=0.10, alpha=0.05 / 6)
    assert a["answer"] == "cannot tell"
    expected = min_detectable_difference(40, alpha=0.05 / 6, power=0.8, discordant_rate=11 / 40)
    assert a["mdd"]["observed"] == pytest.approx(expected)
    assert a["mdd"]["worst_case"] == pytest.approx(min_detectable_difference(40, alpha=0.05 / 6, power=0.8))
    assert a["underpowered"]
    assert f"{100 * expected:.0f} points" in a["explanation"]
    assert "not significant" in a["explanation"]  # never presented as "no difference"


def test_few_discordant_items_do_not_make_a_question_powered():
    # 40 items, 1 vs 0 discordant (the demo's Q2 format): at 2.5% discordance the detectable
    # difference is below the margin, but the interval reaches beyond it: the data cannot tell,
    # so the question is not reported as powered.
    c = comparison(only_a=1, only_b=0, both=39, neither=0)
    a = Q.decide(c, margin=0.10, alpha=0.05 / 6)
    assert a["mdd"]["observed"] < 0.10 and c["ci_high"] > 0.10
    assert a["answer"] == "cannot tell" and a["underpowered"]
    # ten times the items, the same share of disagreements: equivalent, and powered
    big = Q.decide(comparison(only_a=6, only_b=4, both=390, neither=0), margin=0.10, alpha=0.05 / 6)
    assert big["answer"] == "equivalent" and not big["underpowered"]


def test_cannot_tell_notes_non_inferiority_when_the_interval_rules_out_harm():
    # 400 items, ahead by 2.5 points, not significant; the interval (about -0.4 to +5.4 points)
    # reaches beyond +5 but not below -5: not worse by more than a 5-point margin.
    c = comparison(only_a=22, only_b=12, both=250, neither=116)
    assert not c["significant"] and -0.05 < c["ci_low"] < 0 and c["ci_high"] > 0.05
    a = Q.decide(c, margin=0.05, alpha=0.05)
    assert a["answer"] == "cannot tell" and a["non_inferior"]
    assert "rule out being worse by more than 5 points" in a["explanation"]


def test_significant_but_small_is_better_with_a_note():
    # 2,000 items, a 3-point lead: significant, and the whole interval inside ±10.
    c = comparison(only_a=100, only_b=40, both=1200, neither=660)
    a = Q.decide(c, margin=0.10, alpha=0.05)
    assert a["answer"] == "better" and "small" in a["explanation"]


def test_significant_in_the_test_but_interval_across_zero_is_not_better():
    c = {"n": 30, "rate_a": 0.6, "rate_b": 0.5, "difference": 0.1, "ci_low": -0.01, "ci_high": 0.2,
         "discordant_rate": 0.3, "p_adjusted": 0.04, "significant": True}
    assert Q.decide(c, margin=0.10, alpha=0.05)["answer"] == "cannot tell"


def test_no_items_cannot_tell():
    c = comparison(0, 0, 0, 0)
    a = Q.decide(c, margin=0.10, alpha=0.05)
    assert a["answer"] == "cannot tell" and a["mdd"]["observed"] == 1.0


def test_bad_margin():
    with pytest.raises(ValueError, match="margin"):
        Q.decide(comparison(3, 1, 5, 5), margin=0.0, alpha=0.05)


def test_family_alpha():
    assert Q.family_alpha(0.05, 6) == pytest.approx(0.05 / 6)
    assert Q.family_alpha(0.05, 0) == 0.05
