"""`experiment`: the pipeline over training seeds and bootstrapping rounds, resumable, then one report.

``DIR/experiment.json`` records the experiment (its config, seeds, rounds, data seeds) and each run's
state. Run again, the experiment continues where it stopped: a run recorded done whose manifest is
unchanged is not touched, an interrupted one resumes like any run (its finished steps are skipped),
and asking for more seeds or rounds adds runs. A different config in the same DIR is refused. One
command at a time holds the experiment folder, and each run directory while it works on it (locks).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ConfigError, PipelineConfig
from ..console import console
from ..files import atomic_write_json, sha256_file
from ..locking import RunLock
from ..run import Run, RunStateError, now, open_run, prepare_run_dir
from ..steps import baseline, instructions, sft_data
from ..steps.pipeline import run_pipeline
from .cost import Estimate, estimate
from .plan import PlannedRun, check_base_config, plan_runs, run_config

EXPERIMENT_JSON = "experiment.json"
SCHEMA = "cai-bootstrap/experiment/v1"
# The steps a run may adopt, and what decides each one's output (see plan.py).
ADOPTABLE: dict[str, Callable[[PipelineConfig], str]] = {
    "baseline": baseline.step_params, "instructions": instructions.step_params, "sft-data": sft_data.step_params,
}
Pipeline = Callable[..., None]


def _settings(config: PipelineConfig, data_seeds: bool) -> dict[str, Any]:
    return {"config_hash": config.hash(), "base_seed": config.seed, "data_seeds": data_seeds,
            "writer": config.rounds.writer}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    return {k: v for key, sub in d.items() for k, v in _flat(sub, f"{prefix}.{key}" if prefix else key).items()}


def changed_keys(before: dict[str, Any], now_: dict[str, Any]) -> list[str]:
    """Config keys set in both with different values. A key only one side has is an option added (or
    removed) by an upgrade of this package, at its default: the runs' own step hashes decide what
    that changes, so it does not stop the experiment."""
    a, b = _flat(before), _flat(now_)
    return sorted(k for k in set(a) & set(b) if a[k] != b[k])


def open_state(out: Path, config: PipelineConfig, data_seeds: bool) -> dict[str, Any]:
    """The experiment's state: new, or the existing one if it was started with the same settings."""
    path = out / EXPERIMENT_JSON
    settings = _settings(config, data_seeds)
    if path.is_file():
        state = json.loads(path.read_text(encoding="utf-8"))
        differ = [k for k in ("base_seed", "data_seeds", "writer") if state.get("settings", {}).get(k) != settings[k]]
        differ += changed_keys(state.get("config", {}), config.model_dump(mode="json"))
        if differ:
            raise ConfigError(f"{path}: this experiment was started with other settings ({', '.join(differ)} "
                              f"differ); use the same config and options, or another --out")
        state["settings"]["config_hash"] = settings["config_hash"]
        state["config"] = config.model_dump(mode="json")
        return state
    return {"schema": SCHEMA, "created": now(), "settings": settings, "config": config.model_dump(mode="json"),
            "seeds": 0, "rounds": 0, "runs": {}}


def save_state(out: Path, state: dict[str, Any]) -> None:
    state["updated"] = now()
    atomic_write_json(out / EXPERIMENT_JSON, state)


def _finished(out: Path, entry: dict[str, Any]) -> bool:
    """Done, and its manifest is the one recorded when it finished (nothing re-ran or changed since)."""
    manifest = out / entry["dir"] / "manifest.json"
    return entry.get("status") == "done" and manifest.is_file() and sha256_file(manifest) == entry.get("manifest_sha256")


def adopt_shared(run: Run, source: Run, steps: tuple[str, ...]) -> list[str]:
    """Take the shared steps from their source run (see plan.py); the ones newly taken."""
    return [name for name in steps if run.adopt(source, name, ADOPTABLE[name](run.config))]


def run_experiment(config: PipelineConfig, out: Path, *, seeds: int, rounds: int = 1, data_seeds: bool = False,
                   accelerate_config: Path | None = None, pipeline: Pipeline = run_pipeline,
                   config_path: str | Path | None = None) -> dict[str, Any]:
    """Run (or continue) the experiment; returns its state. ``pipeline(run, accelerate_config=...)``
    runs one run directory; ``config_path`` appears in the commands that messages suggest."""
    check_base_config(config)
    out = Path(out)
    prepare_run_dir(out)
    with RunLock(out, "experiment"):
        return _run_locked(config, out, seeds, rounds, data_seeds, accelerate_config, pipeline, config_path)


def _run_locked(config: PipelineConfig, out: Path, seeds: int, rounds: int, data_seeds: bool,
                accelerate_config: Path | None, pipeline: Pipeline, config_path: str | Path | None) -> dict[str, Any]:
    state = open_state(out, config, data_seeds)
    state["seeds"], state["rounds"] = max(state["seeds"], seeds), max(state["rounds"], rounds)
    planned = plan_runs(config.seed, state["seeds"], state["rounds"], data_seeds)
    for p in planned:
        state["runs"].setdefault(p.name, {"dir": p.name, "round": p.round, "seed": p.seed,
                                          "data_seed": p.data_seed, "status": "pending"})
    save_state(out, state)
    first = estimate_now(out, planned, config, state)
    console.print(f"[bold]experiment {out}[/]: {first.line()}", highlight=False)
    state["estimate"] = {"line": first.line(), "at": now()}
    for p in planned:
        entry = state["runs"][p.name]
        if _finished(out, entry):
            console.print(f"{p.name}: done, skipped")
            continue
        _run_one(out, config, p, entry, state, accelerate_config, pipeline, config_path)
        if not any(n != p.name and r.get("status") == "done" for n, r in state["runs"].items()):
            # the first finished run: now the rest can be estimated from what it measured
            line = estimate_now(out, planned, config, state).line()
            console.print(f"[bold]experiment[/]: {line}", highlight=False)
            state["estimate"] = {"line": line, "at": now()}
            save_state(out, state)
    from .results import write_experiment_report

    state["report"] = {k: str(v) for k, v in write_experiment_report(out, state).items()}
    save_state(out, state)
    return state


def rebuild_report(out: Path) -> dict[str, Path]:
    """The experiment report again from the finished runs' saved scores (`cai-bootstrap report DIR`)."""
    from .results import write_experiment_report

    with RunLock(out, "report"):
        return write_experiment_report(out, json.loads((out / EXPERIMENT_JSON).read_text(encoding="utf-8")))


def estimate_now(out: Path, planned: list[PlannedRun], config: PipelineConfig, state: dict[str, Any]) -> Estimate:
    done = {name for name, r in state["runs"].items() if _finished(out, r)}
    measured = next((out / p.name for p in planned if p.name in done and not p.adopts), None)
    return estimate(planned, config, measured, done)


def _run_one(out: Path, config: PipelineConfig, p: PlannedRun, entry: dict, state: dict,
             accelerate_config: Path | None, pipeline: Pipeline, config_path: str | Path | None) -> None:
    console.rule(f"[bold]experiment: {p.name}")
    if p.adopt_from and not _finished(out, state["runs"][p.adopt_from]):
        raise RunStateError(f"{p.name} shares data with {p.adopt_from}, which has not finished")
    entry.update(status="running", started=now())
    entry.pop("error", None)
    save_state(out, state)
    t0 = time.perf_counter()
    try:
        with open_run(out / p.name, run_config(config, p), command="experiment", config_path=config_path) as run:
            if p.adopt_from:
                taken = adopt_shared(run, Run.open_existing(out / p.adopt_from), p.adopts)
                entry["adopted"] = {"from": p.adopt_from, "steps": list(p.adopts)}
                if taken:
                    console.print(f"{p.name}: took {', '.join(taken)} from {p.adopt_from} (same files, checked "
                                  f"by hash)", highlight=False)
            pipeline(run, accelerate_config=accelerate_config)
    except BaseException as e:  # interrupted too: the next invocation resumes this run
        entry.update(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                     error=f"{type(e).__name__}: {e}"[:500], ended=now())
        save_state(out, state)
        raise
    entry.update(status="done", ended=now(), duration_s=round(time.perf_counter() - t0, 1),
                 manifest_sha256=sha256_file(out / p.name / "manifest.json"))
    save_state(out, state)
