"""Peak memory of a block of work: process RSS sampled in a thread, plus CUDA's own peak counter."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psutil


@contextmanager
def peak_memory(interval_s: float = 0.05) -> Iterator[dict]:
    """Yields a dict that holds, after the block, rss_start_mb, rss_peak_mb and (on GPU) gpu_peak_mb."""
    import torch

    proc = psutil.Process()
    stats = {"rss_start_mb": proc.memory_info().rss / 2**20}
    peak = [stats["rss_start_mb"]]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval_s):
            peak[0] = max(peak[0], proc.memory_info().rss / 2**20)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield stats
    finally:
        done.set()
        thread.join()
        peak[0] = max(peak[0], proc.memory_info().rss / 2**20)
        stats["rss_peak_mb"] = round(peak[0], 1)
        stats["rss_start_mb"] = round(stats["rss_start_mb"], 1)
        if torch.cuda.is_available():
            stats["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
