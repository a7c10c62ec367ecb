"""How long an experiment will take, from what one finished run measured.

The estimate is the measured run's step durations (its manifest), summed over the steps each planned
run will execute: a run that adopts shared steps (see plan.py) does not pay for them, a later round
pays for its own SFT data. Adopted steps are counted as free (a copy). It assumes the same config
counts, model and machine as the measured run: when the measured run's config differs from the
planned one in more than the seeds and rounds, the estimate says in which sections.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PipelineConfig
from .plan import PlannedRun

# Sections that do not change how much work a run does.
NEUTRAL = {"seed", "data_seed", "rounds", "tracking"}
REPORT_S = 10.0  # the report step is not in the manifest; a generous allowance per run


@dataclass
class Estimate:
    runs: int
    remaining_runs: int
    total_s: float | None
    remaining_s: float | None
    device: str  # "CPU" or "GPU"
    gpus: int
    basis: str  # what was measured, in words
    differs: list[str] = field(default_factory=list)  # config sections that differ from the measured run's

    def hours(self, seconds: float | None) -> str:
        if seconds is None:
            return "unknown"
        return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds / 60:.0f} min"

    def line(self) -> str:
        """One line: runs, and the time estimate with where it comes from."""
        head = f"{self.runs} runs ({self.remaining_runs} to do)"
        if self.total_s is None:
            return f"{head}; time: not estimated ({self.basis})"
        unit = f"{self.device} hours" if self.device == "CPU" else f"GPU hours ({self.gpus} GPU(s))"
        scale = self.gpus if self.device == "GPU" else 1
        text = (f"{head}; estimated {self.hours(self.total_s)} wall in all, {self.hours(self.remaining_s)} "
                f"still to run = {self.remaining_s * scale / 3600:.2f} {unit}; from {self.basis}")
        if self.differs:
            text += f" (its config differs in {', '.join(self.differs)}: not scaled for that)"
        return text


def step_durations(manifest: dict[str, Any]) -> dict[str, float]:
    """Measured seconds per step of a finished run; adopted steps (copies) are not measurements."""
    out = {}
    for name, entry in manifest.get("steps", {}).items():
        if entry.get("status") == "done" and "adopted_from" not in entry.get("provenance", {}):
            out[name] = float(entry.get("duration_s") or 0.0)
    return out


def machine_of(manifest: dict[str, Any]) -> tuple[str, int]:
    for entry in manifest.get("steps", {}).values():
        m = (entry.get("environment") or {}).get("machine")
        if m:
            gpus = len(m.get("gpus") or [])
            return ("GPU", gpus) if gpus else ("CPU", 0)
    return "CPU", 0


def differing_sections(a: PipelineConfig, b: PipelineConfig) -> list[str]:
    da, db = a.model_dump(mode="json"), b.model_dump(mode="json")
    return sorted(k for k in set(da) | set(db) if k not in NEUTRAL and da.get(k) != db.get(k))


def find_measured(path: Path) -> Path | None:
    """A finished run to measure: the run directory itself, or an experiment's first finished run."""
    path = Path(path)
    state = path / "experiment.json"
    if state.is_file():
        runs = json.loads(state.read_text(encoding="utf-8")).get("runs", {})
        done = [name for name, r in runs.items() if r.get("status") == "done"]
        return path / done[0] if done else None
    return path if (path / "manifest.json").is_file() else None


def estimate(planned: list[PlannedRun], config: PipelineConfig, measured: Path | None,
             done: set[str] = frozenset(), unmeasured: str = "no finished run to measure yet") -> Estimate:
    """Every planned run's time from the measured run's step durations (see the module docstring);
    ``unmeasured`` says why there is none when ``measured`` is None."""
    remaining = [p for p in planned if p.name not in done]
    if measured is None:
        return Estimate(len(planned), len(remaining), None, None, "CPU", 0, unmeasured)
    manifest = json.loads((Path(measured) / "manifest.json").read_text(encoding="utf-8"))
    durations = step_durations(manifest)
    missing = {"instructions", "sft", "evaluate"} - set(durations)
    if missing:
        return Estimate(len(planned), len(remaining), None, None, "CPU", 0,
                        f"{measured} did not measure {sorted(missing)} itself")
    device, gpus = machine_of(manifest)
    measured_config = PipelineConfig.model_validate(manifest.get("config", {}))

    def cost(p: PlannedRun) -> float:
        return sum(s for name, s in durations.items() if name not in p.adopts) + REPORT_S

    total = sum(cost(p) for p in planned)
    left = sum(cost(p) for p in remaining)
    steps = ", ".join(f"{k} {v:.0f}s" for k, v in durations.items())
    basis = f"the measured step times of {measured} ({steps}; adopted steps count as free)"
    unmeasured = sorted({"baseline", "sft-data"} - set(durations))
    if unmeasured:  # the measured run adopted them: runs that make them are under-estimated
        basis += f"; {', '.join(unmeasured)} not measured there, counted as 0"
    return Estimate(len(planned), len(remaining), total, left, device, gpus, basis,
                    differing_sections(measured_config, config))
