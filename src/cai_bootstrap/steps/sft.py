"""`sft`: LoRA SFT with response-only loss on the kept SFT data, in the zero-shot canonical format."""

from __future__ import annotations

import json
from pathlib import Path

from ..console import console
from ..formats import prompt_for
from ..run import Run
from ..schemas import SFTRecord, load_jsonl
from .common import LOGS, SFT, SFT_DIR, tracking_name
from .worker import check_accumulation, launch

SUMMARY_KEYS = ("final_train_loss", "eval_loss", "supervised_tokens_per_s", "tokens_per_s", "wall_time_s",
                "base_fingerprint")


def train_sft_here(run: Run, resume: bool) -> dict:
    """The training itself (in this process, or in each process under `accelerate launch`)."""
    from ..training.sft import train_sft

    config = run.config
    m = config.model
    records = load_jsonl(run.path(SFT), SFTRecord)
    examples = [{"id": r.id, "prompt": prompt_for(r.instruction), "response": r.response} for r in records]
    result = train_sft(m.base, examples, config.sft, out_dir=run.path(SFT_DIR), seed=config.seed,
                       quantization=m.train_quantization, allow_full_precision_fallback=m.allow_full_precision_fallback,
                       dtype=m.dtype, add_bos=m.add_bos_token, resume=resume, tracking=config.tracking,
                       log_dir=run.path(f"{LOGS}/sft"), run_name=tracking_name(run.dir, "sft"),
                       cpu_backend=config.cpu_backend)
    return result.metrics


def run_sft(run: Run, force: bool = False, resume: bool = False, accelerate_config: Path | None = None) -> bool:
    """Train in this process, or under `accelerate launch` with the given config (several processes/GPUs)."""
    config = run.config
    params = config.section_hash("sft")
    if not force and not resume and run.is_current("sft", params, [SFT]):
        console.print("sft: up to date, skipped")
        return False
    if accelerate_config is not None:
        check_accumulation(accelerate_config, "sft", config.sft.gradient_accumulation_steps)
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
        step.metrics["mixed_precision"] = metrics["mixed_precision"]["used"]
        step.metrics["loss_history"] = [h.get("loss") for h in metrics.get("history", [])]
    console.print(f"sft: train loss {metrics.get('final_train_loss')}, eval loss {metrics.get('eval_loss')} "
                  f"(autocast {metrics['mixed_precision']['used']}: {metrics['mixed_precision']['reason']})")
    return True
