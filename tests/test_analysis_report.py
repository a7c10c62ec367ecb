"""analysis (scores -> results) and report (results -> md/html/png) on synthetic responses.

Five models answer the same 36 items. Format (END) and content are planted apart:

- base: the correct answer, then runs on into a new "Instruction:" (content right, format wrong);
- base_fewshot: the correct answer, ends with END on every third item;
- sft: the correct answer, ends with END on every other item;
- dpo: the correct answer, always ends with END;
- dpo_only: always ends with END, but hands the instruction back on every other item.

So Q2 (dpo vs sft) is better on format and equivalent on content (identical answers), Q3 (dpo vs
dpo_only) equivalent on format and better on content.
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
from cai_bootstrap.evaluation.questions import CONTENT_PARTS, FORMAT_PARTS, composite
from cai_bootstrap.evaluation.statistics import benjamini_hochberg, compare_pair, summarize, wilson_interval
from cai_bootstrap.formats import cut_response, prompt_for
from cai_bootstrap.schemas import EvalResponse, InstructionRecord

MODELS = ["base", "base_fewshot", "sft", "dpo", "dpo_only"]

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


def make_responses(items) -> dict[str, list[EvalResponse]]:
    """See the module docstring."""
    return {
        "base": [respond(it, "base", False) for it in items],
        "base_fewshot": [respond(it, "base_fewshot", i % 3 == 0) for i, it in enumerate(items)],
        "sft": [respond(it, "sft", i % 2 == 0) for i, it in enumerate(items)],
        "dpo": [respond(it, "dpo", True) for it in items],
        "dpo_only": [respond(it, "dpo_only", True, it.instruction if i % 2 else None) for i, it in enumerate(items)],
    }


@pytest.fixture(scope="module")
def items():
    return make_items()


@pytest.fixture(scope="module")
def scores(items):
    return A.score_all(items, make_responses(items))


TEST_SET = {"split_by": "template", "test_templates": ["qa-capital", "tr-past-tense"], "shared_templates": 0}
NOTES = {"Q2": ["Both DPO runs saw 64 pairs: a budget note."]}


@pytest.fixture(scope="module")
def results(items, scores):
    return A.analyze(items, scores, models=MODELS, test_set=TEST_SET, question_notes=NOTES)


def outcome(scores, model, criterion):
    return [s.criteria[criterion] for s in scores if s.model == model]


# --------------------------------------------------------------------------------------------
# score_all
# --------------------------------------------------------------------------------------------


def test_score_all_scores_every_model_and_item(items, scores):
    assert len(scores) == len(MODELS) * len(items)
    assert [s.id for s in scores if s.model == "dpo"] == [i.id for i in items]
    assert all(set(s.criteria) == set(CRITERIA) for s in scores)
    assert not any(outcome(scores, "base", "ends_with_end"))
    assert all(outcome(scores, "dpo", "ends_with_end"))
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
        A.analyze(items, [s for s in scores if s.model != "sft" or s.id != "t000"], models=MODELS)
    with pytest.raises(ValueError, match="extra_model"):
        A.analyze(items, scores, models=[*MODELS, "extra_model"])


# --------------------------------------------------------------------------------------------
# Rates and the two composites
# --------------------------------------------------------------------------------------------


def test_rates_match_statistics(items, scores, results):
    assert results["models"] == MODELS
    assert results["criteria"] == ["format", "content", *CRITERIA, "ifeval_strict", "ifeval_loose"]
    n = len(items)
    sft_end = results["rates"]["sft"]["ends_with_end"]
    assert (sft_end["k"], sft_end["rate"]) == (n // 2, 0.5)
    assert (sft_end["ci_low"], sft_end["ci_high"]) == pytest.approx(wilson_interval(n // 2, n))
    for model in MODELS:
        for criterion in CRITERIA:
            assert results["rates"][model][criterion] == asdict(summarize(outcome(scores, model, criterion)))
    n_refs = sum(bool(i.reference_answers) for i in items)
    assert 0 < n_refs < n
    assert results["rates"]["base"]["factually_correct"]["n"] == n_refs
    assert results["rates"]["dpo"]["ifeval_strict"]["n"] == sum(bool(i.constraints) for i in items)


def test_composites_are_their_parts(scores, results):
    for model in MODELS:
        rows = [A.outcome_row(s) for s in scores if s.model == model]
        for aspect, parts in (("format", FORMAT_PARTS), ("content", CONTENT_PARTS)):
            assert results["rates"][model][aspect] == asdict(summarize([composite(r, parts) for r in rows]))


def test_content_does_not_depend_on_end(results):
    # base never writes END but answers correctly: it fails format everywhere and passes content.
    assert results["rates"]["base"]["format"]["rate"] == 0.0
    assert results["rates"]["base"]["content"]["rate"] == 1.0
    assert results["rates"]["dpo"]["content"]["rate"] == 1.0
    assert results["rates"]["dpo_only"]["content"]["rate"] == 0.5  # hands the instruction back on half


def test_categories_break_rates_down(items, results):
    cats = results["categories"]
    assert sum(c["n_items"] for c in cats.values()) == len(items)
    assert cats["qa"]["rates"]["dpo"]["ends_with_end"]["k"] == cats["qa"]["n_items"]
    assert cats["completion"]["rates"]["sft"]["factually_correct"]["n"] == 0


# --------------------------------------------------------------------------------------------
# The primary family and the exploratory one
# --------------------------------------------------------------------------------------------


def test_primary_family_is_the_three_questions_on_two_aspects(results):
    family = results["primary_family"]
    assert family["n_tests"] == 6
    assert family["hypotheses"] == [
        "sft vs base_fewshot on format", "sft vs base_fewshot on content",
        "dpo vs sft on format", "dpo vs sft on content",
        "dpo vs dpo_only on format", "dpo vs dpo_only on content"]
    primary = [a for q in results["questions"] for a in q["aspects"].values()]
    assert len(primary) == 6 and all(a["family"] == "primary" for a in primary)
    # Benjamini-Hochberg within these six only
    adjusted, _ = benjamini_hochberg([a["p_value"] for a in primary], 0.05)
    assert [a["p_adjusted"] for a in primary] == pytest.approx(adjusted)


def test_exploratory_family_is_everything_else_with_its_own_correction(scores, results):
    ex = results["exploratory"]["comparisons"]
    n_pairs = len(list(combinations(MODELS, 2)))
    assert len(ex) == n_pairs * len(results["criteria"]) - 6
    keys = {(c["criterion"], frozenset((c["a"], c["b"]))) for c in ex}
    assert ("format", frozenset(("dpo", "sft"))) not in keys  # a question's comparison is never repeated here
    assert ("ends_with_end", frozenset(("dpo", "sft"))) in keys  # its single criteria are exploratory
    adjusted, _ = benjamini_hochberg([c["p_value"] for c in ex], 0.05)
    assert [c["p_adjusted"] for c in ex] == pytest.approx(adjusted)
    assert results["exploratory"]["n_significant"] == sum(c["significant"] for c in ex)
    # each comparison is statistics.compare_pair on the paired outcomes
    c = next(c for c in ex if c["criterion"] == "ends_with_end" and {c["a"], c["b"]} == {"sft", "base"})
    ref = compare_pair(outcome(scores, c["a"], "ends_with_end"), outcome(scores, c["b"], "ends_with_end"))
    assert (c["difference"], c["ci_low"], c["ci_high"], c["p_value"]) == (
        ref.difference, ref.ci_low, ref.ci_high, ref.mcnemar.p_value)


def test_find_comparison_flips_orientation(results):
    ex = results["exploratory"]["comparisons"]
    c = next(c for c in ex if c["criterion"] == "coherent" and (c["a"], c["b"]) == ("sft", "base"))
    flipped = A.find_comparison(ex, "coherent", "base", "sft")
    assert flipped["difference"] == -c["difference"]
    assert (flipped["ci_low"], flipped["ci_high"]) == (-c["ci_high"], -c["ci_low"])


# --------------------------------------------------------------------------------------------
# The answers
# --------------------------------------------------------------------------------------------


def answers(results):
    return {(q["id"], aspect): a["answer"] for q in results["questions"] for aspect, a in q["aspects"].items()}


def test_planted_effects_give_the_expected_answers(results):
    got = answers(results)
    assert got[("Q2", "format")] == "better"  # END on every item against every other item
    assert got[("Q2", "content")] == "equivalent"  # identical answers: 36 items bound the difference inside ±10
    assert got[("Q3", "format")] == "equivalent"
    assert got[("Q3", "content")] == "better"  # dpo_only hands the instruction back on half the items
    assert got[("Q1", "content")] == "equivalent"
    q1 = results["questions"][0]["aspects"]["format"]
    assert q1["answer"] == "cannot tell" and q1["underpowered"]  # 1/2 vs 1/3 ending in END on 36 items
    q2 = results["questions"][1]
    assert q2["notes"] == NOTES["Q2"]


def test_a_question_without_its_models_is_not_evaluated(items, scores):
    r = A.analyze(items, scores, models=["base", "sft", "dpo", "dpo_only"])
    q1 = r["questions"][0]
    assert not q1["evaluated"] and q1["missing"] == ["base_fewshot"] and q1["aspects"] == {}
    assert r["primary_family"]["n_tests"] == 4


def test_conclusions_say_what_the_run_can_and_cannot_tell(items, results):
    c = results["conclusions"]
    assert c["n_items"] == len(items) and c["margin"] == 0.10
    assert c["alpha"] == pytest.approx(0.05 / 6)
    q1 = next(q for q in c["questions"] if q["id"] == "Q1")
    assert q1["aspects"]["format"]["n"] == len(items)
    assert "Q1 format" in c["underpowered"]
    text = " ".join(c["statements"])
    assert "template-disjoint" in text and "2 template(s)" in text
    assert "not evidence of no difference" in text
    assert "partly a gain on the checks that selected their data" in text


def test_the_checks_that_selected_the_training_data_are_named_truly():
    """Every content part said to have chosen the training data is a content part, and its QC check
    is one sft-data and the pairs really apply."""
    from cai_bootstrap.data.sft_quality import QC_REASONS
    from cai_bootstrap.evaluation.questions import CONTENT_PARTS, SELECTED_ON

    assert set(SELECTED_ON) <= set(CONTENT_PARTS)
    assert set(SELECTED_ON.values()) <= set(QC_REASONS)


def test_in_distribution_slice_is_analysed_apart(tmp_path, items, scores):
    responses = make_responses(items)
    extra = [i.model_copy(update={"id": f"id-{i.id}"}) for i in items[:12]]
    extra_scores = A.score_all(extra, {m: [r.model_copy(update={"id": f"id-{r.id}"}) for r in rs[:12]]
                                       for m, rs in responses.items()})
    r = A.analyze(items, [*scores, *extra_scores], models=MODELS, in_distribution_items=extra)
    slice_ = r["in_distribution"]
    assert slice_["n_items"] == 12
    slice_answers = [a for q in slice_["questions"] for a in q["aspects"].values()]
    assert len(slice_answers) == 6 and all(a["family"] == "in_distribution" for a in slice_answers)
    assert r["n_items"] == len(items)  # the slice never enters the answers
    assert r["questions"] == A.analyze(items, scores, models=MODELS)["questions"]
    paths = R.write_report(r, out_dir=tmp_path)
    assert "## In-distribution slice (apart)" in paths["markdown"].read_text()


def test_results_round_trip_through_json(results):
    text = json.dumps(results, allow_nan=False)
    assert json.loads(text) == results


# --------------------------------------------------------------------------------------------
# Judge scores stay separate
# --------------------------------------------------------------------------------------------


def test_judge_scores_are_a_separate_section(items, scores, results):
    assert results["judge"] is None
    judged = [s.model_copy(update={"judge": {"helpfulness": 4.0 if s.model == "dpo" else 2.0}}) for s in scores]
    r = A.analyze(items, judged, models=MODELS)
    assert r["judge"]["means"]["dpo"]["helpfulness"] == {"n": len(items), "mean": 4.0, "sd": 0.0}
    assert r["judge"]["means"]["base"]["helpfulness"]["mean"] == 2.0
    assert "helpfulness" not in r["criteria"] and "helpfulness" not in r["rates"]["dpo"]
    assert all(c["criterion"] != "helpfulness" for c in r["exploratory"]["comparisons"])


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
    (out / "deltas.png").write_bytes(b"stale")  # a plot of an earlier report version
    paths = R.write_report(results, out_dir=out, samples=samples, baseline=baseline,
                           summaries=summaries, provenance=provenance)
    return paths


def test_write_report_writes_every_file(written):
    assert {"markdown", "html", "answers", "pass_rates", "categories"} <= set(written)
    for key in ("answers", "pass_rates", "categories"):
        data = written[key].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not (written["markdown"].parent / "deltas.png").exists()


def test_html_is_self_contained_and_escaped(written):
    page = written["html"].read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == 3
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page, re.IGNORECASE)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; done" in page
    assert "http://example.org/x" in page  # provenance text shown, never linked
    assert "c &lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold" not in page
    titles = ("Answers", "What this run can and cannot conclude", "Plots", "Pass rates",
              "Exploratory comparisons (not the questions)", "Per category", "Capability baseline",
              "Data and training", "Sample responses", "Provenance")
    for title in titles:
        assert f">{title}</h2>" in page
    order = [page.index(f">{t}</h2>") for t in titles]
    assert order == sorted(order)


def test_markdown_answers_first_with_notes_and_reading_guide(written, results):
    md = written["markdown"].read_text(encoding="utf-8")
    table = R.answers_table(results)
    assert table in md and md.index(table) < md.index("## What this run can and cannot conclude")
    rows = table.splitlines()
    assert len(rows) == 2 + 6
    assert "| Q2 Does DPO add to SFT? | dpo vs sft | format |" in md
    assert "Note: Both DPO runs saw 64 pairs: a budget note." in md
    assert "How to read an answer" in md and "never evidence of no harm" in md
    assert "Q2 format better, content equivalent" in R.answers_summary(results)
    # Markdown tables are well formed: every row of every table has its header's column count.
    for block in re.findall(r"(?:^\|.*\|$\n?)+", md, re.MULTILINE):
        counts = {len(re.findall(r"(?<!\\)\|", line)) for line in block.strip().splitlines()}
        assert len(counts) == 1, block[:200]
    assert "a \\| b<br>c &lt;b>bold&lt;/b>" in md  # a cell with a pipe, a newline and a tag
    before = md[: md.index("<script>")]
    assert before.count("```") % 2 == 1  # the planted script is inside a fenced block
    for png in ("answers.png", "pass_rates.png", "categories.png"):
        assert f"]({png})" in md


def test_rates_table_marks_best_model(results):
    table = R._md_table(R.rates_rows(results))
    row = next(line for line in table.splitlines() if line.startswith("| ends_with_end "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "0% [0–10]"  # base, not bold
    assert cells[5].startswith("**100% [") and cells[6].startswith("**100% [")  # dpo, dpo_only tied best
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


def test_report_for_a_run_without_base_fewshot(tmp_path, items, scores):
    r = A.analyze(items, scores, models=["base", "sft", "dpo", "dpo_only"])
    paths = R.write_report(r, out_dir=tmp_path)
    md = paths["markdown"].read_text()
    assert "not evaluated (no base_fewshot)" in md
