"""Disjoint prompts for the two training methods: the training pool is split once into SFT prompts
and DPO prompts, so that DPO never trains on a prompt whose answer the SFT model has memorised.

The instructions step writes the split (``data/prompt_split.json``); sft-data draws its items from
the SFT side only and pairs from the DPO side only. Both read it through :func:`load_split`, which
checks it against the training pool it was made from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..schemas import InstructionRecord
from .sampling import stratified_sample


class PromptSplit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    dpo_share: float = Field(gt=0, lt=1)
    seed: int
    sft: list[str]  # item ids, in pool order
    dpo: list[str]


class SplitError(ValueError):
    """The split file is malformed or does not match the training pool."""


def split_prompts(items: Sequence[InstructionRecord], dpo_share: float, seed: int) -> PromptSplit:
    """round(dpo_share * n) items for DPO (at least one on each side from two items on), each category
    keeping its share; the rest for SFT."""
    if not 0 < dpo_share < 1:
        raise ValueError(f"dpo_share must be in (0, 1), got {dpo_share!r}")
    n = round(dpo_share * len(items))
    if len(items) >= 2:
        n = min(max(n, 1), len(items) - 1)
    dpo = {it.id for it in stratified_sample(items, n, seed, "dpo-prompts")}
    return PromptSplit(dpo_share=dpo_share, seed=seed, sft=[it.id for it in items if it.id not in dpo],
                       dpo=[it.id for it in items if it.id in dpo])


def load_split(path: str | Path, items: Sequence[InstructionRecord]) -> tuple[list[InstructionRecord],
                                                                                list[InstructionRecord]]:
    """(SFT items, DPO items) of the pool, in pool order; :class:`SplitError` naming the file and the
    field when the file does not validate, or when its ids are not exactly the pool's, once each."""
    path = Path(path)
    try:
        split = PromptSplit.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as e:
        raise SplitError(f"{path}: file not found (run the instructions step)") from e
    except json.JSONDecodeError as e:
        raise SplitError(f"{path}:{e.lineno}: (json): {e.msg}") from e
    except ValidationError as e:
        raise SplitError("\n".join(f"{path}: {'.'.join(map(str, err['loc'])) or '(record)'}: {err['msg']}"
                                   for err in e.errors())) from e
    both = set(split.sft) & set(split.dpo)
    if both:
        raise SplitError(f"{path}: sft, dpo: {len(both)} id(s) on both sides, e.g. {sorted(both)[0]!r}")
    ids = {it.id for it in items}
    listed = [*split.sft, *split.dpo]
    unknown = [i for i in listed if i not in ids]
    if unknown:
        raise SplitError(f"{path}: sft/dpo: {len(unknown)} id(s) not in the training pool, e.g. {unknown[0]!r}")
    if len(listed) != len(set(listed)):
        raise SplitError(f"{path}: sft/dpo: an id is listed twice")
    missing = ids - set(listed)
    if missing:
        raise SplitError(f"{path}: sft/dpo: {len(missing)} training item(s) on neither side, e.g. "
                         f"{sorted(missing)[0]!r}")
    sft = set(split.sft)
    return [it for it in items if it.id in sft], [it for it in items if it.id not in sft]
