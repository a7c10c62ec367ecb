"""What the report says about training: each model's budget, the DPO parity result and the pair
diagnostics, from the run's training.json files and pairs report (no model loaded).

The budget notes go next to the questions that compare trained models, so that a reader can see
whether a difference could be a budget artifact: Q2 (dpo vs sft: dpo is sft plus a DPO run) and Q3
(dpo vs dpo_only: the same DPO run, with or without SFT before it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

def sft_budget(record: Mapping[str, Any]) -> dict[str, Any]:
    """Examples, epochs, optimizer steps and tokens of an SFT run's training.json."""
    hp = record.get("hyperparameters", {})
    return {"examples": record["examples"]["train"], "epochs": hp.get("epochs"), "max_steps": hp.get("max_steps"),
            "steps": hp.get("total_steps"), "tokens": record["tokens"]["tokens"],
            "supervised_tokens": record["tokens"]["supervised_tokens"]}


def dpo_budget(record: Mapping[str, Any]) -> dict[str, Any]:
    """Pairs, epochs, optimizer steps and the pairs and tokens seen of a DPO run's training.json."""
    args = record["trainer_args"]
    return {"pairs": record["pairs_used"], "epochs": args["num_train_epochs"],
            "max_steps": None if args["max_steps"] == -1 else args["max_steps"], "steps": record["steps"],
            "pairs_seen": record["pairs_seen"], "tokens_seen": record["tokens_seen"],
            "learning_rate": record["learning_rate"]}


def training_summary(records: Mapping[str, Mapping[str, Any] | None],
                     pairs_report: Mapping[str, Any] | None) -> dict[str, Any]:
    """Budgets per model (base: none; dpo: its SFT and its DPO run), parity, pairs.

    ``records``: the training.json of "sft", "dpo" and "dpo_only" (None where the model was not trained).
    """
    records = {n: records.get(n) for n in ("sft", "dpo", "dpo_only")}
    sft = sft_budget(records["sft"]) if records["sft"] else None
    dpo = {n: dpo_budget(records[n]) for n in ("dpo", "dpo_only") if records[n]}
    budgets: dict[str, Any] = {"base": {}}
    if sft:
        budgets["sft"] = {"sft": sft}
    if "dpo" in dpo:
        budgets["dpo"] = {**({"sft": sft} if sft else {}), "dpo": dpo["dpo"]}
    if "dpo_only" in dpo:
        budgets["dpo_only"] = {"dpo": dpo["dpo_only"]}
    second = [records[n] for n in ("dpo", "dpo_only") if records[n] and records[n]["parity"]["checked_against"]]
    return {
        "budgets": budgets,
        "parity": second[0]["parity"] if second else None,
        "pairs": dict(pairs_report) if pairs_report else None,
    }


def _sft_text(b: Mapping[str, Any]) -> str:
    return (f"SFT on {b['examples']} examples × {b['epochs']:g} epochs ({b['steps']} steps, "
            f"{b['tokens']:,} tokens, {b['supervised_tokens']:,} of them supervised)")


def _dpo_text(b: Mapping[str, Any]) -> str:
    return (f"DPO on {b['pairs']} pairs × {b['epochs']:g} epochs ({b['steps']} steps, {b['pairs_seen']} pairs and "
            f"{b['tokens_seen']:,} tokens seen, learning rate {b['learning_rate']:g})")


def budget_notes(summary: Mapping[str, Any]) -> dict[str, list[str]]:
    """Question id -> lines stating the compared models' training budgets (only where both are known)."""
    b = summary["budgets"]
    notes: dict[str, list[str]] = {}
    if "sft" in b.get("dpo", {}) and "dpo" in b.get("dpo", {}) and "sft" in b:
        notes["Q2"] = [f"Budget: sft — {_sft_text(b['sft']['sft'])}; dpo — the same SFT, then "
                       f"{_dpo_text(b['dpo']['dpo'])}. dpo had more training than sft: a difference may be "
                       f"the extra budget as much as the preferences."]
    if "dpo" in b and "dpo_only" in b:
        first, second = b["dpo"]["dpo"], b["dpo_only"]["dpo"]
        same = all(first[k] == second[k] for k in ("pairs", "epochs", "steps", "pairs_seen", "tokens_seen"))
        parity = summary.get("parity") or {}
        declared = parity.get("declared_differences") or []
        line = (f"Budget: dpo — {_sft_text(b['dpo']['sft']) + ', then ' if 'sft' in b['dpo'] else ''}"
                f"{_dpo_text(first)}; dpo_only — {_dpo_text(second)}. ")
        line += ("Both DPO runs had the same pairs, epochs, steps and tokens seen" if same else
                 "The two DPO runs did NOT have the same DPO budget")
        line += f" (declared: {'; '.join(declared)})" if declared else ""
        line += "; dpo had the SFT training on top, which is what Q3 asks about."
        notes["Q3"] = [line]
    return notes
