"""The experiment report: experiment.md, a self-contained experiment.html and PNG plots.

The same blocks and renderers as the run report (:mod:`.report`). Sections: the pooled answers of
every round, the rounds side by side (and each trained model against its previous round), the
answers per seed, the spread of pass rates over seeds, the runs and what wrote their data, how the
pooled test works.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import PercentFormatter

from ..files import atomic_write_bytes, atomic_write_text
from .report import (
    Bullets,
    Cell,
    Details,
    Image,
    Para,
    Section,
    Table,
    _png,
    _style,
    model_colours,
    pvalue,
    render_html,
    render_markdown,
    signed_pct,
    value_text,
)

ANSWER_MARK = {"better": "better ▲", "worse": "worse ▼", "equivalent": "equivalent ≈", "cannot tell": "cannot tell"}


def _interval(c: Mapping[str, Any]) -> str:
    return f"{signed_pct(c['difference'])} [{signed_pct(c['ci_low'])}, {signed_pct(c['ci_high'])}]"


def _agreement(c: Mapping[str, Any]) -> str:
    """How many seeds point the pooled way, e.g. '3 of 3 +' or '2 of 3 + (1 −)'."""
    p = c["pooled"]
    n = p["n_strata"]
    sign = "+" if p["difference"] > 0 else ("−" if p["difference"] < 0 else "0")
    rest = [f"{k} {s}" for k, s in ((p["positive"], "+"), (p["negative"], "−"), (p["zero"], "0"))
            if k and s != sign]
    return f"{p['agree']} of {n} {sign}" + (f" ({', '.join(rest)})" if rest else "")


def _comparison_rows(comparisons: Sequence[Mapping[str, Any]], label) -> tuple[list[list], list[bool]]:
    rows, marks = [], []
    for c in comparisons:
        p = c["pooled"]
        rows.append([
            *label(c), c["aspect"], str(p["n_strata"]), str(p["n_pairs"]),
            f"{100 * p['rate_a']:.0f}% / {100 * p['rate_b']:.0f}%", _interval(p),
            f"{p['only_a']} / {p['only_b']}", pvalue(p["p_value"]), pvalue(p["p_adjusted"]),
            Cell(ANSWER_MARK.get(c["answer"], c["answer"]), bold=c["answer"] in ("better", "worse")),
            _agreement(c), ", ".join(signed_pct(s["difference"]) for s in c["per_seed"]),
        ])
        marks.append(c["answer"] in ("better", "worse"))
    return rows, marks


POOLED_HEADERS = ["aspect", "seeds", "pairs", "rate A / B", "pooled diff A−B [95% CI]", "A only / B only",
                  "p", "p (BH)", "answer", "seeds agreeing", "per seed"]


def answers_section(results: Mapping[str, Any]) -> Section:
    s = results["settings"]
    blocks: list = [Para(
        f"Each research question pooled over the training seeds: the difference in pass rate (A − B) over "
        f"all seeds' paired items, its 95% score interval widened for items shared by seeds, the exact "
        f"clustered test (each item's pairs across seeds are one cluster: the seeds answer the same "
        f"items), Benjamini-Hochberg within each round's questions × aspects at q = {s['q']}. Answers: "
        f"better / worse (significant, interval on that side of 0), equivalent (interval inside "
        f"±{100 * s['margin']:.0f} points), otherwise cannot tell. 'Seeds agreeing': seeds whose own "
        f"difference has the pooled sign.")]
    for rnd in results["rounds"]:
        rows, marks = _comparison_rows(rnd["questions"], lambda c: [f"{c['id']} {c['a']} vs {c['b']}"])
        blocks += [Para(f"Round {rnd['round']} — seeds {', '.join(map(str, rnd['seeds']))}", kind="note"),
                   Table(["question (A vs B)", *POOLED_HEADERS], rows,
                         numeric=[False, False, True, True, True, True, True, True, True, False, False, False],
                         row_marks=marks)]
    titles = {c["id"]: c["title"] for rnd in results["rounds"] for c in rnd["questions"]}
    blocks.append(Bullets([f"{qid}: {title}" for qid, title in titles.items()]))
    return Section("Pooled answers", "answers", blocks)


def rounds_section(results: Mapping[str, Any]) -> Section | None:
    rounds = results["rounds"]
    if len(rounds) < 2:
        return None
    keys = list(dict.fromkeys((c["id"], c["aspect"]) for rnd in rounds for c in rnd["questions"]))
    rows = []
    for qid, aspect in keys:
        cells: list = [qid, aspect]
        for rnd in rounds:
            c = next((c for c in rnd["questions"] if (c["id"], c["aspect"]) == (qid, aspect)), None)
            cells.append("—" if c is None else f"{_interval(c['pooled'])} {ANSWER_MARK[c['answer']]}")
        rows.append(cells)
    blocks: list = [
        Para("The questions round by round: in round r+1 the chosen model of round r wrote the SFT data and "
             "sampled the pairs; every round trains from the base model and is evaluated on the same held-out "
             "items."),
        Table(["question", "aspect", *[f"round {r['round']}" for r in rounds]], rows,
              numeric=[False, False] + [True] * len(rounds)),
    ]
    across = results.get("across_rounds") or []
    if across:
        rows, marks = _comparison_rows(across, lambda c: [f"{c['a']} vs {c['b']}"])
        blocks += [Para("Does a round beat the one before? Each trained model against the same model of the "
                        "previous round, paired by item within each seed and pooled over seeds "
                        "(Benjamini-Hochberg within this family)."),
                   Table(["A vs B", *POOLED_HEADERS], rows,
                         numeric=[False, False, True, True, True, True, True, True, True, False, False, False],
                         row_marks=marks)]
    return Section("Rounds side by side", "rounds", blocks)


def per_seed_section(results: Mapping[str, Any]) -> Section:
    blocks: list = [Para("Each seed's own paired comparison (what that run's report shows): McNemar's test and a "
                         "Newcombe interval of the paired difference on that seed's items, uncorrected.")]
    for rnd in results["rounds"]:
        rows = []
        for c in rnd["questions"]:
            for s in c["per_seed"]:
                rows.append([f"{c['id']} {c['a']} vs {c['b']}", c["aspect"], s["label"], str(s["n"]),
                             f"{100 * s['rate_a']:.0f}% / {100 * s['rate_b']:.0f}%", _interval(s),
                             f"{s['only_a']} / {s['only_b']}", pvalue(s["p_value"])])
        blocks.append(Details(f"Round {rnd['round']}: {len(rows)} per-seed comparisons", [
            Table(["question", "aspect", "seed", "n", "rate A / B", "diff A−B [95% CI]", "A only / B only",
                   "McNemar p"], rows, numeric=[False, False, False, True, True, True, True, True])]))
    return Section("Per seed", "per-seed", blocks)


def spread_section(results: Mapping[str, Any], images: Sequence[Image]) -> Section:
    rows = []
    for rnd in results["rounds"]:
        for m, by_aspect in rnd["rates"].items():
            for aspect, by_seed in by_aspect.items():
                values = [v for v in by_seed.values() if v is not None]
                spread = f"{100 * min(values):.0f}–{100 * max(values):.0f}%" if values else "—"
                rows.append([str(rnd["round"]), m, aspect, spread,
                             ", ".join("—" if v is None else f"{100 * v:.0f}%" for v in by_seed.values())])
    return Section("Spread over seeds", "spread", [
        *images,
        Details("Pass rates per seed", [Table(["round", "model", "aspect", "range", "per seed"], rows,
                                              numeric=[True, False, False, True, True])]),
    ])


def runs_section(results: Mapping[str, Any]) -> Section:
    exp, prov = results.get("experiment", {}), results.get("provenance", {})
    rows = []
    for name, r in exp.get("runs", {}).items():
        p = prov.get(name, {})
        if p.get("sft_data_adopted_from"):
            wrote = f"shared: {p['sft_data_adopted_from']}"
        elif p.get("sft_data_written_by"):
            wrote = f"{p['sft_data_written_by']} of {p.get('writer_run') or 'this run'} ({p.get('writer_fingerprint')})"
        else:
            wrote = "—"
        adopted = r.get("adopted") or {}
        rows.append([name, r.get("status", ""), value_text(r.get("duration_s")), str(r.get("data_seed")),
                     ", ".join(adopted.get("steps", [])) + (f" from {adopted['from']}" if adopted else ""),
                     wrote, value_text(p.get("pairs_policy_fingerprint"))])
    blocks: list = [Table(["run", "status", "seconds", "data seed", "adopted steps", "SFT data written by",
                           "pairs policy"], rows, numeric=[False, False, True, True, False, False, False])]
    if exp.get("estimate"):
        blocks.append(Para(f"Estimate at the start of the last invocation: {exp['estimate']}", kind="note"))
    return Section("Runs", "runs", blocks)


def method_section(results: Mapping[str, Any]) -> Section:
    s = results["settings"]
    aspects = "; ".join(f"{k}: all of {', '.join(v)}" for k, v in s["aspects"].items())
    return Section("How the pooling works", "method", [Bullets([
        "McNemar's test is the Cochran-Mantel-Haenszel test with each matched pair (one item under A and "
        "under B) as a stratum; over seeds, CMH over all (seed, item) pairs pools the discordant counts. "
        "The CMH numbers are in results.json (cmh: statistic, p, Mantel-Haenszel odds ratio with its "
        "Robins-Breslow-Greenland interval).",
        "CMH assumes independent strata, but the seeds answer the same held-out items: an item hard for A "
        "is hard for A in every seed. The pooled p-value therefore treats each item as a cluster of its "
        "pairs across seeds: an exact sign-flip test on the per-item sums (equal to exact McNemar on the "
        "pooled discordant pairs when no item repeats).",
        f"Pooled intervals: {s['pooled_interval']}: seeds that only repeat each other give the interval of "
        f"one seed; with no discordant pair the interval stays open (n = 16 leaves ±19 points). Per-seed "
        f"intervals are the runs' own (Newcombe's interval of the paired difference). Aspects (a response passes when every part that "
        f"applies passes): {aspects}.",
        "The test is conditional on the seeds run: the spread plot and the seeds agreeing say how much a "
        "seed moves the result.",
    ])])


# --------------------------------------------------------------------------------------------
# Plots


def plot_spread(results: Mapping[str, Any]) -> bytes:
    """Each model's pass rate per seed (dots) and mean (bar), per round, one panel per aspect."""
    rounds = results["rounds"]
    aspects = list(results["settings"]["aspects"])
    models = list(dict.fromkeys(m for rnd in rounds for m in rnd["models"]))
    colours = model_colours(models)
    groups = [(rnd["round"], m) for rnd in rounds for m in rnd["models"]]
    fig = Figure(figsize=(max(6.0, 0.55 * len(groups) + 2), 3.2 * len(aspects)))
    axes = fig.subplots(len(aspects), 1, squeeze=False)[:, 0]
    for ax, aspect in zip(axes, aspects):
        for x, (r, m) in enumerate(groups):
            rnd = next(rr for rr in rounds if rr["round"] == r)
            values = [v for v in rnd["rates"][m][aspect].values() if v is not None]
            if not values:
                continue
            jitter = [(i - (len(values) - 1) / 2) * 0.08 for i in range(len(values))]
            ax.scatter([x + j for j in jitter], values, color=colours[m], s=22, zorder=3)
            mean = sum(values) / len(values)
            ax.plot([x - 0.3, x + 0.3], [mean, mean], color=colours[m], linewidth=2.2, zorder=2)
        for x in range(1, len(groups)):
            if groups[x][0] != groups[x - 1][0]:  # between rounds
                ax.axvline(x - 0.5, color="#999999", linewidth=0.8, linestyle=":")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{m}\nround {r}" if len(rounds) > 1 else m for r, m in groups], fontsize=8)
        ax.set_ylim(-0.03, 1.03)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(axis="y", color="#e3e3e3", zorder=0)
        ax.set_title(f"{aspect}: pass rate per seed (dots) and mean over seeds (bar)", fontsize=10, loc="left")
        _style(ax)
    fig.tight_layout()
    return _png(fig)


def plot_pooled(results: Mapping[str, Any]) -> bytes:
    """Forest plot: each question x aspect's pooled difference with its interval, each seed's difference
    as a small cross; filled when the pooled answer is better or worse."""
    rows = [(rnd["round"], c) for rnd in results["rounds"] for c in rnd["questions"]]
    fig = Figure(figsize=(8.5, 0.6 + 0.32 * len(rows) + 0.8))
    ax = fig.add_subplot()
    colours = {"format": "#4c78a8", "content": "#e45756"}
    labels = []
    for y, (r, c) in enumerate(rows):
        p = c["pooled"]
        colour = colours.get(c["aspect"], "#555555")
        ax.plot([p["ci_low"], p["ci_high"]], [y, y], color=colour, linewidth=1.8, zorder=2)
        decided = c["answer"] in ("better", "worse")
        ax.plot([p["difference"]], [y], marker="o", markersize=7, color=colour,
                markerfacecolor=colour if decided else "white", markeredgewidth=1.5, zorder=3)
        ax.plot([s["difference"] for s in c["per_seed"]], [y] * len(c["per_seed"]), linestyle="none",
                marker="x", markersize=5, color="#333333", zorder=4)
        labels.append(f"{c['id']} {c['a']}−{c['b']} · {c['aspect']}" + (f" · r{r}" if len(results["rounds"]) > 1 else ""))
    margin = results["settings"]["margin"]
    ax.axvspan(-margin, margin, color="#f0f0f0", zorder=0)
    ax.axvline(0, color="#444444", linewidth=0.9, zorder=1)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(-1.02, 1.02)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("pooled difference in pass rate A − B (95% interval); × = one seed")
    handles = [Line2D([], [], color=col, marker="o", label=a) for a, col in colours.items()]
    handles += [Line2D([], [], color="#333333", marker="x", linestyle="none", label="a seed"),
                Line2D([], [], color="#f0f0f0", linewidth=8, label=f"±{100 * margin:.0f} points")]
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=len(handles), frameon=False,
              fontsize=8)
    _style(ax)
    return _png(fig)


def write_experiment_report(results: Mapping[str, Any], *, out_dir: Path) -> dict[str, Path]:
    """experiment.md, experiment.html and the plots in out_dir, by name."""
    out_dir = Path(out_dir)
    pooled = Image("pooled.png", "Pooled difference per question and aspect with its 95% interval (filled: "
                   "answered better or worse); crosses: each seed's own difference; grey band: the "
                   "equivalence margin.", plot_pooled(results))
    spread = Image("spread.png", "Each model's pass rate in each seed (dots) and the mean over seeds (bar).",
                   plot_spread(results))
    sections = [s for s in (answers_section(results), Section("Plot", "plot", [pooled]), rounds_section(results),
                            per_seed_section(results), spread_section(results, [spread]), runs_section(results),
                            method_section(results)) if s is not None]
    exp = results.get("experiment", {})
    title = "cai-bootstrap experiment report"
    subtitle = (f"{exp.get('seeds', '?')} training seed(s) × {exp.get('rounds', '?')} round(s) · "
                f"rounds written by {exp.get('settings', {}).get('writer', '?')} · "
                f"{'own data per seed' if exp.get('settings', {}).get('data_seeds') else 'shared data'}")
    written = {Path(img.name).stem: atomic_write_bytes(out_dir / img.name, img.png) for img in (pooled, spread)}
    written["markdown"] = atomic_write_text(out_dir / "experiment.md", render_markdown(sections, title))
    written["html"] = atomic_write_text(out_dir / "experiment.html", render_html(sections, title, subtitle))
    return written
