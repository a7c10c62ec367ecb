"""Training curves where researchers look for them: TensorBoard, Trackio or Weights & Biases.

``tracking`` in the run config picks the backend (``none`` by default). Both trainings log the same
scalar names, the ones transformers' reporting callbacks use (``train/…``, ``eval/…``):

* DPO goes through TRL's ``report_to`` (transformers' own callbacks); :func:`trainer_environment`
  points them at the run's log folder and run name;
* our SFT loop logs through :func:`open_tracker` with the names of :data:`SFT_TAGS`: ``train/loss``,
  ``train/learning_rate``, ``train/epoch``, ``train/tokens_per_second``,
  ``train/supervised_tokens_per_second`` every ``logging_steps`` and ``eval/loss`` at each
  checkpoint and at the end.

TensorBoard writes event files into ``<run>/logs/<step>/`` (``tensorboard --logdir <run or
experiment folder>`` shows every run and step side by side); Trackio writes its local database
(``TRACKIO_DIR``, default under ``~/.cache/huggingface``) and Weights & Biases its run files under
``<run>/logs/<step>/``, syncing only when ``WANDB_MODE`` allows it. Only the main process logs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from ..errors import UserError

Tracking = Literal["none", "tensorboard", "trackio", "wandb"]
TRACKINGS: tuple[str, ...] = ("none", "tensorboard", "trackio", "wandb")
PROJECT = "cai-bootstrap"

# The SFT loop's history keys -> scalar tags (transformers' names: its callbacks prefix train/ and
# turn eval_x into eval/x).
SFT_TAGS: dict[str, str] = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "epoch": "train/epoch",
    "tokens_per_s": "train/tokens_per_second",
    "supervised_tokens_per_s": "train/supervised_tokens_per_second",
}
EVAL_LOSS = "eval/loss"
# What TRL's DPOTrainer logs (every logging_steps), as transformers' callbacks name it.
DPO_TAGS: tuple[str, ...] = ("train/loss", "train/learning_rate", "train/epoch", "train/rewards/chosen",
                             "train/rewards/rejected", "train/rewards/accuracies", "train/rewards/margins")
_PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}


class TrackingUnavailable(UserError, RuntimeError):
    """The configured tracking backend's package is not installed."""


def require(kind: str) -> None:
    """Fail at the start of a step, naming the install command, when the backend cannot log here."""
    if kind not in TRACKINGS:
        raise ValueError(f"tracking must be one of {', '.join(TRACKINGS)}, not {kind!r}")
    package = _PACKAGES.get(kind)
    if package and importlib.util.find_spec(package) is None:
        raise TrackingUnavailable(f"tracking: {kind} needs the {package} package, which is not installed "
                                  f"(pip install 'cai-bootstrap[{kind}]'), or set tracking: none")


class Tracker:
    """Scalars at a step, to one backend. ``log`` takes {tag: number}; ``close`` flushes."""

    def log(self, scalars: Mapping[str, float], step: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class _TensorBoard(Tracker):
    def __init__(self, log_dir: Path, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run hides what the interrupted one logged after its checkpoint
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _RunLogger(Tracker):
    """Trackio and wandb share one API: init, log(dict, step), finish."""

    def __init__(self, module, **init):
        self.module = module
        self.run = module.init(**init)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        self.module.log(dict(scalars), step=step)

    def close(self) -> None:
        self.module.finish()


class _Nothing(Tracker):
    def log(self, scalars: Mapping[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def open_tracker(kind: str, *, log_dir: Path, run_name: str, config: Mapping[str, Any] | None = None,
                 resumed_from: int | None = None) -> Tracker:
    """A tracker for one training (``kind`` none gives one that does nothing)."""
    require(kind)
    if kind == "none":
        return _Nothing()
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    if kind == "tensorboard":
        return _TensorBoard(log_dir, purge_step=resumed_from)
    if kind == "trackio":
        import trackio

        return _RunLogger(trackio, project=PROJECT, name=run_name, config=dict(config or {}), resume="allow")
    import wandb

    return _RunLogger(wandb, project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_name, dir=str(log_dir),
                      config=dict(config or {}), resume="allow")


def clear(log_dir: Path) -> None:
    """Empty a training's log folder before a fresh run, so that its curves replace the previous run's
    instead of being drawn over them."""
    shutil.rmtree(log_dir, ignore_errors=True)


def sft_scalars(entry: Mapping[str, Any]) -> dict[str, float]:
    """One SFT history entry as tagged scalars."""
    return {tag: float(entry[key]) for key, tag in SFT_TAGS.items() if entry.get(key) is not None}


@contextlib.contextmanager
def trainer_environment(kind: str, *, log_dir: Path, run_name: str) -> Iterator[None]:
    """Where transformers' reporting callbacks write, while a trainer is built and trains: they read
    these variables when they are created (TensorBoard) or start (wandb). A WANDB_PROJECT of the
    user's wins; the previous environment is restored afterwards."""
    require(kind)
    wanted: dict[str, str] = {}
    if kind == "tensorboard":
        wanted["TENSORBOARD_LOGGING_DIR"] = str(log_dir)
    elif kind == "wandb":
        wanted = {"WANDB_DIR": str(log_dir), "WANDB_PROJECT": os.environ.get("WANDB_PROJECT", PROJECT),
                  "WANDB_NAME": run_name}
    if kind != "none":
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    before = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
