"""Driver for tests/test_distributed.py: ``load_model`` on every process under accelerate's FSDP
environment with ``fsdp_cpu_ram_efficient_loading`` (as configs/accelerate/fsdp.yaml sets it).

    ACCELERATE_USE_FSDP=1 FSDP_CPU_RAM_EFFICIENT_LOADING=1 torchrun --nproc_per_node 2 \
        tests/_fsdp_load_driver.py MODEL OUT_DIR

Each process writes OUT_DIR/RANK.json: whether transformers took the FSDP loading path, the
weights' device types and fingerprint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(model: str, out_dir: str) -> int:
    import torch.distributed as dist

    from transformers.distributed.fsdp import is_fsdp_enabled

    from cai_bootstrap.models.loading import fingerprint, load_model

    dist.init_process_group("gloo")  # transformers reads FSDP loading as on only inside a process group
    loaded = load_model(model, device="cpu")
    devices = sorted({p.device.type for p in loaded.model.parameters()})
    Path(out_dir, f"{dist.get_rank()}.json").write_text(
        json.dumps({"fsdp_loading": is_fsdp_enabled(), "devices": devices, "fingerprint": fingerprint(loaded.model)}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
