"""Peak memory of a block of work: the RSS of this process and every process it started (launched
generation workers, vLLM's engine), sampled in a thread, plus CUDA's own peak counter."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psutil


def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(bytes, processes): the summed RSS of ``proc`` and its descendants. Pages that processes share
    (libraries, a mapped model file) count once per process, so this bounds the true total from above."""
    total = count = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # ended between the listing and the read
            continue
        count += 1
    return total, count


@contextmanager
def peak_memory(interval_s: float = 0.05) -> Iterator[dict]:
    """Yields a dict that holds, after the block, rss_start_mb, rss_peak_mb (this process and its
    descendants, summed), processes_peak (most processes seen at once) and, on GPU, gpu_peak_mb
    (this process's CUDA allocations)."""
    import torch

    proc = psutil.Process()
    start, _ = tree_rss(proc)
    peak = {"rss": start, "processes": 1}
    done = threading.Event()

    def sample() -> None:
        rss, n = tree_rss(proc)
        peak["rss"], peak["processes"] = max(peak["rss"], rss), max(peak["processes"], n)

    def sampler() -> None:
        while not done.wait(interval_s):
            sample()

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    stats = {"rss_start_mb": round(start / 2**20, 1)}
    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    try:
        yield stats
    finally:
        done.set()
        thread.join()
        sample()
        stats["rss_peak_mb"] = round(peak["rss"] / 2**20, 1)
        stats["processes_peak"] = peak["processes"]
        if torch.cuda.is_available():
            stats["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
