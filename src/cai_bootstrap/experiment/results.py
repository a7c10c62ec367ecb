"""The experiment's answers, from its runs' saved scores (no model is loaded).

For every round: each research question on each aspect, per seed (the run's own paired comparison,
:func:`statistics.compare_pair`, the numbers of that run's report) and pooled over the seeds
(:func:`pooling.pool`: clustered exact test, design-effect-adjusted score interval), with Benjamini-Hochberg over the pooled
primary family of the round, the answer, and how many seeds point the pooled way. Each model's pass
rate per seed (the spread). Across rounds: each trained model of round r against the same model of
round r-1, pooled over seeds on the same held-out items (an exploratory family of its own).

Writes ``DIR/results.json`` and the report (``DIR/report/experiment.{md,html}`` and plots).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..evaluation.analysis import outcomes
from ..evaluation.pooling import PooledComparison, Stratum, pool
from ..evaluation.questions import ASPECTS, DEFAULT_MARGIN, QUESTIONS, classify
from ..evaluation.statistics import benjamini_hochberg, compare_pair
from ..files import atomic_write_json
from ..schemas import EvalScore, InstructionRecord, load_jsonl
from ..steps.common import RESULTS, SCORES, TEST

RESULTS_SCHEMA = "cai-bootstrap/experiment-results/v1"
CONFIDENCE = 0.95

# The research questions and the two aspects are one run's (evaluation/questions.py).
MARGIN = DEFAULT_MARGIN
TRAINED = ("sft", "dpo", "dpo_only")  # compared round against round


def item_key(item: InstructionRecord) -> str:
    """The same test item in two runs: its instruction text (ids are per run under --data-seeds)."""
    return " ".join(item.instruction.split()).lower()


class RunOutcomes:
    """One finished run's per-item aspect outcomes: model -> aspect -> [pass/fail/None] in key order."""

    def __init__(self, name: str, run_dir: Path):
        self.name = name
        items = load_jsonl(run_dir / TEST, InstructionRecord)
        scores = load_jsonl(run_dir / SCORES, EvalScore, ("model", "id"))
        self.models = list(dict.fromkeys(s.model for s in scores))
        per_criterion = outcomes(items, scores, self.models)  # the aspects' composites included
        self.keys = [item_key(it) for it in items]
        self.aspects: dict[str, dict[str, list[bool | None]]] = {
            m: {aspect: per_criterion[m][aspect] for aspect in ASPECTS} for m in self.models
        }

    def stratum(self, label: str, a: str, b: str, aspect: str, other: RunOutcomes | None = None) -> Stratum:
        """a (this run) against b (this run, or ``other`` for a round comparison), paired by item."""
        source_b = other or self
        b_by_key = dict(zip(source_b.keys, source_b.aspects[b][aspect]))
        keys = [k for k in self.keys if k in b_by_key]
        a_by_key = dict(zip(self.keys, self.aspects[a][aspect]))
        return Stratum(label, keys, [a_by_key[k] for k in keys], [b_by_key[k] for k in keys])


def answer(c: Mapping[str, Any], margin: float = MARGIN) -> str:
    """The rule of one run's questions (``questions.classify``) applied to the pooled comparison."""
    return classify(n=c["n_pairs"], significant=c["significant"], ci_low=c["ci_low"], ci_high=c["ci_high"],
                    margin=margin)


def _pooled_dict(p: PooledComparison) -> dict[str, Any]:
    return {
        "n_strata": p.n_strata, "n_pairs": p.n_pairs, "n_items": p.n_items, "rate_a": p.rate_a, "rate_b": p.rate_b,
        "difference": p.difference, "ci_low": p.ci_low, "ci_high": p.ci_high, "design_effect": p.design_effect,
        "p_value": p.p_value,
        "items_repeated": p.items_repeated, "only_a": p.only_a, "only_b": p.only_b,
        "test": "exact sign-flip over items, clustered across seeds" if p.items_repeated
                else "exact McNemar on the pooled discordant pairs (no item in two seeds)",
        "cmh": asdict(p.cmh), "positive": p.positive, "negative": p.negative, "zero": p.zero, "agree": p.agree,
    }


def _per_seed(stratum: Stratum) -> dict[str, Any]:
    c = compare_pair(list(stratum.a), list(stratum.b), confidence=CONFIDENCE)
    return {"label": stratum.label, "n": c.n, "rate_a": c.rate_a, "rate_b": c.rate_b, "difference": c.difference,
            "ci_low": c.ci_low, "ci_high": c.ci_high, "p_value": c.mcnemar.p_value,
            "only_a": c.mcnemar.b_only_a, "only_b": c.mcnemar.b_only_b}


def _family(comparisons: list[dict[str, Any]], q: float, margin: float) -> None:
    """BH over a family's pooled p-values, then each comparison's answer (in place)."""
    adjusted, rejected = benjamini_hochberg([c["pooled"]["p_value"] for c in comparisons], q)
    for c, p, r in zip(comparisons, adjusted, rejected):
        c["pooled"].update(p_adjusted=p, significant=r)
        c["answer"] = answer(c["pooled"], margin)


def analyze_runs(runs: Mapping[int, Mapping[int, RunOutcomes]], *, q: float = 0.05,
                 margin: float = MARGIN) -> dict[str, Any]:
    """``runs``: round -> training seed -> the run's outcomes (finished runs only)."""
    rounds_out = []
    for r in sorted(runs):
        by_seed = runs[r]
        seeds = sorted(by_seed)
        models = [m for m in by_seed[seeds[0]].models if all(m in by_seed[s].models for s in seeds)]
        family = []
        for question in QUESTIONS:
            a, b = question.a, question.b
            if a not in models or b not in models:
                continue
            for aspect in ASPECTS:
                strata = [by_seed[s].stratum(f"seed {s}", a, b, aspect) for s in seeds]
                family.append({"id": question.id, "title": question.title, "a": a, "b": b, "aspect": aspect,
                               "per_seed": [_per_seed(st) for st in strata],
                               "pooled": _pooled_dict(pool(strata, confidence=CONFIDENCE))})
        _family(family, q, margin)
        rates = {m: {aspect: {str(s): _rate(by_seed[s].aspects[m][aspect]) for s in seeds} for aspect in ASPECTS}
                 for m in models}
        rounds_out.append({"round": r, "seeds": seeds, "models": models, "questions": family, "rates": rates})

    across = []
    for r in sorted(runs)[1:]:
        seeds = sorted(set(runs[r]) & set(runs[r - 1])) if r - 1 in runs else []
        for m in TRAINED:
            if not seeds or not all(m in runs[r][s].models and m in runs[r - 1][s].models for s in seeds):
                continue
            for aspect in ASPECTS:
                strata = [runs[r][s].stratum(f"seed {s}", m, m, aspect, other=runs[r - 1][s]) for s in seeds]
                across.append({"model": m, "aspect": aspect, "a": f"{m} (round {r})", "b": f"{m} (round {r - 1})",
                               "round": r, "per_seed": [_per_seed(st) for st in strata],
                               "pooled": _pooled_dict(pool(strata, confidence=CONFIDENCE))})
    if across:
        _family(across, q, margin)
    return {
        "schema": RESULTS_SCHEMA,
        "settings": {"q": q, "margin": margin, "confidence": CONFIDENCE,
                     "aspects": {k: list(v) for k, v in ASPECTS.items()},
                     "pooled_test": "exact sign-flip test over items (each item's pairs across seeds a cluster); "
                                    "exact McNemar on the pooled discordant pairs when no item repeats",
                     "pooled_interval": "Tango's score interval for paired proportions on the counts divided by "
                                        "the design effect of the clustering by item (Rao-Scott)",
                     "correction": "Benjamini-Hochberg within each round's primary family (questions x aspects), "
                                   "and within the round-against-round family"},
        "rounds": rounds_out,
        "across_rounds": across,
    }


def _rate(values: Sequence[bool | None]) -> float | None:
    applied = [v for v in values if v is not None]
    return sum(applied) / len(applied) if applied else None


def load_finished(out: Path, state: Mapping[str, Any]) -> dict[int, dict[int, RunOutcomes]]:
    """Every finished run with scores, by round and seed."""
    runs: dict[int, dict[int, RunOutcomes]] = {}
    for name, entry in state["runs"].items():
        run_dir = out / entry["dir"]
        if entry.get("status") == "done" and (run_dir / SCORES).is_file() and (run_dir / RESULTS).is_file():
            runs.setdefault(entry["round"], {})[entry["seed"]] = RunOutcomes(name, run_dir)
    return runs


def write_experiment_report(out: Path, state: Mapping[str, Any]) -> dict[str, Path]:
    """results.json and the report of every finished run so far."""
    from ..config import PipelineConfig
    from ..evaluation.experiment_report import write_experiment_report as render

    config = PipelineConfig.model_validate(state["config"])
    runs = load_finished(out, state)
    if not runs:
        raise ValueError(f"{out}: no finished run with scores to report on")
    results = analyze_runs(runs, q=config.evaluation.fdr_q, margin=config.evaluation.equivalence_margin)
    results["experiment"] = {"settings": state["settings"], "seeds": state["seeds"], "rounds": state["rounds"],
                             "runs": {n: {k: r.get(k) for k in ("status", "round", "seed", "data_seed", "dir",
                                                                   "duration_s", "adopted")}
                                      for n, r in state["runs"].items()},
                             "estimate": state.get("estimate", {}).get("line")}
    results["provenance"] = provenance(out, state)
    paths = {"results": atomic_write_json(out / "results.json", results)}
    paths.update(render(results, out_dir=out / "report"))
    return paths


def provenance(out: Path, state: Mapping[str, Any]) -> dict[str, Any]:
    """Which model wrote which run's SFT data and sampled its pairs (fingerprints), per run."""
    import json

    rows = {}
    for name, entry in state["runs"].items():
        manifest = out / entry["dir"] / "manifest.json"
        if not manifest.is_file():
            continue
        steps = json.loads(manifest.read_text(encoding="utf-8"))["steps"]
        sft = steps.get("sft-data", {})
        writer = sft.get("provenance", {}).get("writer") or {}
        evaluation = steps.get("evaluate", {}).get("metrics", {}).get("fingerprints", {})
        rows[name] = {
            "sft_data_written_by": writer.get("model"), "writer_run": writer.get("run_dir"),
            "writer_fingerprint": writer.get("fingerprint"),
            "sft_data_adopted_from": (sft.get("provenance", {}).get("adopted_from") or {}).get("run_dir"),
            "pairs_policy_fingerprint": steps.get("pairs", {}).get("provenance", {}).get("policy", {}).get("fingerprint"),
            "model_fingerprints": evaluation,
        }
    return rows
