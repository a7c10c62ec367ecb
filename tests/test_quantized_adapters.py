"""Adapters on a quantized base stay unmerged (models/adapters.py), with real bitsandbytes 8-bit on CPU.

The adapter is a real one: two SFT steps on the tiny model at the default learning rate, so its
change points where the data does (a random LoRA of the same size barely moves the logits). Its
weight changes are a fraction of one int8 quantization step, as real SFT adapters' are (the demo's
on SmolLM2-135M: a median 0.09 step), which is what merging into int8 weights rounds away.
"""

from __future__ import annotations

import pytest
import torch

from cai_bootstrap.models import adapters as adapters_mod
from cai_bootstrap.models.loading import fingerprint, load_model
from test_sft import make_cfg, make_examples

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning",
                                        "ignore:MatMul8bitLt.*:UserWarning",
                                        "ignore:Merge lora module to 8-bit linear.*:UserWarning")

TEXTS = ["Instruction: Write item number 3 about the cat.\nResponse: the cat sat on a warm mat",
         "Instruction: Write item number 8 about rain.\nResponse: rain fell softly over quiet green hills and"]


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_folder, tmp_path_factory):
    from cai_bootstrap.training import sft

    out = tmp_path_factory.mktemp("sft-8bit")
    sft.train_sft(str(tiny_model_folder), make_examples(16),
                  make_cfg(max_steps=2, learning_rate=2e-4, lora=dict(r=8, alpha=16, dropout=0.0)),
                  out_dir=out, seed=0, progress=False)
    return out


def _logits(model, tokenizer):
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()[batch["attention_mask"].bool()]


def _kl(p, q) -> float:
    """Mean per-token KL(softmax p || softmax q), in nats."""
    lp, lq = p.log_softmax(-1), q.log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def test_an_adapter_on_8bit_weights_keeps_its_effect_unmerged_and_would_lose_it_merged(
        tiny_model_folder, sft_adapter, tokenizer):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = str(tiny_model_folder)
    fp32 = load_model(folder).model
    true_base = _logits(fp32, tokenizer)
    true = _logits(load_model(folder, adapters=[sft_adapter]).model, tokenizer)  # merged in fp32: exact

    int8 = load_model(folder, quantization="8bit")
    assert int8.provenance["quantization"] == "8bit" and adapters_mod.is_quantized(int8.model)
    int8_base = _logits(int8.model, tokenizer)
    base_fp, base_weights = fingerprint(int8.model), {k: v.clone() for k, v in int8.model.state_dict().items()}
    unmerged = load_model(folder, quantization="8bit", adapters=[sft_adapter])
    assert unmerged.provenance["adapters_applied"] == "unmerged"
    assert "Peft" not in type(unmerged.model).__name__ and not any("lora" in n for n, _ in unmerged.model.named_modules())
    state = unmerged.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_weights.items())  # the int8 weights are untouched ...
    assert fingerprint(unmerged.model) != base_fp  # ... and the adapter is part of the fingerprint
    with_adapter = _logits(unmerged.model, tokenizer)
    merged = _logits(PeftModel.from_pretrained(load_model(folder, quantization="8bit").model,
                                               str(sft_adapter)).merge_and_unload(), tokenizer)  # the old way

    # the regime: the adapter's weight changes are a fraction of one int8 step of their row
    weights, delta = load_file(str(tiny_model_folder / "model.safetensors")), load_file(
        str(sft_adapter / "adapter_model.safetensors"))
    steps = []
    for key in (k for k in delta if "lora_A" in k):
        w = weights[key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")]
        change = 2.0 * delta[key.replace("lora_A", "lora_B")] @ delta[key]  # scaling alpha / r = 2
        steps.append(float((change.abs() / (w.abs().amax(1, keepdim=True) / 127)).median()))
    assert 0.02 < float(torch.tensor(steps).median()) < 0.5

    effect = _kl(true, true_base)  # what the adapter does, in full precision
    base_error = _kl(true_base, int8_base)  # what int8 does to the base alone
    assert effect > 2 * base_error  # an effect that int8 noise cannot hide
    # unmerged: as close to the true adapted model as int8 is to the true base
    assert _kl(true, with_adapter) < 1.25 * base_error
    # merged into int8 and re-quantized: well beyond int8's own error, and a sizeable part of the
    # adapter's effect is gone (KL between the two int8 models against dropping the adapter)
    assert _kl(true, merged) > 1.25 * base_error
    assert _kl(with_adapter, merged) > 0.2 * _kl(with_adapter, int8_base)


def test_unmerged_adapters_compute_what_merged_ones_do_and_chain_in_order(tiny_model_folder, sft_adapter, tokenizer,
                                                                          tmp_path):
    """The hooks are LoRA's own arithmetic: on fp32 weights a chain of two adapters applied unmerged
    gives the logits of the same chain merged, and each adapter counts."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    second = get_peft_model(load_model(str(tiny_model_folder)).model,
                            LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    second.save_pretrained(tmp_path / "second")
    chain = [sft_adapter, tmp_path / "second"]
    merged = load_model(str(tiny_model_folder), adapters=chain)
    assert merged.provenance["adapters_applied"] == "merged"
    model = load_model(str(tiny_model_folder)).model
    for a in chain:
        model = adapters_mod.attach_unmerged(model, a)
    assert torch.allclose(_logits(model, tokenizer), _logits(merged.model, tokenizer), atol=1e-5)
    first_only = load_model(str(tiny_model_folder), adapters=chain[:1]).model
    assert not torch.allclose(_logits(model, tokenizer), _logits(first_only, tokenizer), atol=1e-3)


def test_merging_into_quantized_weights_is_refused(tiny_model_folder, sft_adapter):
    pytest.importorskip("bitsandbytes")
    int8 = load_model(str(tiny_model_folder), quantization="8bit").model
    with pytest.raises(ValueError, match="refusing to merge .* into quantized weights"):
        adapters_mod.merge(int8, sft_adapter)
    with pytest.raises(Exception, match="not a PEFT adapter folder"):
        adapters_mod.apply_adapters(int8, [tiny_model_folder])


def test_dpo_from_sft_on_an_8bit_base_starts_from_the_unmerged_sft_model(tiny_model_folder, sft_adapter, tmp_path,
                                                                         tokenizer):
    """The reference (and the policy at step 0) is the 8-bit base with the SFT adapter unmerged on it:
    TRL disables its own DPO adapter for the reference, and the SFT hooks are not a PEFT adapter."""
    pytest.importorskip("bitsandbytes")
    from cai_bootstrap.training.dpo import build_trainer
    from test_dpo import _logps, make_pairs, small_cfg

    pairs = make_pairs(4)
    setup = build_trainer("sft", str(tiny_model_folder), pairs, small_cfg(), out_dir=tmp_path / "dpo", seed=0,
                          sft_adapter=sft_adapter, quantization="8bit")
    assert setup.provenance["quantization"] == "8bit" and setup.provenance["adapters_applied"] == "unmerged"
    ref = list(setup.trainer.train_dataset["ref_chosen_logps"])
    start = load_model(str(tiny_model_folder), quantization="8bit", adapters=[sft_adapter]).model
    base = load_model(str(tiny_model_folder), quantization="8bit").model
    start_c, _ = _logps(start, tokenizer, pairs)
    base_c, _ = _logps(base, tokenizer, pairs)
    # int8 rounds activations per token, so TRL's layout and ours differ by a little int8 noise; the
    # SFT adapter moves every sum by far more (the reference is not the bare base)
    noise = max(abs(a - b) for a, b in zip(ref, start_c, strict=True))
    assert noise < 0.25 * min(abs(a - b) for a, b in zip(start_c, base_c, strict=True))
    assert noise < 0.25 * min(abs(a - b) for a, b in zip(ref, base_c, strict=True))
    # and it trains the DPO LoRA on top of the int8 base and the SFT adapter, which stays as it was
    model = setup.trainer.model
    frozen = {n: b.clone() for n, b in model.named_buffers() if "unmerged_lora" in n}
    assert len(frozen) == 2 * 14  # A and B of every adapted layer (7 per decoder layer, 2 layers)
    assert setup.trainer.train().global_step == 2
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers() if "unmerged_lora" in n)
    assert any(float(p.detach().abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
