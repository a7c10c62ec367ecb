"""Console output: one rich console, progress bars with throughput, tables."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


@contextmanager
def generation_progress(total: int, label: str) -> Iterator:
    """A progress bar over prompts that shows generated tokens/s; yields the engine callback."""
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[tps]:.1f} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False, disable=not console.is_terminal,
    )
    state = {"tokens": 0}
    with progress:
        task = progress.add_task(label, total=total, tps=0.0)

        def update(n_prompts: int, n_tokens: int) -> None:
            state["tokens"] += n_tokens
            elapsed = progress.tasks[task].elapsed or 1e-9
            progress.update(task, advance=n_prompts, tps=state["tokens"] / elapsed)

        yield update
