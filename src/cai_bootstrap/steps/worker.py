"""A training step's body, run by every process under `accelerate launch`.

The parent process owns the run directory and the manifest; the workers only read them and train.
The trainers write the adapter, training.json (and DPO's reference cache) from the main process
alone, and the parent records the step from training.json. A worker's error reaches the parent
through ``launching``.

    accelerate launch --config_file configs/accelerate/ddp.yaml -m cai_bootstrap.steps.worker sft --run-dir RUN
    ... -m cai_bootstrap.steps.worker dpo-sft --run-dir RUN     (dpo-base: the DPO-only baseline)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import launching
from ..launching import ERRORS_DIR, reporting_errors
from ..run import Run, StepFailed

STEPS = ("sft", "dpo-sft", "dpo-base")


def check_accumulation(accelerate_config: Path, section: str, steps: int) -> None:
    """Refuse gradient accumulation under DeepSpeed before any process starts: the SFT loop accumulates
    by hand, and DeepSpeed's engine steps the optimizer after every backward (training/sft.py)."""
    from ..cpu_backend import strategy_of_config

    if strategy_of_config(accelerate_config) == "deepspeed" and steps != 1:
        raise StepFailed(f"{section}.gradient_accumulation_steps is {steps}; under DeepSpeed ({accelerate_config}) "
                         f"keep it 1 and raise {section}.batch_size or the number of GPUs instead")


def launch(step: str, run_dir: Path, accelerate_config: Path, resume: bool = False) -> None:
    """Run a training step under `accelerate launch` in subprocesses; raise the workers' errors if any fails."""
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}")
    launching.launch(accelerate_config, "cai_bootstrap.steps.worker",
                     [step, "--run-dir", str(run_dir)] + (["--resume"] if resume else []),
                     errors=run_dir / ERRORS_DIR, tag=step, what=step)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=STEPS)
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    import torch

    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        # Before anything touches CUDA: otherwise every process's model and CUDA context land on GPU 0
        # (DPO loads its model before TRL's accelerator exists).
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    with reporting_errors(args.run_dir / ERRORS_DIR, args.step):
        run = Run.open_existing(args.run_dir)
        if args.step == "sft":
            from .sft import train_sft_here

            train_sft_here(run, args.resume)
        else:
            from .dpo import train_dpo_here

            train_dpo_here(run, args.step.removeprefix("dpo-"))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
