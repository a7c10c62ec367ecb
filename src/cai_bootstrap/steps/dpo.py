"""`dpo`: DPO from the SFT model (`--init sft`) and the DPO-only baseline from base (`--init base`).

Both runs take every hyperparameter from the one `dpo:` block (the DPO-only run may take its own
learning rate through the explicit `dpo.dpo_only_learning_rate`); the second run to execute checks
what makes the comparison fair against the first's recorded facts (training/dpo.py: pairs, steps,
tokens seen, LoRA, precision, processes) and fails on any undeclared difference. Training runs in
this process or under `accelerate launch`; either way the step is recorded from the run's
training.json, its parity result and learning curve included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..console import console
from ..cpu_backend import choose, strategy_of_config
from ..models.loading import default_device
from ..run import Run
from ..schemas import PreferencePair, load_jsonl
from ..training.dpo import PLANNED_FACTS, RUN_NAMES, TRAINING_JSON, check_parity, planned_facts, train_dpo
from .common import DPO_DIR, DPO_ONLY_DIR, LOGS, PAIRS, SFT_DIR, tracking_name
from .worker import launch

STEP_NAMES = RUN_NAMES  # init -> step name (and run directory name), one map with the parity record
OUT_DIRS = {"sft": DPO_DIR, "base": DPO_ONLY_DIR}
REF_CACHE = "cache/ref_logps"
SUMMARY_KEYS = ("train_loss", "steps", "pairs_seen", "tokens_seen", "learning_rate", "final_reward_accuracy",
                "final_reward_margin", "pairs_used", "rejected_truncated", "ref_cache_hit", "ref_forward_batches",
                "num_processes", "wall_time_s")


def _other(init: str) -> str:
    return STEP_NAMES["base" if init == "sft" else "sft"]


def reference_of(run: Run, init: str) -> dict[str, Any] | None:
    """The other DPO run's recorded parity facts if it is done (this run must match them), else None."""
    other = run.steps().get(_other(init), {})
    if other.get("status") != "done":
        return None
    return other.get("provenance", {}).get("parity_facts", {})  # {}: recorded before facts were (fails)


def train_dpo_here(run: Run, init: str) -> None:
    """The training itself (in this process, or in each process under `accelerate launch`)."""
    config, m = run.config, run.config.model
    reference = reference_of(run, init)
    train_dpo(init, m.base, load_jsonl(run.path(PAIRS), PreferencePair), config.dpo, out_dir=run.path(OUT_DIRS[init]),
              seed=config.seed, sft_adapter=run.path(SFT_DIR) if init == "sft" else None,
              quantization=m.train_quantization, dtype=m.dtype, add_bos=m.add_bos_token, cache_dir=run.path(REF_CACHE),
              reference=reference, tracking=config.tracking, log_dir=run.path(f"{LOGS}/{STEP_NAMES[init]}"),
              run_name=tracking_name(run.dir, STEP_NAMES[init]), cpu_backend=config.cpu_backend)


def run_dpo(run: Run, init: str, force: bool = False, accelerate_config: Path | None = None) -> bool:
    if init not in STEP_NAMES:
        raise ValueError(f"--init must be sft or base, not {init!r}")
    config = run.config
    name, out = STEP_NAMES[init], OUT_DIRS[init]
    reference = reference_of(run, init)
    params = config.section_hash("dpo") + f":init={init}"
    inputs = [PAIRS, SFT_DIR] if init == "sft" else [PAIRS]
    if not force and run.is_current(name, params, inputs):
        console.print(f"{name}: up to date, skipped")
        return False
    with run.step(name, params, inputs, [out]) as step:
        if accelerate_config is None:
            train_dpo_here(run, init)
        else:
            # fail here, with the differences, rather than in every launched process
            m = config.model
            backend = choose(config.cpu_backend, default_device(), strategy_of_config(accelerate_config))
            facts = planned_facts(config.dpo, init, None, out_dir=run.path(out), seed=config.seed, dtype=m.dtype,
                                  quantization=m.train_quantization, processes=None, tracking=config.tracking,
                                  run_name=tracking_name(run.dir, name), backend=backend)
            check_parity(reference, facts, PLANNED_FACTS, config.dpo)
            launch(f"dpo-{init}", run.dir, accelerate_config)
            step.provenance["launcher"] = {"accelerate_config": str(accelerate_config)}
        record = json.loads(run.path(f"{out}/{TRAINING_JSON}").read_text(encoding="utf-8"))
        step.kept = record["pairs_used"]
        step.dropped.update(record["pairs_dropped"])
        step.provenance["trainer_args"] = record["trainer_args"]
        step.provenance["lora_args"] = record["lora_args"]
        step.provenance["num_processes"] = record["num_processes"]
        step.provenance["parity_facts"] = record["parity_facts"]
        step.provenance["parity"] = record["parity"]
        step.provenance["parity_checked_against"] = record["parity"]["checked_against"]
        step.metrics.update({k: record[k] for k in SUMMARY_KEYS})
        step.metrics["mixed_precision"] = record["mixed_precision"]["used"]
        step.metrics["loss_history"] = [h["loss"] for h in record["history"]]
    console.print(f"{name}: done ({', '.join(f'{k}={v}' for k, v in step.metrics.items() if 'reward' in k)})")
    return True
