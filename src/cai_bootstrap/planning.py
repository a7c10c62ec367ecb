"""A memory plan per pipeline step, printed by ``cai-bootstrap plan CONFIG`` before a run.

For the configured base model it estimates, per GPU, what each step holds at its peak:

* **weights** -- parameter count x bytes per parameter: fp32 4 B, bf16/fp16 2 B; bitsandbytes
  8-bit: 1 B per linear weight + one fp32 scale per output row; 4-bit NF4: 0.5 B + one fp32 absmax
  per block of 64 weights (0.0625 B; no double quantisation, as models/loading.py configures it).
  Embeddings, lm_head, norms and biases are never quantised and stay in the compute dtype. Training
  steps use ``model.train_quantization``, generation steps ``model.generation_quantization``; on a
  quantized base the adapters stay unmerged (their fp32 A and B: a few MB, inside the overhead).
* **LoRA** -- ``r x (in + out)`` per targeted linear layer; ``all-linear`` = q, k, v, o, gate, up,
  down in every decoder layer (PEFT's "all-linear" leaves lm_head out). PEFT keeps adapter weights in
  fp32 (``autocast_adapter_dtype``) even on a bf16 base, so the fp32 weights *are* the master copy:
  4 B weights + 4 B gradients + 8 B AdamW moments = 16 B per LoRA parameter. Under DeepSpeed bf16
  the engine casts the module to bf16 and keeps an fp32 master apart: 2 + 4 (master) + 4 + 8 = 18 B.
* **activations** (training) -- ``micro-batch x sequence x hidden x layers x factor``: 34 bytes per
  token, hidden unit and layer at 16-bit (Korthikanti et al. 2022, "Reducing Activation Recomputation
  in Large Transformer Models", without the attention-score term that SDPA/flash attention never
  stores), x2 for fp32 compute. With activation checkpointing only each layer's input is kept
  (2 or 4 B per token and hidden unit per layer) plus one layer's full activations while it is
  recomputed. Sequences are taken at ``max_length`` (an upper bound: micro-batches are padded to
  their longest example only). DPO runs chosen and rejected together: 2 x batch sequences.
* **logits** (training) -- ``sequences x max_length x vocab x 4 B x 2`` (fp32 logits and their
  gradient): an upper bound for SFT, which projects only the supervised positions on the vocabulary.
* **KV cache** (generation) -- ``2 x layers x kv_heads x head_dim x bytes x batch x (prompt + new
  tokens)``. Prompt length is estimated: ``INSTRUCTION_TOKENS`` per instruction, and for few-shot
  prompts ``shots x (INSTRUCTION_TOKENS + max_new_tokens)`` more.
* **DPO reference** -- nothing extra: with a PEFT policy TRL computes the reference with the adapter
  disabled (precomputed once), no second model is loaded.
* **overhead** -- ``OVERHEAD_BYTES`` per GPU for the CUDA context, kernels and allocator slack.

Strategies (training steps): ``single`` and ``ddp`` hold everything on each GPU (DDP replicates);
``fsdp`` and ``zero3`` shard frozen weights, LoRA weights, gradients and optimizer state over the
N GPUs and add a gathered working set (two of the largest units: a decoder layer or the embedding,
the current one and the prefetched one). Activations are per process in every strategy (the
configured batch sizes are per process). Generation steps run data-parallel
(:mod:`~cai_bootstrap.generation.distributed`): every GPU holds the whole model whatever the strategy.

These are estimates for planning (they do not include fragmentation beyond ``OVERHEAD_BYTES``);
compare with ``torch.cuda.max_memory_allocated`` of a short run before a long one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import PipelineConfig

GiB = 1 << 30
INSTRUCTION_TOKENS = 64
"""Assumed tokens of one ``Instruction: ...\\nResponse:`` prompt (a generous average)."""
ACTIVATION_FACTOR_16BIT = 34
"""Bytes per token, hidden unit and layer kept for the backward pass at 16-bit (Korthikanti et al.)."""
SELF_INSTRUCT_SHOWN = 8  # seed instructions in a self-instruct prompt (data/self_instruct.build_prompt)
OVERHEAD_BYTES = 1 * GiB
"""CUDA context, kernels and allocator slack per GPU."""
NF4_BLOCK = 64
LORA_BYTES_PER_PARAM = 16  # fp32 weight (= master) + fp32 grad + 2 fp32 AdamW moments
LORA_BYTES_PER_PARAM_DEEPSPEED_BF16 = 18  # bf16 working copy + fp32 master + fp32 grad + 2 moments
STRATEGIES = ("single", "ddp", "fsdp", "zero3")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GENERATION_STEPS = ("instructions", "sft-data", "pairs", "evaluate")
TRAINING_STEPS = ("sft", "dpo")


@dataclass(frozen=True)
class ModelDims:
    """What the memory of a Llama/Qwen-style decoder depends on."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    head_dim: int | None = None  # None: hidden // heads
    qkv_bias: bool = False  # Qwen2: biases on q, k, v
    o_bias: bool = False  # Llama attention_bias: biases on q, k, v and o
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: an RMSNorm of head_dim on q and on k in every layer

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.hd, self.kv_heads * self.hd, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_bias_params(self) -> int:
        s = self.linear_shapes()
        n = 0
        if self.qkv_bias or self.o_bias:
            n += s["q_proj"][1] + s["k_proj"][1] + s["v_proj"][1]
        if self.o_bias:
            n += s["o_proj"][1]
        if self.mlp_bias:
            n += s["gate_proj"][1] + s["up_proj"][1] + s["down_proj"][1]
        return n

    def layer_linear_weight_params(self) -> int:
        return sum(i * o for i, o in self.linear_shapes().values())

    def layer_other_params(self) -> int:
        """Norms and biases of one layer (never quantised)."""
        return 2 * self.hidden + self.layer_bias_params() + (2 * self.hd if self.qk_norm else 0)

    def layer_params(self) -> int:
        return self.layer_linear_weight_params() + self.layer_other_params()

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def param_count(self) -> int:
        """Exact parameter count (tied embeddings counted once)."""
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.embedding_params() + head + self.layers * self.layer_params() + self.hidden


# Qwen2.5 base models (config.json of each hub repo; the -Instruct variants have the same shapes).
KNOWN_MODELS: dict[str, ModelDims] = {
    d.name.lower(): d
    for d in (
        ModelDims("Qwen2.5-0.5B", 896, 24, 14, 2, 4864, 151936, True, qkv_bias=True),
        ModelDims("Qwen2.5-1.5B", 1536, 28, 12, 2, 8960, 151936, True, qkv_bias=True),
        ModelDims("Qwen2.5-3B", 2048, 36, 16, 2, 11008, 151936, True, qkv_bias=True),
        ModelDims("Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152064, False, qkv_bias=True),
        ModelDims("Qwen2.5-14B", 5120, 48, 40, 8, 13824, 152064, False, qkv_bias=True),
        ModelDims("Qwen2.5-32B", 5120, 64, 40, 8, 27648, 152064, False, qkv_bias=True),
    )
}


def dims_from_config(cfg: dict[str, Any], name: str = "model") -> ModelDims:
    """ModelDims from a transformers config.json (llama, mistral, qwen2, qwen3 and look-alikes)."""
    model_type = cfg.get("model_type", "")
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        dims = ModelDims(
            name=name,
            hidden=hidden,
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            intermediate=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            head_dim=int(cfg["head_dim"]) if cfg.get("head_dim") else None,
            qkv_bias=model_type == "qwen2",
            o_bias=bool(cfg.get("attention_bias", False)) and model_type != "qwen2",
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
        )
    except KeyError as e:
        raise ValueError(f"{name}: config.json lacks {e.args[0]!r}; cannot plan memory for it") from None
    return dims


def model_dims(spec: str) -> ModelDims:
    """Dimensions of a model spec: the known-sizes table for Qwen2.5 hub ids (works offline), else
    the config.json of the resolved model (embedded name, local folder, cached hub model)."""
    short = spec.rstrip("/").split("/")[-1].lower().removesuffix("-instruct")
    if spec.count("/") <= 1 and short in KNOWN_MODELS and not Path(spec).expanduser().exists():
        return KNOWN_MODELS[short]
    from .models.loading import resolve

    path = resolve(spec).path
    return dims_from_config(json.loads((Path(path) / "config.json").read_text(encoding="utf-8")), name=spec)


# ------------------------------------------------------------------------------------------------
# the pieces


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of the compute dtype on a GPU (``auto`` loads bf16 there)."""
    return {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}[dtype]


def weight_bytes(dims: ModelDims, dtype: str, quantization: str = "none") -> int:
    """Bytes of the base model's weights as loaded (see the module docstring for the rules)."""
    b = dtype_bytes(dtype)
    never_quantised = dims.embedding_params() * (1 if dims.tied_embeddings else 2) + dims.hidden \
        + dims.layers * dims.layer_other_params()
    linear = dims.layers * dims.layer_linear_weight_params()
    if quantization == "none":
        return (never_quantised + linear) * b
    if quantization == "8bit":
        rows = dims.layers * sum(o for _, o in dims.linear_shapes().values())
        return never_quantised * b + linear + 4 * rows
    if quantization == "4bit":
        return never_quantised * b + linear // 2 + 4 * math.ceil(linear / NF4_BLOCK)
    raise ValueError(f"unknown quantization {quantization!r}")


def lora_targets(target_modules: str | list[str]) -> list[str]:
    if target_modules == "all-linear":
        return list(LINEARS)
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    unknown = [n for n in names if n not in LINEARS]
    if unknown:
        raise ValueError(f"cannot plan LoRA on {unknown}: known linear layers are {list(LINEARS)} or 'all-linear'")
    return names


def lora_params(dims: ModelDims, r: int, target_modules: str | list[str] = "all-linear") -> int:
    """Sum over targeted linear layers of r x (in + out)."""
    shapes = dims.linear_shapes()
    return dims.layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in lora_targets(target_modules))


def kv_cache_bytes(dims: ModelDims, batch: int, tokens: int, bytes_per_el: int) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x bytes x batch x tokens."""
    return 2 * dims.layers * dims.kv_heads * dims.hd * bytes_per_el * batch * tokens


def activation_bytes(dims: ModelDims, sequences: int, seq_len: int, bytes_per_el: int,
                     checkpointing: bool = False) -> int:
    """Activations kept for the backward pass (see the module docstring)."""
    per_layer = ACTIVATION_FACTOR_16BIT * bytes_per_el // 2 * sequences * seq_len * dims.hidden
    if not checkpointing:
        return per_layer * dims.layers
    return bytes_per_el * sequences * seq_len * dims.hidden * dims.layers + per_layer


def logits_bytes(dims: ModelDims, sequences: int, seq_len: int) -> int:
    return sequences * seq_len * dims.vocab * 4 * 2


# ------------------------------------------------------------------------------------------------
# the plan


@dataclass
class StepPlan:
    kind: str  # generation | training
    items: dict[str, int] = field(default_factory=dict)  # bytes per GPU
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.items.values())


def _generation_step(dims: ModelDims, wbytes: int, act_b: int, batch: int, prompt_tokens: int,
                     new_tokens: int, note: str) -> StepPlan:
    tokens = prompt_tokens + new_tokens
    return StepPlan("generation", {
        "weights": wbytes,
        "kv_cache": kv_cache_bytes(dims, batch, tokens, act_b),
        "logits": batch * dims.vocab * 4,  # the last position of each row, per decoding step
        "overhead": OVERHEAD_BYTES,
    }, [f"{note}: batch {batch} x ({prompt_tokens} prompt + {new_tokens} new) tokens; "
        f"weights replicated on every GPU (data-parallel generation)"])


def _training_step(dims: ModelDims, config: PipelineConfig, which: str, num_gpus: int, strategy: str,
                   checkpointing: bool) -> StepPlan:
    cfg = config.sft if which == "sft" else config.dpo
    quant, dtype = config.model.train_quantization, config.model.dtype
    b = dtype_bytes(dtype)
    act_b = 2 if which == "dpo" and dtype == "float32" else b  # TRL autocasts DPO to bf16 on GPUs
    sharded = strategy in ("fsdp", "zero3")
    n = num_gpus if sharded else 1
    lora = lora_params(dims, cfg.lora.r, cfg.lora.target_modules)
    per_lora = LORA_BYTES_PER_PARAM_DEEPSPEED_BF16 if strategy == "zero3" and b == 2 else LORA_BYTES_PER_PARAM
    sequences = cfg.batch_size * (2 if which == "dpo" else 1)
    items = {
        "weights": math.ceil(weight_bytes(dims, dtype, quant) / n),
        "lora_weights": math.ceil(lora * (per_lora - 12) / n),
        "lora_grads": math.ceil(lora * 4 / n),
        "optimizer": math.ceil(lora * 8 / n),
        "activations": activation_bytes(dims, sequences, cfg.max_length, act_b, checkpointing),
        "logits": logits_bytes(dims, sequences, cfg.max_length),
    }
    if sharded:
        items["gathered_weights"] = 2 * max(dims.layer_params(), dims.embedding_params()) * b
    if which == "dpo":
        items["dpo_reference"] = 0
    items["overhead"] = OVERHEAD_BYTES
    notes = [f"LoRA r={cfg.lora.r} on {','.join(lora_targets(cfg.lora.target_modules))}: {lora:,} params, "
             f"{per_lora} B each (weights incl. fp32 master, grads, AdamW moments)",
             f"micro-batch {sequences} sequence(s) x {cfg.max_length} tokens per process"
             f"{' (chosen + rejected)' if which == 'dpo' else ''}; activation checkpointing "
             f"{'on' if checkpointing else 'off'}"]
    if which == "dpo":
        notes.append("reference model: 0 B extra (PEFT adapter disabled, log-probs precomputed once)")
    if sharded:
        notes.append(f"{strategy}: weights, LoRA weights, grads and optimizer state divided by {num_gpus} GPUs")
    if sharded and quant != "none":
        notes.append(f"warning: {quant} bitsandbytes weights with {strategy} are not supported by this pipeline; "
                     f"use ddp (QLoRA) or a bf16 base")
    return StepPlan("training", items, notes)


def plan(config: PipelineConfig, num_gpus: int = 1, strategy: str = "single", *,
         activation_checkpointing: bool = False, gpu_memory_gib: float | None = None,
         dims: ModelDims | None = None) -> dict[str, Any]:
    """Per-GPU memory estimate of every step; see the module docstring for the rules.

    Returns a JSON-able dict: ``model`` (dims, params, weights bytes), ``strategy``, ``num_gpus``,
    ``steps`` (name -> kind, items in bytes, total, notes), ``peak`` (step, bytes), ``fits`` (when
    ``gpu_memory_gib`` is given) and ``assumptions``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if num_gpus < 1:
        raise ValueError("num_gpus must be >= 1")
    if strategy == "single" and num_gpus != 1:
        raise ValueError("strategy 'single' is one GPU; use ddp, fsdp or zero3 for more")
    if dims is None:
        from .models.embedded import ModelNotAvailable

        try:
            dims = model_dims(config.model.base)
        except ModelNotAvailable as e:
            known = ", ".join(d.name for d in KNOWN_MODELS.values())
            raise ModelNotAvailable(f"{e}\nFor planning, a local folder with its config.json is enough; "
                                    f"sizes are built in for: {known}") from e
    dtype, quant = config.model.dtype, config.model.generation_quantization
    b = dtype_bytes(dtype)
    wbytes = weight_bytes(dims, dtype, quant)  # generation steps; training steps use train_quantization

    steps: dict[str, StepPlan] = {}
    if config.instructions.self_instruct_rounds > 0:
        steps["instructions"] = _generation_step(
            dims, wbytes, b, config.generation.batch_size, (SELF_INSTRUCT_SHOWN + 1) * INSTRUCTION_TOKENS,
            config.instructions.self_instruct_max_new_tokens, "self-instruct (a numbered list of 8 seeds)")
    sd = config.sft_data
    few_shot_prompt = INSTRUCTION_TOKENS + sd.few_shot * (INSTRUCTION_TOKENS + sd.max_new_tokens)
    steps["sft-data"] = _generation_step(dims, wbytes, b, config.generation.batch_size, few_shot_prompt,
                                         sd.max_new_tokens, f"base model, {sd.few_shot}-shot")
    steps["sft"] = _training_step(dims, config, "sft", num_gpus, strategy, activation_checkpointing)
    steps["pairs"] = _generation_step(dims, wbytes, b, config.generation.batch_size, INSTRUCTION_TOKENS,
                                      config.pairs.max_new_tokens, "SFT model, zero-shot")
    steps["dpo"] = _training_step(dims, config, "dpo", num_gpus, strategy, activation_checkpointing)
    ev = config.evaluation
    if "base_fewshot" in ev.models:  # the longest prompts: the few-shot prompt of sft-data
        steps["evaluate"] = _generation_step(dims, wbytes, b, ev.batch_size, few_shot_prompt, ev.max_new_tokens,
                                             f"each evaluated model; base_fewshot {sd.few_shot}-shot")
    else:
        steps["evaluate"] = _generation_step(dims, wbytes, b, ev.batch_size, INSTRUCTION_TOKENS, ev.max_new_tokens,
                                             "each evaluated model, zero-shot")

    peak_step = max(steps, key=lambda s: steps[s].total)
    out: dict[str, Any] = {
        "model": {**asdict(dims), "head_dim": dims.hd, "params": dims.param_count(), "dtype": dtype,
                  "train_quantization": config.model.train_quantization, "generation_quantization": quant,
                  "train_weights_bytes": weight_bytes(dims, dtype, config.model.train_quantization),
                  "generation_weights_bytes": wbytes},
        "strategy": strategy,
        "num_gpus": num_gpus,
        "activation_checkpointing": activation_checkpointing,
        "steps": {name: {"kind": s.kind, "items": dict(s.items), "total": s.total, "notes": list(s.notes)}
                  for name, s in steps.items()},
        "peak": {"step": peak_step, "bytes": steps[peak_step].total},
        "assumptions": [
            f"prompt of {INSTRUCTION_TOKENS} tokens per instruction (few-shot: + max_new_tokens per shot)",
            f"activations: {ACTIVATION_FACTOR_16BIT} B x tokens x hidden x layers at 16-bit (x2 fp32)",
            "training sequences at max_length (upper bound); logits in fp32 with their gradient",
            f"{OVERHEAD_BYTES // GiB} GiB per GPU for the CUDA context and allocator slack",
        ],
    }
    if gpu_memory_gib is not None:
        limit = gpu_memory_gib * GiB
        out["gpu_memory_bytes"] = int(limit)
        out["fits"] = {name: s.total <= limit for name, s in steps.items()}
    return out


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


ITEM_LABELS = {
    "weights": "base weights", "gathered_weights": "gathered (sharded) layers", "lora_weights": "LoRA weights",
    "lora_grads": "LoRA grads", "optimizer": "AdamW moments", "activations": "activations",
    "logits": "logits", "kv_cache": "KV cache", "dpo_reference": "DPO reference", "overhead": "overhead",
}


def format_plan(p: dict[str, Any]) -> str:
    """A plain-text table (GiB per GPU): one column per step, one row per item, totals and the peak."""
    m = p["model"]
    steps = list(p["steps"])
    items = [k for k in ITEM_LABELS if any(k in p["steps"][s]["items"] for s in steps)]
    width = max(len(ITEM_LABELS[k]) for k in items + ["overhead"]) + 2
    col = max(10, *(len(s) + 2 for s in steps))
    lines = [
        f"Memory plan: {m['name']} ({_count(m['params'])} params, {m['layers']} layers, hidden {m['hidden']}, "
        f"{m['heads']} heads / {m['kv_heads']} kv heads, vocab {m['vocab']}), "
        f"{m['dtype']}; quantization: training {m['train_quantization']}, generation {m['generation_quantization']}",
        f"Strategy: {p['strategy']} on {p['num_gpus']} GPU(s); GiB per GPU"
        + (f"; GPU memory {p['gpu_memory_bytes'] / GiB:.0f} GiB" if "gpu_memory_bytes" in p else ""),
        "",
        "".ljust(width) + "".join(s.rjust(col) for s in steps),
    ]
    for k in items:
        cells = [(_gib(p["steps"][s]["items"][k]) if k in p["steps"][s]["items"] else "-").rjust(col) for s in steps]
        lines.append(ITEM_LABELS[k].ljust(width) + "".join(cells))
    lines.append("-" * (width + col * len(steps)))
    lines.append("total".ljust(width) + "".join(_gib(p["steps"][s]["total"]).rjust(col) for s in steps))
    if "fits" in p:
        lines.append("fits".ljust(width) + "".join(("yes" if p["fits"][s] else "NO").rjust(col) for s in steps))
    lines.append("")
    lines.append(f"Peak: {p['peak']['step']} at {_gib(p['peak']['bytes'])} GiB per GPU")
    for s in steps:
        for note in p["steps"][s]["notes"]:
            lines.append(f"  {s}: {note}")
    lines.append("Assumptions: " + "; ".join(p["assumptions"]))
    return "\n".join(lines)
