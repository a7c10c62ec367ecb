"""`sft`: LoRA SFT with response-only loss on the kept SFT data, in the zero-shot canonical format."""

from __future__ import annotations

from ..console import console
from ..formats import prompt_for
from ..run import Run
from ..schemas import SFTRecord, load_jsonl
from ..training.sft import train_sft
from .common import SFT, SFT_DIR

SUMMARY_KEYS = ("final_train_loss", "eval_loss", "examples_kept", "examples_dropped", "supervised_tokens_per_s",
                "tokens_per_s", "wall_time_s", "optimizer_steps", "base_fingerprint")


def sft_examples(records: list[SFTRecord]) -> list[dict]:
    """Train on the zero-shot prompt: the few-shot prefix was scaffolding for generation only."""
    return [{"id": r.id, "prompt": prompt_for(r.instruction), "response": r.response} for r in records]


def run_sft(run: Run, force: bool = False, resume: bool = False) -> bool:
    config = run.config
    params = config.section_hash("sft")
    if not force and not resume and run.is_current("sft", params, [SFT]):
        console.print("sft: up to date, skipped")
        return False
    with run.step("sft", params, [SFT], [SFT_DIR]) as step:
        records = load_jsonl(run.path(SFT), SFTRecord)
        m = config.model
        result = train_sft(m.base, sft_examples(records), config.sft, out_dir=run.path(SFT_DIR), seed=config.seed,
                           quantization=m.quantization, allow_full_precision_fallback=m.allow_full_precision_fallback,
                           dtype=m.dtype, add_bos=m.add_bos_token, resume=resume)
        metrics = result.metrics
        step.kept = metrics.get("examples_kept")
        step.dropped.update(metrics.get("examples_dropped") or {})
        step.metrics.update({k: metrics[k] for k in SUMMARY_KEYS if k in metrics and k != "examples_dropped"})
        step.metrics["loss_history"] = [h.get("loss") for h in metrics.get("history", [])]
    console.print(f"sft: train loss {metrics.get('final_train_loss')}, eval loss {metrics.get('eval_loss')}")
    return True
