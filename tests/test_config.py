from pathlib import Path

import pytest

from cai_bootstrap.config import ConfigError, PipelineConfig, load_config

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
    from cai_bootstrap.config import dump_config

    assert load_config(None, ["sft.mixed_precision=no"]).sft.mixed_precision == "no"
    p.write_text(dump_config(cfg))  # a resolved config written back reads the same
    assert load_config(p).sft.mixed_precision == "no"
    for bad in ("yes", "true", "fp16"):
        with pytest.raises(ConfigError, match="sft.mixed_precision"):
            load_config(None, [f"sft.mixed_precision={bad}"])
