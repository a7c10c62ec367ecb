"""Generation in processes started by ``accelerate launch``, driven from the step's own process.

The parent writes a request (model, adapters, dtype, quantization, batch size, and one or more
(prompts, decoding) jobs) into a work folder, launches this module on every process, and reads the
results back in input order. Each launched process loads the model and generates its shard
(:func:`~cai_bootstrap.generation.distributed.generate_sharded`); process 0 writes the results, the
weights' fingerprint and the load provenance. The parent holds no model meanwhile: on GPUs the
launched processes need all the memory.

    accelerate launch --config_file CFG -m cai_bootstrap.generation.launched REQUEST.json RESULT.json
"""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..launching import ERRORS_DIR, launch, reporting_errors
from .engine import Decoding, Generation, GenerationStats

Job = tuple[Sequence[str], Decoding]


@dataclass(frozen=True)
class LaunchModel:
    """What every launched process loads (the arguments of ``models.loading.load_model``)."""

    spec: str
    adapters: tuple[str, ...] = ()
    quantization: str = "none"
    dtype: str = "float32"
    allow_full_precision_fallback: bool = False
    batch_size: int = 16
    add_bos: bool = False
    cpu_backend: str = "auto"  # each launched process decides for its own device (cpu_backend.py)


def decoding_from_dict(d: dict[str, Any]) -> Decoding:
    return Decoding(max_new_tokens=d["max_new_tokens"], temperature=d["temperature"], top_p=d["top_p"],
                    seed=d["seed"], stop_strings=tuple(d["stop_strings"]))


@dataclass
class LaunchedEngine:
    """``generate`` and ``stats`` like :class:`~cai_bootstrap.generation.engine.Engine`, run by
    ``accelerate launch`` with ``accelerate_config``; one launch (one model load per process) per call.

    After a call, ``loaded`` holds what process 0 reported: ``provenance`` (as ``LoadedModel.provenance``),
    ``fingerprint``, ``processes``, ``gpu_peak_mb`` (the busiest GPU's peak allocation; None off CUDA)
    and ``cpu_backend`` (process 0's decision).
    """

    model: LaunchModel
    accelerate_config: Path
    work_dir: Path
    stats: GenerationStats = field(default_factory=GenerationStats)
    loaded: dict[str, Any] = field(default_factory=dict)

    def generate(self, prompts: Sequence[str], decoding: Decoding,
                 progress: Callable[[int, int], None] | None = None) -> list[Generation]:
        return self.generate_many([(prompts, decoding)], progress)[0]

    def generate_many(self, jobs: Sequence[Job], progress: Callable[[int, int], None] | None = None
                      ) -> list[list[Generation]]:
        """Every job in one launch; an empty list only loads the model (for its fingerprint)."""
        from ..files import atomic_write_json

        tag = f"generate-{uuid.uuid4().hex[:12]}"
        request, result = (Path(self.work_dir) / f"{tag}.{kind}.json" for kind in ("request", "result"))
        atomic_write_json(request, {"model": asdict(self.model),
                                    "jobs": [{"prompts": list(p), "decoding": d.as_dict()} for p, d in jobs]})
        try:  # launch checks the accelerate config; the request and result are scratch either way
            launch(self.accelerate_config, "cai_bootstrap.generation.launched", [str(request), str(result)],
                   errors=_errors_dir(request), tag=tag, what=f"generation with {self.model.spec}")
            out = json.loads(result.read_text(encoding="utf-8"))
        finally:
            request.unlink()
            result.unlink(missing_ok=True)
        self.loaded = {k: out[k] for k in ("provenance", "fingerprint", "processes", "gpu_peak_mb", "cpu_backend")}
        for k, v in out["stats"].items():
            setattr(self.stats, k, getattr(self.stats, k) + v)
        gens = [[Generation(**g) for g in job] for job in out["jobs"]]
        if [len(g) for g in gens] != [len(p) for p, _ in jobs]:
            raise RuntimeError(f"launched generation returned {[len(g) for g in gens]} results for "
                               f"{[len(p) for p, _ in jobs]} prompts")
        if progress:
            for g in gens:
                progress(len(g), sum(x.completion_tokens for x in g))
        return gens


def _errors_dir(request: Path) -> Path:
    return request.parent / ERRORS_DIR


def main(argv: Sequence[str] | None = None) -> int:
    """The launched side: every process loads the model and generates its shard of every job."""
    ap = argparse.ArgumentParser(description="Sharded generation of a request; run under accelerate launch.")
    ap.add_argument("request", type=Path)
    ap.add_argument("result", type=Path, help="written by process 0")
    args = ap.parse_args(argv)
    with reporting_errors(_errors_dir(args.request), args.request.name.removesuffix(".request.json")):
        return _generate(args.request, args.result)


def _generate(request: Path, result: Path) -> int:
    from ..files import atomic_write_json
    from ..models.loading import fingerprint, load_model
    from .distributed import _state, generate_sharded
    from .engine import Engine

    state = _state()
    req = json.loads(request.read_text(encoding="utf-8"))
    m = LaunchModel(**{**req["model"], "adapters": tuple(req["model"]["adapters"])})
    device = "cpu" if state.device.type == "cpu" else str(state.device)
    loaded = load_model(m.spec, quantization=m.quantization, dtype=m.dtype, adapters=list(m.adapters),
                        allow_full_precision_fallback=m.allow_full_precision_fallback, device=device)
    engine = Engine(loaded.model, loaded.tokenizer, batch_size=m.batch_size, add_bos=m.add_bos,
                    cpu_backend=m.cpu_backend)
    jobs = [generate_sharded(engine, job["prompts"], decoding_from_dict(job["decoding"])) for job in req["jobs"]]
    gpu_peaks = _gathered(state, _gpu_peak_mb(state.device))
    if state.is_main_process:
        atomic_write_json(result, {
            "processes": state.num_processes, "provenance": loaded.provenance, "fingerprint": fingerprint(loaded.model),
            "gpu_peak_mb": max((p for p in gpu_peaks if p is not None), default=None),
            "cpu_backend": engine.backend.as_dict(),
            "stats": vars(engine.stats), "jobs": [[asdict(g) for g in gens] for gens in jobs]})
    state.wait_for_everyone()
    if state.num_processes > 1:
        state.destroy_process_group()
    return 0


def _gpu_peak_mb(device) -> float | None:
    """This process's peak CUDA allocation (the parent cannot see it), None off CUDA."""
    if device.type != "cuda":
        return None
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def _gathered(state, value) -> list:
    """``value`` of every process, on every process."""
    if state.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


if __name__ == "__main__":
    raise SystemExit(main())
