"""`dpo`: DPO from the SFT model (`--init sft`) and the DPO-only baseline from base (`--init base`).

Both runs take every hyperparameter from the one `dpo:` block; the second run to execute checks
its trainer arguments against the first's and fails if anything but the init and output differ.
"""

from __future__ import annotations

from ..console import console
from ..run import Run
from ..schemas import PreferencePair, load_jsonl
from ..training.dpo import train_dpo
from .common import DPO_DIR, DPO_ONLY_DIR, PAIRS, SFT_DIR

STEP_NAMES = {"sft": "dpo", "base": "dpo_only"}
OUT_DIRS = {"sft": DPO_DIR, "base": DPO_ONLY_DIR}
REF_CACHE = "cache/ref_logps"


def run_dpo(run: Run, init: str, force: bool = False) -> bool:
    if init not in STEP_NAMES:
        raise ValueError(f"--init must be sft or base, not {init!r}")
    config = run.config
    name, out = STEP_NAMES[init], OUT_DIRS[init]
    other = run.steps().get(STEP_NAMES["base" if init == "sft" else "sft"], {})
    reference = other.get("provenance", {}) if other.get("status") == "done" else {}
    params = config.section_hash("dpo") + f":init={init}"
    inputs = [PAIRS, SFT_DIR] if init == "sft" else [PAIRS]
    if not force and run.is_current(name, params, inputs):
        console.print(f"{name}: up to date, skipped")
        return False
    with run.step(name, params, inputs, [out]) as step:
        pairs = load_jsonl(run.path(PAIRS), PreferencePair)
        m = config.model
        result = train_dpo(init, m.base, pairs, config.dpo, out_dir=run.path(out), seed=config.seed,
                           sft_adapter=run.path(SFT_DIR) if init == "sft" else None, quantization=m.quantization,
                           dtype=m.dtype, add_bos=m.add_bos_token, cache_dir=run.path(REF_CACHE),
                           reference_args=reference.get("trainer_args"), reference_lora=reference.get("lora_args"))
        step.kept = len(pairs)
        step.provenance["trainer_args"] = result.trainer_args
        step.provenance["lora_args"] = result.lora_args
        step.provenance["parity_checked_against"] = STEP_NAMES["base" if init == "sft" else "sft"] if reference else None
        step.metrics.update({k: v for k, v in result.metrics.items() if not isinstance(v, (list, dict))})
        step.metrics["loss_history"] = [h.get("loss") for h in result.metrics.get("history", []) if "loss" in h]
    console.print(f"{name}: done ({', '.join(f'{k}={v}' for k, v in step.metrics.items() if 'reward' in k)})")
    return True
