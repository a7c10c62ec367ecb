"""torch.compile (inductor) against eager mode on one SFT-like training step, in one process.

The same LoRA model (r=16, all-linear, no dropout; two copies with the same initialisation) and batch (--rows rows of --tokens random tokens,
the second half of each row supervised) on three sides: PEFT's layers in eager mode, the same model
compiled with ``torch.compile(dynamic=False)``, and our fused LoRA layers (``training.fused_lora``)
in eager mode, their steps interleaved. Prints the compile time (the first compiled step) and each
side's median step time, forward + backward, with the losses (they must agree).

    .venv/bin/python bench/compile.py [--rows 2] [--tokens 200] [--repeats 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    from peft import LoraConfig, get_peft_model

    from cai_bootstrap.models.loading import load_model
    from cai_bootstrap.training.fused_lora import use_fused_lora

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()

    def lora_model():
        torch.manual_seed(0)  # the same adapter initialisation for both copies
        m = get_peft_model(load_model(args.model, trainable=True).model, LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
        return m.train()

    model, fused = lora_model(), lora_model()
    use_fused_lora(fused)
    ids = torch.randint(0, model.config.vocab_size, (args.rows, args.tokens), generator=torch.Generator().manual_seed(0))
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, args.tokens // 2:-1] = True
    targets = ids[:, 1:][keep[:, :-1]]

    def step(forward, owner) -> float:
        t0 = time.perf_counter()
        logits = forward(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
        F.cross_entropy(logits.float(), targets).backward()
        owner.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def loss(forward) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(forward(input_ids=ids, use_cache=False, logits_to_keep=keep).logits, targets))

    compiled = torch.compile(model, dynamic=False)
    compile_s = step(compiled, model)
    sides = {"PEFT layers, eager": (model, model), "PEFT layers, torch.compile": (compiled, model),
             "fused layers, eager": (fused, fused)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.repeats):  # interleaved: the machine's drift reaches every side alike
        for name, (forward, owner) in sides.items():
            times[name].append(step(forward, owner))
    rows = [(name, statistics.median(times[name]), loss(forward)) for name, (forward, _) in sides.items()]

    print(f"model {args.model}, {args.rows} rows x {args.tokens} tokens, {torch.get_num_threads()} threads; "
          f"median of {args.repeats} interleaved steps (forward + backward); compile (first compiled step): {compile_s:.1f} s")
    print(f"{'side':28} {'step s':>7} {'x PEFT eager':>13} {'loss':>9}")
    for name, seconds, value in rows:
        print(f"{name:28} {seconds:7.2f} {rows[0][1] / seconds:12.2f}x {value:9.4f}")


if __name__ == "__main__":
    main()
