"""Run the tests as another kind of CPU would: ``CAI_TEST_CPU=avx2|avx512_bf16|amx make test``.

torch answers "does this CPU compute bf16 natively?" from the CPU itself, and ``mixed_precision:
auto`` follows that answer (``models/precision.py``). With ``CAI_TEST_CPU`` set, tests/conftest.py
puts this folder first on PYTHONPATH, so every Python process of the run (pytest and the processes
that tests launch) imports this file at start-up and gets torch's answer for the named kind: the
suite can be checked for an AVX2-only CI machine on an AVX-512 BF16 one, and the other way round.
The speed is the real CPU's; only the decision is faked.
"""

from __future__ import annotations

import os

KINDS = {"avx2": (False, False), "avx512_bf16": (True, False), "amx": (True, True)}  # (avx512_bf16, amx)


def apply(kind: str) -> None:
    if kind not in KINDS:
        raise SystemExit(f"CAI_TEST_CPU={kind!r}: expected one of {', '.join(KINDS)}")
    import torch

    avx512_bf16, amx = KINDS[kind]
    torch.cpu._is_avx512_bf16_supported = lambda: avx512_bf16
    torch.cpu._is_amx_tile_supported = lambda: amx


if os.environ.get("CAI_TEST_CPU"):
    apply(os.environ["CAI_TEST_CPU"])
