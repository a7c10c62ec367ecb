"""A training step's body, run by every process under `accelerate launch`.

The parent process owns the run directory and the manifest; the workers only train, and the
trainer writes the adapter and training.json from the main process alone.

    accelerate launch --config_file configs/accelerate/ddp.yaml -m cai_bootstrap.steps.worker sft --run-dir RUN
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ..formats import prompt_for
from ..run import Run
from ..schemas import SFTRecord, load_jsonl
from .common import SFT, SFT_DIR


def train_sft_here(run: Run, resume: bool) -> dict:
    from ..training.sft import train_sft

    config = run.config
    m = config.model
    records = load_jsonl(run.path(SFT), SFTRecord)
    examples = [{"id": r.id, "prompt": prompt_for(r.instruction), "response": r.response} for r in records]
    result = train_sft(m.base, examples, config.sft, out_dir=run.path(SFT_DIR), seed=config.seed,
                       quantization=m.quantization, allow_full_precision_fallback=m.allow_full_precision_fallback,
                       dtype=m.dtype, add_bos=m.add_bos_token, resume=resume)
    return result.metrics


def launch(step: str, run_dir: Path, accelerate_config: Path, resume: bool = False) -> None:
    """Run a training step under `accelerate launch` in subprocesses; raise if any worker fails."""
    if not accelerate_config.is_file():
        raise FileNotFoundError(f"accelerate config {accelerate_config} not found")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
           "-m", "cai_bootstrap.steps.worker", step, "--run-dir", str(run_dir)] + (["--resume"] if resume else [])
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")  # N processes on a CPU machine must not oversubscribe its cores
    subprocess.run(cmd, check=True, env=env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["sft"])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    train_sft_here(Run.open_existing(args.run_dir), args.resume)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
