"""From saved responses to the report's numbers: scores, rates, paired comparisons, a verdict.

Pure functions, no models. ``score_all`` applies the deterministic criteria to every response;
``analyze`` turns the scores into one JSON-serialisable ``results`` dict:

- ``rates``: per model x criterion, pass rate with a Wilson interval (``statistics.summarize``);
- ``categories``: the same per item category;
- ``comparisons``: every pair of models on every criterion (``statistics.compare_pair``), with
  Benjamini-Hochberg applied once across all of them (``statistics.adjust_all``);
- ``power``: the smallest difference the test set could detect, per criterion;
- ``judge``: optional LLM-judge scores, summarised on their own and never mixed into the above;
- ``verdict``: ready / inconclusive / not ready, with the rule that decided it and the reasons.

The criteria reported are the nine of ``criteria.CRITERIA``, the IFEval-style constraint checks
(``ifeval_strict``, ``ifeval_loose``) and ``all_criteria``, the share of items on which a response
passes every criterion that applies to it.
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
from .statistics import PairComparison, adjust_all, compare_pair, min_detectable_difference, summarize

RESULTS_SCHEMA = "cai-bootstrap/results/v1"
CONFIDENCE = 0.95
POWER = 0.80

IFEVAL = ("ifeval_strict", "ifeval_loose")
ALL = "all_criteria"
# Everything that gets a rate, in report order: the headline composite first.
REPORT_CRITERIA: tuple[str, ...] = (ALL, *crit.CRITERIA, *IFEVAL)
# What all_criteria requires: the nine criteria and the loose constraint check. The strict check
# is left out on purpose: it fails a response for a one-line preamble that every other criterion
# forgives, so including it would make the composite mostly a measure of preambles.
COMPOSITE_PARTS: tuple[str, ...] = (*crit.CRITERIA, "ifeval_loose")

# The verdict: what the method is meant to change (a response that ends cleanly with END, that
# does not run on into a new turn, and that passes everything else too).
DEFAULT_CANDIDATE = "dpo"
DEFAULT_BASELINE = "base"
KEY_CRITERIA: tuple[str, ...] = ("ends_with_end", "no_rambling", ALL)

DEFINITIONS: dict[str, str] = {
    ALL: "passes every criterion that applies to the item (the nine criteria and ifeval_loose)",
    "ends_with_end": "closes the answer with END",
    "proper_structure": "non-empty body without template residue or chat tokens",
    "no_rambling": "does not start a new turn and does not hit the token limit",
    "addresses_instruction": "attempts the task (no refusal, no copy of the instruction)",
    "appropriate_length": "within stated or typical length bounds",
    "no_unwarranted_refusal": "does not refuse (every test instruction is benign)",
    "factually_correct": "matches a reference answer (only items with references)",
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


def composite(score: EvalScore) -> bool:
    """all_criteria for one response: every applicable part of COMPOSITE_PARTS passes."""
    values = [score.criteria.get(c) for c in crit.CRITERIA] + [score.checks_loose]
    return all(v for v in values if v is not None)


def _outcome_row(score: EvalScore) -> dict[str, bool | None]:
    missing = [c for c in crit.CRITERIA if c not in score.criteria]
    if missing:
        raise ValueError(f"score {score.model}/{score.id} lacks criteria {missing}")
    row: dict[str, bool | None] = {c: score.criteria[c] for c in crit.CRITERIA}
    row["ifeval_strict"] = score.checks_strict
    row["ifeval_loose"] = score.checks_loose
    row[ALL] = composite(score)
    return row


def outcomes(
    items: Sequence[InstructionRecord], scores: Sequence[EvalScore], models: Sequence[str]
) -> Outcomes:
    """Per model and criterion, the outcome on each item (test-set order).

    Scores of models not in ``models`` are ignored; a listed model must have exactly one score per
    test item (ValueError otherwise).
    """
    item_ids = [i.id for i in items]
    by_model: dict[str, list[EvalScore]] = defaultdict(list)
    for s in scores:
        by_model[s.model].append(s)
    result: Outcomes = {}
    for model in models:
        _check_ids(model, item_ids, [s.id for s in by_model.get(model, [])], "score")
        rows = {s.id: _outcome_row(s) for s in by_model[model]}
        result[model] = {c: [rows[i][c] for i in item_ids] for c in REPORT_CRITERIA}
    return result


# --------------------------------------------------------------------------------------------
# The sections of the results
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


def model_pairs(models: Sequence[str]) -> list[tuple[str, str]]:
    """Every pair once, as (a, b) with a the model listed later: differences read "a - b", so
    with models in pipeline order (base, sft, dpo, ...) a positive difference is an improvement
    over the earlier model."""
    return [(b, a) for a, b in combinations(models, 2)]


def _comparison_dict(criterion: str, a: str, b: str, c: PairComparison) -> dict[str, Any]:
    return {
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
        "method": c.mcnemar.method,
        "statistic": c.mcnemar.statistic,
        "p_value": c.mcnemar.p_value,
        "p_adjusted": c.p_adjusted,
        "significant": c.significant,
        "cohens_h": c.cohens_h,
    }


def _comparisons(out: Outcomes, models: Sequence[str], q: float, n_resamples: int, seed: int) -> list[dict]:
    """Every pair x criterion, BH-adjusted together. Each comparison uses the same bootstrap seed,
    so a pair's interval does not depend on which other models are in the report."""
    keys: list[tuple[str, str, str]] = []
    raw: list[PairComparison] = []
    for criterion in REPORT_CRITERIA:
        for a, b in model_pairs(models):
            keys.append((criterion, a, b))
            raw.append(
                compare_pair(
                    out[a][criterion], out[b][criterion],
                    seed=seed, n_resamples=n_resamples, confidence=CONFIDENCE,
                )
            )
    adjusted = adjust_all(raw, q)
    return [_comparison_dict(cr, a, b, c) for (cr, a, b), c in zip(keys, adjusted)]


def _power(out: Outcomes, comparisons: Sequence[dict], q: float) -> dict[str, Any]:
    """Per criterion: how large a paired difference the test set can detect (80% power, worst
    case discordance), at alpha = q and at the Bonferroni level q/m that bounds BH from below."""
    m = max(len(comparisons), 1)
    per_criterion: dict[str, dict] = {}
    for criterion in REPORT_CRITERIA:
        ns = [c["n"] for c in comparisons if c["criterion"] == criterion]
        if not ns:  # one model only: no pairs, use the applicable items of that model
            ns = [sum(v is not None for v in values[criterion]) for values in out.values()]
        n = min(ns)
        per_criterion[criterion] = {
            "n": n,
            "mdd": min_detectable_difference(n, alpha=q, power=POWER),
            "mdd_bonferroni": min_detectable_difference(n, alpha=q / m, power=POWER),
        }
    return {
        "power": POWER,
        "alpha": q,
        "n_tests": len(comparisons),
        "criteria": per_criterion,
        "note": (
            f"Smallest difference in pass rate a two-sided McNemar test detects with {POWER:.0%} "
            f"power on the n items where the criterion applies to both models (the smallest n over "
            f"the pairs), assuming the worst case that every item is discordant; first at alpha = "
            f"{q} (mdd), then at the Bonferroni level {q}/{m} (mdd_bonferroni). Benjamini-Hochberg "
            f"over {len(comparisons)} tests puts the real threshold between the two. A true "
            f"difference smaller than this will often not reach significance: absence of a "
            f"significant difference is not evidence of no difference."
        ),
    }


def _judge(scores: Sequence[EvalScore], models: Sequence[str]) -> dict[str, Any] | None:
    """Mean (and sd) of each judge metric per model; None when no score has any."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in scores:
        if s.model in models:
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
        "deterministic criteria, the multiple-testing correction and the verdict.",
    }


# --------------------------------------------------------------------------------------------
# The verdict
# --------------------------------------------------------------------------------------------


def find_comparison(comparisons: Sequence[dict], criterion: str, x: str, y: str) -> dict | None:
    """The comparison of x against y, oriented so that difference = rate(x) - rate(y)."""
    for c in comparisons:
        if c["criterion"] != criterion:
            continue
        if (c["a"], c["b"]) == (x, y):
            return c
        if (c["a"], c["b"]) == (y, x):
            flipped = dict(c, a=x, b=y, rate_a=c["rate_b"], rate_b=c["rate_a"],
                           difference=-c["difference"], ci_low=-c["ci_high"], ci_high=-c["ci_low"],
                           only_a=c["only_b"], only_b=c["only_a"], cohens_h=-c["cohens_h"])
            return flipped
    return None


def _describe(c: dict) -> str:
    return (
        f"{c['a']} {c['rate_a']:.0%} vs {c['b']} {c['rate_b']:.0%} on {c['criterion']} "
        f"(diff {c['difference']:+.0%} [{c['ci_low']:+.0%}, {c['ci_high']:+.0%}], "
        f"p_BH={c['p_adjusted']:.3g})"
    )


def rule_text(candidate: str, baseline: str, guards: Sequence[str], key: Sequence[str], q: float, n_tests: int) -> str:
    return (
        f"READY when (1) {candidate} passes more items than {baseline} on each of "
        f"{', '.join(key)}, significantly: McNemar p ≤ {q} after Benjamini-Hochberg over all "
        f"{n_tests} tests of this report; and (2) {candidate} is not significantly worse (same "
        f"correction) than {' or '.join(guards)} on any criterion. NOT READY when (2) fails or "
        f"{candidate} is not ahead of {baseline} on some key criterion. INCONCLUSIVE when {candidate} "
        f"is ahead on every key criterion and nowhere significantly worse, but some lead is not "
        f"significant (see the power note)."
    )


def verdict(
    comparisons: Sequence[dict],
    models: Sequence[str],
    *,
    q: float,
    candidate: str = DEFAULT_CANDIDATE,
    baseline: str = DEFAULT_BASELINE,
    key_criteria: Sequence[str] = KEY_CRITERIA,
) -> dict[str, Any]:
    """Decide readiness by the rule of :func:`rule_text`.

    The guards are the baseline and every model listed before the candidate (what it was built
    from: with the default order, base and sft for dpo). Models after it (dpo_only, extras) do
    not decide the verdict; ``notes`` compares the candidate with each of them on all_criteria.
    """
    base_info = {"candidate": candidate, "baseline": baseline, "key_criteria": list(key_criteria)}
    if candidate not in models or baseline not in models or candidate == baseline:
        return {
            "verdict": "not evaluated",
            "rule": f"needs the candidate {candidate!r} and the baseline {baseline!r} among the models",
            "reasons": [f"models evaluated: {', '.join(models)}"],
            "notes": [],
            "guards": [],
            **base_info,
        }
    guards = [baseline] + [m for m in models[: models.index(candidate)] if m != baseline]
    rule = rule_text(candidate, baseline, guards, key_criteria, q, len(comparisons))

    regressions = []
    for guard in guards:
        for criterion in REPORT_CRITERIA:
            c = find_comparison(comparisons, criterion, candidate, guard)
            if c and c["significant"] and c["difference"] < 0:
                regressions.append(c)
    behind, unproven, proven = [], [], []
    for criterion in key_criteria:
        c = find_comparison(comparisons, criterion, candidate, baseline)
        if c is None or c["n"] == 0 or c["difference"] <= 0:
            behind.append(c or {"criterion": criterion})
        elif c["significant"]:
            proven.append(c)
        else:
            unproven.append(c)

    reasons = [f"significantly worse: {_describe(c)}" for c in regressions]
    for c in behind:
        if "a" not in c or c["n"] == 0:
            reasons.append(f"no paired items to compare on {c['criterion']}")
        else:
            reasons.append(f"not ahead: {_describe(c)}")
    reasons += [f"ahead but not significant: {_describe(c)}" for c in unproven]
    reasons += [f"significantly better: {_describe(c)}" for c in proven]
    if not regressions:
        reasons.append(f"{candidate} is not significantly worse than {' or '.join(guards)} on any criterion")

    notes = []
    for other in models[models.index(candidate) + 1:]:
        c = find_comparison(comparisons, ALL, candidate, other)
        if c and c["n"]:
            flag = "significant" if c["significant"] else "not significant"
            notes.append(f"{_describe(c)}: {flag}")

    if regressions or behind:
        decision = "not ready"
    elif unproven:
        decision = "inconclusive"
    else:
        decision = "ready"
    return {"verdict": decision, "rule": rule, "reasons": reasons, "notes": notes, "guards": guards, **base_info}


# --------------------------------------------------------------------------------------------
# Everything together
# --------------------------------------------------------------------------------------------


def analyze(
    items: Sequence[InstructionRecord],
    scores: Sequence[EvalScore],
    *,
    models: Sequence[str],
    q: float = 0.05,
    n_resamples: int = 10_000,
    seed: int = 0,
    candidate: str = DEFAULT_CANDIDATE,
    baseline: str = DEFAULT_BASELINE,
    key_criteria: Sequence[str] = KEY_CRITERIA,
) -> dict[str, Any]:
    """The results of an evaluation as one JSON-serialisable dict (see the module docstring).

    ``models`` gives the order (pipeline order: base, sft, dpo, dpo_only, extras) and which
    models are analysed; each must have exactly one score per item.
    """
    models = list(models)
    if not models:
        raise ValueError("no models to analyse")
    if len(set(models)) != len(models):
        raise ValueError(f"models listed twice: {models}")
    if not items:
        raise ValueError("no test items")
    unknown = [c for c in key_criteria if c not in REPORT_CRITERIA]
    if unknown:
        raise ValueError(f"unknown key criteria {unknown}; known: {list(REPORT_CRITERIA)}")
    out = outcomes(items, scores, models)
    comparisons = _comparisons(out, models, q, n_resamples, seed)
    return {
        "schema": RESULTS_SCHEMA,
        "models": models,
        "criteria": list(REPORT_CRITERIA),
        "definitions": dict(DEFINITIONS),
        "n_items": len(items),
        "category_counts": dict(Counter(i.category for i in items)),
        "settings": {
            "q": q,
            "confidence": CONFIDENCE,
            "n_resamples": n_resamples,
            "seed": seed,
            "interval": "Wilson score (rates); paired percentile bootstrap (differences)",
            "test": "McNemar (exact binomial below 25 discordant pairs, else chi2 with continuity correction)",
            "correction": "Benjamini-Hochberg over every comparison in this report",
        },
        "rates": _rates(out),
        "categories": _categories(items, out),
        "comparisons": comparisons,
        "multiple_testing": {
            "method": "benjamini-hochberg",
            "q": q,
            "n_tests": len(comparisons),
            "n_significant": sum(bool(c["significant"]) for c in comparisons),
        },
        "power": _power(out, comparisons, q),
        "judge": _judge(scores, models),
        "verdict": verdict(
            comparisons, models, q=q, candidate=candidate, baseline=baseline, key_criteria=key_criteria
        ),
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
