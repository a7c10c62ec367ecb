"""What steps share: loading the configured base model, provenance, and reading the few-shot pool."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..config import PipelineConfig
from ..formats import Example
from ..generation.engine import Decoding, Engine
from ..models.loading import LoadedModel, load_model
from ..schemas import GeneratorProvenance

# Artifact paths inside a run directory (DESIGN.md §2): explicit, never "the newest match".
INSTRUCTIONS = "data/instructions.jsonl"
TEST = "data/test.jsonl"
INSTRUCTIONS_REPORT = "data/instructions_report.json"
SFT = "data/sft.jsonl"
SFT_QC = "data/sft_qc.json"
NEGATIVES = "data/negatives.jsonl"
PAIRS = "data/pairs.jsonl"
BASELINE = "baseline.json"
SFT_DIR = "models/sft"
DPO_DIR = "models/dpo"
DPO_ONLY_DIR = "models/dpo_only"
RESPONSES_DIR = "eval/responses"
RESULTS = "eval/results.json"
SCORES = "eval/scores.jsonl"
REPORT_DIR = "report"


def load_base(config: PipelineConfig, adapters: list[str | Path] | None = None) -> LoadedModel:
    m = config.model
    return load_model(m.base, quantization=m.quantization, dtype=m.dtype, adapters=adapters,
                      allow_full_precision_fallback=m.allow_full_precision_fallback)


def engine_for(loaded: LoadedModel, config: PipelineConfig, batch_size: int | None = None) -> Engine:
    return Engine(loaded.model, loaded.tokenizer, batch_size=batch_size or config.generation.batch_size,
                  add_bos=config.model.add_bos_token)


def generator_provenance(loaded: LoadedModel, config: PipelineConfig, decoding: Decoding,
                         model_fingerprint: str) -> GeneratorProvenance:
    p = loaded.provenance
    return GeneratorProvenance(
        model=p["model"], model_fingerprint=model_fingerprint,
        adapters=p["adapters"], quantization=p["quantization"], quantization_requested=p["quantization_requested"],
        full_precision_fallback=p["full_precision_fallback"], dtype=p["dtype"],
        add_bos_token=config.model.add_bos_token, decoding=decoding.as_dict(), seed=decoding.seed,
    )


def few_shot_pool() -> list[Example]:
    raw = json.loads(resources.files("cai_bootstrap.data").joinpath("builtin/few_shot.json").read_text("utf-8"))
    return [Example(e["instruction"], e["response"]) for e in raw["examples"]]
