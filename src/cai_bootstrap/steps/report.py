"""`report`: scores, statistics and the report, rebuilt from saved responses without loading a model."""

from __future__ import annotations

import json
from pathlib import Path

from ..console import console
from ..evaluation import ifeval
from ..evaluation.analysis import analyze, score_all, select_samples
from ..evaluation.judge import JudgeScore
from ..evaluation.report import answers_summary, answers_table, write_report
from ..evaluation.training_summary import budget_notes, training_summary
from ..files import atomic_write_json, write_jsonl
from ..run import Run, RunStateError
from ..schemas import EvalResponse, InstructionRecord, load_jsonl
from .common import (
    BASELINE,
    DPO_DIR,
    DPO_ONLY_DIR,
    INSTRUCTIONS_REPORT,
    PAIRS_REPORT,
    REPORT_DIR,
    RESPONSES_DIR,
    RESULTS,
    SCORES,
    SFT_DIR,
    TEST,
    TEST_IN_DISTRIBUTION,
)
from .evaluate import EVALUATION, JUDGE

N_SAMPLES = 8


def load_responses(run: Run, names: list[str]) -> dict[str, list[EvalResponse]]:
    out = {}
    for name in names:
        path = run.path(f"{RESPONSES_DIR}/{name}.jsonl")
        out[name] = load_jsonl(path, EvalResponse)
        wrong = {r.model for r in out[name]} - {name}
        if wrong:
            raise ValueError(f"{path}: holds responses of {sorted(wrong)}, expected only {name!r}")
    return out


def with_judge(scores: list, run: Run) -> list:
    """Attach saved judge scores (eval/judge.jsonl) to the deterministic scores; they stay apart in analysis."""
    if not run.path(JUDGE).exists():
        return scores
    judged = {(j.model, j.id): j.judge for j in load_jsonl(run.path(JUDGE), JudgeScore, ("model", "id"))}
    return [s.model_copy(update={"judge": judged.get((s.model, s.id), {})}) for s in scores]


def step_summaries(run: Run) -> dict:
    return {name: {"status": s.get("status"), **s.get("counts", {}), "metrics": s.get("metrics", {}),
                   "duration_s": s.get("duration_s")} for name, s in run.steps().items()}


def provenance(run: Run, evaluation: dict) -> dict:
    env = next((s.get("environment") for s in run.steps().values() if s.get("environment")), {}) or {}
    return {
        "config_hash": run.manifest.get("config_hash"),
        "base_model": run.config.model.base,
        "git_commit": env.get("git_commit"),
        **{f"version.{k}": v for k, v in (env.get("versions") or {}).items() if v},
        **{f"fingerprint.{n}": i["fingerprint"] for n, i in evaluation.get("models", {}).items()},
        **{f"peak_rss_mb.{n}": i["memory"]["rss_peak_mb"] for n, i in evaluation.get("models", {}).items()},
        "isolation_verified": evaluation.get("isolation", {}).get("verified"),
        "prompt_format": evaluation.get("prompt_format"),
        **{f"prompt_form.{n}": f for n, f in evaluation.get("prompt_forms", {}).items()},
    }


def report_inputs(run: Run) -> list[str]:
    """What the report reads: the test set (and the in-distribution slice, if any) and the responses
    of the latest evaluation (else every saved one)."""
    tests = [TEST] + ([TEST_IN_DISTRIBUTION] if run.path(TEST_IN_DISTRIBUTION).exists() else [])
    evaluated = run.steps().get("evaluate")
    if evaluated is not None:
        return [*tests, *evaluated.get("outputs", {})]
    if not any(run.path(RESPONSES_DIR).glob("*.jsonl")):
        raise RunStateError(f"no responses to report on in {run.path(RESPONSES_DIR)}: "
                            f"run `{run.command('evaluate')}` first")
    return [*tests, *(f"{RESPONSES_DIR}/{p.name}" for p in sorted(run.path(RESPONSES_DIR).glob("*.jsonl")))]


def test_set_info(run: Run) -> dict | None:
    """How the test set was built (from instructions_report.json): the split and its templates."""
    path = run.path(INSTRUCTIONS_REPORT)
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    keys = ("split_by", "test_templates", "train_templates", "shared_templates", "test_template_surplus",
            "categories_without_test", "self_instruct_seeds", "in_distribution", "few_shot_near_test")
    return {k: report[k] for k in keys if k in report}


def question_notes(run: Run, evaluation: dict, test_set: dict | None,
                   training: dict | None = None) -> dict[str, list[str]]:
    """Remarks printed under each question in the report (question id -> lines): how the compared
    models were made, where that matters for reading the answer (the few-shot prompt of Q1, the
    training budgets of Q2 and Q3)."""
    notes: dict[str, list[str]] = {}
    few_shot = evaluation.get("few_shot")
    if few_shot and "base_fewshot" in evaluation.get("prompt_forms", {}):
        notes.setdefault("Q1", []).append(
            f"base_fewshot is the base model prompted with {few_shot['k']} worked examples ending in END, the "
            f"prompt that wrote the SFT data (shots drawn per item id with seed {few_shot['seed']}); the "
            f"zero-shot base stays in the tables as the floor.")
        near = (test_set or {}).get("few_shot_near_test")
        if near:
            notes["Q1"].append(
                f"{len({n['test_id'] for n in near})} test item(s) are near-duplicates of a worked example of "
                f"that prompt ({', '.join(sorted({n['test_id'] for n in near})[:5])}): base_fewshot may see "
                f"their answer in its prompt.")
    for question, lines in (budget_notes(training) if training else {}).items():
        notes.setdefault(question, []).extend(lines)
    return notes


def training_curves(run: Run) -> dict[str, dict]:
    """Each finished training's training.json (its history is what the curves plot), by model."""
    out = {}
    for name, folder in (("sft", SFT_DIR), ("dpo", DPO_DIR), ("dpo_only", DPO_ONLY_DIR)):
        path = run.path(f"{folder}/training.json")
        if path.is_file():
            out[name] = json.loads(path.read_text(encoding="utf-8"))
    return out


def training_facts(run: Run, records: dict[str, dict]) -> dict | None:
    """Budgets, DPO parity and pair diagnostics from the trainings' training.json (``records``, by
    model) and the pairs report (None before any model was trained)."""
    if not records:
        return None
    pairs = json.loads(run.path(PAIRS_REPORT).read_text()) if run.path(PAIRS_REPORT).exists() else None
    return training_summary(records, pairs)


def build_report(run: Run) -> dict:
    """Score saved responses, compute statistics, write results.json and the report. No model is loaded."""
    evaluation = json.loads(run.path(EVALUATION).read_text()) if run.path(EVALUATION).exists() else {}
    names = evaluation.get("order") or [p.stem for p in sorted(run.path(RESPONSES_DIR).glob("*.jsonl"))]
    items = load_jsonl(run.path(TEST), InstructionRecord)
    in_dist = (load_jsonl(run.path(TEST_IN_DISTRIBUTION), InstructionRecord)
               if run.path(TEST_IN_DISTRIBUTION).exists() else [])
    responses = load_responses(run, names)
    scores = with_judge(score_all([*items, *in_dist], responses), run)
    cfg = run.config.evaluation
    test_set = test_set_info(run)
    curves = training_curves(run)
    training = training_facts(run, curves)
    results = analyze(items, scores, models=names, q=cfg.fdr_q, margin=cfg.equivalence_margin,
                      question_notes=question_notes(run, evaluation, test_set, training), test_set=test_set,
                      in_distribution_items=in_dist)
    test_ids = {it.id for it in items}  # IFEval's metrics are the test set's, never the slice's
    results["ifeval"] = ifeval.summary(items, [s for s in scores if s.id in test_ids], names, ifeval.QC_STATEMENT)
    write_jsonl(run.path(SCORES), scores)
    atomic_write_json(run.path(RESULTS), results)
    baseline = json.loads(run.path(BASELINE).read_text()) if run.path(BASELINE).exists() else None
    paths = write_report(results, out_dir=run.path(REPORT_DIR), samples=select_samples(items, responses, n=N_SAMPLES, seed=run.config.seed),
                         baseline=baseline, summaries=step_summaries(run), provenance=provenance(run, evaluation),
                         curves=curves, training=training)
    return {"results": results, "paths": paths}


def run_report(run: Run) -> Path:
    out = build_report(run)
    print(answers_table(out["results"]))  # plain stdout: a markdown table must not be wrapped
    print(answers_summary(out["results"]))
    md = Path(out["paths"]["markdown"])
    console.print(f"report: {md} (and {out['paths']['html']})")
    return md
