"""`run`: every step in order, skipping the ones whose inputs and config are unchanged."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..console import console
from ..run import Run
from .baseline import run_baseline
from .dpo import run_dpo
from .evaluate import run_evaluate
from .instructions import run_instructions
from .pairs import run_pairs
from .report import run_report
from .sft import run_sft
from .sft_data import run_sft_data

STEPS: tuple[tuple[str, Callable[[Run, bool], object]], ...] = (
    ("baseline", run_baseline),
    ("instructions", run_instructions),
    ("sft-data", run_sft_data),
    ("sft", run_sft),
    ("pairs", run_pairs),
    ("dpo", lambda run, force, **kw: run_dpo(run, "sft", force, **kw)),
    ("dpo_only", lambda run, force, **kw: run_dpo(run, "base", force, **kw)),
    ("evaluate", run_evaluate),
)
# Steps that run under `accelerate launch` given an accelerate config (they take accelerate_config=).
LAUNCHABLE = {"sft-data", "sft", "pairs", "dpo", "dpo_only", "evaluate"}


def run_pipeline(run: Run, force: bool = False, until: str | None = None,
                 accelerate_config: Path | None = None) -> None:
    """accelerate_config: run the LAUNCHABLE steps under `accelerate launch` with this config."""
    names = [n for n, _ in STEPS]
    if until is not None and until not in names:
        raise ValueError(f"--until must be one of {names}")
    t0 = time.perf_counter()
    for k, (name, fn) in enumerate(STEPS, start=1):
        console.rule(f"[bold]step {k}/{len(STEPS) + 1}: {name}")
        t = time.perf_counter()
        ran = fn(run, force, accelerate_config=accelerate_config) if name in LAUNCHABLE else fn(run, force)
        console.print(f"{name}: {'done' if ran else 'skipped'} in {time.perf_counter() - t:.1f}s "
                      f"(pipeline {time.perf_counter() - t0:.0f}s)")
        if name == until:
            return
    console.rule(f"[bold]step {len(STEPS) + 1}/{len(STEPS) + 1}: report")
    run_report(run)
    console.print(f"pipeline finished in {time.perf_counter() - t0:.0f}s")
