"""Peak memory of evaluating four models (base, sft, sft->dpo, dpo_only) against evaluating one.

Each measurement is a fresh child process that runs ``steps.evaluate.evaluate_models`` (the code the
`evaluate` step runs: base fingerprint before, each model loaded fresh with its adapter chain,
generated, fingerprinted and freed, base fingerprint after) and reports its own peak RSS
(``ru_maxrss``: interpreter, libraries and everything it allocated). "one" evaluates the sft model
only; "four" evaluates all four in turn. The adapters are random LoRA adapters (r=16, all linear
layers) of the real sizes, written to a temporary folder, so the script needs no earlier run.

    .venv/bin/python bench/evaluation.py [--items 32] [--new-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = {"base": [], "sft": ["sft"], "dpo": ["sft", "dpo"], "dpo_only": ["dpo_only"]}


def make_adapters(model: str, folder: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from cai_bootstrap.models.loading import load_model

    for k, name in enumerate(("sft", "dpo", "dpo_only")):
        torch.manual_seed(k)
        peft_model = get_peft_model(load_model(model).model, LoraConfig(
            r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))
        peft_model.save_pretrained(folder / name)


def child(model: str, folder: Path, names: list[str], items: int, new_tokens: int) -> None:
    from cai_bootstrap.config import PipelineConfig
    from cai_bootstrap.data.pool import builtin_pool
    from cai_bootstrap.data.sampling import stratified_sample
    from cai_bootstrap.steps.evaluate import ModelUnderTest, evaluate_models

    config = PipelineConfig.model_validate({"model": {"base": model},
                                            "evaluation": {"max_new_tokens": new_tokens, "batch_size": 16}})
    models = [ModelUnderTest(n, model, tuple(folder / a for a in MODELS[n])) for n in names]
    _, record = evaluate_models(models, stratified_sample(builtin_pool(), items, 0, "bench"), config)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak_mb": peak_mb, "per_model_peak_mb": record["peak_rss_mb"]}))


def measure(args, folder: Path, names: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", ",".join(names), "--adapters", str(folder), "--model", args.model,
           "--items", str(args.items), "--new-tokens", str(args.new_tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--adapters", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.model, args.adapters, args.child.split(","), args.items, args.new_tokens)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_adapters(args.model, folder)
        runs = {"one (sft)": [], "four": []}
        per_model = {}
        for _ in range(args.repeats):
            runs["one (sft)"].append(measure(args, folder, ["sft"])["peak_mb"])
            four = measure(args, folder, list(MODELS))
            runs["four"].append(four["peak_mb"])
            per_model = four["per_model_peak_mb"]
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"machine: {platform.machine()}, python {platform.python_version()}; model {args.model}; "
          f"{args.items} items x {args.new_tokens} new tokens; median of {args.repeats} child processes each")
    print(f"{'evaluation':<14}{'peak RSS MB':>12}   runs")
    for k, v in runs.items():
        print(f"{k:<14}{med[k]:>12.0f}   {', '.join(f'{x:.0f}' for x in v)}")
    print(f"ratio four / one: {med['four'] / med['one (sft)']:.2f}x (target <= 1.3x)")
    print("per-model peak RSS inside the four-model run (MB): "
          + ", ".join(f"{k} {v:.0f}" for k, v in per_model.items()))


if __name__ == "__main__":
    main()
