"""Run directory and manifest: steps declare inputs and outputs, record provenance, and resume.

A step is skipped when its manifest entry is ``done``, its parameters hash and input hashes are
unchanged, and its outputs still hash as recorded. ``force`` re-runs it. A step refuses to start
while a step that writes one of its inputs is not done, and an output changed after its step wrote
it is never silently rebuilt (``keep_edits`` adopts it). A command that fails on bad input leaves
the directory as it was (docs/errors.md); one command at a time holds a run (:class:`RunLock`).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
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

from pydantic import ValidationError

from .config import PipelineConfig, dump_config
from .console import console
from .errors import UserError
from .files import TMP_SUFFIX, atomic_write_bytes, atomic_write_json, atomic_write_text, inside, is_orphan, sha256_path
from .locking import RunLock, lock_holder, process_alive

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


class RunStateError(UserError):
    """The run directory is not in a state this command can work from: in use, corrupt, an input
    step not done, or an output edited by hand."""


MANIFEST = "manifest.json"
CONFIG = "config.yaml"


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


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest, checked to be one; a damaged one is a RunStateError saying what to do."""
    advice = ("it is only ever replaced whole, so another program or a hand edit changed it: restore it, "
              "or move it away to start the run's record afresh (every step then runs again)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RunStateError(f"{path}: corrupt manifest (not UTF-8 at byte {e.start}); {advice}") from None
    if not text.strip():
        raise RunStateError(f"{path}: the manifest is empty; {advice}")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise RunStateError(f"{path}:{e.lineno}: corrupt manifest ({e.msg} at column {e.colno}); {advice}") from None
    steps = manifest.get("steps") if isinstance(manifest, dict) else None
    if not isinstance(steps, dict) or not all(isinstance(s, dict) and "status" in s for s in steps.values()):
        raise RunStateError(f"{path}: not a run manifest (no `steps` with a status each); {advice}")
    return manifest


def prepare_run_dir(run_dir: Path) -> bool:
    """Check that ``run_dir`` can be a run directory and create it; True when this call created it."""
    if run_dir.exists():
        if not run_dir.is_dir():
            raise RunStateError(f"--run-dir {run_dir} is a file, not a directory")
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise RunStateError(f"--run-dir {run_dir} is not writable (permission denied)")
        return False
    parent = run_dir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RunStateError(f"--run-dir {run_dir}: {parent} is a file, so no directory can be made under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunStateError(f"--run-dir {run_dir}: cannot create it in {parent} (permission denied)")
    run_dir.mkdir(parents=True)
    return True


class Run:
    """``config``: the command's config, written to the run (``config.yaml``, the manifest) when a step
    starts, never before. ``config_path`` appears in the commands that messages suggest.
    ``keep_edits``: an output changed after its step wrote it is adopted instead of refused."""

    def __init__(self, run_dir: str | Path, config: PipelineConfig | None = None, *,
                 config_path: str | Path | None = None, keep_edits: bool = False):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.dir / MANIFEST
        self.manifest = self._load_manifest()
        self.config_path = str(config_path or self.dir / CONFIG)
        self.keep_edits = keep_edits
        self._new_config = config
        self.config = config if config is not None else self._recorded_config()

    @classmethod
    def open_existing(cls, run_dir: str | Path) -> Run:
        """Read-only view (workers, status): config from the manifest, nothing written."""
        run = cls.__new__(cls)
        run.dir = Path(run_dir)
        run.manifest_path = run.dir / MANIFEST
        if not run.manifest_path.is_file():
            raise RunStateError(f"{run.manifest_path} not found: not a run directory")
        run.manifest = run._load_manifest()
        run.config_path, run.keep_edits, run._new_config = str(run.dir / CONFIG), False, None
        run.config = run._recorded_config()
        return run

    def _load_manifest(self) -> dict[str, Any]:
        if self.manifest_path.exists():
            return read_manifest(self.manifest_path)
        return {"created": now(), "run_dir": str(self.dir), "steps": {}}

    def _recorded_config(self) -> PipelineConfig:
        try:
            return PipelineConfig.model_validate(self.manifest.get("config", {}))
        except ValidationError as e:
            raise RunStateError(f"{self.manifest_path}: its config does not validate with this version "
                                f"({e.error_count()} problem(s), first: {'.'.join(map(str, e.errors()[0]['loc']))}: "
                                f"{e.errors()[0]['msg']}); run a step with a config file to record a new one") from None

    def _save(self) -> None:
        self.manifest["updated"] = now()
        atomic_write_json(self.manifest_path, self.manifest)

    def path(self, rel: str) -> Path:
        """A path inside the run directory; one that would leave it is refused."""
        inside(self.dir, rel)
        return self.dir / rel

    def _input_path(self, name: str) -> Path:
        return Path(name) if Path(name).is_absolute() else self.path(name)  # absolute: the user's own file

    def command(self, step: str, *flags: str) -> str:
        """The command line that runs ``step`` on this run, for messages."""
        from .steps.common import STEP_COMMANDS

        words = STEP_COMMANDS.get(step, step).split()
        return " ".join(["cai-bootstrap", words[0], self.config_path, "--run-dir", str(self.dir), *words[1:], *flags])

    # ------------------------------------------------------------------ state of steps

    def steps(self) -> dict[str, dict[str, Any]]:
        return self.manifest["steps"]

    def state(self, name: str) -> str:
        """done | failed | running | interrupted | absent. A step marked running whose process is gone
        (or no longer holds the run) was interrupted."""
        entry = self.steps().get(name)
        if entry is None:
            return "absent"
        if entry["status"] != "running":
            return entry["status"]
        pid, host = entry.get("pid"), entry.get("host")
        if host is not None and host != socket.gethostname():
            holder = lock_holder(self.dir)  # another machine: its lock record is all there is to go by
            return "running" if holder and (holder.get("host"), holder.get("pid")) == (host, pid) else "interrupted"
        if pid is None or not process_alive(pid):
            return "interrupted"
        if pid == os.getpid():
            return "running"
        holder = lock_holder(self.dir)  # alive but not holding the run: the pid was reused
        return "running" if holder and holder.get("pid") == pid else "interrupted"

    def _explain(self, name: str, state: str) -> str:
        entry = self.steps().get(name, {})
        if state == "absent":
            return "has not run"
        if state == "failed":
            return f"failed ({str(entry.get('error', '')).splitlines()[0][:300]})"
        who = f"pid {entry.get('pid')} on {entry.get('host')}" if entry.get("pid") else "its process"
        if state == "interrupted" and entry["status"] == "interrupted":
            return f"was interrupted (Ctrl-C, at {entry.get('ended')})"
        if state == "interrupted":
            return f"was interrupted (started {entry.get('started')}; {who} is gone)"
        return f"is still running ({who}, started {entry.get('started')})"

    def _writer(self, rel: str) -> tuple[str | None, dict[str, Any] | None]:
        """The step that writes ``rel`` and its manifest entry (None if it never started here)."""
        for step, entry in self.steps().items():
            if rel in (entry.get("outputs") or {}):
                return step, entry
        from .steps.common import WRITERS

        step = WRITERS.get(rel)
        return step, self.steps().get(step) if step else None

    def check_inputs_ready(self, name: str, inputs: list[str]) -> None:
        """Refuse to start ``name`` while a step that writes one of its inputs is not done, or one of
        them is missing or changed since its step wrote it (adopted under ``keep_edits``)."""
        for rel in inputs:
            if Path(rel).is_absolute():
                continue
            writer, entry = self._writer(rel)
            exists = self.path(rel).exists()
            if writer is None or writer == name:
                continue
            if entry is None:
                if not exists:
                    raise RunStateError(f"{name} needs {self.path(rel)}, which step {writer} writes and has not "
                                        f"written here: run `{self.command(writer)}` first")
                continue  # a file of the user's own, never written by a step here
            state = self.state(writer)
            if state != "done":
                raise RunStateError(f"{name} needs {rel} from step {writer}, which {self._explain(writer, state)}: "
                                    f"run `{self.command(writer)}` first")
            if not exists:
                raise RunStateError(f"{name} needs {self.path(rel)}, which step {writer} wrote but is gone: "
                                    f"run `{self.command(writer)}` again")
            edited = self._edited_outputs(entry, [rel])
            if edited:
                self._handle_edits(writer, entry, edited, rebuildable=True)

    def _edited_outputs(self, entry: dict[str, Any], only: list[str] | None = None) -> dict[str, tuple[str, str]]:
        """Outputs of a done step that exist but no longer hash as recorded: {rel: (recorded, now)}."""
        if entry.get("status") != "done":
            return {}
        out = {}
        for rel, digest in entry.get("outputs", {}).items():
            if (only is None or rel in only) and digest and self.path(rel).exists():
                current = sha256_path(self.path(rel))
                if current != digest:
                    out[rel] = (digest, current)
        return out

    def _handle_edits(self, name: str, entry: dict[str, Any], edited: dict[str, tuple[str, str]],
                      rebuildable: bool) -> None:
        """Adopt the edited outputs of step ``name`` under keep_edits, else refuse saying how to go on."""
        from .steps.common import EDIT_HINTS

        files = ", ".join(f"{rel} (sha256 {old[:12]} when written, {new[:12]} now)" for rel, (old, new) in edited.items())
        if not self.keep_edits:
            hints = "".join(f"; {EDIT_HINTS[rel]}" for rel in edited if rel in EDIT_HINTS)
            raise RunStateError(f"{files} changed after step {name} wrote it: add --keep-edits to use it as it is, "
                                f"or rebuild it with `{self.command(name, '--force')}`{hints}")
        if not rebuildable:
            raise RunStateError(f"step {name} must run again (its config or inputs changed), which would replace "
                                f"{files} that you edited: `{self.command(name, '--force')}` rebuilds it, or undo the "
                                f"change")
        for rel, (old, new) in edited.items():
            entry["outputs"][rel] = new
            entry.setdefault("edited", {})[rel] = {"written": old, "kept": new, "at": now()}
            console.print(f"{name}: keeping your edited {rel} (--keep-edits)", highlight=False, soft_wrap=True)
        self._save()

    def _input_hashes(self, inputs: list[str]) -> dict[str, str]:
        hashes = {}
        for rel in inputs:
            p = self._input_path(rel)
            if not p.exists() and Path(rel).is_absolute():
                raise RunStateError(f"{p}: file not found (a file the config names)")
            if not p.exists():
                raise RunStateError(f"missing input {p}: run the step that writes it first (or fix the path)")
            hashes[rel] = sha256_path(p)
        return hashes

    def is_current(self, name: str, params_hash: str, inputs: list[str]) -> bool:
        """Done with the same parameters and inputs, and every output as it wrote it. An output changed
        since is refused (RunStateError), or adopted under keep_edits; a missing one is rebuilt."""
        entry = self.steps().get(name)
        if not entry or entry.get("status") != "done":
            return False
        try:
            unchanged = entry.get("params_hash") == params_hash and entry.get("inputs") == self._input_hashes(inputs)
        except RunStateError:
            unchanged = False
        edited = self._edited_outputs(entry)
        kept = [rel for rel in entry.get("edited", {}) if rel not in edited and self.path(rel).exists()]
        if edited:
            self._handle_edits(name, entry, edited, rebuildable=unchanged)
        elif kept and not unchanged:  # edits adopted earlier are protected the same way
            raise RunStateError(f"step {name} must run again (its config or inputs changed), which would replace "
                                f"{', '.join(kept)} that you edited (kept with --keep-edits): "
                                f"`{self.command(name, '--force')}` rebuilds it, or undo the change")
        return unchanged and all(self.path(rel).exists() for rel in entry.get("outputs", {}))

    # ------------------------------------------------------------------ running a step

    def remove_orphans(self) -> list[Path]:
        """Remove the temporary files of interrupted atomic writes (``.NAME.xxxx.tmp``); call it only while
        no other process writes here (a command holds the run's lock)."""
        removed: list[Path] = []
        for p in sorted(self.dir.rglob(".*")):
            if is_orphan(p) and not any(p.is_relative_to(r) for r in removed) and p.exists():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(p)
        if removed:
            console.print(f"removed {len(removed)} temporary file(s) left by an interrupted write: "
                          + ", ".join(str(p.relative_to(self.dir)) for p in removed), highlight=False, soft_wrap=True)
        return removed

    def _snapshot(self, outputs: list[str]) -> dict[str, Any]:
        files = {rel: (self.path(rel).read_bytes() if self.path(rel).is_file() else None) for rel in (MANIFEST, CONFIG)}
        return {"files": files, "manifest": copy.deepcopy(self.manifest),
                "outputs": {rel: sha256_path(self.path(rel)) if self.path(rel).exists() else None for rel in outputs}}

    def _restore(self, snapshot: dict[str, Any]) -> None:
        for rel, data in snapshot["files"].items():
            if data is None:
                self.path(rel).unlink(missing_ok=True)
            else:
                atomic_write_bytes(self.path(rel), data)
        self.manifest = snapshot["manifest"]

    @contextmanager
    def step(self, name: str, params_hash: str, inputs: list[str], outputs: list[str]) -> Iterator[StepRecord]:
        """Run a step body, recording it; on failure the entry says so and the error is re-raised.
        A UserError (bad input) that changed no output leaves the run directory as it was."""
        self.check_inputs_ready(name, inputs)
        record = StepRecord(name, params_hash, self._input_hashes(inputs), outputs)
        self.remove_orphans()
        snapshot = self._snapshot(outputs)
        started, t0 = now(), time.perf_counter()
        if self._new_config is not None:  # the run's config is the one its latest step ran with
            self.manifest["config_hash"] = self._new_config.hash()
            self.manifest["config"] = self._new_config.model_dump(mode="json")
            atomic_write_text(self.path(CONFIG), dump_config(self._new_config))
        writes = dict.fromkeys(outputs)  # which files this step writes, for the steps that read them
        self.manifest["steps"][name] = {"status": "running", "started": started, "params_hash": params_hash,
                                        "pid": os.getpid(), "host": socket.gethostname(), "outputs": writes}
        self._save()
        try:
            yield record
        except BaseException as e:
            unchanged = all((sha256_path(self.path(rel)) if self.path(rel).exists() else None) == digest
                            for rel, digest in snapshot["outputs"].items())
            if isinstance(e, UserError) and unchanged:
                self._restore(snapshot)
            else:
                self._record_failure(name, e, started, t0, params_hash, writes)
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

    def adopt(self, source: Run, name: str, params_hash: str) -> bool:
        """Take step ``name`` as ``source`` (another run directory) finished it: copy its outputs and
        its manifest entry, with ``provenance.adopted_from`` saying where from, so that this run skips
        the step and uses the same artifacts (runs of one experiment share their data this way).

        Refused (:class:`RunStateError`) unless the source's step is done with ``params_hash`` (what this
        run's config gives for the step), its outputs still hash as recorded, and this run's copies of
        the step's inputs are the ones it used. Returns False when this run already has those outputs.
        """
        entry = source.steps().get(name)
        where = f"{source.dir}: step {name}"
        if not entry or entry.get("status") != "done":
            raise RunStateError(f"{where} is not done: nothing to share")
        if entry.get("params_hash") != params_hash:
            raise RunStateError(f"{where} ran with other settings (params {entry.get('params_hash')} != "
                             f"{params_hash}): it cannot be shared with {self.dir}")
        for rel, digest in entry.get("inputs", {}).items():
            p = self._input_path(rel)
            if not p.exists() or sha256_path(p) != digest:
                raise RunStateError(f"{where} read {rel} ({digest[:12]}), which {self.dir} does not have as such")
        outputs: dict[str, str] = entry.get("outputs", {})
        for rel, digest in outputs.items():
            if not source.path(rel).exists() or sha256_path(source.path(rel)) != digest:
                raise RunStateError(f"{where}: {rel} changed since the step recorded it; re-run it there first")
        mine = self.steps().get(name, {})
        if mine.get("status") == "done" and mine.get("params_hash") == params_hash and mine.get("outputs") == outputs \
                and all(self.path(r).exists() and sha256_path(self.path(r)) == d for r, d in outputs.items()):
            return False
        for rel in outputs:
            _copy_atomic(source.path(rel), self.path(rel))
        adopted_from = {"run_dir": os.path.relpath(source.dir.resolve(), self.dir.resolve()),
                        "ended": entry.get("ended"), "adopted": now()}
        self.manifest["steps"][name] = {**entry, "provenance": {**entry.get("provenance", {}),
                                                                 "adopted_from": adopted_from}}
        self._save()
        return True

    def _record_failure(self, name: str, e: BaseException, started: str, t0: float, params_hash: str,
                        writes: dict) -> None:
        self.manifest["steps"][name] = {
            "status": "interrupted" if isinstance(e, KeyboardInterrupt) else "failed", "started": started, "ended": now(),
            "duration_s": round(time.perf_counter() - t0, 2), "params_hash": params_hash, "outputs": writes,
            "error": f"{type(e).__name__}: {e}"[:2000],
            "traceback": traceback.format_exc(limit=6)[-4000:],
        }
        self._save()


@contextmanager
def open_run(run_dir: Path, config: PipelineConfig | None, *, command: str, config_path: str | Path | None = None,
             keep_edits: bool = False) -> Iterator[Run]:
    """A run directory for a command that writes to it: checked, created if missing, and locked while
    the command works. A directory this command created and left without files is removed again."""
    created = prepare_run_dir(run_dir) if config is not None else False
    if config is None and not (run_dir / MANIFEST).is_file():
        raise RunStateError(f"{run_dir / MANIFEST} not found: not a run directory")
    try:
        with RunLock(run_dir, command):
            yield Run(run_dir, config, config_path=config_path, keep_edits=keep_edits)
    finally:
        if created and not any(p.is_file() for p in run_dir.rglob("*")):
            shutil.rmtree(run_dir, ignore_errors=True)


def _copy_atomic(src: Path, dst: Path) -> None:
    """A file or folder copied beside the target, then renamed into place (an interrupted copy leaves
    an orphan that the next command removes)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.adopting{TMP_SUFFIX}")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    if src.is_dir():
        shutil.copytree(src, tmp)
        if dst.exists():
            shutil.rmtree(dst)
    else:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)
