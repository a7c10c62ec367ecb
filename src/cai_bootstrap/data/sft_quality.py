"""Quality control of the base model's SFT responses: drop, never repair, and say why."""

from __future__ import annotations

from .. import quality
from ..constraints import check_all
from ..schemas import InstructionRecord

# Checked in this order; the first failing rule is the reason recorded.
QC_REASONS: tuple[str, ...] = (
    "empty", "truncated", "runaway", "template_residue", "copies_instruction", "refusal",
    "constraint_failed", "incorrect_answer", "incoherent",
)


def qc_reason(item: InstructionRecord, text: str, stop_string: str | None, finish_reason: str) -> str | None:
    """Why a cleaned response must be dropped, or None to keep it."""
    if not text.strip():
        return "empty"
    if finish_reason == "length":
        return "truncated"  # cut off by the token limit: its end is unknown
    if quality.is_runaway(stop_string):
        return "runaway"  # started a new instruction or dialogue turn
    if quality.has_template_residue(text):
        return "template_residue"
    if quality.copies_instruction(item.instruction, text):
        return "copies_instruction"
    if quality.is_refusal(text):
        return "refusal"
    strict, _ = check_all(item.constraints, text)
    if strict is False:
        return "constraint_failed"
    if item.reference_answers and not quality.matches_reference(text, item.reference_answers):
        return "incorrect_answer"  # a checkable fact the base model got wrong: never train on it
    if not quality.is_coherent(text):
        return "incoherent"
    return None
