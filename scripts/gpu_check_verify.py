"""Checks of scripts/gpu_check.sh: is what a path left in its run directory what that path promises?

    python scripts/gpu_check_verify.py bf16|vllm|zero3 RUN_DIR [--hf-run HF_RUN_DIR]

Prints one line (the evidence, or what is wrong) and exits 0 (as promised) or 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from cai_bootstrap.config import EVALUATED_MODELS as MODELS  # every model the run evaluates

TRAINED = {"sft": "models/sft", "dpo": "models/dpo", "dpo_only": "models/dpo_only"}


class Failed(Exception):
    pass


def _json(path: Path) -> dict:
    if not path.is_file():
        raise Failed(f"{path} is missing")
    return json.loads(path.read_text(encoding="utf-8"))


def _lines(path: Path) -> list[dict]:
    if not path.is_file():
        raise Failed(f"{path} is missing")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _training(run: Path, step: str) -> dict:
    record = _json(run / TRAINED[step] / "training.json")
    if not (run / TRAINED[step] / "adapter_model.safetensors").is_file():
        raise Failed(f"{step}: no adapter_model.safetensors")
    losses = [h["loss"] for h in record["history"]]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise Failed(f"{step}: losses {losses}")
    return record


def _common(record: dict, step: str, precision: str, backend_reason: str) -> None:
    if record["mixed_precision"]["used"] != precision:
        raise Failed(f"{step}: autocast {record['mixed_precision']}, expected {precision}")
    backend = record.get("cpu_backend", {})
    if backend.get("used") is not False or backend_reason not in backend.get("reason", ""):
        raise Failed(f"{step}: cpu_backend {backend}, expected the libraries' paths ({backend_reason!r})")
    if step != "sft" and not record["forward"].startswith("trl"):
        raise Failed(f"{step}: forward {record['forward']!r}, expected TRL's")


def check_bf16(run: Path) -> str:
    manifest = _json(run / "manifest.json")
    not_done = {k: v.get("status") for k, v in manifest["steps"].items() if v.get("status") != "done"}
    if not_done:
        raise Failed(f"steps not done: {not_done}")
    records = {step: _training(run, step) for step in TRAINED}
    for step, record in records.items():
        _common(record, step, "bf16", "is not a CPU")
    missing = [m for m in MODELS if not (run / "eval" / "responses" / f"{m}.jsonl").is_file()]
    if missing or not (run / "report" / "report.md").is_file():
        raise Failed(f"no responses for {missing} or no report")
    sft = [h["loss"] for h in records["sft"]["history"]]
    return (f"{len(manifest['steps'])} steps done; sft loss {sft[0]:.3f} -> {sft[-1]:.3f}; dpo reward accuracy "
            f"{records['dpo']['final_reward_accuracy']}; autocast bf16, libraries' paths")


def check_vllm(run: Path, hf_run: Path | None) -> str:
    evaluation = _json(run / "eval" / "evaluation.json")
    runtime = json.dumps(evaluation)
    if '"vllm"' not in runtime:
        raise Failed("eval/evaluation.json does not record the vllm backend")
    agree = []
    for model in MODELS:
        rows = _lines(run / "eval" / "responses" / f"{model}.jsonl")
        if not rows:
            raise Failed(f"{model}: no responses")
        if hf_run is not None:
            hf = {r["id"]: r["response"] for r in _lines(hf_run / "eval" / "responses" / f"{model}.jsonl")}
            if set(hf) != {r["id"] for r in rows}:
                raise Failed(f"{model}: other ids than the HF run's")
            agree.append(f"{model} {sum(hf[r['id']] == r['response'] for r in rows)}/{len(rows)}")
    return f"{len(MODELS)} models evaluated with vLLM" + (f"; same greedy text as HF: {', '.join(agree)}" if agree else "")


def check_zero3(run: Path) -> str:
    records = {step: _training(run, step) for step in TRAINED}
    for step, record in records.items():
        _common(record, step, "bf16", "deepspeed")
        processes = record.get("num_processes", record.get("hyperparameters", {}).get("num_processes"))
        if processes != 1:
            raise Failed(f"{step}: {processes} processes, expected 1")
    return "sft, dpo, dpo_only trained under DeepSpeed ZeRO-3 (1 process), TRL's forward, autocast bf16"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", choices=["bf16", "vllm", "zero3"])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--hf-run", type=Path, default=None, help="vllm: the bf16 run, to compare greedy texts")
    args = ap.parse_args(argv)
    try:
        if args.path == "bf16":
            line = check_bf16(args.run_dir)
        elif args.path == "vllm":
            line = check_vllm(args.run_dir, args.hf_run)
        else:
            line = check_zero3(args.run_dir)
    except (Failed, KeyError, json.JSONDecodeError) as e:
        print(f"{type(e).__name__}: {e}" if not isinstance(e, Failed) else str(e))
        return 1
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
