"""`sft`: LoRA SFT with response-only loss on the kept SFT data, in the zero-shot canonical format."""

from __future__ import annotations

import json
from pathlib import Path

from ..console import console
from ..run import Run
from .common import SFT, SFT_DIR
from .worker import launch, train_sft_here

SUMMARY_KEYS = ("final_train_loss", "eval_loss", "supervised_tokens_per_s", "tokens_per_s", "wall_time_s",
                "base_fingerprint")


def run_sft(run: Run, force: bool = False, resume: bool = False, accelerate_config: Path | None = None) -> bool:
    """Train in this process, or under `accelerate launch` with the given config (several processes/GPUs)."""
    config = run.config
    params = config.section_hash("sft")
    if not force and not resume and run.is_current("sft", params, [SFT]):
        console.print("sft: up to date, skipped")
        return False
    with run.step("sft", params, [SFT], [SFT_DIR]) as step:
        if accelerate_config is None:
            metrics = train_sft_here(run, resume)
        else:
            launch("sft", run.dir, accelerate_config, resume)
            metrics = json.loads(run.path(f"{SFT_DIR}/training.json").read_text())
            step.provenance["launcher"] = {"accelerate_config": str(accelerate_config)}
        step.kept = metrics["examples"]["kept"]
        step.dropped.update(metrics["examples"]["dropped"])
        step.metrics.update({k: metrics[k] for k in SUMMARY_KEYS})
        step.metrics["total_steps"] = metrics["hyperparameters"]["total_steps"]
        step.metrics["num_processes"] = metrics["hyperparameters"]["num_processes"]
        step.metrics["loss_history"] = [h.get("loss") for h in metrics.get("history", [])]
    console.print(f"sft: train loss {metrics.get('final_train_loss')}, eval loss {metrics.get('eval_loss')}")
    return True
