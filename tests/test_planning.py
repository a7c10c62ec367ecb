"""The memory plan against hand-computed numbers (SmolLM2-135M), transformers' own parameter counts
(models built on the meta device), PEFT's LoRA parameter count, and the sharding rules."""

from __future__ import annotations

import json

import pytest

from cai_bootstrap.config import load_config
from cai_bootstrap.planning import (
    INSTRUCTION_TOKENS,
    KNOWN_MODELS,
    OVERHEAD_BYTES,
    ModelDims,
    dims_from_config,
    format_plan,
    kv_cache_bytes,
    lora_params,
    model_dims,
    plan,
    weight_bytes,
)

SMOLLM2_CONFIG = {  # the config.json fields of HuggingFaceTB/SmolLM2-135M that matter here
    "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
}
SMOLLM2 = dims_from_config(SMOLLM2_CONFIG, name="SmolLM2-135M")

# By hand, SmolLM2-135M:
#   embedding 49152 x 576                                  = 28,311,552 (tied: lm_head shares it)
#   per layer: q 576x576 = 331,776; k, v 576x192 = 110,592 each; o 576x576 = 331,776
#              gate, up 576x1536, down 1536x576 = 884,736 each; two RMSNorms 2 x 576 = 1,152
#              -> 331,776 + 2 x 110,592 + 331,776 + 3 x 884,736 + 1,152 = 3,540,096
#   30 layers = 106,202,880; final norm 576
SMOLLM2_PARAMS = 28_311_552 + 30 * 3_540_096 + 576
# LoRA r=16, all-linear, per layer: r x (in + out)
#   q 16x(576+576) = 18,432; k, v 16x(576+192) = 12,288 each; o 18,432; gate, up, down 16x(576+1536) = 33,792 each
SMOLLM2_LORA_R16 = 30 * (18_432 + 2 * 12_288 + 18_432 + 3 * 33_792)


def config_for(folder, *overrides):
    return load_config(None, [f"model.base={folder}", *overrides])


@pytest.fixture
def smollm2_config_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    return tmp_path


def test_smollm2_parameter_count_by_hand():
    assert SMOLLM2_PARAMS == 134_515_008  # "134.5M parameters"
    assert SMOLLM2.param_count() == SMOLLM2_PARAMS


def test_smollm2_parameter_count_of_the_real_config(smollm2_folder):
    real = json.loads((smollm2_folder / "config.json").read_text())
    assert dims_from_config(real).param_count() == SMOLLM2_PARAMS


def _meta_count(model_cls, config) -> int:
    import torch

    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once


def test_parameter_counts_match_transformers():
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    assert _meta_count(LlamaForCausalLM, LlamaConfig(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)) == SMOLLM2_PARAMS
    for d in KNOWN_MODELS.values():  # the Qwen2.5 table (q/k/v biases, tied or not)
        cfg = Qwen2Config(hidden_size=d.hidden, num_hidden_layers=d.layers, num_attention_heads=d.heads,
                          num_key_value_heads=d.kv_heads, intermediate_size=d.intermediate, vocab_size=d.vocab,
                          tie_word_embeddings=d.tied_embeddings)
        assert _meta_count(Qwen2ForCausalLM, cfg) == d.param_count(), d.name
    # published sizes
    assert KNOWN_MODELS["qwen2.5-0.5b"].param_count() == 494_032_768
    assert KNOWN_MODELS["qwen2.5-7b"].param_count() == 7_615_616_512
    assert KNOWN_MODELS["qwen2.5-32b"].param_count() == 32_763_876_352


def test_known_models_resolve_offline_by_hub_id():
    assert model_dims("Qwen/Qwen2.5-32B") is KNOWN_MODELS["qwen2.5-32b"]
    assert model_dims("Qwen/Qwen2.5-7B-Instruct") is KNOWN_MODELS["qwen2.5-7b"]


def test_lora_params_by_hand_and_against_peft(tiny_model_folder):
    assert lora_params(SMOLLM2, 16, "all-linear") == SMOLLM2_LORA_R16 == 4_884_480
    assert lora_params(SMOLLM2, 16, ["q_proj", "v_proj"]) == 30 * (18_432 + 12_288)
    with pytest.raises(ValueError, match="known linear layers"):
        lora_params(SMOLLM2, 16, ["lm_head"])

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_folder)
    dims = dims_from_config(model.config.to_dict())
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == lora_params(dims, 4, "all-linear")


def test_weight_bytes_by_dtype_and_quantization():
    assert weight_bytes(SMOLLM2, "float32") == 4 * SMOLLM2_PARAMS
    assert weight_bytes(SMOLLM2, "bfloat16") == 2 * SMOLLM2_PARAMS
    linear = 30 * (331_776 + 2 * 110_592 + 331_776 + 3 * 884_736)
    other = SMOLLM2_PARAMS - linear  # embedding, norms: never quantised
    out_rows = 30 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576)
    assert weight_bytes(SMOLLM2, "bfloat16", "8bit") == 2 * other + linear + 4 * out_rows
    assert weight_bytes(SMOLLM2, "bfloat16", "4bit") == 2 * other + linear // 2 + 4 * (linear // 64)


def test_kv_cache_by_hand(smollm2_config_folder):
    # 2 (K, V) x 30 layers x 3 kv heads x 64 head dim x 4 B (fp32) = 46,080 B per token
    assert kv_cache_bytes(SMOLLM2, batch=1, tokens=1, bytes_per_el=4) == 46_080
    cfg = config_for(smollm2_config_folder)  # defaults: float32, evaluation batch 16, 96 new tokens
    p = plan(cfg)
    assert p["model"]["params"] == SMOLLM2_PARAMS
    # base_fewshot (a default model) gets sft-data's 3-shot prompt: 3 x (64 + 96) tokens more
    few_shot = INSTRUCTION_TOKENS + 3 * (INSTRUCTION_TOKENS + 96)
    assert p["steps"]["evaluate"]["items"]["kv_cache"] == 46_080 * 16 * (few_shot + 96)
    zero = plan(config_for(smollm2_config_folder, "evaluation.models=[base, sft]"))
    assert zero["steps"]["evaluate"]["items"]["kv_cache"] == 46_080 * 16 * (INSTRUCTION_TOKENS + 96)
    bf16 = plan(config_for(smollm2_config_folder, "model.dtype=bfloat16", "evaluation.models=[base, sft]"))
    assert bf16["steps"]["evaluate"]["items"]["kv_cache"] == 23_040 * 16 * (INSTRUCTION_TOKENS + 96)


def test_training_items_by_hand(smollm2_config_folder):
    cfg = config_for(smollm2_config_folder, "sft.batch_size=4", "sft.max_length=128")
    sft = plan(cfg)["steps"]["sft"]["items"]
    assert sft["weights"] == 4 * SMOLLM2_PARAMS
    assert sft["lora_weights"] == 4 * SMOLLM2_LORA_R16
    assert sft["lora_grads"] == 4 * SMOLLM2_LORA_R16
    assert sft["optimizer"] == 8 * SMOLLM2_LORA_R16  # two fp32 AdamW moments
    assert sft["activations"] == 34 * 2 * 4 * 128 * 576 * 30  # fp32: 2 x the 16-bit factor
    assert sft["logits"] == 4 * 128 * 49152 * 4 * 2
    assert sft["overhead"] == OVERHEAD_BYTES
    assert "gathered_weights" not in sft
    dpo = plan(cfg)["steps"]["dpo"]
    assert dpo["items"]["dpo_reference"] == 0 and any("adapter disabled" in n for n in dpo["notes"])
    ckpt = plan(cfg, activation_checkpointing=True)["steps"]["sft"]["items"]["activations"]
    assert ckpt == 4 * 4 * 128 * 576 * 30 + 34 * 2 * 4 * 128 * 576  # layer inputs + one layer recomputed


def test_zero3_over_8_gpus_divides_weights_by_8(smollm2_config_folder):
    cfg = config_for(smollm2_config_folder, "model.dtype=bfloat16")
    single = plan(cfg)
    ddp = plan(cfg, 8, "ddp")
    zero3 = plan(cfg, 8, "zero3")
    fsdp = plan(cfg, 8, "fsdp")
    for step in ("sft", "dpo"):
        s, d, z, f = (x["steps"][step]["items"] for x in (single, ddp, zero3, fsdp))
        assert s["weights"] == 2 * SMOLLM2_PARAMS
        assert d["weights"] == s["weights"]  # DDP replicates
        assert z["weights"] == f["weights"] == -(-s["weights"] // 8)
        assert z["lora_grads"] == -(-s["lora_grads"] // 8) and z["optimizer"] == -(-s["optimizer"] // 8)
        assert z["activations"] == s["activations"]  # the batch is per process
        assert z["gathered_weights"] > 0
    # generation is data-parallel: every GPU holds the whole model
    assert zero3["steps"]["evaluate"]["items"]["weights"] == single["steps"]["evaluate"]["items"]["weights"]


def test_peak_fits_and_format(smollm2_config_folder):
    cfg = config_for(smollm2_config_folder)
    p = plan(cfg, gpu_memory_gib=80)
    totals = {k: v["total"] for k, v in p["steps"].items()}
    assert p["peak"] == {"step": max(totals, key=totals.get), "bytes": max(totals.values())}
    assert all(p["fits"].values())
    text = format_plan(p)
    for word in ("sft-data", "sft", "pairs", "dpo", "evaluate", "KV cache", "total", "Peak:", "134.5M params"):
        assert word in text
    assert not plan(cfg, gpu_memory_gib=0.5)["fits"]["sft"]


def test_bad_arguments(smollm2_config_folder):
    cfg = config_for(smollm2_config_folder)
    with pytest.raises(ValueError, match="strategy"):
        plan(cfg, 2, "tensor")
    with pytest.raises(ValueError, match="single"):
        plan(cfg, 8, "single")
    assert isinstance(SMOLLM2, ModelDims)


def test_training_steps_plan_the_train_quantization_and_generation_steps_the_other(smollm2_config_folder):
    cfg = config_for(smollm2_config_folder, "model.dtype=bfloat16", "model.train_quantization=4bit",
                     "model.generation_quantization=8bit")
    p = plan(cfg)
    for step in ("sft", "dpo"):
        assert p["steps"][step]["items"]["weights"] == weight_bytes(SMOLLM2, "bfloat16", "4bit")
    for step in ("sft-data", "pairs", "evaluate"):
        assert p["steps"][step]["items"]["weights"] == weight_bytes(SMOLLM2, "bfloat16", "8bit")
    assert (p["model"]["train_weights_bytes"], p["model"]["generation_weights_bytes"]) == (
        weight_bytes(SMOLLM2, "bfloat16", "4bit"), weight_bytes(SMOLLM2, "bfloat16", "8bit"))
    assert "quantization: training 4bit, generation 8bit" in format_plan(p).splitlines()[0]
