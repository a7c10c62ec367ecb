"""The report's training part: budgets per model, budget notes for Q2/Q3, the parity result and the
pair diagnostics, from hand-built training records (both DPO runs' curves: plot_training_curves)."""

from __future__ import annotations

import pytest

from cai_bootstrap.data.pair_diagnostics import diagnose
from cai_bootstrap.evaluation import report as R
from cai_bootstrap.evaluation.training_summary import budget_notes, training_summary
from cai_bootstrap.schemas import PreferencePair

SFT = {"examples": {"given": 120, "kept": 118, "train": 106, "eval": 12}, "hyperparameters": {
    "epochs": 2.0, "max_steps": None, "total_steps": 28}, "tokens": {"tokens": 21000, "supervised_tokens": 4300}}


def dpo_record(init, lr=5e-4, steps=22, tokens=40000, declared=(), against=None):
    return {"init": init, "pairs_used": 85, "steps": steps, "pairs_seen": 170, "tokens_seen": tokens,
            "learning_rate": lr, "trainer_args": {"num_train_epochs": 2.0, "max_steps": -1},
            "parity": {"checked_against": against, "same": ["lora_args", "steps"],
                       "declared_differences": list(declared)}}


def pairs_report():
    pairs = [PreferencePair(id=f"p{k}", instruction_id=f"i{k}", category="qa", prompt="Instruction: q\nResponse:",
                            chosen=" Paris.\nEND", rejected=" Lyon, a city.\nEND" if k % 2 else " Rome.\nEND",
                            negative_type="on_policy", chosen_source="sft_model", margin=0.1 * k)
             for k in range(4)]
    return {"pairs": 4, "prompts": 10, "samples_per_prompt": 4, "no_pair": {"all_tie": 4, "no_acceptable_sample": 2},
            "diagnostics": diagnose(pairs, 1.0)}


def test_budgets_and_notes_say_what_each_model_was_trained_on():
    summary = training_summary({"sft": SFT, "dpo": dpo_record("sft"), "dpo_only": dpo_record("base", against="dpo")},
                               pairs_report())
    b = summary["budgets"]
    assert b["base"] == {} and b["sft"]["sft"]["examples"] == 106 and b["sft"]["sft"]["steps"] == 28
    assert set(b["dpo"]) == {"sft", "dpo"} and set(b["dpo_only"]) == {"dpo"}  # dpo includes its SFT
    assert b["dpo_only"]["dpo"] == {"pairs": 85, "epochs": 2.0, "max_steps": None, "steps": 22, "pairs_seen": 170,
                                    "tokens_seen": 40000, "learning_rate": 5e-4}
    assert summary["parity"]["checked_against"] == "dpo"
    notes = budget_notes(summary)
    assert set(notes) == {"Q2", "Q3"}
    assert "sft — SFT on 106 examples × 2 epochs (28 steps, 21,000 tokens" in notes["Q2"][0]
    assert "DPO on 85 pairs × 2 epochs (22 steps, 170 pairs and 40,000 tokens seen" in notes["Q2"][0]
    assert "Both DPO runs had the same pairs, epochs, steps and tokens seen" in notes["Q3"][0]
    assert "dpo had the SFT training on top" in notes["Q3"][0]

    # a declared learning rate of its own is said; a different budget is flagged
    lr = "learning_rate: 0.0005 != 0.001 (declared by dpo.dpo_only_learning_rate)"
    summary = training_summary({"sft": SFT, "dpo": dpo_record("sft"),
                                "dpo_only": dpo_record("base", lr=1e-3, steps=8, declared=[lr], against="dpo")}, None)
    q3 = budget_notes(summary)["Q3"][0]
    assert "did NOT have the same DPO budget" in q3 and f"(declared: {lr})" in q3
    assert "learning rate 0.001" in q3
    # only what was trained is stated
    assert budget_notes(training_summary({"sft": SFT}, None)) == {}
    assert training_summary({"sft": SFT}, None)["parity"] is None


def test_training_section_shows_budgets_parity_and_pair_diagnostics():
    summary = training_summary({"sft": SFT, "dpo": dpo_record("sft"),
                                "dpo_only": dpo_record("base", against="dpo")}, pairs_report())
    section = R.training_section(summary)
    md = R.render_markdown([section], "t")
    assert "| dpo_only | DPO (lr 0.0005) | 85 pairs (170 seen) | 2 | 22 | 40,000 |" in md
    assert "| base | none (prompted only) |" in md and "| sft | SFT | 106 examples | 2 | 28 | 21,000 |" in md
    assert "Q2 (dpo vs sft): Budget:" in md and "Q3 (dpo vs dpo_only): Budget:" in md
    assert "checked against the dpo run: the same lora_args, steps; declared differences: none" in md
    assert "prompts without a pair: all_tie: 4, no_acceptable_sample: 2" in md
    assert "| surface-separable | 0% (0 of 4; missing_end: 0, stock_opening: 0) |" in md
    assert "| rejected longer | 50% (chosen longer 50%, same 0%) |" in md
    assert "<td>" in R.render_html([section], "t", "s")
    assert R.training_section(None) is None


@pytest.mark.parametrize("missing", ["dpo", "dpo_only"])
def test_one_dpo_run_is_shown_alone(missing):
    records = {"sft": SFT, "dpo": dpo_record("sft"), "dpo_only": dpo_record("base")}
    del records[missing]
    summary = training_summary(records, None)
    assert set(summary["budgets"]) == {"base", "sft", *({"dpo", "dpo_only"} - {missing})}
    assert "Q3" not in budget_notes(summary)
    md = R.render_markdown([R.training_section(summary)], "t")
    assert ("| dpo |" in md) == (missing != "dpo") and ("| dpo_only |" in md) == (missing != "dpo_only")
