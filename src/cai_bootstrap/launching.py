"""``accelerate launch`` from a step's own process, with the launched processes' errors carried back.

A launched process that fails writes its error to ``ERRORS_DIR/TAG.RANK.json`` beside the work it
was given (:func:`reporting_errors`); when the launch exits non-zero, :func:`launch` raises
``StepFailed`` with each distinct error once and the ranks that reported it, not the launcher's
exit status (the processes' own output, tracebacks included, is printed above it as usual). The
launcher stops the other processes when one fails, so some ranks may not get to report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .files import atomic_write_json
from .run import StepFailed

ERRORS_DIR = ".worker-errors"


def launch(accelerate_config: Path, module: str, args: Sequence[str], errors: Path, tag: str, what: str) -> None:
    """Run ``python -m module args`` on every process of ``accelerate_config``; ``errors`` is the
    folder the processes report to under ``tag``, ``what`` names the work in the error."""
    if not Path(accelerate_config).is_file():
        raise FileNotFoundError(f"accelerate config {accelerate_config} not found")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
           "-m", module, *args]
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")  # N processes on a CPU machine must not oversubscribe its cores
    for stale in errors.glob(f"{tag}.*.json"):
        stale.unlink()
    try:
        subprocess.run(cmd, check=True, env=env)
    except subprocess.CalledProcessError as e:
        raise StepFailed(launch_failure(errors, tag, what, e.returncode)) from e


@contextmanager
def reporting_errors(errors: Path, tag: str) -> Iterator[None]:
    """In a launched process: an exception from the block is written for the parent, then re-raised."""
    try:
        yield
    except Exception as e:
        rank = int(os.environ.get("RANK", "0"))
        atomic_write_json(errors / f"{tag}.{rank}.json", {"rank": rank, "error": type(e).__name__, "message": str(e)})
        raise


def launch_failure(errors: Path, tag: str, what: str, returncode: int) -> str:
    """What the processes of a failed launch reported: each distinct error once, with its ranks."""
    ranks: dict[str, list[int]] = {}
    for report in errors.glob(f"{tag}.*.json"):
        r = json.loads(report.read_text(encoding="utf-8"))
        ranks.setdefault(f"{r['error']}: {r['message']}", []).append(r["rank"])
    head = f"{what} failed under accelerate launch (exit status {returncode})"
    if not ranks:
        return f"{head} before any process reported an error; their output is above"
    return head + "".join(f"\n  process {', '.join(map(str, sorted(r)))}: {error}" for error, r in sorted(ranks.items()))
