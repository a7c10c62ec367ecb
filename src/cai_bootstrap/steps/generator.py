"""What a step generates with, wherever the generation runs.

* ``generation.backend: hf`` (default): the model is loaded in this process and generates with
  :class:`~cai_bootstrap.generation.engine.Engine`;
* the same with an accelerate config (``--launcher accelerate``): every launched process loads the
  model and generates a shard (:mod:`cai_bootstrap.generation.launched`); this process holds no model
  meanwhile. Greedy results are byte-identical to one process (sampled ones are a deterministic
  but different draw per process count: see generation/distributed.py);
* ``generation.backend: vllm``: one vLLM engine (its own processes, tensor parallel over
  ``generation.tensor_parallel_size`` GPUs) on the base weights, the adapters served as one LoRA
  request (a chain combined into one small adapter in ``work_dir``); closing the generator shuts the
  engine down, so a step never holds two. vLLM parallelises itself, so it ignores the accelerate config.

The step's logic, QC and manifest stay in this process in every case. Steps that also score with the
model (the sft-data critic, the pair margins) ask for :meth:`Generator.scoring_model`: the generating
model itself when it lives here, otherwise one loaded here once generation is over.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..config import PipelineConfig
from ..console import generation_progress
from ..generation.engine import Decoding, Engine, Generation, GenerationStats
from ..generation.launched import Job, LaunchedEngine, LaunchModel
from ..generation.vllm_backend import BackendUnavailable, VLLMEngine, engine_args, require_vllm
from ..models.adapter_chain import combine as combine_chain
from ..models.adapter_chain import read_lora
from ..models.loading import LoadedModel, fingerprint, free, load_model, load_tokenizer, resolve


def check_backend(config: PipelineConfig) -> None:
    """Fail at the start of a step, in one line, when the configured backend cannot run here."""
    if config.generation.backend == "vllm":
        require_vllm()
        if config.model.generation_quantization != "none":
            raise BackendUnavailable(f"generation.backend vllm needs model.generation_quantization none (got "
                                     f"{config.model.generation_quantization}): vLLM loads the weights itself")


class Generator:
    """One model (``spec`` + ``adapters``, loaded as ``config.model`` says) to generate with.

    ``load`` replaces how the weights are loaded in this process (tests inject one); ``work_dir`` holds
    the launch requests and vLLM's combined adapter chain while they are needed.
    """

    def __init__(self, config: PipelineConfig, *, spec: str | None = None, adapters: Sequence[str | Path] = (),
                 batch_size: int | None = None, accelerate_config: Path | None = None,
                 work_dir: Path | None = None, load: Callable[[], LoadedModel] | None = None):
        check_backend(config)
        m = config.model
        self.config = config
        self.spec = spec or m.base
        self.adapters = [str(a) for a in adapters]
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.gettempdir())
        self._load = load or (lambda: load_model(self.spec, quantization=m.generation_quantization, dtype=m.dtype,
                                                 adapters=self.adapters,
                                                 allow_full_precision_fallback=m.allow_full_precision_fallback))
        batch_size = batch_size or config.generation.batch_size
        self.loaded: LoadedModel | None = None  # the HF model in this process, if any
        self.launched_gpu_peak_mb: float | None = None  # launched processes' busiest GPU (this one sees none)
        self._facts: dict[str, Any] | None = None  # provenance and fingerprint of the generating weights
        self._combined: Path | None = None  # an adapter chain as one LoRA, for vLLM
        self.engine: Engine | LaunchedEngine | VLLMEngine
        if config.generation.backend == "vllm":
            self.engine = self._vllm_engine()
            self.runtime = {"backend": "vllm", "tensor_parallel_size": config.generation.tensor_parallel_size,
                            "lora": self.engine.lora is not None}
        elif accelerate_config is not None:
            self.engine = LaunchedEngine(LaunchModel(self.spec, tuple(self.adapters), m.generation_quantization, m.dtype,
                                                     m.allow_full_precision_fallback, batch_size, m.add_bos_token,
                                                     config.cpu_backend),
                                         Path(accelerate_config), self.work_dir)
            self.runtime = {"backend": "hf", "accelerate_config": str(accelerate_config)}
        else:
            self.loaded = self._load()
            self.engine = Engine(self.loaded.model, self.loaded.tokenizer, batch_size=batch_size,
                                 add_bos=m.add_bos_token, cpu_backend=config.cpu_backend)
            self.runtime = {"backend": "hf", "processes": 1, "cpu_backend": self.engine.backend.as_dict()}

    def _vllm_engine(self) -> VLLMEngine:
        # The HF load gives the fingerprint (isolation checks compare it with HF-loaded base weights):
        # the weights the base plus the adapters stand for, which vLLM serves as base + LoRA.
        loaded = self._load()
        self._facts = {"provenance": loaded.provenance, "fingerprint": fingerprint(loaded.model)}
        folder, tokenizer = loaded.resolved.path, loaded.tokenizer
        free(loaded)
        try:
            adapter = None
            if len(self.adapters) == 1:
                adapter = read_lora(self.adapters[0])
            elif self.adapters:
                self._combined = self.work_dir / f"vllm-lora-{self._facts['fingerprint']}"
                adapter = combine_chain(self.adapters, self._combined)
            g, m = self.config.generation, self.config.model
            args = engine_args(g.vllm, dtype=m.dtype, tensor_parallel_size=g.tensor_parallel_size,
                               seed=self.config.seed, lora_rank=adapter.rank if adapter else None)
            return VLLMEngine.load(folder, tokenizer, args, add_bos=m.add_bos_token,
                                   adapter=adapter.folder if adapter else None)
        except BaseException:
            self._remove_combined()  # __init__ fails, so close() will not run
            raise

    def generate(self, prompts: Sequence[str], decoding: Decoding, label: str = "generate") -> list[Generation]:
        return self.generate_many([(prompts, decoding)], label)[0]

    def generate_many(self, jobs: Sequence[Job], label: str = "generate") -> list[list[Generation]]:
        """Each (prompts, decoding) job in order; launched, all in one launch (one model load)."""
        with generation_progress(sum(len(p) for p, _ in jobs), label) as progress:
            if isinstance(self.engine, LaunchedEngine):
                gens = self.engine.generate_many(jobs, progress)
                self.runtime["processes"] = self.engine.loaded["processes"]
                self.runtime["cpu_backend"] = self.engine.loaded["cpu_backend"]
                self.launched_gpu_peak_mb = self.engine.loaded["gpu_peak_mb"]
                return gens
            return [self.engine.generate(p, d, progress) for p, d in jobs]

    @property
    def stats(self) -> GenerationStats:
        return self.engine.stats

    def _model_facts(self) -> dict[str, Any]:
        if self._facts is None:
            if isinstance(self.engine, LaunchedEngine):
                if not self.engine.loaded:
                    self.engine.generate_many([])  # a launch that only loads
                self._facts = {k: self.engine.loaded[k] for k in ("provenance", "fingerprint")}
            else:
                self._facts = {"provenance": self.loaded.provenance, "fingerprint": fingerprint(self.loaded.model)}
        return self._facts

    @property
    def provenance(self) -> dict[str, Any]:
        """``LoadedModel.provenance`` of the weights that generated (from launched process 0 if launched)."""
        return self._model_facts()["provenance"]

    @property
    def fingerprint(self) -> str:
        return self._model_facts()["fingerprint"]

    @property
    def tokenizer(self):
        if self.loaded is not None:
            return self.loaded.tokenizer
        return getattr(self.engine, "tokenizer", None) or load_tokenizer(resolve(self.spec).path)

    def scoring_model(self) -> LoadedModel:
        """The same weights as an HF model in this process, for log-probabilities."""
        if self.loaded is None:
            self._model_facts()
            if isinstance(self.engine, VLLMEngine):
                self.engine.close()  # give the GPU back before loading here
            self.loaded = self._load()
        return self.loaded

    def close(self) -> None:
        if isinstance(self.engine, VLLMEngine):
            self.engine.close()
        free(self.loaded)
        self.loaded = None
        self._remove_combined()

    def _remove_combined(self) -> None:
        if self._combined is not None:
            shutil.rmtree(self._combined, ignore_errors=True)

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
