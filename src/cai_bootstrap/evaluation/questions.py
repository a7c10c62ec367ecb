"""The three research questions of Stage 1, fixed before any data is seen, and how each is answered.

- **Q1** — does SFT teach more than prompting? ``sft`` against ``base_fewshot``: the base model
  given the same few-shot prompt that wrote the SFT data.
- **Q2** — does DPO add to SFT? ``dpo`` against ``sft``.
- **Q3** — does SFT first beat DPO alone? ``dpo`` against ``dpo_only``.

Each question is answered on two **aspects**, each a composite pass/fail per item:

- ``format``: the response closes with END and does not run on (``FORMAT_PARTS``);
- ``content``: everything about what the response says and nothing about how it ends
  (``CONTENT_PARTS``), so a model that answers well but never writes END can still pass it.

The 3 x 2 comparisons are the **primary family**: Benjamini-Hochberg is applied within it and
nowhere else (every other comparison is exploratory, corrected in its own family). Each
comparison gets one of four answers (:func:`decide`):

- ``better`` / ``worse``: McNemar significant after BH within the family, and the confidence
  interval of the difference excludes 0 on the same side;
- ``equivalent``: not significant, and the whole 95% interval lies inside ±margin (an
  equivalence claim at the stated margin; two one-sided tests at 2.5% each);
- ``cannot tell``: neither; reported with the minimum detectable difference, because "not
  significantly different" is not evidence of "no difference".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .statistics import min_detectable_difference

POWER = 0.80
DEFAULT_MARGIN = 0.10


@dataclass(frozen=True)
class Question:
    id: str
    title: str
    a: str  # differences read rate(a) - rate(b): positive favours a
    b: str
    meaning: str  # what "better" means in words


QUESTIONS: tuple[Question, ...] = (
    Question("Q1", "Does SFT teach more than prompting?", "sft", "base_fewshot",
             "SFT beats prompting the base model with the few-shot prompt that wrote its data"),
    Question("Q2", "Does DPO add to SFT?", "dpo", "sft", "DPO improves on the SFT model it started from"),
    Question("Q3", "Does SFT first beat DPO alone?", "dpo", "dpo_only",
             "SFT then DPO beats DPO from the base model with the same pairs and settings"),
)

# --------------------------------------------------------------------------------------------
# The two aspects: the one place where the composites are defined
# --------------------------------------------------------------------------------------------

FORMAT_PARTS: tuple[str, ...] = ("ends_with_end", "no_rambling")
# The item's verifiable instructions: IFEval's prompt-level loose verdict by Google's official checks
# (items without instructions: not applicable). Loose, not strict: strict fails a one-line preamble
# that every other content criterion forgives.
CONSTRAINTS_VERDICT = "ifeval_loose"
CONTENT_PARTS: tuple[str, ...] = (
    "proper_structure",
    "addresses_instruction",
    "appropriate_length",
    "no_unwarranted_refusal",
    "factually_correct",
    "coherent",
    "on_topic",
    CONSTRAINTS_VERDICT,
)
ASPECTS: dict[str, tuple[str, ...]] = {"format": FORMAT_PARTS, "content": CONTENT_PARTS}
# Content parts whose kind of check also chose the training data: sft-data kept, and pairs took as
# chosen, only responses that passed these QC checks (data/sft_quality.QC_REASONS). The report says so:
# a content gain is partly a gain on the checks that selected the data.
SELECTED_ON: dict[str, str] = {
    "addresses_instruction": "copies_instruction",
    "no_unwarranted_refusal": "refusal",
    "factually_correct": "incorrect_answer",
    "coherent": "incoherent",
    CONSTRAINTS_VERDICT: "constraint_failed",
}
ASPECT_DEFINITIONS: dict[str, str] = {
    "format": "closes the answer with END and does not run on into a new turn or the token limit "
              f"(all of {', '.join(FORMAT_PARTS)})",
    "content": "passes every content criterion that applies: " + ", ".join(CONTENT_PARTS)
               + " (nothing about END or stopping)",
}


def composite(row: Mapping[str, bool | None], parts: Sequence[str]) -> bool | None:
    """Passes when every applicable part passes (None parts do not apply); None when none applies.

    Every part must be a key of ``row``: a missing score is an error, not a pass.
    """
    missing = [p for p in parts if p not in row]
    if missing:
        raise KeyError(f"outcome row lacks {missing}")
    values = [row[p] for p in parts if row[p] is not None]
    return all(values) if values else None


# --------------------------------------------------------------------------------------------
# The answer to one comparison
# --------------------------------------------------------------------------------------------


def detectable(n: int, discordant_rate: float, *, alpha: float) -> dict[str, float]:
    """Minimum detectable difference (80% power, two-sided McNemar at ``alpha``) on n paired
    items: at the discordance seen (at least one discordant item, so that it is never 0) and in
    the worst case (every item discordant), the bound that holds before any data."""
    if n == 0:
        return {"observed": 1.0, "worst_case": 1.0}
    psi = max(discordant_rate, 1.0 / n)
    return {
        "observed": min_detectable_difference(n, alpha=alpha, power=POWER, discordant_rate=psi),
        "worst_case": min_detectable_difference(n, alpha=alpha, power=POWER),
    }


def points(x: float) -> str:
    """A difference in pass rate as signed percentage points, one decimal ("+12.5", "0.0")."""
    return f"{100 * x:+.1f}" if round(100 * x, 1) != 0 else "0.0"


def classify(*, n: int, significant: bool | None, ci_low: float, ci_high: float, margin: float) -> str:
    """The answer rule alone (see the module docstring): better / worse / equivalent / cannot tell."""
    if n == 0:
        return "cannot tell"
    if significant and ci_low > 0:
        return "better"
    if significant and ci_high < 0:
        return "worse"
    if -margin < ci_low and ci_high < margin:
        return "equivalent"
    return "cannot tell"


def decide(c: Mapping[str, Any], *, margin: float, alpha: float) -> dict[str, Any]:
    """The answer for one comparison ``c`` (a results comparison: n, rate_a, rate_b, difference,
    ci_low, ci_high, discordant_rate, p_adjusted, significant), oriented a - b.

    ``alpha`` is the level the minimum detectable difference is quoted at (the family's
    Bonferroni level q/m: what a lone effect must reach under BH). Returns ``answer``,
    ``explanation``, ``mdd`` (observed and worst case), ``underpowered`` (the difference the
    data can detect is larger than the margin, or the answer is "cannot tell": with few discordant
    items the detectable difference at the discordance seen is an optimistic estimate, while the
    interval, which the answer rests on, reaches beyond the margin) and
    ``non_inferior`` (the interval rules out
    being worse by more than the margin).
    """
    if not 0.0 < margin < 1.0:
        raise ValueError(f"margin must be in (0, 1), got {margin}")
    n = c["n"]
    mdd = detectable(n, c.get("discordant_rate", 1.0), alpha=alpha)
    low, high, d = c["ci_low"], c["ci_high"], c["difference"]
    interval = f"{points(d)} points, 95% CI [{points(low)}, {points(high)}]"
    p = c.get("p_adjusted")
    p_text = f"p_BH = {p:.3g}" if p is not None else "no test"
    inside = -margin < low and high < margin
    answer = classify(n=n, significant=c.get("significant"), ci_low=low, ci_high=high, margin=margin)
    if n == 0:
        why = "no item where both models could be judged"
    elif answer in ("better", "worse"):
        why = f"{interval}; {p_text}"
    elif answer == "equivalent":
        why = f"{interval} lies inside ±{100 * margin:.0f}; {p_text}"
    else:
        test = ("not significant" if not c.get("significant")
                else "significant in McNemar's test, but the interval includes 0")
        why = (f"{interval} is {test} ({p_text}) and reaches beyond ±{100 * margin:.0f}; "
               f"with {n} items and the discordance seen ({100 * c.get('discordant_rate', 1.0):.0f}% of items), "
               f"a difference of {100 * mdd['observed']:.0f} points would be detected with {POWER:.0%} power "
               f"at α = {alpha:.3g}, smaller ones often not")
        if low > -margin:
            why += f"; the interval does rule out being worse by more than {100 * margin:.0f} points"
        elif high < margin:
            why += f"; the interval does rule out being better by more than {100 * margin:.0f} points"
    if answer in ("better", "worse") and inside:
        why += f" (a real difference, but inside ±{100 * margin:.0f}: small)"
    return {
        "answer": answer,
        "explanation": why,
        "margin": margin,
        "mdd": mdd,
        "mdd_alpha": alpha,
        "underpowered": mdd["observed"] > margin or answer == "cannot tell",
        "non_inferior": n > 0 and low > -margin,
    }


def family_alpha(q: float, m: int) -> float:
    """The Bonferroni level q/m: the p-value a single true effect must reach under BH over m
    tests when no other hypothesis is rejected (BH rejects at q when all are)."""
    return q / max(m, 1)
