"""Driver for tests/test_run_safety.py: a CLI command that is SIGKILLed halfway through writing
its first adapter weights file, as a machine that loses power or an OOM killer would stop it.

    python tests/_kill_while_saving_driver.py dpo CONFIG --run-dir RUN --init base --force
"""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str]) -> None:
    import peft.peft_model
    from safetensors.torch import save

    def save_half_then_die(tensors, filename, metadata=None):
        data = save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    peft.peft_model.safe_save_file = save_half_then_die  # the name PEFT's save_pretrained writes with
    from cai_bootstrap.cli import app

    app(argv, prog_name="cai-bootstrap")


if __name__ == "__main__":
    main(sys.argv[1:])
