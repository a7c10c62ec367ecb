"""Greedy generation throughput: one prompt at a time (the naive baseline) vs the batched engine.

Both run in this process on the same model, prompts and precision. Prints tokens/s (median of
--repeats runs), the ratio, and whether the greedy outputs are identical.

    .venv/bin/python bench/generation.py [--prompts 64] [--new-tokens 64] [--batch-size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from cai_bootstrap.data.pool import builtin_pool
from cai_bootstrap.data.sampling import stratified_sample
from cai_bootstrap.formats import prompt_for
from cai_bootstrap.generation.engine import Decoding, Engine
from cai_bootstrap.models.loading import load_model


def timed(engine: Engine, prompts: list[str], decoding: Decoding) -> tuple[float, int, list[str]]:
    t0 = time.perf_counter()
    outs = engine.generate(prompts, decoding)
    seconds = time.perf_counter() - t0
    return seconds, sum(g.completion_tokens for g in outs), [g.raw_text for g in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    lm = load_model(args.model, dtype=args.dtype)
    items = stratified_sample(builtin_pool(), args.prompts, 0, "bench")
    prompts = [prompt_for(it.instruction) for it in items]
    # No stop strings: every prompt generates exactly --new-tokens (EOS aside), so the work is equal.
    decoding = Decoding(max_new_tokens=args.new_tokens, stop_strings=())
    naive = Engine(lm.model, lm.tokenizer, batch_size=1)
    batched = Engine(lm.model, lm.tokenizer, batch_size=args.batch_size)
    rows = {"one-at-a-time": [], "batched": []}
    texts = {}
    for _ in range(args.repeats):
        for name, engine in (("one-at-a-time", naive), ("batched", batched)):
            seconds, tokens, texts[name] = timed(engine, prompts, decoding)
            rows[name].append(tokens / seconds)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"model {args.model} ({args.dtype})")
    print(f"{args.prompts} prompts x {args.new_tokens} new tokens, greedy, median of {args.repeats}")
    print(f"{'engine':<16}{'tokens/s':>12}{'runs':>40}")
    for k, v in rows.items():
        print(f"{k:<16}{med[k]:>12.1f}{', '.join(f'{x:.1f}' for x in v):>40}")
    print(f"ratio batched / one-at-a-time: {med['batched'] / med['one-at-a-time']:.1f}x")
    same = texts["batched"] == texts["one-at-a-time"]
    print(f"greedy outputs identical: {same}"
          + ("" if same else f" ({sum(a != b for a, b in zip(texts['batched'], texts['one-at-a-time']))} differ)"))


if __name__ == "__main__":
    main()
