"""`evaluate`: each model loaded fresh from disk, run on the held-out set, fingerprinted, then freed.

Isolation is verified, not assumed: the base fingerprint is taken before any adapter model runs and
again from a fresh load after all of them; adapter models must differ from base and from each other.

A model is weights *and* a prompt form: ``base`` is prompted zero-shot (the floor), ``base_fewshot``
is the same base weights given the few-shot prompt that wrote the SFT data (``sft_data.sft_prompts``:
the same shots, drawn by seed and item id), the question SFT has to beat. Each response records its
prompt and prompt form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import PipelineConfig
from ..console import console
from ..evaluation.memory import peak_memory
from ..data.critic import CRITIC_PROMPT_VERSION
from ..evaluation.judge import judge_responses, judge_spec
from ..files import atomic_write_json, sha256_path, write_jsonl
from ..formats import prompt_for
from ..generation.engine import Decoding
from ..models.loading import LoadedModel, fingerprint, free, load_model
from ..run import Run
from ..schemas import EvalResponse, InstructionRecord, load_jsonl
from .common import MODEL_CHAINS, RESPONSES_DIR, TEST, TEST_IN_DISTRIBUTION, TMP
from .generator import Generator, check_backend
from .sft_data import sft_prompts

EVALUATION = "eval/evaluation.json"
JUDGE = "eval/judge.jsonl"
PROMPT_FORMAT = "Instruction: {instruction}\\nResponse:"
ZERO_SHOT, FEW_SHOT = "zero_shot", "few_shot"
# name -> (adapter chain, prompt form): base_fewshot is the base weights with the few-shot prompt.
MODELS: dict[str, tuple[list[str], str]] = {
    "base": (MODEL_CHAINS["base"], ZERO_SHOT),
    "base_fewshot": (MODEL_CHAINS["base"], FEW_SHOT),
    "sft": (MODEL_CHAINS["sft"], ZERO_SHOT),
    "dpo": (MODEL_CHAINS["dpo"], ZERO_SHOT),
    "dpo_only": (MODEL_CHAINS["dpo_only"], ZERO_SHOT),
}


class IsolationError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelUnderTest:
    name: str
    spec: str
    adapters: tuple[Path, ...]
    prompt_form: str = ZERO_SHOT


def models_under_test(run: Run) -> list[ModelUnderTest]:
    cfg = run.config.evaluation
    out = []
    for name in cfg.models:
        if name not in MODELS:
            raise ValueError(f"evaluation.models: unknown model {name!r}; known: {list(MODELS)} (+ extra_models)")
        chain, form = MODELS[name]
        out.append(ModelUnderTest(name, run.config.model.base, tuple(run.path(a) for a in chain), form))
    for name, spec in cfg.extra_models.items():
        base, _, adapter = spec.partition("+")
        out.append(ModelUnderTest(name, base, (Path(adapter),) if adapter else ()))
    return out


Loader = Callable[[ModelUnderTest, PipelineConfig], LoadedModel]


def fresh_load(m: ModelUnderTest, config: PipelineConfig) -> LoadedModel:
    """Base weights from disk plus this model's own adapter chain: never a model object used before."""
    mc = config.model
    return load_model(m.spec, quantization=mc.generation_quantization, dtype=mc.dtype, adapters=list(m.adapters),
                      allow_full_precision_fallback=mc.allow_full_precision_fallback)


def prompts_for(m: ModelUnderTest, items: list[InstructionRecord], config: PipelineConfig) -> list[str]:
    """Zero-shot prompts, or the few-shot prompts that wrote the SFT data (same shots per item id)."""
    if m.prompt_form == FEW_SHOT:
        return sft_prompts(config, items)
    return [prompt_for(it.instruction) for it in items]


def evaluate_one(m: ModelUnderTest, items: list[InstructionRecord], config: PipelineConfig,
                 loader: Loader = fresh_load, accelerate_config: Path | None = None,
                 work_dir: Path | None = None) -> tuple[list[EvalResponse], dict]:
    """``loader`` loads the model when it generates in this process; launched or vLLM generation
    loads it its own way (from the same spec and adapters) and reports its fingerprint."""
    cfg = config.evaluation
    decoding = Decoding(max_new_tokens=cfg.max_new_tokens)  # greedy: deterministic
    prompts = prompts_for(m, items, config)
    with peak_memory() as memory:  # RSS: this process and the ones it launches
        with Generator(config, spec=m.spec, adapters=m.adapters, batch_size=cfg.batch_size,
                       accelerate_config=accelerate_config, work_dir=work_dir, load=lambda: loader(m, config)) as gen:
            gens = gen.generate(prompts, decoding, label=f"evaluate {m.name}")
            fp = gen.fingerprint  # after generating: a launched run reports it with its results
            provenance = dict(gen.provenance)
    if gen.launched_gpu_peak_mb is not None:  # the GPUs were the launched processes'
        memory["gpu_peak_mb"] = gen.launched_gpu_peak_mb
    responses = [
        EvalResponse(id=it.id, model=m.name, prompt=p, prompt_form=m.prompt_form, raw_text=g.raw_text,
                     response=g.text, stop_string=g.stop_string,
                     finish_reason=g.finish_reason, prompt_tokens=g.prompt_tokens,
                     completion_tokens=g.completion_tokens, max_new_tokens=decoding.max_new_tokens)
        for it, p, g in zip(items, prompts, gens)
    ]
    info = {"fingerprint": fp, "adapters": {str(a): sha256_path(a) for a in m.adapters}, "prompt_form": m.prompt_form,
            "memory": memory,
            "provenance": provenance, "generation": gen.stats.as_dict(), "runtime": gen.runtime,
            "decoding": decoding.as_dict()}
    return responses, info


def verify_isolation(infos: dict[str, dict], models: list[ModelUnderTest], base_spec: str, base_before: str,
                     base_after: str) -> list[str]:
    """Every way a model could have run with weights other than its own; empty when isolated."""
    problems = []
    if base_after != base_before:
        problems.append(f"base weights changed while evaluating: {base_before} before, {base_after} after")
    for m in models:
        fp = infos[m.name]["fingerprint"]
        if m.spec == base_spec and not m.adapters and fp != base_before:
            problems.append(f"{m.name} should run the base weights ({base_before}) but ran {fp}")
        if m.spec == base_spec and m.adapters and fp == base_before:
            problems.append(f"{m.name} ran the base weights: its adapters {[str(a) for a in m.adapters]} had no effect")
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            if (a.spec, a.adapters) != (b.spec, b.adapters) and infos[a.name]["fingerprint"] == infos[b.name]["fingerprint"]:
                problems.append(f"{a.name} and {b.name} ran identical weights despite different models")
    return problems


def evaluate_models(models: list[ModelUnderTest], items: list[InstructionRecord], config: PipelineConfig,
                    loader: Loader = fresh_load, accelerate_config: Path | None = None,
                    work_dir: Path | None = None) -> tuple[dict[str, list[EvalResponse]], dict]:
    """Evaluate one model at a time; verify isolation; return responses and the evaluation record.

    The base fingerprints before and after are always taken in this process, with ``loader``."""
    check_backend(config)
    base = ModelUnderTest("base", config.model.base, ())
    before = loader(base, config)
    base_before = fingerprint(before.model)
    free(before)
    del before
    responses, infos = {}, {}
    for m in models:
        console.print(f"evaluate: {m.name} ({len(m.adapters)} adapter(s))")
        responses[m.name], infos[m.name] = evaluate_one(m, items, config, loader, accelerate_config, work_dir)
    after = loader(base, config)
    base_after = fingerprint(after.model)
    free(after)
    del after
    problems = verify_isolation(infos, models, config.model.base, base_before, base_after)
    if problems:
        raise IsolationError("model isolation check failed:\n" + "\n".join(problems))
    record = {
        "models": infos,
        "order": [m.name for m in models],
        "isolation": {"verified": True, "base_fingerprint_before": base_before, "base_fingerprint_after": base_after},
        "prompt_format": PROMPT_FORMAT,
        "prompt_forms": {m.name: m.prompt_form for m in models},
        "few_shot": {"k": config.sft_data.few_shot, "seed": config.data_seed_value,
                     "shots": "builtin few_shot.json, drawn per item id as in sft-data"},
        "n_items": len(items),
        "peak_rss_mb": {n: i["memory"]["rss_peak_mb"] for n, i in infos.items()},
    }
    return responses, record


def run_evaluate(run: Run, force: bool = False, only: list[str] | None = None,
                 accelerate_config: Path | None = None) -> bool:
    """accelerate_config: generate under `accelerate launch` with this config (several processes/GPUs)."""
    config = run.config
    models = [m for m in models_under_test(run) if not only or m.name in only]
    test_files = [TEST] + ([TEST_IN_DISTRIBUTION] if config.instructions.in_distribution_size else [])
    inputs = test_files + sorted({str(a.relative_to(run.dir)) for m in models for a in m.adapters
                                  if a.is_relative_to(run.dir)})
    # A few-shot model's prompts depend on the few-shot settings of sft-data.
    sections = ("evaluation", "sft_data") if any(m.prompt_form == FEW_SHOT for m in models) else ("evaluation",)
    params = config.section_hash(*sections) + ":" + ",".join(m.name for m in models)
    outputs = [f"{RESPONSES_DIR}/{m.name}.jsonl" for m in models] + [EVALUATION]
    if judge_spec(config):
        outputs.append(JUDGE)
    if not force and run.is_current("evaluate", params, inputs):
        console.print("evaluate: up to date, skipped")
        return False
    with run.step("evaluate", params, inputs, outputs) as step:
        # The in-distribution slice is answered in the same pass; the report keeps it apart.
        items = [it for f in test_files for it in load_jsonl(run.path(f), InstructionRecord)]
        responses, record = evaluate_models(models, items, config, accelerate_config=accelerate_config,
                                            work_dir=run.path(TMP))
        for name, rs in responses.items():
            write_jsonl(run.path(f"{RESPONSES_DIR}/{name}.jsonl"), rs)
        if judge_spec(config):
            write_jsonl(run.path(JUDGE), judge_responses(config, items, responses))
            record["judge"] = {"spec": judge_spec(config), "prompt_version": CRITIC_PROMPT_VERSION}
        elif run.path(JUDGE).exists():
            run.path(JUDGE).unlink()  # a stale judge file must not be merged into a new report
        atomic_write_json(run.path(EVALUATION), record)
        step.kept = len(items)
        step.metrics.update({"models": record["order"], "peak_rss_mb": record["peak_rss_mb"],
                             "fingerprints": {n: i["fingerprint"] for n, i in record["models"].items()},
                             "isolation_verified": True})
    return True
