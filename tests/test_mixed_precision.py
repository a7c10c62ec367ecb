"""Training precision: ``auto`` picks bf16 autocast only where the device computes bf16 natively;
forced bf16 really autocasts SFT and DPO (losses move a little, stay close) and is recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


@pytest.mark.skipif(bool(os.environ.get("CAI_TEST_CPU")), reason="CAI_TEST_CPU fakes torch's answer on purpose")
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


def test_a_faked_kind_of_cpu_reaches_launched_processes(tmp_path):
    """`CAI_TEST_CPU=avx2 make test` runs the suite as an AVX2-only machine would, in the processes
    that tests launch too (tests/fake_cpu): auto resolves to fp32 there, whatever this CPU has."""
    from conftest import FAKE_CPU

    src = Path(precision.__file__).resolve().parents[2]
    code = "from cai_bootstrap.models.precision import resolve_mixed_precision as r; print(*r('auto', 'cpu'), sep='|')"
    env = {**os.environ, "CAI_TEST_CPU": "avx2", "PYTHONPATH": os.pathsep.join([str(FAKE_CPU), str(src)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "no|auto: cpu has no native bf16 (CPUs need AVX-512 BF16 or AMX)"
    env["CAI_TEST_CPU"] = "avx1024"
    bad = subprocess.run([sys.executable, "-c", "pass"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "CAI_TEST_CPU='avx1024': expected one of avx2, avx512_bf16, amx" in bad.stderr


def test_dpo_trainer_arguments_follow_the_setting(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: None)
    plain = dpo.trainer_arguments(small_cfg(), out_dir=tmp_path, seed=0)
    forced = dpo.trainer_arguments(small_cfg(mixed_precision="bf16"), out_dir=tmp_path, seed=0)
    assert plain["bf16"] is False and forced["bf16"] is True
    assert dpo.parity_check(plain, forced) == ["bf16: False != True"]
    assert dpo.trainer_arguments(small_cfg(mixed_precision="auto"), out_dir=tmp_path, seed=0)["bf16"] is False
    monkeypatch.setattr(precision, "native_bf16", lambda device: "test")
    assert dpo.trainer_arguments(small_cfg(mixed_precision="auto"), out_dir=tmp_path, seed=0)["bf16"] is True


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


# --- the equivalences of the speed code, under forced bf16 -----------------------------------------
# bf16 keeps 8 significant bits, and its error grows through the backward pass: on the tiny model
# bf16 gradients are a few percent off fp32's for SFT, 1e-4 for DPO. The fp32 versions of these
# tests (test_sft, test_dpo) hold at 1e-5; here the tolerance is bf16's own error, measured on the
# plain path (its bf16 gradients against its fp32 ones): the fast path may differ from the plain
# one by at most twice that, and the bug each test guards against must move the result by more
# than twice the tolerance, so the tolerance still catches it. Losses (means over many tokens)
# hold to 2**-8, bf16's relative precision.
BF16_REL = 2.0 ** -8


def _rel(a: dict, b: dict) -> float:
    """The largest relative difference of one gradient tensor."""
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a)


def _grads(model) -> dict:
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return g


def test_sft_packing_and_accumulation_hold_under_bf16(tiny_model_folder, tokenizer):
    from accelerate import Accelerator

    from cai_bootstrap.training.masking import PackedCollator, ResponseOnlyCollator, encode_dataset
    from test_sft import lora_tiny

    encoded, _ = encode_dataset(tokenizer, make_examples(8), max_length=128, max_drop_share=0.0)
    model = lora_tiny(tiny_model_folder)
    collate = ResponseOnlyCollator(tokenizer.pad_token_id)
    padded = collate(encoded)
    packed = PackedCollator(tokenizer.pad_token_id, row_tokens=128)(encoded)
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
    four, halves = collate(encoded[:4]), [collate(encoded[:2]), collate(encoded[2:4])]  # 0 long, 1-3 short
    accelerator = Accelerator(cpu=True)

    def loss_and_grads(batch):
        loss = sft._forward_loss(model, batch) / sft.supervised_targets(batch["labels"])
        loss.backward()
        return float(loss.detach()), _grads(model)

    _, g_fp32 = loss_and_grads(padded)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(input_ids=padded["input_ids"]).logits.dtype == torch.bfloat16  # autocast is on
        loss_padded, g_padded = loss_and_grads(padded)
        loss_packed, g_packed = loss_and_grads(packed)
        _, g_leaky = loss_and_grads(leaky)
        whole, g_whole = sft.train_window(model, [four], accelerator), _grads(model)
        split, g_split = sft.train_window(model, halves, accelerator), _grads(model)
        for b in halves:  # the mean of per-micro-batch means: what accumulation must not compute
            (sft._forward_loss(model, b) / sft.supervised_targets(b["labels"]) / len(halves)).backward()
        g_naive = _grads(model)
    tol = 2 * _rel(g_fp32, g_padded)
    assert 0 < tol < 0.5  # bf16 changed the arithmetic, and the gradients still point the same way

    assert loss_packed == pytest.approx(loss_padded, rel=BF16_REL) and _rel(g_padded, g_packed) < tol
    assert _rel(g_padded, g_leaky) > 2 * tol  # examples that see their neighbours
    assert split.loss == pytest.approx(whole.loss, rel=BF16_REL) and _rel(g_whole, g_split) < tol
    assert _rel(g_whole, g_naive) > 2 * tol


def test_packed_dpo_forward_gives_trls_loss_and_gradients_under_bf16(tiny_model_folder, tmp_path, monkeypatch):
    from cai_bootstrap.training import packing

    def leaky_tree(*args, **kwargs):  # one causal mask over each row: chosen and rejected see each other
        tree = real_tree(*args, **kwargs)
        width = tree.mask.shape[-1]
        tree.mask = torch.ones(width, width, dtype=torch.bool).tril().expand_as(tree.mask).clone()
        return tree

    real_tree = packing.prompt_tree
    pairs = make_pairs(8)
    results = {}
    for name, precision in (("fp32", "no"), ("padded", "bf16"), ("packed", "bf16"), ("leaky", "bf16")):
        monkeypatch.setattr(packing, "prompt_tree", leaky_tree if name == "leaky" else real_tree)
        packed = name in ("packed", "leaky")
        setup = dpo.build_trainer("base", str(tiny_model_folder), pairs,
                                  small_cfg(packing=packed, mixed_precision=precision),
                                  out_dir=tmp_path / name, seed=0)
        trainer, model = setup.trainer, setup.trainer.model
        assert trainer.args.bf16 == (precision == "bf16") and trainer.packed == packed
        torch.manual_seed(1)
        with torch.no_grad():  # a policy away from the reference, so every term has a gradient
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.05)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
        model.train()
        with trainer.autocast_smart_context_manager():
            loss = trainer.compute_loss(model, batch)
        loss.backward()
        results[name] = float(loss.detach()), _grads(model)
    (_, g_fp32), (l_pad, g_pad), (l_pack, g_pack), (_, g_leak) = (results[k] for k in ("fp32", "padded", "packed", "leaky"))
    tol = 2 * _rel(g_fp32, g_pad)
    assert 0 < tol < 0.5
    assert l_pack == pytest.approx(l_pad, rel=BF16_REL) and _rel(g_pad, g_pack) < tol
    assert _rel(g_pad, g_leak) > 2 * tol
