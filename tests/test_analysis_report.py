"""analysis (scores -> results) and report (results -> md/html/png) on synthetic responses.

Four models answer the same 36 items with the same correct answer text; only the ending differs:
base always runs on into a new "Instruction:", sft ends with END on every other item, dpo and
dpo_only always end with END (and are identical, so nothing may separate them).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from itertools import combinations

import pytest

from cai_bootstrap.evaluation import analysis as A
from cai_bootstrap.evaluation import report as R
from cai_bootstrap.evaluation.criteria import CRITERIA
from cai_bootstrap.evaluation.statistics import benjamini_hochberg, compare_pair, summarize, wilson_interval
from cai_bootstrap.formats import cut_response, prompt_for
from cai_bootstrap.schemas import EvalResponse, InstructionRecord

MODELS = ["base", "sft", "dpo", "dpo_only"]
N_RESAMPLES = 2000

# (instruction, category, references, constraints, a correct answer)
TEMPLATES = [
    ("What is the capital of France?", "qa", ["Paris"], [], "Paris is the capital of France."),
    ("How many legs does a spider have?", "qa", ["eight", "8"], [], "A spider has eight legs."),
    ("Complete the sentence: The sun rises in the", "completion", [], [], "east every morning."),
    ("Name three primary colours in lowercase.", "constrained", [], [{"type": "change_case:english_lowercase"}],
     "red, blue and yellow are the primary colours."),
    ("Describe the ocean in at most twenty words.", "constrained", [], [{"type": "length_constraints:number_words", "relation": "less than", "num_words": 21}],
     "The ocean is vast, deep and salty, full of waves and marine life."),
    ("Rewrite in the past tense: I walk to the park.", "transformation", [], [], "I walked to the park."),
    ("List two fruits as a bulleted list.", "format", [], [{"type": "detectable_format:number_bullet_lists", "num_bullets": 2}],
     "- apple\n- pear"),
    ("Write a short note about why sleep matters.", "open", [], [],
     "Sleep matters because it restores the body and helps memory, mood and focus."),
    ("What is the largest planet in the solar system?", "qa", ["Jupiter"], [],
     "Jupiter is the largest planet in the solar system."),
]
N_ITEMS = 36


def make_items(n: int = N_ITEMS) -> list[InstructionRecord]:
    items = []
    for i in range(n):
        instruction, category, refs, cons, _ = TEMPLATES[i % len(TEMPLATES)]
        items.append(InstructionRecord(id=f"t{i:03d}", instruction=instruction, category=category,
                                       source="builtin", reference_answers=refs, constraints=cons))
    return items


def answer_of(item: InstructionRecord) -> str:
    return next(t[4] for t in TEMPLATES if t[0] == item.instruction)


def respond(item: InstructionRecord, model: str, ends: bool, text: str | None = None) -> EvalResponse:
    body = answer_of(item) if text is None else text
    raw = f" {body}\nEND" if ends else f" {body}\nInstruction: Tell me another thing.\nResponse: Sure"
    cut = cut_response(raw)
    return EvalResponse(id=item.id, model=model, prompt=prompt_for(item.instruction), raw_text=raw,
                        response=cut.response, stop_string=cut.marker, finish_reason="stop",
                        prompt_tokens=12, completion_tokens=20, max_new_tokens=64)


def make_responses(items, planted: bool = True) -> dict[str, list[EvalResponse]]:
    """base never ends with END; sft on every other item; dpo/dpo_only always (if planted)."""
    return {
        "base": [respond(it, "base", False) for it in items],
        "sft": [respond(it, "sft", i % 2 == 0) for i, it in enumerate(items)],
        "dpo": [respond(it, "dpo", planted) for it in items],
        "dpo_only": [respond(it, "dpo_only", planted) for it in items],
    }


@pytest.fixture(scope="module")
def items():
    return make_items()


@pytest.fixture(scope="module")
def scores(items):
    return A.score_all(items, make_responses(items))


@pytest.fixture(scope="module")
def results(items, scores):
    return A.analyze(items, scores, models=MODELS, n_resamples=N_RESAMPLES, seed=0)


def outcome(scores, model, criterion):
    return [s.criteria[criterion] for s in scores if s.model == model]


# --------------------------------------------------------------------------------------------
# score_all
# --------------------------------------------------------------------------------------------


def test_score_all_scores_every_model_and_item(items, scores):
    assert len(scores) == len(MODELS) * len(items)
    assert [s.id for s in scores if s.model == "dpo"] == [i.id for i in items]
    assert all(set(s.criteria) == set(CRITERIA) for s in scores)
    # The planted difference is visible in the raw scores.
    assert not any(outcome(scores, "base", "ends_with_end"))
    assert all(outcome(scores, "dpo", "ends_with_end"))
    # factually_correct applies only to items with references; checks only to constrained ones.
    for s, item in zip([s for s in scores if s.model == "base"], items):
        assert (s.criteria["factually_correct"] is None) == (not item.reference_answers)
        assert (s.checks_strict is None) == (not item.constraints)


def test_score_all_rejects_missing_extra_duplicate_and_mislabelled(items):
    responses = make_responses(items)
    missing = dict(responses, sft=responses["sft"][:-1])
    with pytest.raises(ValueError, match=r"'sft'.*no response for 1 test item.*t035"):
        A.score_all(items, missing)

    stray = respond(items[0], "dpo", True).model_copy(update={"id": "not-a-test-item"})
    with pytest.raises(ValueError, match=r"'dpo'.*not in the test set.*not-a-test-item"):
        A.score_all(items, dict(responses, dpo=responses["dpo"] + [stray]))

    with pytest.raises(ValueError, match="duplicate"):
        A.score_all(items, dict(responses, base=responses["base"] + [responses["base"][0]]))

    with pytest.raises(ValueError, match="labelled"):
        A.score_all(items, dict(responses, sft=responses["dpo"]))


def test_analyze_rejects_missing_scores(items, scores):
    with pytest.raises(ValueError, match=r"'sft'.*no score"):
        A.analyze(items, [s for s in scores if s.model != "sft" or s.id != "t000"], models=MODELS,
                  n_resamples=100)
    with pytest.raises(ValueError, match="extra_model"):
        A.analyze(items, scores, models=[*MODELS, "extra_model"], n_resamples=100)


# --------------------------------------------------------------------------------------------
# analyze: rates, comparisons, power
# --------------------------------------------------------------------------------------------


def test_rates_match_statistics(items, scores, results):
    assert results["models"] == MODELS
    assert set(results["criteria"]) == {*CRITERIA, "ifeval_strict", "ifeval_loose", "all_criteria"}
    n = len(items)
    base_end = results["rates"]["base"]["ends_with_end"]
    dpo_end = results["rates"]["dpo"]["ends_with_end"]
    sft_end = results["rates"]["sft"]["ends_with_end"]
    assert (base_end["n"], base_end["k"], base_end["rate"]) == (n, 0, 0.0)
    assert (dpo_end["n"], dpo_end["k"], dpo_end["rate"]) == (n, n, 1.0)
    assert (sft_end["k"], sft_end["rate"]) == (n // 2, 0.5)
    assert (sft_end["ci_low"], sft_end["ci_high"]) == pytest.approx(wilson_interval(n // 2, n))
    for model in MODELS:
        for criterion in CRITERIA:
            assert results["rates"][model][criterion] == asdict(summarize(outcome(scores, model, criterion)))
    # None-applicability: factually_correct only on the items with references.
    n_refs = sum(bool(i.reference_answers) for i in items)
    assert 0 < n_refs < n
    assert results["rates"]["base"]["factually_correct"]["n"] == n_refs
    n_cons = sum(bool(i.constraints) for i in items)
    assert results["rates"]["dpo"]["ifeval_strict"]["n"] == n_cons


def test_all_criteria_is_every_applicable_criterion(items, scores, results):
    for model in MODELS:
        expected = [
            all(v for v in [*s.criteria.values(), s.checks_loose] if v is not None)
            for s in scores if s.model == model
        ]
        assert results["rates"][model]["all_criteria"] == asdict(summarize(expected))
    # base fails everywhere (no END), dpo's answers are good: the composite separates them.
    assert results["rates"]["base"]["all_criteria"]["rate"] == 0.0
    assert results["rates"]["dpo"]["all_criteria"]["rate"] > 0.8


def test_categories_break_rates_down(items, results):
    cats = results["categories"]
    assert sum(c["n_items"] for c in cats.values()) == len(items)
    assert cats["qa"]["n_items"] == sum(i.category == "qa" for i in items)
    assert cats["qa"]["rates"]["dpo"]["ends_with_end"]["k"] == cats["qa"]["n_items"]
    assert cats["qa"]["rates"]["base"]["ends_with_end"]["k"] == 0
    assert cats["completion"]["rates"]["sft"]["factually_correct"]["n"] == 0


def test_every_pair_and_criterion_is_compared_and_adjusted(scores, results):
    comps = results["comparisons"]
    criteria = results["criteria"]
    assert len(comps) == 6 * len(criteria)
    pairs = {(c["criterion"], frozenset((c["a"], c["b"]))) for c in comps}
    assert pairs == {(cr, frozenset(p)) for cr in criteria for p in combinations(MODELS, 2)}
    assert results["multiple_testing"]["n_tests"] == len(comps)
    for c in comps:
        assert c["p_adjusted"] >= c["p_value"] - 1e-12
        assert c["significant"] == (c["p_adjusted"] <= 0.05)
    # One BH correction across every test of the report, not per criterion or per pair.
    adjusted, _ = benjamini_hochberg([c["p_value"] for c in comps], 0.05)
    assert [c["p_adjusted"] for c in comps] == pytest.approx(adjusted)
    # Each comparison is exactly statistics.compare_pair on the paired outcomes.
    c = next(c for c in comps if c["criterion"] == "ends_with_end" and {c["a"], c["b"]} == {"sft", "base"})
    ref = compare_pair(outcome(scores, c["a"], "ends_with_end"), outcome(scores, c["b"], "ends_with_end"),
                       seed=0, n_resamples=N_RESAMPLES)
    assert (c["difference"], c["ci_low"], c["ci_high"], c["p_value"]) == (
        ref.difference, ref.ci_low, ref.ci_high, ref.mcnemar.p_value)


def test_planted_difference_is_significant_identical_models_are_not(results):
    comps = results["comparisons"]
    dpo_base = A.find_comparison(comps, "ends_with_end", "dpo", "base")
    assert dpo_base["difference"] == 1.0 and dpo_base["significant"]
    assert dpo_base["only_a"] == results["n_items"] and dpo_base["only_b"] == 0
    same = [c for c in comps if {c["a"], c["b"]} == {"dpo", "dpo_only"}]
    assert same and all(c["p_value"] == 1.0 and not c["significant"] and c["difference"] == 0 for c in same)
    # In pipeline order the later model is "a": differences read as improvement over the earlier.
    assert ("dpo", "base") in {(c["a"], c["b"]) for c in comps}


def test_power_note(items, results):
    power = results["power"]
    for criterion in results["criteria"]:
        p = power["criteria"][criterion]
        assert 0 < p["mdd"] <= p["mdd_bonferroni"] <= 1
    assert power["criteria"]["ends_with_end"]["n"] == len(items)
    assert power["criteria"]["factually_correct"]["n"] == sum(bool(i.reference_answers) for i in items)
    assert str(power["n_tests"]) in power["note"]


def test_results_round_trip_through_json(results):
    text = json.dumps(results, allow_nan=False)
    assert json.loads(text) == results


# --------------------------------------------------------------------------------------------
# The verdict
# --------------------------------------------------------------------------------------------


def test_verdict_ready_with_planted_effect_and_flips_without(items, results):
    v = results["verdict"]
    assert v["verdict"] == "ready", v["reasons"]
    assert "dpo" in v["rule"] and "base" in v["rule"] and "Benjamini-Hochberg" in v["rule"]
    assert v["guards"] == ["base", "sft"]
    assert any("significantly better" in r and "ends_with_end" in r for r in v["reasons"])

    flat = A.score_all(items, make_responses(items, planted=False))
    v2 = A.analyze(items, flat, models=MODELS, n_resamples=N_RESAMPLES)["verdict"]
    assert v2["verdict"] == "not ready"
    # dpo is now significantly worse than sft (sft ends with END on half the items).
    assert any("significantly worse" in r and "sft" in r for r in v2["reasons"])


def _comp(criterion, a, b, diff, significant):
    return {"criterion": criterion, "a": a, "b": b, "n": 50, "rate_a": 0.5 + diff / 2,
            "rate_b": 0.5 - diff / 2, "difference": diff, "ci_low": diff - 0.1, "ci_high": diff + 0.1,
            "only_a": 5, "only_b": 1, "cohens_h": diff, "p_value": 0.01 if significant else 0.4,
            "p_adjusted": 0.02 if significant else 0.5, "significant": significant}


@pytest.mark.parametrize(
    "lead_significant, sft_regression, expected",
    [(True, False, "ready"), (False, False, "inconclusive"), (True, True, "not ready")],
)
def test_verdict_rule_outcomes(lead_significant, sft_regression, expected):
    models = ["base", "sft", "dpo"]
    comps = []
    for criterion in A.REPORT_CRITERIA:
        key = criterion in A.KEY_CRITERIA
        comps.append(_comp(criterion, "dpo", "base", 0.3 if key else 0.0, key and (lead_significant or criterion != "all_criteria")))
        worse = sft_regression and criterion == "coherent"
        comps.append(_comp(criterion, "dpo", "sft", -0.3 if worse else 0.0, worse))
        comps.append(_comp(criterion, "sft", "base", 0.0, False))
    v = A.verdict(comps, models, q=0.05)
    assert v["verdict"] == expected, v["reasons"]


def test_verdict_not_evaluated_without_candidate(items, scores):
    v = A.analyze(items, scores, models=["base", "sft"], n_resamples=100)["verdict"]
    assert v["verdict"] == "not evaluated"


# --------------------------------------------------------------------------------------------
# Judge scores stay separate
# --------------------------------------------------------------------------------------------


def test_judge_scores_are_a_separate_section(items, scores, results):
    assert results["judge"] is None
    judged = [s.model_copy(update={"judge": {"helpfulness": 4.0 if s.model == "dpo" else 2.0}}) for s in scores]
    r = A.analyze(items, judged, models=MODELS, n_resamples=100)
    assert r["judge"]["means"]["dpo"]["helpfulness"] == {"n": len(items), "mean": 4.0, "sd": 0.0}
    assert r["judge"]["means"]["base"]["helpfulness"]["mean"] == 2.0
    assert "helpfulness" not in r["criteria"] and "helpfulness" not in r["rates"]["dpo"]
    assert all(c["criterion"] != "helpfulness" for c in r["comparisons"])


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------

EVIL = '<script>alert("x")</script> & done'


@pytest.fixture(scope="module")
def written(tmp_path_factory, items, results):
    samples = A.select_samples(items, make_responses(items), n=4)
    samples[0]["responses"]["dpo"] = EVIL
    baseline = {"forms": {"zero_shot": {"ends_with_end": 0.0, "coherent": 0.9},
                          "few_shot": {"ends_with_end": 0.4, "coherent": 0.85}},
                "n_probes": 20, "sentinels": {"capital_of_france": True}}
    summaries = {"sft-data": {"kept": 180, "dropped": {"no_end": 12, "refusal": 3}, "metrics": {}},
                 "dpo": {"kept": 150, "dropped": {}, "metrics": {"train_loss": 0.41, "rewards/accuracies": 0.93}}}
    provenance = {"config_hash": "ab" * 32, "versions": {"torch": "2.13.0"}, "url": "http://example.org/x",
                  "note": "a | b\nc <b>bold</b>"}
    out = tmp_path_factory.mktemp("report")
    paths = R.write_report(results, out_dir=out, samples=samples, baseline=baseline,
                           summaries=summaries, provenance=provenance)
    return paths


def test_write_report_writes_every_file(written):
    assert {"markdown", "html", "pass_rates", "categories", "deltas"} <= set(written)
    for key in ("pass_rates", "categories", "deltas"):
        data = written[key].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_html_is_self_contained_and_escaped(written):
    page = written["html"].read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == 3
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page, re.IGNORECASE)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; done" in page
    assert "http://example.org/x" in page  # provenance text shown, never linked
    assert "c &lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold" not in page
    for title in ("Headline", "Plots", "Pairwise comparisons", "Power", "Per category",
                  "Capability baseline", "Data and training", "Sample responses", "Provenance"):
        assert f">{title}</h2>" in page
    order = [page.index(f">{t}</h2>") for t in ("Headline", "Plots", "Pairwise comparisons", "Power",
                                                "Per category", "Sample responses", "Provenance")]
    assert order == sorted(order)


def test_markdown_has_headline_table_and_verdict(written, results):
    md = written["markdown"].read_text(encoding="utf-8")
    assert "**Verdict: READY**" in md
    assert results["verdict"]["rule"].split(";")[0] in md
    header = next(line for line in md.splitlines() if line.startswith("| criterion | n |"))
    assert all(f" {m} " in header for m in MODELS)
    table = R.headline_table(results)
    assert table in md
    rows = table.splitlines()
    assert len(rows) == 2 + len(results["criteria"])
    # Markdown tables are well formed: every row of every table has its header's column count.
    for block in re.findall(r"(?:^\|.*\|$\n?)+", md, re.MULTILINE):
        counts = {len(re.findall(r"(?<!\\)\|", line)) for line in block.strip().splitlines()}
        assert len(counts) == 1, block[:200]
    assert "a \\| b<br>c &lt;b>bold&lt;/b>" in md  # a cell with a pipe, a newline and a tag
    # The planted script is inside a fenced code block, never loose Markdown/HTML.
    before = md[: md.index("<script>")]
    assert before.count("```") % 2 == 1
    for png in ("pass_rates.png", "categories.png", "deltas.png"):
        assert f"]({png})" in md


def test_headline_table_marks_best_model(results):
    table = R.headline_table(results)
    row = next(line for line in table.splitlines() if line.startswith("| ends_with_end "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "0% [0–10]"  # base, not bold
    assert cells[4].startswith("**100% [") and cells[5].startswith("**100% [")  # dpo, dpo_only tied best
    same = next(line for line in table.splitlines() if line.startswith("| proper_structure "))
    assert "**" not in same  # every model equal: nobody is "best"


def test_report_plots_training_curves_from_training_json_histories(tmp_path, results):
    sft = {"history": [{"step": s, "loss": 3.0 / s, "lr": 1e-3, "tokens_per_s": 150.0} for s in (1, 2, 3)],
           "eval_history": [{"step": 2, "eval_loss": 1.9}], "eval_loss": 1.2}
    dpo = {"history": [{"step": s, "loss": 0.7 - 0.1 * s, "rewards/accuracies": 0.5 + 0.1 * s,
                        "rewards/margins": 0.2 * s} for s in (1, 2)]}
    paths = R.write_report(results, out_dir=tmp_path, curves={"sft": sft, "dpo": dpo, "dpo_only": dpo})
    assert paths["training_curves"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](training_curves.png)" in paths["markdown"].read_text(encoding="utf-8")
    # no history recorded (e.g. a report rebuilt before any training): no empty figure
    assert R.plot_training_curves({"sft": {"history": []}}) is None
    assert "training_curves" not in R.write_report(results, out_dir=tmp_path / "none", curves={})
