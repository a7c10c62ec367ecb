"""Generation over many processes (GPUs, or CPU processes with gloo) through accelerate.

Each process holds its own copy of the model and generates a shard of the prompts; the results are
gathered with ``accelerate.utils.gather_object`` so that **every** process gets all of them back in
input order (the main one writes them). No home-made communication: accelerate's ``PartialState``
joins the processes that ``torchrun`` / ``accelerate launch`` started.

**How prompts are split.** The split is made at the granularity of the engine's own length buckets:
:func:`~cai_bootstrap.generation.engine.length_batches` orders all prompts longest first and cuts them
into batches of ``engine.batch_size``; batch ``j`` goes to process ``j % num_processes``
(:func:`shard_indices` over the batch list). So

* every process gets batches of the same length profile (long and short prompts are dealt round-robin,
  not in contiguous blocks where one process would get all the long prompts);
* each process's batches are exactly the batches a single process would have run (same prompts, same
  padding, same shapes), so **greedy outputs are identical whatever the number of processes** (tested
  byte for byte on CPU with 2 processes);
* sampling (``temperature > 0``) draws each prompt with its own generator, seeded from the decoding's
  seed and the prompt's position in the whole list (``engine.prompt_seed``), so a sampled run gives the
  same outputs whatever the number of processes and the batch size (tested).

With one process (no launcher) :func:`generate_sharded` is exactly ``engine.generate``.

The pipeline's steps launch :mod:`cai_bootstrap.generation.launched` instead, which runs several
decodings per launch and also reports the weights' fingerprint and load provenance.

Command line, for tests and ad-hoc runs (only rank 0 writes the output file)::

    torchrun --nproc_per_node 2 -m cai_bootstrap.generation.distributed \\
        --model DIR --prompts prompts.jsonl --out out.jsonl --max-new-tokens 32
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml \\
        -m cai_bootstrap.generation.distributed --model DIR --prompts prompts.jsonl --out out.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .engine import Decoding, Engine, Generation, GenerationStats, encode_prompts, length_batches


def shard_indices(n: int, num_processes: int, process_index: int) -> list[int]:
    """The items of ``range(n)`` that process ``process_index`` of ``num_processes`` handles: every
    ``num_processes``-th one, starting at ``process_index`` (strided).

    Disjoint across processes, together covering ``range(n)``, deterministic, sizes differing by at
    most one. Strided rather than contiguous: applied to a length-sorted list (as
    :func:`generate_sharded` does with the engine's length buckets) every process gets the same mix
    of long and short work.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return list(range(process_index, n, num_processes))


def _state(accelerator=None):
    """The accelerator's state, or a PartialState that joins whatever launcher started us.

    ``cpu=True`` when there is no GPU, so that ``torchrun`` / ``accelerate launch`` on a CPU machine
    gives a multi-CPU (gloo) group instead of independent single processes.
    """
    if accelerator is not None:
        return accelerator.state
    from accelerate import PartialState

    from ..models.loading import default_device

    return PartialState(cpu=default_device() == "cpu")


def _launched_multi() -> bool:
    """True under torchrun / accelerate launch with several processes (or an initialized group)."""
    import os

    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return True
    except ValueError:
        pass
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _merge_stats(parts: Sequence[dict[str, Any]]) -> GenerationStats:
    """Counts summed over processes; seconds = the slowest process (the wall time of the sharded run)."""
    s = GenerationStats()
    for p in parts:
        s.prompts += p["prompts"]
        s.completion_tokens += p["completion_tokens"]
        s.batches += p["batches"]
        s.prompt_tokens += p["prompt_tokens"]
        s.padded_prompt_tokens += p["padded_prompt_tokens"]
    s.seconds = max((p["seconds"] for p in parts), default=0.0)
    return s


def generate_sharded(engine: Engine, prompts: Sequence[str], decoding: Decoding, accelerator=None,
                     progress: Callable[[int, int], None] | None = None) -> list[Generation]:
    """Generate ``prompts`` over all processes; every process returns all results in input order.

    Each process must hold its own model on its own device (``accelerator.device``). With one
    process this is exactly ``engine.generate(prompts, decoding, progress)``. With several, the
    ``engine.stats`` of this call are combined over processes (counts summed, seconds = the slowest
    process) and added to every process's ``engine.stats``.
    """
    if accelerator is None and not _launched_multi():
        return engine.generate(prompts, decoding, progress)  # no launcher: leave accelerate's state alone
    state = _state(accelerator)
    nproc, pidx = state.num_processes, state.process_index
    if nproc == 1:
        return engine.generate(prompts, decoding, progress)
    from accelerate.utils import gather_object

    encoded = encode_prompts(engine.tokenizer, prompts, engine.add_bos)
    batches = length_batches([len(e) for e in encoded], engine.batch_size)
    mine = sorted(i for j in shard_indices(len(batches), nproc, pidx) for i in batches[j])
    before = GenerationStats(**vars(engine.stats))
    local = engine.generate([prompts[i] for i in mine], decoding, progress, indices=mine) if mine else []
    delta = {k: getattr(engine.stats, k) - getattr(before, k) for k in vars(before)}
    gathered = gather_object([("gen", i, g) for i, g in zip(mine, local, strict=True)] + [("stats", pidx, delta)])
    results: list[Generation | None] = [None] * len(prompts)
    stats_parts = []
    for kind, i, payload in gathered:
        if kind == "stats":
            stats_parts.append(payload)
        else:
            results[i] = payload
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:  # a broken launcher or an uneven gather; never return a silently shorter list
        raise RuntimeError(f"sharded generation lost {len(missing)} of {len(prompts)} results (first: {missing[:5]})")
    merged = _merge_stats(stats_parts)
    engine.stats = before
    for k in vars(merged):
        setattr(engine.stats, k, getattr(before, k) + getattr(merged, k))
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# command line (``python -m cai_bootstrap.generation.distributed``)


def _read_prompts(path: Path) -> list[str]:
    """JSONL with a ``prompt`` field per line (a bare JSON string per line is accepted too)."""
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        if isinstance(obj, str):
            prompts.append(obj)
        elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            prompts.append(obj["prompt"])
        else:
            raise ValueError(f"{path}:{n}: prompt: expected an object with a string 'prompt' (or a JSON string)")
    return prompts


def write_generations(path: str | Path, prompts: Sequence[str], gens: Sequence[Generation]) -> Path:
    """JSONL, one object per prompt in input order (index, prompt and every Generation field)."""
    from ..files import write_jsonl

    return write_jsonl(path, [{"index": i, "prompt": p, "text": g.text, "raw_text": g.raw_text,
                               "stop_string": g.stop_string, "finish_reason": g.finish_reason,
                               "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens}
                              for i, (p, g) in enumerate(zip(prompts, gens, strict=True))])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cai_bootstrap.generation.distributed",
                                     description="Sharded generation; run under torchrun / accelerate launch.")
    parser.add_argument("--model", required=True, help="model spec: embedded name, local folder or hub id")
    parser.add_argument("--adapter", action="append", default=[], help="adapter folder(s), merged in order")
    parser.add_argument("--prompts", required=True, type=Path, help="JSONL, one {'prompt': ...} per line")
    parser.add_argument("--out", required=True, type=Path, help="JSONL written by rank 0, in input order")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--quantization", default="none", choices=["none", "8bit", "4bit"])
    parser.add_argument("--add-bos", action="store_true")
    parser.add_argument("--cpu-backend", default="auto", choices=["auto", "off"])
    args = parser.parse_args(argv)

    from ..models.loading import load_model

    state = _state()
    prompts = _read_prompts(args.prompts)
    device = "cpu" if state.device.type == "cpu" else str(state.device)
    loaded = load_model(args.model, quantization=args.quantization, dtype=args.dtype,
                        adapters=args.adapter, device=device)
    engine = Engine(loaded.model, loaded.tokenizer, batch_size=args.batch_size, add_bos=args.add_bos,
                    cpu_backend=args.cpu_backend)
    decoding = Decoding(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed)
    gens = generate_sharded(engine, prompts, decoding)
    if state.is_main_process:
        write_generations(args.out, prompts, gens)
        print(json.dumps({"processes": state.num_processes, "prompts": len(prompts), **engine.stats.as_dict()}),
              file=sys.stderr)
    state.wait_for_everyone()
    if state.num_processes > 1:
        state.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
