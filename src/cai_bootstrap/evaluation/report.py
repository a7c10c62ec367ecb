"""The evaluation report: report.md, a self-contained report.html, and PNG plots.

Each section is built once as a list of blocks (paragraphs, bullet lists, tables, figures,
sample grids) by a small function; two renderers turn the blocks into Markdown and HTML. The HTML
has its CSS inline and its images embedded as base64 PNG data URIs: it loads nothing from
anywhere. All text that comes from data (instructions, responses, names, provenance) is escaped.

Sections, in order: the answers to the three questions (with per-question notes), what this run
can and cannot conclude, plots, pass rates, exploratory comparisons (apart, their own correction),
the in-distribution slice (if any), per category, judge scores (if any), capability baseline,
data and training summaries, sample responses, provenance.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import matplotlib

matplotlib.use("Agg")  # no display: the report is written to files only

from matplotlib.figure import Figure  # noqa: E402  (after the backend is chosen)
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402

from ..files import atomic_write_bytes, atomic_write_text  # noqa: E402
from .questions import ASPECTS, QUESTIONS, points  # noqa: E402
from .training_summary import budget_notes  # noqa: E402

DPI = 130
# Fixed colours for the pipeline's models; extras take the rest in order.
MODEL_COLOURS = {"base": "#9a9a9a", "base_fewshot": "#5f5f5f", "sft": "#4c78a8", "dpo": "#e45756",
                 "dpo_only": "#f2a541"}
EXTRA_COLOURS = ["#54a24b", "#b279a2", "#72b7b2", "#9d755d", "#eeca3b", "#ff9da6", "#439894"]
ANSWER_COLOURS = {"better": "#1e7b34", "worse": "#b42318", "equivalent": "#1d4f91", "cannot tell": "#44505c"}
COMPOSITES = tuple(ASPECTS)


# --------------------------------------------------------------------------------------------
# Blocks: what a section is made of
# --------------------------------------------------------------------------------------------


@dataclass
class Cell:
    text: str
    bold: bool = False
    mark: bool = False  # highlighted (a significant comparison)


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Union[Cell, str]]]
    numeric: list[bool] = field(default_factory=list)  # right-align these columns
    row_marks: list[bool] = field(default_factory=list)  # highlight whole rows


@dataclass
class Para:
    text: str
    kind: str = ""  # "question" for a question's heading, "note" for small print


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Image:
    name: str  # file name next to the report
    caption: str
    png: bytes


@dataclass
class Samples:
    samples: list[dict]
    models: list[str]


@dataclass
class Details:
    summary: str
    blocks: list


@dataclass
class Section:
    title: str
    anchor: str
    blocks: list


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def pct(x: float | None, digits: int = 0) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def rate_cell(summary: Mapping[str, Any]) -> str:
    """'85% [72–93]' (rate, Wilson interval in percent); '—' where nothing applied."""
    if not summary or summary["n"] == 0:
        return "—"
    return f"{100 * summary['rate']:.0f}% [{100 * summary['ci_low']:.0f}–{100 * summary['ci_high']:.0f}]"


def pvalue(p: float | None) -> str:
    if p is None:
        return "—"
    if p < 0.001:
        return "<0.001"
    return f"{p:.3f}" if p < 0.1 else f"{p:.2f}"


def signed_pct(x: float) -> str:
    return f"{100 * x:+.0f}%" if round(100 * x) != 0 else "0%"


def value_text(v: Any) -> str:
    """A generic value for a table cell: numbers compactly, lists of numbers summarised."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        if v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) and len(v) > 4:
            return f"{len(v)} values: {value_text(v[0])} → {value_text(v[-1])} (min {value_text(min(v))}, max {value_text(max(v))})"
        return ", ".join(value_text(x) for x in v) if v else "—"
    if isinstance(v, dict):
        return json.dumps(v, ensure_ascii=False, default=str)
    return str(v)


def flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings as dotted keys, in insertion order."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.extend(flatten(v, key))
        else:
            out.append((key, v))
    return out


def model_colours(models: Sequence[str]) -> dict[str, str]:
    colours, extra = {}, iter(EXTRA_COLOURS * 4)
    for m in models:
        colours[m] = MODEL_COLOURS.get(m) or next(extra)
    return colours


# --------------------------------------------------------------------------------------------
# Plots (matplotlib Figure objects directly: no pyplot state)
# --------------------------------------------------------------------------------------------


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def _style(ax) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=9)


def _legend_on_top(ax, handles, ncol: int) -> None:
    """One row of legend between the title and the axes, left-aligned with the title."""
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=min(ncol, 6),
              frameon=False, fontsize=9, borderaxespad=0.2, handlelength=1.6, columnspacing=1.4)


def _criterion_axis(ax, criteria: list[str]) -> None:
    """Criteria top to bottom on the y axis, the composites in bold."""
    ax.set_yticks(range(len(criteria)))
    ax.set_yticklabels(criteria)
    for label in ax.get_yticklabels():
        if label.get_text() in COMPOSITES:
            label.set_fontweight("bold")
    ax.set_ylim(len(criteria) - 0.5, -0.5)


def plot_pass_rates(results: Mapping[str, Any]) -> bytes:
    """Horizontal grouped bars: pass rate per criterion and model, Wilson 95% error bars."""
    models, criteria, rates = results["models"], results["criteria"], results["rates"]
    colours = model_colours(models)
    k = len(models)
    height = 0.8 / k
    fig = Figure(figsize=(9, 0.3 + 0.22 * k * len(criteria) + 0.9))
    ax = fig.add_subplot()
    for j, m in enumerate(models):
        ys, xs, lo, hi = [], [], [], []
        for i, c in enumerate(criteria):
            s = rates[m][c]
            if s["n"] == 0:
                continue
            ys.append(i - 0.4 + height * (j + 0.5))
            xs.append(s["rate"])
            lo.append(s["rate"] - s["ci_low"])
            hi.append(s["ci_high"] - s["rate"])
        ax.barh(ys, xs, height=height * 0.92, color=colours[m], label=m, zorder=2)
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="none", ecolor="#333333", elinewidth=0.9,
                    capsize=2, zorder=3)
    _criterion_axis(ax, criteria)
    ax.set_xlim(0, 1.0)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(axis="x", color="#dddddd", zorder=0)
    last = max((criteria.index(c) for c in COMPOSITES if c in criteria), default=None)
    if last is not None:
        ax.axhline(last + 0.5, color="#888888", linewidth=0.8, linestyle=":")
    ax.set_xlabel("pass rate (95% Wilson interval)")
    ax.set_title(f"Pass rate per criterion — {results['n_items']} test items", fontsize=11, loc="left", pad=26)
    _legend_on_top(ax, ax.get_legend_handles_labels()[0], k)
    _style(ax)
    return _png(fig)


def plot_categories(results: Mapping[str, Any], criterion: str = "content") -> bytes:
    """Heatmap of one criterion's pass rate by category (rows) and model (columns)."""
    models, categories = results["models"], list(results["categories"])
    grid = [[results["categories"][c]["rates"][m][criterion]["rate"] for m in models] for c in categories]
    fig = Figure(figsize=(1.6 + 1.25 * len(models), 0.9 + 0.55 * len(categories)))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i, c in enumerate(categories):
        n = results["categories"][c]["n_items"]
        for j, m in enumerate(models):
            v = grid[i][j]
            ax.text(j, i, f"{100 * v:.0f}%", ha="center", va="center", fontsize=10,
                    color="black" if 0.25 < v < 0.8 else "white", fontweight="bold")
        categories[i] = f"{c} (n={n})"
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models)
    ax.set_yticks(range(len(categories)))
    ax.set_yticklabels(categories)
    ax.tick_params(length=0, labelsize=9)
    ax.xaxis.tick_top()
    for spine in ax.spines.values():
        spine.set_visible(False)
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03, format=PercentFormatter(1.0))
    bar.ax.tick_params(labelsize=8)
    ax.set_title(f"{criterion} pass rate by category", fontsize=11, loc="left", pad=24)
    return _png(fig)


def plot_answers(results: Mapping[str, Any]) -> bytes | None:
    """Forest plot of the primary family: each question's difference on format and content with
    its 95% interval, the ±margin band shaded, the marker coloured by the answer. None when no
    question could be evaluated."""
    rows = [(f"{q['id']} {aspect}\n{q['a']} − {q['b']}", a) for q in results["questions"]
            for aspect, a in q["aspects"].items()]
    if not rows:
        return None
    margin = results["settings"]["margin"]
    fig = Figure(figsize=(9, 1.2 + 0.55 * len(rows)))
    ax = fig.add_subplot()
    ax.axvspan(-margin, margin, color="#e8f0fb", zorder=0, label=f"±{100 * margin:.0f} points (margin)")
    for i, (_, a) in enumerate(rows):
        colour = ANSWER_COLOURS[a["answer"]]
        ax.plot([a["ci_low"], a["ci_high"]], [i, i], color=colour, linewidth=2, zorder=2)
        ax.plot([a["difference"]], [i], marker="o", markersize=7, color=colour, zorder=3)
        ax.text(1.02, i, a["answer"], transform=ax.get_yaxis_transform(), va="center", fontsize=9, color=colour)
    ax.axvline(0, color="#444444", linewidth=0.9, zorder=1)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r for r, _ in rows], fontsize=8.5)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ends = [abs(x) for _, a in rows for x in (a["ci_low"], a["ci_high"])]
    reach = min(1.05, max(1.5 * margin, 1.15 * max(ends, default=1.0)))
    ax.set_xlim(-reach, reach)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(axis="x", color="#e3e3e3", zorder=0)
    ax.set_xlabel("difference in pass rate, a − b (Newcombe 95% interval)")
    ax.set_title("The three questions: format and content", fontsize=11, loc="left", pad=26)
    handles = [Line2D([], [], color=c, marker="o", linewidth=2, label=k) for k, c in ANSWER_COLOURS.items()]
    _legend_on_top(ax, handles, len(handles))
    _style(ax)
    return _png(fig)


# The panels of the training-curves figure: (training, history key, title); SFT's eval loss is drawn
# over its training loss. The same quantities TensorBoard shows (training/tracking.py).
SFT_PANELS = (("loss", "SFT loss (token mean; ○ eval)"), ("lr", "SFT learning rate"),
              ("tokens_per_s", "SFT tokens/s"))
DPO_PANELS = (("loss", "DPO loss"), ("rewards/accuracies", "DPO reward accuracy"),
              ("rewards/margins", "DPO reward margin"))


def plot_training_curves(curves: Mapping[str, Mapping[str, Any]]) -> bytes | None:
    """Learning curves from each training's training.json: SFT loss (with its eval loss), learning rate
    and throughput; DPO loss, reward accuracy and reward margin of each DPO run, side by side. None when
    no training recorded a history. ``curves``: {"sft": training.json, "dpo": ..., "dpo_only": ...}."""
    rows = []
    if curves.get("sft", {}).get("history"):
        rows.append([("sft", key, title) for key, title in SFT_PANELS])
    dpo_runs = [m for m in curves if m != "sft" and curves[m].get("history")]
    if dpo_runs:
        rows.append([(None, key, title) for key, title in DPO_PANELS])
    if not rows:
        return None
    colours = model_colours(list(curves))
    fig = Figure(figsize=(11, 2.9 * len(rows)))
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for r, panels in enumerate(rows):
        for c, (training, key, title) in enumerate(panels):
            ax = axes[r][c]
            for name in ([training] if training else dpo_runs):
                points = [(h["step"], h[key]) for h in curves[name]["history"] if h.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), color=colours[name], linewidth=1.6, marker=".", label=name)
            if training == "sft" and key == "loss":
                evals = [(e["step"], e["eval_loss"]) for e in curves["sft"].get("eval_history", [])
                         if e.get("eval_loss") is not None]
                if curves["sft"].get("eval_loss") is not None:
                    last = curves["sft"]["history"][-1]["step"]
                    evals.append((last, curves["sft"]["eval_loss"]))
                if evals:
                    ax.plot(*zip(*evals), color=colours["sft"], linestyle="none", marker="o", markersize=6,
                            markerfacecolor="white", label="eval")
            ax.set_title(title, fontsize=10, loc="left")
            ax.set_xlabel("optimizer step", fontsize=9)
            ax.grid(color="#e3e3e3")
            _style(ax)
            if training is None and c == 0:
                ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _n_text(ns: Sequence[int]) -> str:
    return str(ns[0]) if len(set(ns)) == 1 else f"{min(ns)}–{max(ns)}"


def _diff_cell(c: Mapping[str, Any]) -> str:
    if not c["n"]:
        return "—"
    return f"{signed_pct(c['difference'])} [{signed_pct(c['ci_low'])}, {signed_pct(c['ci_high'])}]"


def answers_rows(results: Mapping[str, Any]) -> Table:
    """One row per question and aspect: the two rates, the difference with its interval, the
    adjusted p-value and the answer."""
    rows, marks = [], []
    for q in results["questions"]:
        label = f"{q['id']} {q['title']}"
        if not q["evaluated"]:
            rows.append([label, f"{q['a']} vs {q['b']}", "—", "—", "—", "—", "—", "—",
                         Cell(f"not evaluated (no {', '.join(q['missing'])})")])
            marks.append(False)
            continue
        for aspect, a in q["aspects"].items():
            rows.append([label, f"{q['a']} vs {q['b']}", aspect, str(a["n"]),
                         f"{pct(a['rate_a'])} ({a['rate_a'] * a['n']:.0f})",
                         f"{pct(a['rate_b'])} ({a['rate_b'] * a['n']:.0f})",
                         f"{points(a['difference'])} [{points(a['ci_low'])}, {points(a['ci_high'])}]",
                         pvalue(a["p_adjusted"]), Cell(a["answer"], bold=True)])
            marks.append(a["answer"] in ("better", "worse", "equivalent"))
    return Table(["question", "a vs b", "aspect", "n", "rate a", "rate b", "a − b, points [95% CI]", "p (BH)",
                  "answer"],
                 rows, numeric=[False, False, False, True, True, True, True, True, False], row_marks=marks)


def answers_table(results: Mapping[str, Any]) -> str:
    """The questions table as Markdown (also readable as plain text in a console)."""
    return _md_table(answers_rows(results))


def answers_section(results: Mapping[str, Any]) -> Section:
    family, settings = results["primary_family"], results["settings"]
    margin = 100 * settings["margin"]
    test_set = results.get("test_set") or {}
    splits = {"template": "a template-disjoint split: no test item shares a template with training",
              "item": "an item-level split: test items may share templates with training"}
    split = splits.get(test_set.get("split_by"), "")
    blocks: list = [
        Para(f"{results['n_items']} held-out test items{f' ({split})' if split else ''}, answered by every "
             f"model. Each question compares two models on the same items, on format and on content; these "
             f"{family['n_tests']} comparisons are the primary family, fixed before the data, with "
             f"Benjamini-Hochberg at q = {family['q']} within it."),
        answers_rows(results),
    ]
    for q in results["questions"]:
        lines = [f"{aspect} — {a['answer']}: {a['explanation']}" for aspect, a in q["aspects"].items()]
        if not q["evaluated"]:
            lines.append(f"not evaluated: {', '.join(q['missing'])} not among the evaluated models")
        lines += [f"Note: {note}" for note in q.get("notes", [])]
        blocks += [Para(f"{q['id']} {q['title']} ({q['a']} vs {q['b']}: {q['meaning']})", kind="question"),
                   Bullets(lines)]
    blocks.append(Para(
        f"How to read an answer: better / worse — the difference is significant after the correction and its "
        f"95% interval lies on one side of 0; equivalent — not significant and the whole interval lies inside "
        f"±{margin:.0f} points (the margin, evaluation.equivalence_margin); cannot tell — neither: the data "
        f"do not decide, and the minimum detectable difference says how large a difference this test set "
        f"could have shown. Not significantly worse is never evidence of no harm.", kind="note"))
    blocks.append(Details("What format and content mean", [
        Table(["aspect", "passes when the response …"],
              [[a, results["definitions"][a]] for a in COMPOSITES if a in results["definitions"]])]))
    return Section("Answers", "answers", blocks)


def conclusions_section(results: Mapping[str, Any]) -> Section:
    c = results["conclusions"]
    rows = []
    for q in c["questions"]:
        for aspect, a in q["aspects"].items():
            rows.append([q["id"], aspect, str(a["n"]), pct(a["mdd"]["observed"]), pct(a["mdd"]["worst_case"]),
                         Cell("yes", bold=True) if a["underpowered"] else "no", a["answer"]])
    blocks: list = [Bullets(list(c["statements"]))]
    if rows:
        blocks.append(Table(
            ["question", "aspect", "n", "detectable (discordance seen)", "detectable (worst case)",
             f"underpowered (> ±{100 * c['margin']:.0f})", "answer"],
            rows, numeric=[False, False, True, True, True, False, False]))
    blocks.append(Para(
        f"Detectable: the difference a two-sided McNemar test at α = {c['alpha']:.3g} finds with "
        f"{c['power']:.0%} power on these n items (Connor's approximation), at the share of items on which "
        f"the two models disagree, and if every item disagreed.", kind="note"))
    return Section("What this run can and cannot conclude", "conclusions", blocks)


def plots_section(images: Sequence[Image]) -> Section:
    return Section("Plots", "plots", list(images))


def rates_rows(results: Mapping[str, Any]) -> Table:
    """Criteria (rows) x models (columns): 'rate [Wilson CI]', the best model per criterion bold."""
    models, rates = results["models"], results["rates"]
    rows = []
    for c in results["criteria"]:
        summaries = [rates[m][c] for m in models]
        ns = [s["n"] for s in summaries]
        if not any(ns):  # applies to no item here (e.g. no constrained items)
            continue
        applied = [s["rate"] for s in summaries if s["n"] > 0]
        best = max(applied) if applied else None
        distinct = len(set(applied)) > 1
        cells = [
            Cell(rate_cell(s), bold=distinct and s["n"] > 0 and s["rate"] == best) for s in summaries
        ]
        rows.append([Cell(c, bold=c in COMPOSITES), _n_text(ns), *cells])
    return Table(["criterion", "n", *models], rows, numeric=[False, True] + [True] * len(models))


def rates_section(results: Mapping[str, Any]) -> Section:
    definitions = results.get("definitions", {})
    blocks: list = [
        Para("Cells: pass rate [95% Wilson interval] over the n items where the criterion applies; bold marks "
             "the best model per criterion. base is prompted zero-shot and has never seen END: its format "
             "rate is a floor, not a competitor."),
        rates_rows(results),
    ]
    if definitions:
        blocks.append(Details("What the criteria mean", [
            Table(["criterion", "passes when the response …"],
                  [[c, definitions[c]] for c in results["criteria"] if c in definitions])
        ]))
    return Section("Pass rates", "rates", blocks)


def _comparison_rows(comparisons: Sequence[Mapping[str, Any]]) -> tuple[list[list], list[bool]]:
    rows, marks = [], []
    for c in comparisons:
        sig = bool(c["significant"])
        rows.append([
            c["criterion"],
            f"{c['a']} vs {c['b']}",
            str(c["n"]),
            pct(c["rate_a"]) if c["n"] else "—",
            pct(c["rate_b"]) if c["n"] else "—",
            _diff_cell(c),
            f"{c['only_a']} / {c['only_b']}",
            "exact" if c["method"] == "exact" else "χ² (cc)",
            pvalue(c["p_value"]),
            pvalue(c["p_adjusted"]),
            f"{c['cohens_h']:+.2f}",
            Cell("✓", bold=True) if sig else "",
        ])
        marks.append(sig)
    return rows, marks


COMPARISON_HEADERS = ["criterion", "A vs B", "n", "rate A", "rate B", "diff A−B [95% CI]", "A only / B only",
                      "McNemar", "p", "p (BH)", "Cohen's h", "sig."]
COMPARISON_NUMERIC = [False, False] + [True] * 9 + [False]


def exploratory_section(results: Mapping[str, Any]) -> Section | None:
    ex = results["exploratory"]
    if not ex["comparisons"]:
        return None
    significant = [c for c in ex["comparisons"] if c["significant"]]
    blocks: list = [Para(
        f"Every other pair of models and every single criterion: {ex['n_tests']} comparisons, "
        f"Benjamini-Hochberg at q = {ex['q']} within this family alone, so they do not dilute or borrow from "
        f"the answers. {ex['n_significant']} significant (✓). These are leads for the next run, not findings "
        f"of this one: the family was not chosen with a question in mind.", kind="note")]
    if significant:
        rows, marks = _comparison_rows(significant)
        blocks += [Para("The significant ones:"),
                   Table(COMPARISON_HEADERS, rows, numeric=COMPARISON_NUMERIC, row_marks=marks)]
    rows, marks = _comparison_rows(ex["comparisons"])
    blocks.append(Details(f"All {ex['n_tests']} exploratory comparisons", [
        Table(COMPARISON_HEADERS, rows, numeric=COMPARISON_NUMERIC, row_marks=marks)]))
    return Section("Exploratory comparisons (not the questions)", "exploratory", blocks)


def in_distribution_section(results: Mapping[str, Any]) -> Section | None:
    slice_ = results.get("in_distribution")
    if not slice_:
        return None
    sub = {**results, "rates": slice_["rates"]}
    rows = [[q["id"], f"{q['a']} vs {q['b']}", aspect, str(a["n"]), _diff_cell(a), pvalue(a["p_adjusted"]),
             a["answer"]] for q in slice_["questions"] for aspect, a in q["aspects"].items()]
    return Section("In-distribution slice (apart)", "in-distribution", [
        Para(f"{slice_['n_items']} items. {slice_['note']}", kind="note"),
        Table(["question", "a vs b", "aspect", "n", "a − b [95% CI]", "p (BH, slice)", "answer"], rows,
              numeric=[False, False, False, True, True, True, False]),
        Details("Pass rates on the slice", [rates_rows(sub)]),
    ])


def ifeval_section(results: Mapping[str, Any]) -> Section | None:
    """IFEval's four metrics and per-instruction-id pass rates (results["ifeval"])."""
    info = results.get("ifeval")
    if not info or not info["n_prompts"]:
        return None
    models = results["models"]
    metrics = ("prompt_level_strict", "prompt_level_loose", "inst_level_strict", "inst_level_loose")
    rows = [[m, *[rate_cell(info["models"][m][k]) for k in metrics]] for m in models]
    per_id = [[i, str(next((info["models"][m]["per_instruction"][i]["n"] for m in models
                            if i in info["models"][m]["per_instruction"]), 0)),
               *[f"{pct(info['models'][m]['per_instruction'][i]['strict'])} / "
                 f"{pct(info['models'][m]['per_instruction'][i]['loose'])}"
                 if i in info["models"][m]["per_instruction"] else "-" for m in models]]
              for i in info["instruction_ids"]]
    return Section("IFEval", "ifeval", [
        Para(f"{info['n_prompts']} test items carry {info['n_instructions']} IFEval instructions "
             f"({len(info['instruction_ids'])} distinct ids), checked by {info['implementation']}. "
             f"Checked text: {info['checked_text']}."),
        Para(f"Did these checks also filter the training data? {info['filtered_training_data']}.", "note"),
        Table(["model", *metrics], rows, numeric=[False] + [True] * len(metrics)),
        Bullets([f"{k}: {v}" for k, v in info["definitions"].items()]),
        Details("pass rate per instruction id (strict / loose)",
                [Table(["instruction id", "n", *models], per_id, numeric=[False, True] + [True] * len(models))]),
    ])


def categories_section(results: Mapping[str, Any]) -> Section:
    models = results["models"]
    rows = []
    for category, info in results["categories"].items():
        summaries = [info["rates"][m]["content"] for m in models]
        best = max(s["rate"] for s in summaries)
        distinct = len({s["rate"] for s in summaries}) > 1
        rows.append([category, str(info["n_items"]),
                     *[Cell(rate_cell(s), bold=distinct and s["rate"] == best) for s in summaries]])
    details = []
    for category, info in results["categories"].items():
        sub = {**results, "rates": info["rates"]}
        details.append(Details(f"{category}: every criterion ({info['n_items']} items)", [rates_rows(sub)]))
    return Section("Per category", "categories", [
        Para("content pass rate [95% Wilson interval] per item category. Small categories give "
             "wide intervals; read them as a breakdown, not as separate findings."),
        Table(["category", "items", *models], rows, numeric=[False, True] + [True] * len(models)),
        *details,
    ])


def judge_section(results: Mapping[str, Any]) -> Section | None:
    judge = results.get("judge")
    if not judge:
        return None
    models = results["models"]
    rows = []
    for metric in judge["metrics"]:
        cells = []
        for m in models:
            s = judge["means"][m][metric]
            if not s["n"]:
                cells.append("—")
            else:
                sd = f" ± {s['sd']:.2f}" if s["sd"] is not None else ""
                cells.append(f"{s['mean']:.2f}{sd} (n={s['n']})")
        rows.append([metric, *cells])
    return Section("Judge scores (separate)", "judge", [
        Para(judge["note"], kind="note"),
        Table(["metric", *models], rows, numeric=[False] + [True] * len(models)),
    ])


def baseline_section(baseline: Mapping[str, Any] | None) -> Section | None:
    if not baseline:
        return None
    blocks: list = []
    forms = baseline.get("forms") or {}
    if forms:
        columns: list[str] = []
        for scores in forms.values():
            for key in scores:
                if key not in columns:
                    columns.append(key)
        best = {}
        for col in columns:
            values = [s.get(col) for s in forms.values() if isinstance(s.get(col), (int, float))]
            best[col] = max(values) if len(set(values)) > 1 else None
        rows = []
        for form, scores in forms.items():
            cells: list = [form]
            for col in columns:
                v = scores.get(col)
                text = pct(v) if isinstance(v, float) and 0.0 <= v <= 1.0 else value_text(v)
                cells.append(Cell(text, bold=v is not None and v == best[col]))
            rows.append(cells)
        intro = "How the base model does on capability probes, per prompt form"
        if "n_probes" in baseline:
            intro += f" ({value_text(baseline['n_probes'])} probes)"
        blocks += [Para(intro + ". Bold: the best form per column."),
                   Table(["form", *columns], rows, numeric=[False] + [True] * len(columns))]
    rest = [(k, v) for k, v in flatten({k: v for k, v in baseline.items() if k != "forms"})]
    if rest:
        blocks.append(Table(["key", "value"], [[k, value_text(v)] for k, v in rest], numeric=[False, True]))
    return Section("Capability baseline", "baseline", blocks)


def summaries_section(summaries: Mapping[str, Any] | None) -> Section | None:
    if not summaries:
        return None
    count_rows, metric_rows = [], []
    for step, info in summaries.items():
        info = info or {}
        dropped = info.get("dropped") or {}
        total = sum(v for v in dropped.values() if isinstance(v, (int, float)))
        reasons = ", ".join(f"{r}: {value_text(n)}" for r, n in sorted(dropped.items(), key=lambda x: -x[1]))
        count_rows.append([step, value_text(info.get("kept")), value_text(total) if dropped else "0", reasons or "—"])
        for key, value in flatten(info.get("metrics") or {}):
            metric_rows.append([step, key, value_text(value)])
        others = {k: v for k, v in info.items() if k not in ("kept", "dropped", "metrics")}
        for key, value in flatten(others):
            metric_rows.append([step, key, value_text(value)])
    blocks: list = [Table(["step", "kept", "dropped", "dropped by reason"], count_rows,
                          numeric=[False, True, True, False])]
    if metric_rows:
        blocks += [Para("Metrics recorded by each step (losses, reward accuracies, margins, …):"),
                   Table(["step", "metric", "value"], metric_rows, numeric=[False, False, True])]
    return Section("Data and training", "summaries", blocks)


QUESTION_MODELS = {q.id: f"{q.a} vs {q.b}" for q in QUESTIONS}


def _budget_rows(budgets: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for model, parts in budgets.items():
        if not parts:
            rows.append([model, "none (prompted only)", "—", "—", "—", "—"])
        for kind, b in parts.items():
            if kind == "sft":
                rows.append([model, "SFT", f"{b['examples']} examples", f"{b['epochs']:g}", str(b["steps"]),
                             f"{b['tokens']:,}"])
            else:
                rows.append([model, f"DPO (lr {b['learning_rate']:g})", f"{b['pairs']} pairs ({b['pairs_seen']} seen)",
                             f"{b['epochs']:g}", str(b["steps"]), f"{b['tokens_seen']:,}"])
    return rows


def _diagnostic_rows(d: Mapping[str, Any]) -> list[list[str]]:
    sep, length, margin = d["surface_separable"], d["length"], d["margin"]
    defs = d["definitions"]
    rows = [
        ["surface-separable", f"{pct(sep['share'])} ({sep['count']} of {d['pairs']}; "
         + ", ".join(f"{k}: {v}" for k, v in sep["by_rule"].items()) + ")", defs["surface_separable"]],
        ["rejected longer", f"{pct(length['rejected_longer'])} (chosen longer {pct(length['chosen_longer'])}, "
         f"same {pct(length['same_length'])})", defs["length"]],
    ]
    if margin["n"]:
        q = margin["quantiles"]
        rows.append(["SFT-model margin", f"min {q['q00']:.2f}, quartiles {q['q25']:.2f} / {q['q50']:.2f} / "
                     f"{q['q75']:.2f}, max {q['q100']:.2f}; already ranked {pct(margin['already_ranked'])}, "
                     f"confident (> {margin['confident_margin']:g}) {pct(margin['confident'])}", defs["margin"]])
    rows.append(["sources", ", ".join(f"{k}: {v}" for k, v in d["sources"].items() if v) or "—", defs["sources"]])
    return rows


def training_section(training: Mapping[str, Any] | None) -> Section | None:
    """Each model's training budget with the notes for Q2 and Q3, the DPO parity check and the
    diagnostics of the preference pairs (both DPO runs' curves are in the training-curves figure)."""
    if not training:
        return None
    blocks: list = [
        Para("Training budget of each evaluated model (a trained model's budget includes the training it "
             "started from); the training-curves figure shows both DPO runs side by side:"),
        Table(["model", "training", "data", "epochs", "steps", "tokens seen"], _budget_rows(training["budgets"]),
              numeric=[False, False, False, True, True, True]),
    ]
    notes = budget_notes(training)
    if notes:
        blocks.append(Bullets([f"{q} ({QUESTION_MODELS[q]}): {line}" for q, lines in notes.items() for line in lines]))
    parity = training.get("parity")
    if parity:
        declared = parity["declared_differences"]
        blocks.append(Para(f"DPO parity, checked against the {parity['checked_against']} run: the same "
                           f"{', '.join(parity['same'])}; declared differences: "
                           f"{'; '.join(declared) if declared else 'none'}."))
    pairs = training.get("pairs")
    if pairs:
        d = pairs["diagnostics"]
        no_pair = ", ".join(f"{k}: {v}" for k, v in pairs["no_pair"].items()) or "none"
        blocks += [
            Para(f"Preference pairs: {pairs['pairs']} from {pairs['prompts']} DPO prompts (never SFT prompts), "
                 f"{pairs['samples_per_prompt']} samples of the SFT model each; prompts without a pair: {no_pair}."),
            Table(["diagnostic", "value", "definition"], _diagnostic_rows(d), numeric=[False, False, False]),
        ]
    return Section("Training budgets, DPO parity and pairs", "training", blocks)


def samples_section(samples: Sequence[dict] | None, models: Sequence[str]) -> Section | None:
    if not samples:
        return None
    shown = list(models) + [m for s in samples for m in s.get("responses", {}) if m not in models]
    shown = list(dict.fromkeys(shown))
    return Section("Sample responses", "samples", [
        Para("The same held-out items answered by each model (responses as scored, cut at the first "
             "stop marker), each with how it ended."),
        Samples(list(samples), shown),
    ])


def provenance_section(provenance: Mapping[str, Any] | None) -> Section | None:
    if not provenance:
        return None
    rows = [[k, value_text(v)] for k, v in flatten(provenance)]
    return Section("Provenance", "provenance", [Table(["key", "value"], rows)])


def build_sections(results, images, samples, baseline, summaries, provenance, training=None) -> list[Section]:
    sections = [
        answers_section(results),
        conclusions_section(results),
        plots_section(images),
        rates_section(results),
        exploratory_section(results),
        in_distribution_section(results),
        ifeval_section(results),
        categories_section(results),
        judge_section(results),
        baseline_section(baseline),
        summaries_section(summaries),
        training_section(training),
        samples_section(samples, results["models"]),
        provenance_section(provenance),
    ]
    return [s for s in sections if s is not None]


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


_MD_TAG = re.compile(r"<(?=[A-Za-z/!?])")  # what Markdown would take for the start of raw HTML
_MD_ENTITY = re.compile(r"&(?=#?\w+;)")  # what it would take for an entity


def _md_escape(text: str) -> str:
    """Text for a Markdown paragraph or cell: no raw HTML, no table breaks, one line.

    Only what a Markdown renderer would interpret as HTML is escaped, so that the text stays
    readable as plain text ("p <0.001" is left alone; "<script>" becomes "&lt;script>").
    """
    text = _MD_ENTITY.sub("&amp;", str(text))
    text = _MD_TAG.sub("&lt;", text)
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _md_cell(cell: Union[Cell, str]) -> str:
    if isinstance(cell, Cell):
        text = _md_escape(cell.text)
        return f"**{text}**" if cell.bold and text else text
    return _md_escape(cell)


def _md_table(table: Table) -> str:
    numeric = table.numeric or [False] * len(table.headers)
    lines = [
        "| " + " | ".join(_md_escape(h) for h in table.headers) + " |",
        "|" + "|".join("---:" if n else ":---" for n in numeric) + "|",
    ]
    for row in table.rows:
        lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    return "\n".join(lines)


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _md_samples(block: Samples) -> str:
    parts = []
    for s in block.samples:
        parts.append(f"#### {_md_escape(s['id'])} · {_md_escape(s.get('category', ''))}\n\n"
                     f"> {_md_escape(s['instruction'])}\n")
        endings = s.get("endings", {})
        for m in block.models:
            if m not in s.get("responses", {}):
                continue
            text = s["responses"][m] or "(empty)"
            fence = _fence(text)
            how = f" — {_md_escape(endings[m])}" if m in endings else ""
            parts.append(f"**{_md_escape(m)}**{how}\n\n{fence}text\n{text}\n{fence}\n")
    return "\n".join(parts)


def _md_block(block) -> str:
    if isinstance(block, Para):
        if block.kind == "question":
            return f"### {_md_escape(block.text)}"
        return f"*{_md_escape(block.text)}*" if block.kind == "note" else _md_escape(block.text)
    if isinstance(block, Bullets):
        return "\n".join(f"- {_md_escape(b)}" for b in block.items)
    if isinstance(block, Table):
        return _md_table(block)
    if isinstance(block, Image):
        return f"![{_md_escape(block.caption)}]({block.name})"
    if isinstance(block, Samples):
        return _md_samples(block)
    if isinstance(block, Details):
        inner = "\n\n".join(_md_block(b) for b in block.blocks)
        return f"<details><summary>{_md_escape(block.summary)}</summary>\n\n{inner}\n\n</details>"
    raise TypeError(f"unknown block {type(block).__name__}")


def render_markdown(sections: Sequence[Section], title: str) -> str:
    parts = [f"# {_md_escape(title)}"]
    for section in sections:
        parts.append(f"## {_md_escape(section.title)}")
        parts.extend(_md_block(b) for b in section.blocks)
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d8dee4; --head: #f3f5f7; --mark: #eaf5ec; }
* { box-sizing: border-box; }
body { font: 14px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--fg);
       margin: 0; background: #fafbfc; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 28px 60px; background: white; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
nav { font-size: 13px; color: var(--muted); margin-bottom: 12px; }
nav a { color: #0969da; text-decoration: none; margin-right: 12px; }
p { margin: 8px 0; } .note { color: var(--muted); font-size: 13px; }
.question { font-size: 16px; font-weight: 600; margin: 16px 0 4px; }
ul { margin: 6px 0 12px; padding-left: 22px; } li { margin: 2px 0; }
.tablewrap { overflow-x: auto; margin: 10px 0; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 4px 9px; vertical-align: top; }
th { background: var(--head); text-align: left; font-weight: 600; }
td.num { text-align: right; white-space: nowrap; }
tbody tr:nth-child(even) td { background: #fbfcfd; }
tr.mark td { background: var(--mark) !important; }
td code { font-size: 12px; word-break: break-all; }
figure { margin: 14px 0 22px; } figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 13px; }
details { margin: 8px 0; } summary { cursor: pointer; color: #0969da; }
.sample { border: 1px solid var(--line); border-radius: 8px; margin: 14px 0; overflow: hidden; }
.sample-head { background: var(--head); padding: 8px 12px; }
.sample-head .tag { display: inline-block; background: #dde4ea; border-radius: 10px; padding: 0 8px;
                    font-size: 12px; margin-right: 6px; }
.sample-head .id { color: var(--muted); font-size: 12px; margin-right: 6px; }
.grid { display: grid; gap: 0; }
.resp { border-left: 1px solid var(--line); padding: 8px 10px; min-width: 0; }
.resp:first-child { border-left: none; }
.resp .model { font-weight: 600; font-size: 13px; } .resp .how { color: var(--muted); font-size: 12px; }
.resp pre { white-space: pre-wrap; word-wrap: break-word; font: 12.5px/1.45 ui-monospace, Menlo, Consolas, monospace;
            margin: 6px 0 0; max-height: 320px; overflow-y: auto; }
.empty { color: var(--muted); font-style: italic; }
"""


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_cell(cell: Union[Cell, str], numeric: bool, code: bool) -> str:
    text, bold = (cell.text, cell.bold) if isinstance(cell, Cell) else (cell, False)
    inner = _h(text)
    if code and len(text) > 24 and " " not in text:
        inner = f"<code>{inner}</code>"
    if bold and inner:
        inner = f"<strong>{inner}</strong>"
    return f'<td class="num">{inner}</td>' if numeric else f"<td>{inner}</td>"


def _html_table(table: Table) -> str:
    numeric = table.numeric or [False] * len(table.headers)
    head = "".join(f"<th>{_h(h)}</th>" for h in table.headers)
    body = []
    for i, row in enumerate(table.rows):
        mark = ' class="mark"' if i < len(table.row_marks) and table.row_marks[i] else ""
        cells = "".join(_html_cell(c, numeric[j] if j < len(numeric) else False, code=j > 0)
                        for j, c in enumerate(row))
        body.append(f"<tr{mark}>{cells}</tr>")
    return f'<div class="tablewrap"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _html_samples(block: Samples) -> str:
    out = []
    for s in block.samples:
        responses, endings = s.get("responses", {}), s.get("endings", {})
        shown = [m for m in block.models if m in responses]
        cols = []
        for m in shown:
            text = responses[m]
            body = f"<pre>{_h(text)}</pre>" if text.strip() else '<pre class="empty">(empty)</pre>'
            how = f' <span class="how">· {_h(endings[m])}</span>' if m in endings else ""
            cols.append(f'<div class="resp"><div class="model">{_h(m)}{how}</div>{body}</div>')
        out.append(
            f'<div class="sample"><div class="sample-head"><span class="tag">{_h(s.get("category", ""))}</span>'
            f'<span class="id">{_h(s["id"])}</span> {_h(s["instruction"])}</div>'
            f'<div class="grid" style="grid-template-columns: repeat({max(len(shown), 1)}, minmax(0, 1fr))">'
            f'{"".join(cols)}</div></div>'
        )
    return "\n".join(out)


def _html_block(block) -> str:
    if isinstance(block, Para):
        cls = f' class="{block.kind}"' if block.kind else ""
        return f"<p{cls}>{_h(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{_h(b)}</li>" for b in block.items) + "</ul>"
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        return (f'<figure><img alt="{_h(block.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{_h(block.caption)}</figcaption></figure>")
    if isinstance(block, Samples):
        return _html_samples(block)
    if isinstance(block, Details):
        inner = "\n".join(_html_block(b) for b in block.blocks)
        return f"<details><summary>{_h(block.summary)}</summary>{inner}</details>"
    raise TypeError(f"unknown block {type(block).__name__}")


def render_html(sections: Sequence[Section], title: str, subtitle: str) -> str:
    nav = "".join(f'<a href="#{s.anchor}">{_h(s.title)}</a>' for s in sections)
    body = []
    for s in sections:
        body.append(f'<section id="{s.anchor}"><h2>{_h(s.title)}</h2>')
        body.extend(_html_block(b) for b in s.blocks)
        body.append("</section>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_h(title)}</title><style>{CSS}</style></head><body><main>"
        f'<h1>{_h(title)}</h1><p class="note">{_h(subtitle)}</p><nav>{nav}</nav>'
        + "\n".join(body)
        + "</main></body></html>\n"
    )


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def make_images(results: Mapping[str, Any], curves: Mapping[str, Mapping[str, Any]] | None = None) -> list[Image]:
    images = []
    answers = plot_answers(results)
    if answers is not None:
        images.append(Image("answers.png", "The three questions: difference a − b on format and content with "
                            "Newcombe 95% intervals; the shaded band is the equivalence margin; colour: the answer.",
                            answers))
    images.append(Image("pass_rates.png", "Pass rate per criterion and model, with 95% Wilson intervals.",
                        plot_pass_rates(results)))
    if results.get("categories"):
        images.append(Image("categories.png", "content pass rate by item category and model.",
                            plot_categories(results)))
    training = plot_training_curves(curves or {})
    if training is not None:
        images.append(Image("training_curves.png", "Training curves from each training's training.json: SFT "
                            "loss per logging window (eval loss: open circles), learning rate and tokens/s; "
                            "each DPO run's loss, reward accuracy and reward margin (TRL's logged values).",
                            training))
    return images


def answers_summary(results: Mapping[str, Any]) -> str:
    """'Q1 format better, content cannot tell; Q2 …' for the subtitle and the console."""
    parts = []
    for q in results["questions"]:
        if q["evaluated"]:
            parts.append(f"{q['id']} " + ", ".join(f"{aspect} {a['answer']}" for aspect, a in q["aspects"].items()))
        else:
            parts.append(f"{q['id']} not evaluated")
    return "; ".join(parts)


def write_report(
    results: Mapping[str, Any],
    *,
    out_dir: str | Path,
    samples: list[dict] | None = None,
    baseline: dict | None = None,
    summaries: dict | None = None,
    provenance: dict | None = None,
    curves: dict | None = None,
    training: dict | None = None,
) -> dict[str, Path]:
    """Write report.md, report.html and the PNG plots into out_dir; return them by name
    ("markdown", "html", and each plot's stem: "answers", "pass_rates", "categories", "training_curves"
    when ``curves`` holds a training history). PNG files of an earlier report that this one does not
    write are removed, so no stale plot stays beside it. ``training``:
    :func:`~cai_bootstrap.evaluation.training_summary.training_summary` of the run (budgets, DPO
    parity, pair diagnostics)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = make_images(results, curves)
    sections = build_sections(results, images, samples, baseline, summaries, provenance, training)
    title = "cai-bootstrap evaluation report"
    subtitle = (f"{results['n_items']} held-out items · models: {', '.join(results['models'])} · "
                f"{answers_summary(results)}")
    written: dict[str, Path] = {}
    for stale in set(out_dir.glob("*.png")) - {out_dir / image.name for image in images}:
        stale.unlink()
    for image in images:
        written[Path(image.name).stem] = atomic_write_bytes(out_dir / image.name, image.png)
    written["markdown"] = atomic_write_text(out_dir / "report.md", render_markdown(sections, title))
    written["html"] = atomic_write_text(out_dir / "report.html", render_html(sections, title, subtitle))
    return written
