from pathlib import Path

import pytest

from cai_bootstrap.config import ConfigError, PipelineConfig, dump_config, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["quick.yaml", "stage1.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, PipelineConfig)


def test_stage1_targets_qwen_and_quick_the_embedded_model():
    assert load_config(CONFIGS / "stage1.yaml").model.base == "Qwen/Qwen2.5-0.5B"
    assert load_config(CONFIGS / "quick.yaml").model.base == "smollm2-135m"
    assert load_config(CONFIGS / "stage1.yaml").sft_data.critic.enabled


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sft:\n  learnin_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "sft.learnin_rate" in str(e.value)


def test_wrong_type_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("dpo:\n  beta: lots\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "dpo.beta" in str(e.value)


def test_overrides_are_parsed_as_yaml_and_validated():
    cfg = load_config(None, ["sft.lora.r=4", "evaluation.models=[base, sft]", "model.add_bos_token=true"])
    assert cfg.sft.lora.r == 4
    assert cfg.evaluation.models == ["base", "sft"]
    assert cfg.model.add_bos_token is True
    with pytest.raises(ConfigError, match="sft.lora.rr"):
        load_config(None, ["sft.lora.rr=4"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["sft.lora.r"])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="best_of_n"):
        load_config(None, ["sft_data.best_of_n=4"])
    with pytest.raises(ConfigError, match="unknown negative kinds"):
        load_config(None, ["pairs.negative_weights={typo: 1.0}"])


def test_section_hash_tracks_only_its_sections():
    a = load_config(None)
    b = load_config(None, ["dpo.beta=0.5"])
    assert a.section_hash("sft") == b.section_hash("sft")
    assert a.section_hash("dpo") != b.section_hash("dpo")
    assert a.hash() != b.hash()


def test_mixed_precision_no_reads_as_written_in_yaml(tmp_path):
    """YAML 1.1 reads a bare `no` as false; `mixed_precision: no` means "no", other booleans are errors."""
    p = tmp_path / "c.yaml"
    p.write_text("sft:\n  mixed_precision: no\ndpo:\n  mixed_precision: bf16\n")
    cfg = load_config(p, ["dpo.mixed_precision=no"])
    assert cfg.sft.mixed_precision == cfg.dpo.mixed_precision == "no"
    assert load_config(None, ["sft.mixed_precision='no'"]).sft.mixed_precision == "no"
    assert load_config(None, ["sft.mixed_precision=no"]).sft.mixed_precision == "no"
    p.write_text(dump_config(cfg))  # a resolved config written back reads the same
    assert load_config(p).sft.mixed_precision == "no"
    for bad in ("yes", "true", "fp16"):
        with pytest.raises(ConfigError, match="sft.mixed_precision"):
            load_config(None, [f"sft.mixed_precision={bad}"])


def test_quantization_is_set_apart_for_training_and_generation(tmp_path):
    cfg = load_config(None, ["model.train_quantization=4bit"])
    assert (cfg.model.train_quantization, cfg.model.generation_quantization) == ("4bit", "none")
    # a config written before the split: one value for both, as it meant
    p = tmp_path / "old.yaml"
    p.write_text("model:\n  quantization: 8bit\n")
    old = load_config(p)
    assert (old.model.train_quantization, old.model.generation_quantization) == ("8bit", "8bit")
    assert "quantization:" not in dump_config(old).replace("_quantization:", "")
    with pytest.raises(ConfigError, match="model.train_quantization and model.generation_quantization"):
        load_config(p, ["model.generation_quantization=none"])
    with pytest.raises(ConfigError, match="model.generation_quantization"):
        load_config(None, ["model.generation_quantization=2bit"])


def test_stage1_header_recipes_are_accepted(monkeypatch):
    """Each `--set` line in stage1.yaml's header validates, and the generation backend it names
    accepts its quantization (vLLM present, as on the GPU machine it is written for)."""
    import shlex
    import sys
    import types

    from cai_bootstrap.steps.generator import check_backend
    from cai_bootstrap.steps.worker import check_accumulation

    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    header = [line for line in (CONFIGS / "stage1.yaml").read_text().splitlines() if line.startswith("#")]
    recipes = [shlex.split(line.lstrip("# ")) for line in header if line.lstrip("# ").startswith("--set ")]
    assert len(recipes) == 2
    backends = set()
    for words in recipes:
        overrides = [w for w in words if w != "--set"]
        assert len(overrides) == words.count("--set")
        cfg = load_config(CONFIGS / "stage1.yaml", overrides)
        assert cfg.model.base == "Qwen/Qwen2.5-32B"
        check_backend(cfg)
        backends.add(cfg.generation.backend)
        if cfg.model.train_quantization == "none":  # the ZeRO-3 recipe: DeepSpeed steps every backward
            check_accumulation(CONFIGS / "accelerate" / "deepspeed_zero3.yaml", "sft",
                               cfg.sft.gradient_accumulation_steps)
    assert backends == {"hf", "vllm"}
    base = load_config(CONFIGS / "stage1.yaml")
    check_backend(base)
    assert (base.model.train_quantization, base.model.generation_quantization) == ("8bit", "8bit")
