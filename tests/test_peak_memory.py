"""Peak memory covers this process and the processes it starts (launched generation workers)."""

from __future__ import annotations

import subprocess
import sys

from cai_bootstrap.evaluation.memory import peak_memory

CHILD = "import time; block = b'x' * (300 << 20); time.sleep(1.0)"  # 300 MB, resident (written)


def test_a_child_process_is_counted():
    with peak_memory(interval_s=0.02) as memory:
        subprocess.run([sys.executable, "-c", CHILD], check=True)
    assert memory["processes_peak"] >= 2
    assert memory["rss_peak_mb"] - memory["rss_start_mb"] > 250


def test_this_process_alone():
    with peak_memory(interval_s=0.02) as memory:
        block = b"x" * (200 << 20)
    del block
    assert memory["processes_peak"] == 1
    assert 180 < memory["rss_peak_mb"] - memory["rss_start_mb"] < 400
