"""The machine's matmul ceiling for SmolLM2-135M's shapes: fp32 vs bf16 GFLOP/s.

Decides whether bf16 autocast can speed up training or generation here: it only pays where the CPU
has native bf16 matmul (AVX-512 BF16 / AMX); on AVX2 machines torch falls back to slow kernels.
Rows: tokens per matmul (1 = a batch-1 decode step, 256 = a training micro-batch); columns: the
model's projections (hidden 576, MLP 1536, vocabulary 49152), and the vocabulary projection done in
512-wide slices (``models.lm_head.project``: MKL runs a 49k-wide output at about half speed on AMD
CPUs). Median of --repeats timings each.

    .venv/bin/python bench/matmul.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cai_bootstrap.models.lm_head import project

SHAPES = {"attn 576x576": (576, 576), "mlp up 576x1536": (576, 1536), "mlp down 1536x576": (1536, 576),
          "lm head 576x49152": (576, 49152)}


def gflops(m: int, k: int, n: int, dtype, repeats: int, sliced: bool = False) -> float:
    a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    out = torch.empty(m, n, dtype=dtype)
    run = (lambda: project(a, w, out)) if sliced else (lambda: torch.nn.functional.linear(a, w))
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; GFLOP/s, median of {args.repeats}")
    print(f"{'tokens':>7} {'dtype':>9}" + "".join(f"{k:>20}" for k in SHAPES) + f"{'lm head, sliced':>20}")
    for m in (1, 64, 256):
        for dtype in (torch.float32, torch.bfloat16):
            cells = "".join(f"{gflops(m, k, n, dtype, args.repeats):>20.1f}" for k, n in SHAPES.values())
            sliced = gflops(m, 576, 49152, dtype, args.repeats, sliced=True)
            print(f"{m:>7} {str(dtype).removeprefix('torch.'):>9}{cells}{sliced:>20.1f}")


if __name__ == "__main__":
    main()
