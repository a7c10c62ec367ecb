"""Driver for tests/test_distributed.py: one train_sft run, launched under torchrun / accelerate launch.

    torchrun --nproc_per_node 2 tests/_dist_sft_driver.py SPEC.json

SPEC.json holds ``model``, ``examples``, ``cfg`` (an SFTConfig as a dict), ``seed`` and ``out_dir``.
train_sft writes the adapter and training.json from the main process only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec_path: str) -> int:
    from cai_bootstrap.config import SFTConfig
    from cai_bootstrap.training.sft import train_sft

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    train_sft(spec["model"], spec["examples"], SFTConfig.model_validate(spec["cfg"]),
              out_dir=Path(spec["out_dir"]), seed=spec["seed"], progress=False)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
