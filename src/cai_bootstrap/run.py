"""Run directory and manifest: steps declare inputs and outputs, record provenance, and resume.

A step is skipped when its manifest entry is ``done``, its parameters hash and input hashes are
unchanged, and its outputs still hash as recorded. ``force`` re-runs it.
"""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import PipelineConfig, dump_config
from .files import atomic_write_json, atomic_write_text, sha256_path

TRACKED_PACKAGES = (
    "cai-bootstrap", "torch", "transformers", "peft", "trl", "accelerate", "datasets",
    "bitsandbytes", "tokenizers", "gguf", "numpy", "scipy", "pydantic",
)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
            text=True, timeout=5, check=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict[str, Any]:
    import os

    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


class StepFailed(RuntimeError):
    pass


@dataclass
class StepRecord:
    """What one step did; filled in by the step while it runs."""

    name: str
    params_hash: str
    inputs: dict[str, str]
    outputs: list[str]
    kept: int | None = None
    dropped: Counter = field(default_factory=Counter)
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n


class Run:
    def __init__(self, run_dir: str | Path, config: PipelineConfig | None = None):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.dir / "manifest.json"
        self.manifest = self._load_manifest()
        if config is not None:
            self.config = config
            self.manifest["config_hash"] = config.hash()
            self.manifest["config"] = config.model_dump(mode="json")
            atomic_write_text(self.dir / "config.yaml", dump_config(config))
            self._save()
        else:
            self.config = PipelineConfig.model_validate(self.manifest.get("config", {}))

    @classmethod
    def open_existing(cls, run_dir: str | Path) -> Run:
        """Read-only view for worker processes: config from the manifest, nothing written."""
        run = cls.__new__(cls)
        run.dir = Path(run_dir)
        run.manifest_path = run.dir / "manifest.json"
        if not run.manifest_path.is_file():
            raise StepFailed(f"{run.manifest_path} not found: not a run directory")
        run.manifest = run._load_manifest()
        run.config = PipelineConfig.model_validate(run.manifest.get("config", {}))
        return run

    def _load_manifest(self) -> dict[str, Any]:
        if self.manifest_path.exists():
            try:
                return json.loads(self.manifest_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise StepFailed(f"{self.manifest_path}: corrupt manifest ({e.msg} at line {e.lineno})") from e
        return {"created": now(), "run_dir": str(self.dir), "steps": {}}

    def _save(self) -> None:
        self.manifest["updated"] = now()
        atomic_write_json(self.manifest_path, self.manifest)

    def path(self, rel: str) -> Path:
        return self.dir / rel

    def _hash_inputs(self, inputs: list[str]) -> dict[str, str]:
        hashes = {}
        for rel in inputs:
            p = self.path(rel)
            if not p.exists():
                raise StepFailed(f"missing input {p}: run the step that writes it first (or fix the path)")
            hashes[rel] = sha256_path(p)
        return hashes

    def is_current(self, name: str, params_hash: str, inputs: list[str]) -> bool:
        entry = self.manifest["steps"].get(name)
        if not entry or entry.get("status") != "done" or entry.get("params_hash") != params_hash:
            return False
        try:
            if entry.get("inputs") != self._hash_inputs(inputs):
                return False
        except StepFailed:
            return False
        for rel, digest in entry.get("outputs", {}).items():
            p = self.path(rel)
            if not p.exists() or sha256_path(p) != digest:
                return False
        return True

    @contextmanager
    def step(self, name: str, params_hash: str, inputs: list[str], outputs: list[str]) -> Iterator[StepRecord]:
        """Run a step body, recording it; on failure the entry says so and the error is re-raised."""
        record = StepRecord(name, params_hash, self._hash_inputs(inputs), outputs)
        started, t0 = now(), time.perf_counter()
        self.manifest["steps"][name] = {"status": "running", "started": started, "params_hash": params_hash}
        self._save()
        try:
            yield record
        except BaseException as e:
            self.manifest["steps"][name] = {
                "status": "failed", "started": started, "ended": now(),
                "duration_s": round(time.perf_counter() - t0, 2), "params_hash": params_hash,
                "error": f"{type(e).__name__}: {e}"[:2000],
                "traceback": traceback.format_exc(limit=6)[-4000:],
            }
            self._save()
            raise
        missing = [rel for rel in outputs if not self.path(rel).exists()]
        if missing:
            raise StepFailed(f"step {name} did not write {missing}")
        self.manifest["steps"][name] = {
            "status": "done",
            "started": started,
            "ended": now(),
            "duration_s": round(time.perf_counter() - t0, 2),
            "params_hash": params_hash,
            "inputs": record.inputs,
            "outputs": {rel: sha256_path(self.path(rel)) for rel in outputs},
            "counts": {"kept": record.kept, "dropped": dict(record.dropped)},
            "metrics": record.metrics,
            "provenance": record.provenance,
            "environment": {"versions": package_versions(), "git_commit": git_commit(), "machine": machine()},
        }
        self._save()

    def steps(self) -> dict[str, dict[str, Any]]:
        return self.manifest["steps"]
