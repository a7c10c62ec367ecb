"""Greedy generation throughput: plain one-prompt-at-a-time ``model.generate`` vs our batched engine.

All sides run in this process on the same model, prompts and precision (fp32 by default), greedy,
no stop strings (every prompt generates exactly --new-tokens unless it hits EOS, so the work is
equal). Prints tokens/s (median of --repeats runs), the ratios, and whether the greedy outputs are
identical to one-at-a-time.

Batch-1 throughput does not depend on how many prompts there are, so the one-at-a-time baseline
runs on the first --baseline-prompts prompts only (it is slow); output identity is checked on
those. ``--hf-batched`` adds transformers' own batched ``generate`` at the same batch size (left
padding), to separate what batching gives from what our decode loop gives.

    .venv/bin/python bench/generation.py [--prompts 128] [--batch-size 128] [--new-tokens 64]
        [--baseline-prompts 16] [--repeats 3] [--hf-batched]
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
from cai_bootstrap.generation.engine import Decoding, Engine, encode_prompts, left_padded, length_batches
from cai_bootstrap.models.loading import load_model


def hf_generate(model, tokenizer, prompts: list[str], new_tokens: int, batch_size: int) -> list[list[int]]:
    """transformers' ``generate``, greedy, left-padded batches of similar length; completion ids."""
    encoded = encode_prompts(tokenizer, prompts, add_bos=False)
    out: list[list[int]] = [[] for _ in prompts]
    eos = tokenizer.eos_token_id
    for batch in length_batches([len(e) for e in encoded], batch_size):
        ids, mask, _ = left_padded([encoded[i] for i in batch], tokenizer.pad_token_id, "cpu")
        width = ids.shape[1]
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                 temperature=None, top_p=None, top_k=None, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id)
        for row, i in enumerate(batch):
            completion = gen[row, width:].tolist()
            out[i] = completion[:completion.index(eos) + 1] if eos in completion else completion
    return out


def timed(fn) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    ids = fn()
    return time.perf_counter() - t0, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--baseline-prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--hf-batched", action="store_true", help="also time transformers' batched generate")
    args = ap.parse_args()

    lm = load_model(args.model, dtype=args.dtype)
    model, tok = lm.model, lm.tokenizer
    items = stratified_sample(builtin_pool(), args.prompts, 0, "bench")
    prompts = [prompt_for(it.instruction) for it in items]
    few = prompts[:args.baseline_prompts]
    decoding = Decoding(max_new_tokens=args.new_tokens, stop_strings=())
    engine = Engine(model, tok, batch_size=args.batch_size)

    def ours() -> list[list[int]]:
        return [tok(g.raw_text, add_special_tokens=False)["input_ids"] for g in engine.generate(prompts, decoding)]

    def ours_ids() -> list[list[int]]:  # exact ids, for the identity check and token counts
        return [engine._decode([e], decoding, 0)[0] for e in encode_prompts(tok, few, False)]

    sides = {
        "one-at-a-time (HF generate, batch 1)": (len(few), lambda: hf_generate(model, tok, few, args.new_tokens, 1)),
        f"ours (batch {args.batch_size})": (len(prompts), None),
    }
    if args.hf_batched:
        sides[f"HF generate (batch {args.batch_size})"] = (
            len(prompts), lambda: hf_generate(model, tok, prompts, args.new_tokens, args.batch_size))
    rates: dict[str, list[float]] = {k: [] for k in sides}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for name, (_, fn) in sides.items():
            if fn is None:  # ours: time the engine, count its completion tokens from its own stats
                before = engine.stats.completion_tokens
                seconds, _ = timed(lambda: engine.generate(prompts, decoding))
                rates[name].append((engine.stats.completion_tokens - before) / seconds)
                continue
            seconds, outputs[name] = timed(fn)
            rates[name].append(sum(len(o) for o in outputs[name]) / seconds)
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = next(iter(sides))
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, model {args.model} ({args.dtype})")
    print(f"{args.prompts} prompts (one-at-a-time: first {len(few)}) x {args.new_tokens} new tokens, greedy, "
          f"median of {args.repeats}")
    print(f"{'side':<40}{'tokens/s':>10}{'x one-at-a-time':>17}   runs")
    for k, v in rates.items():
        print(f"{k:<40}{med[k]:>10.1f}{med[k] / med[base]:>16.1f}x   {', '.join(f'{x:.1f}' for x in v)}")
    mine = ours_ids()
    differ = sum(a != b for a, b in zip(mine, outputs[base], strict=True))
    print(f"greedy outputs identical to one-at-a-time on {len(few)} prompts: {differ == 0}"
          + ("" if differ == 0 else f" ({differ} differ)"))
    if args.hf_batched:
        hf = outputs[f"HF generate (batch {args.batch_size})"][:len(few)]
        print(f"HF batched identical to one-at-a-time: {hf == outputs[base]}")


if __name__ == "__main__":
    main()
