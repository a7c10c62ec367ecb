"""From saved responses to the report's numbers: scores, rates, the three questions' answers.

Pure functions, no models. ``score_all`` applies the deterministic criteria to every response;
``analyze`` turns the scores into one JSON-serialisable ``results`` dict:

- ``rates``: per model x criterion, pass rate with a Wilson interval (``statistics.summarize``);
- ``categories``: the same per item category;
- ``questions``: the three research questions of ``questions.QUESTIONS``, each answered on format
  and on content — the *primary family*, fixed before the data, Benjamini-Hochberg within it;
- ``exploratory``: every other pair of models and every single criterion, BH within that family
  alone, kept apart from the answers;
- ``conclusions``: what this run can and cannot conclude (n, minimum detectable differences,
  which questions are underpowered);
- ``in_distribution``: the same questions on an optional slice of held-out fillers of *training*
  templates, reported apart (its own correction) and never mixed into the answers;
- ``judge``: optional LLM-judge scores, summarised on their own.

The criteria reported are the composites ``format`` and ``content`` (``questions.ASPECTS``), the
nine of ``criteria.CRITERIA`` and the constraint checks (``ifeval_strict``, ``ifeval_loose``).
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from itertools import combinations
from typing import Any

from ..formats import END_SUFFIX, cut_response
from ..schemas import CATEGORIES, EvalResponse, EvalScore, InstructionRecord
from . import criteria as crit
from . import ifeval
from .questions import (
    ASPECT_DEFINITIONS,
    ASPECTS,
    DEFAULT_MARGIN,
    POWER,
    QUESTIONS,
    SELECTED_ON,
    composite,
    decide,
    family_alpha,
)
from .statistics import PairComparison, adjust_all, compare_pair, summarize

RESULTS_SCHEMA = "cai-bootstrap/results/v2"
CONFIDENCE = 0.95

IFEVAL = ("ifeval_strict", "ifeval_loose")
# Everything that gets a rate, in report order: the two composites the questions are answered on first.
REPORT_CRITERIA: tuple[str, ...] = (*ASPECTS, *crit.CRITERIA, *IFEVAL)

DEFINITIONS: dict[str, str] = {
    **ASPECT_DEFINITIONS,
    "ends_with_end": "closes the answer with END",
    "proper_structure": "non-empty body without template residue or chat tokens",
    "no_rambling": "does not start a new turn and does not hit the token limit",
    "addresses_instruction": "attempts the task: no refusal, no copy of the instruction or of its input "
                             "text, no tautology or bare fragment of the prompt",
    "appropriate_length": "within stated or typical length bounds",
    "no_unwarranted_refusal": "does not refuse (every test instruction is benign)",
    "factually_correct": "its answer is a reference answer: not hedged between candidates, not negated, "
                         "not contradicted (only items with references)",
    "coherent": "not looping, not symbol soup or gibberish",
    "on_topic": "about the instruction's subject (where words can tell)",
    "ifeval_strict": "IFEval prompt-level strict: every IFEval instruction of the item followed, by Google's "
                     "official checks, on the response cut at its stop string (only items with instructions)",
    "ifeval_loose": "IFEval prompt-level loose: the same with IFEval's loose response variants",
}


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _check_ids(model: str, item_ids: Sequence[str], got_ids: Sequence[str], what: str) -> None:
    """Raise ValueError unless got_ids are exactly item_ids, once each."""
    duplicates = sorted(i for i, c in Counter(got_ids).items() if c > 1)
    missing = sorted(set(item_ids) - set(got_ids))
    extra = sorted(set(got_ids) - set(item_ids))
    problems = []
    if missing:
        problems.append(f"no {what} for {len(missing)} test item(s): {_preview(missing)}")
    if extra:
        problems.append(f"{len(extra)} {what}(s) for ids not in the test set: {_preview(extra)}")
    if duplicates:
        problems.append(f"duplicate {what}s for: {_preview(duplicates)}")
    if problems:
        raise ValueError(f"model {model!r}: " + "; ".join(problems))


def _preview(ids: Sequence[str], k: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:k])
    return shown + (f" ... (+{len(ids) - k} more)" if len(ids) > k else "")


def score_one(item: InstructionRecord, response: EvalResponse) -> EvalScore:
    return EvalScore(
        id=item.id,
        model=response.model,
        category=item.category,
        criteria=crit.score(item, response),
        **ifeval.verdict_fields(item, response.response),
    )


def score_all(
    items: Sequence[InstructionRecord], responses: Mapping[str, Sequence[EvalResponse]]
) -> list[EvalScore]:
    """Score every model's response to every test item (criteria.score + the official IFEval verdicts).

    Raises ValueError when a model lacks a response for a test item, has responses for ids that
    are not test items, has two responses for one item, or holds a response labelled with another
    model's name. Scores come model by model (mapping order), items in test-set order.
    """
    item_ids = [i.id for i in items]
    if len(set(item_ids)) != len(item_ids):
        raise ValueError("the test set has duplicate item ids")
    scores: list[EvalScore] = []
    for model, rs in responses.items():
        _check_ids(model, item_ids, [r.id for r in rs], "response")
        wrong = sorted({r.model for r in rs} - {model})
        if wrong:
            raise ValueError(f"responses listed under {model!r} are labelled model={wrong}")
        by_id = {r.id: r for r in rs}
        scores.extend(score_one(item, by_id[item.id]) for item in items)
    return scores


# --------------------------------------------------------------------------------------------
# Outcomes: model -> criterion -> pass/fail/None per item, in test-set order
# --------------------------------------------------------------------------------------------

Outcomes = dict[str, dict[str, list["bool | None"]]]


def outcome_row(score: EvalScore) -> dict[str, bool | None]:
    """Every reported criterion for one response: the nine, the checks and the two composites."""
    missing = [c for c in crit.CRITERIA if c not in score.criteria]
    if missing:
        raise ValueError(f"score {score.model}/{score.id} lacks criteria {missing}")
    row: dict[str, bool | None] = {c: score.criteria[c] for c in crit.CRITERIA}
    row["ifeval_strict"] = score.checks_strict
    row["ifeval_loose"] = score.checks_loose
    for aspect, parts in ASPECTS.items():
        row[aspect] = composite(row, parts)
    return row


def outcomes(
    items: Sequence[InstructionRecord], scores: Sequence[EvalScore], models: Sequence[str]
) -> Outcomes:
    """Per model and criterion, the outcome on each item (test-set order).

    Scores of models not in ``models`` or of items not in ``items`` are ignored; a listed model
    must have exactly one score per item (ValueError otherwise).
    """
    item_ids = [i.id for i in items]
    wanted = set(item_ids)
    by_model: dict[str, list[EvalScore]] = defaultdict(list)
    for s in scores:
        if s.id in wanted:
            by_model[s.model].append(s)
    result: Outcomes = {}
    for model in models:
        _check_ids(model, item_ids, [s.id for s in by_model.get(model, [])], "score")
        rows = {s.id: outcome_row(s) for s in by_model[model]}
        result[model] = {c: [rows[i][c] for i in item_ids] for c in REPORT_CRITERIA}
    return result


# --------------------------------------------------------------------------------------------
# Rates
# --------------------------------------------------------------------------------------------


def _rates(out: Outcomes, positions: Sequence[int] | None = None) -> dict[str, dict[str, dict]]:
    rates: dict[str, dict[str, dict]] = {}
    for model, by_criterion in out.items():
        rates[model] = {}
        for c, values in by_criterion.items():
            kept = values if positions is None else [values[i] for i in positions]
            rates[model][c] = asdict(summarize(kept, CONFIDENCE))
    return rates


def _categories(items: Sequence[InstructionRecord], out: Outcomes) -> dict[str, dict]:
    section: dict[str, dict] = {}
    for category in CATEGORIES:
        positions = [i for i, item in enumerate(items) if item.category == category]
        if positions:
            section[category] = {"n_items": len(positions), "rates": _rates(out, positions)}
    return section


# --------------------------------------------------------------------------------------------
# Comparisons, in families
# --------------------------------------------------------------------------------------------


def model_pairs(models: Sequence[str]) -> list[tuple[str, str]]:
    """Every pair once, as (a, b) with a the model listed later: differences read "a - b", so
    with models in pipeline order (base, base_fewshot, sft, dpo, ...) a positive difference is an
    improvement over the earlier model."""
    return [(b, a) for a, b in combinations(models, 2)]


def _comparison_dict(criterion: str, a: str, b: str, c: PairComparison, family: str) -> dict[str, Any]:
    return {
        "family": family,
        "criterion": criterion,
        "a": a,
        "b": b,
        "n": c.n,
        "rate_a": c.rate_a,
        "rate_b": c.rate_b,
        "difference": c.difference,
        "ci_low": c.ci_low,
        "ci_high": c.ci_high,
        "only_a": c.mcnemar.b_only_a,
        "only_b": c.mcnemar.b_only_b,
        "discordant_rate": c.discordant_rate,
        "method": c.mcnemar.method,
        "statistic": c.mcnemar.statistic,
        "p_value": c.mcnemar.p_value,
        "p_adjusted": c.p_adjusted,
        "significant": c.significant,
        "cohens_h": c.cohens_h,
    }


def compare_family(out: Outcomes, keys: Sequence[tuple[str, str, str]], q: float, family: str) -> list[dict]:
    """(criterion, a, b) comparisons, Benjamini-Hochberg over exactly these."""
    raw = [compare_pair(out[a][c], out[b][c], confidence=CONFIDENCE) for c, a, b in keys]
    return [_comparison_dict(c, a, b, r, family) for (c, a, b), r in zip(keys, adjust_all(raw, q))]


def primary_keys(models: Sequence[str]) -> list[tuple[str, str, str]]:
    """The primary family: each question whose two models were evaluated, on each aspect."""
    return [(aspect, q.a, q.b) for q in QUESTIONS if q.a in models and q.b in models for aspect in ASPECTS]


def exploratory_keys(models: Sequence[str]) -> list[tuple[str, str, str]]:
    """Every pair of models on every reported criterion, except the primary comparisons."""
    primary = {(c, frozenset((a, b))) for c, a, b in primary_keys(models)}
    return [(c, a, b) for c in REPORT_CRITERIA for a, b in model_pairs(models)
            if (c, frozenset((a, b))) not in primary]


def find_comparison(comparisons: Sequence[dict], criterion: str, x: str, y: str) -> dict | None:
    """The comparison of x against y, oriented so that difference = rate(x) - rate(y)."""
    for c in comparisons:
        if c["criterion"] != criterion:
            continue
        if (c["a"], c["b"]) == (x, y):
            return c
        if (c["a"], c["b"]) == (y, x):
            return dict(c, a=x, b=y, rate_a=c["rate_b"], rate_b=c["rate_a"],
                        difference=-c["difference"], ci_low=-c["ci_high"], ci_high=-c["ci_low"],
                        only_a=c["only_b"], only_b=c["only_a"], cohens_h=-c["cohens_h"])
    return None


# --------------------------------------------------------------------------------------------
# The questions
# --------------------------------------------------------------------------------------------


def answer_questions(
    primary: Sequence[dict], models: Sequence[str], *, q: float, margin: float,
    notes: Mapping[str, Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """Per question: its two aspects' comparisons with their answers (``questions.decide``), or
    ``evaluated: False`` naming the models that were not evaluated. ``notes`` adds per-question
    remarks (e.g. a training-budget note) that the report prints under the question."""
    alpha = family_alpha(q, len(primary))
    section = []
    for question in QUESTIONS:
        missing = [m for m in (question.a, question.b) if m not in models]
        entry: dict[str, Any] = {
            "id": question.id,
            "title": question.title,
            "meaning": question.meaning,
            "a": question.a,
            "b": question.b,
            "evaluated": not missing,
            "missing": missing,
            "notes": list((notes or {}).get(question.id, [])),
            "aspects": {},
        }
        if not missing:
            for aspect in ASPECTS:
                c = find_comparison(primary, aspect, question.a, question.b)
                entry["aspects"][aspect] = {**c, **decide(c, margin=margin, alpha=alpha)}
        section.append(entry)
    return section


def conclusions(questions: Sequence[dict], n_items: int, *, q: float, margin: float, m: int,
                test_set: Mapping[str, Any] | None) -> dict[str, Any]:
    """What this run can and cannot conclude: per question and aspect, the items compared, the
    minimum detectable difference and whether the question is underpowered (that difference is
    larger than the margin), and a few plain statements."""
    alpha = family_alpha(q, m)
    per_question, underpowered, statements = [], [], []
    for question in questions:
        entry = {"id": question["id"], "evaluated": question["evaluated"], "aspects": {}}
        for aspect, a in question["aspects"].items():
            entry["aspects"][aspect] = {"n": a["n"], "mdd": a["mdd"], "underpowered": a["underpowered"],
                                        "answer": a["answer"]}
            if a["underpowered"]:
                underpowered.append(f"{question['id']} {aspect}")
        per_question.append(entry)
    if test_set:
        if test_set.get("split_by") == "template":
            statements.append(
                f"The {n_items} test items come from {len(test_set.get('test_templates') or [])} template(s) that "
                f"no training item came from (template-disjoint split): the answers are about new kinds of "
                f"instructions, not only new fillers of trained ones.")
        elif test_set.get("split_by") == "item":
            statements.append(
                f"The test items were drawn item by item: {test_set.get('shared_templates', 'some')} template(s) "
                f"have items on both sides, so the answers are about new fillers of trained instructions "
                f"(in-distribution), not new kinds of instructions.")
    statements.append(
        "Part of the content composite also chose the training data: sft-data kept, and pairs took as chosen, "
        "only responses that passed the same kinds of check ("
        + ", ".join(f"{part} ~ QC {reason}" for part, reason in SELECTED_ON.items())
        + "). A content gain of sft or dpo is partly a gain on the checks that selected their data; the test "
          "items are held out, so it is not memorised answers, but no judge independent of these checks "
          "scores this run.")
    statements.append(
        f"Primary family: {m} comparison(s) (3 questions x format and content), fixed before the data, "
        f"Benjamini-Hochberg at q = {q} within it. A difference is quoted as detectable when a two-sided "
        f"McNemar test at α = {alpha:.3g} (the level a lone effect needs under BH) finds it with "
        f"{POWER:.0%} power, at the discordance seen between the two models.")
    for question in per_question:
        for aspect, a in question["aspects"].items():
            mdd = a["mdd"]
            if mdd["observed"] > margin:
                state = (f"underpowered for the ±{100 * margin:.0f} margin: a real difference of that size "
                         f"would often go unseen")
            elif a["underpowered"]:
                state = (f"underpowered for the ±{100 * margin:.0f} margin all the same: that estimate rests on "
                         f"the few items the two models disagree on, and the 95% interval reaches beyond "
                         f"±{100 * margin:.0f}, so neither a difference nor equivalence of that size was shown")
            else:
                state = f"powered for the ±{100 * margin:.0f} margin"
            statements.append(
                f"{question['id']} {aspect}: {a['n']} items; detectable difference {100 * mdd['observed']:.0f} "
                f"points at the discordance seen ({100 * mdd['worst_case']:.0f} in the worst case); {state}.")
    statements.append(
        "A 'cannot tell' is not evidence of no difference, and a significant exploratory comparison is a "
        "hypothesis for the next run, not a finding of this one.")
    return {"n_items": n_items, "margin": margin, "alpha": alpha, "power": POWER,
            "questions": per_question, "underpowered": underpowered, "statements": statements}


# --------------------------------------------------------------------------------------------
# Judge scores (kept apart)
# --------------------------------------------------------------------------------------------


def _judge(scores: Sequence[EvalScore], models: Sequence[str], item_ids: set[str]) -> dict[str, Any] | None:
    """Mean (and sd) of each judge metric per model; None when no score has any."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in scores:
        if s.model in models and s.id in item_ids:
            for metric, v in s.judge.items():
                values[metric][s.model].append(float(v))
    if not values:
        return None
    metrics = sorted(values)
    means: dict[str, dict[str, dict]] = {}
    for model in models:
        means[model] = {}
        for metric in metrics:
            xs = [x for x in values[metric].get(model, []) if math.isfinite(x)]
            n = len(xs)
            mean = sum(xs) / n if n else None
            sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
            means[model][metric] = {"n": n, "mean": mean, "sd": sd}
    return {
        "metrics": metrics,
        "means": means,
        "note": "LLM-judge scores: model-graded and not verifiable; they are kept out of the "
        "deterministic criteria, the multiple-testing correction and the answers.",
    }


# --------------------------------------------------------------------------------------------
# Everything together
# --------------------------------------------------------------------------------------------


def _check_models(models: Sequence[str]) -> list[str]:
    models = list(models)
    if not models:
        raise ValueError("no models to analyse")
    if len(set(models)) != len(models):
        raise ValueError(f"models listed twice: {models}")
    return models


def _in_distribution(items: Sequence[InstructionRecord], scores: Sequence[EvalScore], models: Sequence[str],
                     *, q: float, margin: float) -> dict[str, Any]:
    """The questions on the in-distribution slice, BH within the slice alone."""
    out = outcomes(items, scores, models)
    comparisons = compare_family(out, primary_keys(models), q, "in_distribution")
    return {
        "n_items": len(items),
        "category_counts": dict(Counter(i.category for i in items)),
        "rates": _rates(out),
        "questions": answer_questions(comparisons, models, q=q, margin=margin),
        "note": "Held-out fillers of templates that training also drew from: how the models do on the kind of "
                "instruction they were trained on. Reported apart, BH within this slice only; not the answers.",
    }


def analyze(
    items: Sequence[InstructionRecord],
    scores: Sequence[EvalScore],
    *,
    models: Sequence[str],
    q: float = 0.05,
    margin: float = DEFAULT_MARGIN,
    question_notes: Mapping[str, Sequence[str]] | None = None,
    test_set: Mapping[str, Any] | None = None,
    in_distribution_items: Sequence[InstructionRecord] = (),
) -> dict[str, Any]:
    """The results of an evaluation as one JSON-serialisable dict (see the module docstring).

    ``models`` gives the order (pipeline order: base, base_fewshot, sft, dpo, dpo_only, extras)
    and which models are analysed; each must have exactly one score per item. ``test_set``
    describes how the test set was built (``instructions_report.json``: split_by, templates).
    """
    models = _check_models(models)
    if not items:
        raise ValueError("no test items")
    out = outcomes(items, scores, models)
    primary = compare_family(out, primary_keys(models), q, "primary")
    exploratory = compare_family(out, exploratory_keys(models), q, "exploratory")
    questions = answer_questions(primary, models, q=q, margin=margin, notes=question_notes)
    item_ids = {i.id for i in items}
    return {
        "schema": RESULTS_SCHEMA,
        "models": models,
        "criteria": list(REPORT_CRITERIA),
        "definitions": dict(DEFINITIONS),
        "n_items": len(items),
        "category_counts": dict(Counter(i.category for i in items)),
        "test_set": dict(test_set) if test_set else None,
        "settings": {
            "q": q,
            "confidence": CONFIDENCE,
            "margin": margin,
            "power": POWER,
            "interval": "Wilson score (rates); Newcombe hybrid score for paired data (differences)",
            "test": "McNemar (exact binomial below 25 discordant pairs, else chi2 with continuity correction)",
            "correction": "Benjamini-Hochberg within each family: primary (the questions), exploratory, "
                          "in-distribution",
        },
        "rates": _rates(out),
        "categories": _categories(items, out),
        "questions": questions,
        "primary_family": {
            "hypotheses": [f"{a} vs {b} on {c}" for c, a, b in primary_keys(models)],
            "n_tests": len(primary),
            "n_significant": sum(bool(c["significant"]) for c in primary),
            "q": q,
            "fixed_in": "cai_bootstrap.evaluation.questions (QUESTIONS, ASPECTS)",
        },
        "exploratory": {
            "comparisons": exploratory,
            "n_tests": len(exploratory),
            "n_significant": sum(bool(c["significant"]) for c in exploratory),
            "q": q,
        },
        "conclusions": conclusions(questions, len(items), q=q, margin=margin, m=len(primary), test_set=test_set),
        "in_distribution": (_in_distribution(in_distribution_items, scores, models, q=q, margin=margin)
                            if in_distribution_items else None),
        "judge": _judge(scores, models, item_ids),
    }


def select_samples(
    items: Sequence[InstructionRecord],
    responses: Mapping[str, Sequence[EvalResponse]],
    *,
    n: int = 6,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """A few items for the side-by-side section: spread over categories, deterministic for a
    seed. Returns ``[{id, instruction, category, responses: {model: text}}]``."""
    by_category: dict[str, list[InstructionRecord]] = defaultdict(list)
    for item in items:
        by_category[item.category].append(item)
    rng = random.Random(seed)
    for group in by_category.values():
        rng.shuffle(group)
    picked: list[InstructionRecord] = []
    while len(picked) < n and any(by_category.values()):
        for category in CATEGORIES:
            if by_category.get(category) and len(picked) < n:
                picked.append(by_category[category].pop())
    by_id = {m: {r.id: r for r in rs} for m, rs in responses.items()}
    return [
        {
            "id": item.id,
            "instruction": item.instruction,
            "category": item.category,
            "responses": {m: by_id[m][item.id].response if item.id in by_id[m] else "" for m in responses},
            "endings": {m: ending(by_id[m][item.id]) for m in responses if item.id in by_id[m]},
        }
        for item in picked
    ]


def ending(r: EvalResponse) -> str:
    """How a response ended, in a few words: "END", "ran on into Instruction:", "token limit",
    "EOS without END"."""
    if r.finish_reason == "length":
        return "token limit"
    marker = r.stop_string or cut_response(r.raw_text).marker
    if marker == END_SUFFIX:
        return "END"
    if marker:
        return f"ran on into {marker.strip()}"
    return "EOS without END"
