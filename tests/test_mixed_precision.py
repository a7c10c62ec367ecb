"""Training precision: ``auto`` picks bf16 autocast only where the device computes bf16 natively;
forced bf16 really autocasts SFT and DPO (losses move a little, stay close) and is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cai_bootstrap.models import precision
from cai_bootstrap.models.precision import native_bf16, resolve_mixed_precision
from cai_bootstrap.training import dpo, sft
from cai_bootstrap.training.token_logprobs import token_log_probs
from test_dpo import make_pairs, small_cfg
from test_sft import make_cfg, make_examples

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    pytest.skip("no CPU flags in /proc/cpuinfo")


def test_this_cpu_is_detected_from_its_flags():
    flags = _cpu_flags()
    assert (native_bf16("cpu") is not None) == bool({"avx512_bf16", "amx_tile"} & flags)
    used, why = resolve_mixed_precision("auto", "cpu")
    assert used == ("bf16" if native_bf16("cpu") else "no") and why.startswith("auto: ")


def test_auto_follows_the_hardware_and_explicit_settings_win(monkeypatch):
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False)
    assert resolve_mixed_precision("auto", "cpu") == ("no", "auto: cpu has no native bf16 (CPUs need AVX-512 BF16 or AMX)")
    assert resolve_mixed_precision("bf16", "cpu") == ("bf16", "configured (emulated on this cpu: slower than fp32)")
    assert resolve_mixed_precision("no", "cpu") == ("no", "configured")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_mixed_precision("auto", "cpu") == ("bf16", "auto: CPU with AVX-512 BF16")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_mixed_precision("auto", "cpu") == ("bf16", "auto: CPU with AMX")
    assert resolve_mixed_precision("no", "cpu")[0] == "no"
    with pytest.raises(ValueError, match="mixed_precision"):
        resolve_mixed_precision("fp8", "cpu")


def test_dpo_trainer_arguments_follow_the_setting(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: None)
    plain = dpo.trainer_arguments(small_cfg(), out_dir=tmp_path, seed=0)
    forced = dpo.trainer_arguments(small_cfg(mixed_precision="bf16"), out_dir=tmp_path, seed=0)
    assert plain["bf16"] is False and forced["bf16"] is True
    assert dpo.parity_check(plain, forced) == ["bf16: False != True"]
    monkeypatch.setattr(precision, "native_bf16", lambda device: "test")
    assert dpo.trainer_arguments(small_cfg(), out_dir=tmp_path, seed=0)["bf16"] is True


def test_token_log_probs_stay_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(20, 64, generator=g), torch.randn(300, 64, generator=g)
    targets = torch.randint(0, 300, (20,), generator=g)
    plain = token_log_probs(hidden, weight, targets)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = token_log_probs(hidden, weight, targets)[0]
        assert (hidden @ weight.T).dtype == torch.bfloat16  # autocast is on here
    assert cast.dtype == torch.float32 and torch.equal(cast, plain)


def _losses(record) -> list[float]:
    return [h["loss"] for h in record["history"]]


def test_sft_under_bf16_autocast_is_recorded_and_close_to_fp32(tiny_model_folder, tmp_path, monkeypatch):
    ex = make_examples(8)
    records = {}
    for setting in ("no", "bf16", "env"):
        if setting == "env":  # as `accelerate launch --config_file ddp.yaml` exports it: the config still decides
            monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
        result = sft.train_sft(str(tiny_model_folder), ex,
                               make_cfg(max_steps=2, mixed_precision="no" if setting == "env" else setting),
                               out_dir=tmp_path / setting, seed=0, progress=False)
        records[setting] = result.metrics
    assert _losses(records["env"]) == _losses(records["no"])
    assert records["no"]["mixed_precision"] == {"setting": "no", "used": "no", "reason": "configured"}
    assert records["bf16"]["mixed_precision"]["used"] == "bf16"
    fp32, bf16 = _losses(records["no"]), _losses(records["bf16"])
    assert fp32 != bf16  # autocast changed the arithmetic ...
    assert bf16 == pytest.approx(fp32, rel=0.02)  # ... and not the result
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}  # LoRA weights stay fp32


def test_dpo_under_bf16_autocast_is_recorded_and_close_to_fp32(tiny_model_folder, tmp_path):
    records = {}
    for setting in ("no", "bf16"):
        dpo.train_dpo("base", str(tiny_model_folder), make_pairs(8), small_cfg(mixed_precision=setting),
                      out_dir=tmp_path / setting, seed=0)
        records[setting] = json.loads((tmp_path / setting / dpo.TRAINING_JSON).read_text())
    assert records["bf16"]["trainer_args"]["bf16"] is True and records["no"]["trainer_args"]["bf16"] is False
    assert records["bf16"]["mixed_precision"]["used"] == "bf16"
    first = records["bf16"]["history"][0]
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # reference and policy under the same autocast
    fp32, bf16 = _losses(records["no"]), _losses(records["bf16"])
    assert fp32[-1] != bf16[-1] and bf16 == pytest.approx(fp32, rel=0.02)


def test_dpo_autocast_ignores_an_accelerate_config_in_the_environment(tiny_model_folder, tmp_path, monkeypatch):
    """`accelerate launch --config_file ddp.yaml` exports ACCELERATE_MIXED_PRECISION=bf16, which
    transformers would otherwise apply whenever bf16 is off; the run config decides."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    setup = dpo.build_trainer("base", str(tiny_model_folder), make_pairs(4), small_cfg(mixed_precision="no"),
                              out_dir=tmp_path, seed=0)
    assert setup.trainer.accelerator.mixed_precision == "no"
