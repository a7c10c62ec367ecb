"""What steps share: artifact paths, generator provenance, and reading the few-shot pool.

The model a step generates with is a :class:`~cai_bootstrap.steps.generator.Generator`.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import PipelineConfig
from ..formats import Example
from ..generation.engine import Decoding
from ..schemas import GeneratorProvenance

# Artifact paths inside a run directory (DESIGN.md §2): explicit, never "the newest match".
INSTRUCTIONS = "data/instructions.jsonl"
TEST = "data/test.jsonl"
TEST_IN_DISTRIBUTION = "data/test_in_distribution.jsonl"  # optional: unseen fillers of training templates
INSTRUCTIONS_REPORT = "data/instructions_report.json"
PROMPT_SPLIT = "data/prompt_split.json"  # training pool -> SFT prompts | DPO prompts
SFT = "data/sft.jsonl"
SFT_QC = "data/sft_qc.json"
NEGATIVES = "data/negatives.jsonl"
PAIRS = "data/pairs.jsonl"
PAIRS_REPORT = "data/pairs_report.json"
BASELINE = "baseline.json"
SFT_DIR = "models/sft"
DPO_DIR = "models/dpo"
DPO_ONLY_DIR = "models/dpo_only"
RESPONSES_DIR = "eval/responses"
RESULTS = "eval/results.json"
SCORES = "eval/scores.jsonl"
REPORT_DIR = "report"
TMP = "tmp"  # launch requests and merged weights while a step runs; nothing in it is an artifact
LOGS = "logs"  # training curves (tracking: tensorboard, wandb), one folder per training step
# Each model of a run: the adapters applied, in order, to the base weights.
MODEL_CHAINS: dict[str, list[str]] = {"base": [], "sft": [SFT_DIR], "dpo": [SFT_DIR, DPO_DIR],
                                      "dpo_only": [DPO_ONLY_DIR]}

# For messages that say which command to run first: the step that writes each artifact, and the
# command of a step whose name is not its command.
WRITERS = {BASELINE: "baseline", INSTRUCTIONS: "instructions", TEST: "instructions", INSTRUCTIONS_REPORT: "instructions",
           SFT: "sft-data", SFT_QC: "sft-data", SFT_DIR: "sft", PAIRS: "pairs", NEGATIVES: "pairs",
           DPO_DIR: "dpo", DPO_ONLY_DIR: "dpo_only"}
STEP_COMMANDS = {"dpo": "dpo --init sft", "dpo_only": "dpo --init base"}
EDIT_HINTS = {INSTRUCTIONS: "to train on instructions of your own, set instructions.train_file (docs/errors.md)",
              TEST: "to test on items of your own, set instructions.test_file (docs/errors.md)"}


def tracking_name(run_dir: Path, step: str) -> str:
    """A training's name in a tracker: the run folder's last two parts and the step
    (round-2/seed-1/dpo in an experiment)."""
    resolved = Path(run_dir).resolve()
    return f"{resolved.parent.name}/{resolved.name}/{step}"


def writer_label(config: PipelineConfig) -> str | None:
    """The model that writes this run's data, as the step parameters record it (independent of where
    the experiment folder lies): ``<previous run>:<model>``; None in round 1 (the base model)."""
    r = config.rounds
    return None if r.previous is None else f"{r.previous}:{r.writer}"


def writer_adapters(run_dir: Path, config: PipelineConfig) -> list[str]:
    """The adapters of the model that writes this run's SFT data and samples its pairs: none in round 1,
    round r's ``rounds.writer`` model after. Absolute paths: that run lies outside this one, and a
    run's own relative paths never leave its directory."""
    r = config.rounds
    if r.previous is None:
        return []
    from ..run import RunStateError

    previous = (Path(run_dir) / r.previous).resolve()
    adapters = [previous / a for a in MODEL_CHAINS[r.writer]]
    missing = [str(a) for a in adapters if not (a / "adapter_config.json").is_file()]
    if missing:
        raise RunStateError(f"round {r.round}'s data is written by the {r.writer} model of {previous}, which has no "
                            f"finished adapter at {', '.join(missing)}: finish that run first")
    return [str(a) for a in adapters]


def generator_provenance(p: dict[str, Any], config: PipelineConfig, decoding: Decoding,
                         model_fingerprint: str) -> GeneratorProvenance:
    """p: the generating model's load provenance (``LoadedModel.provenance``)."""
    return GeneratorProvenance(
        model=p["model"], model_fingerprint=model_fingerprint,
        adapters=p["adapters"], quantization=p["quantization"], quantization_requested=p["quantization_requested"],
        full_precision_fallback=p["full_precision_fallback"], adapters_applied=p.get("adapters_applied"),
        dtype=p["dtype"],
        add_bos_token=config.model.add_bos_token, decoding=decoding.as_dict(), seed=decoding.seed,
    )


def few_shot_pool() -> list[Example]:
    raw = json.loads(resources.files("cai_bootstrap.data").joinpath("builtin/few_shot.json").read_text("utf-8"))
    return [Example(e["instruction"], e["response"]) for e in raw["examples"]]
