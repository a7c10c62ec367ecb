"""DPO through TRL with a LoRA adapter: argument parity, reference = starting model, plain-text
tokenization, loss types, the on-disk reference log-probability cache. Tiny random model only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai_bootstrap.config import DPOConfig
from cai_bootstrap.schemas import PreferencePair
from cai_bootstrap.training import dpo
from cai_bootstrap.training.dpo import (
    DPODataError,
    ParityError,
    build_trainer,
    check_parity,
    parity_check,
    train_dpo,
    trainer_arguments,
)

# PEFT asks transformers 5 for `is_gradient_checkpointing` when an adapter is loaded (load_model here)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

FACTS = [
    ("What is the capital of France?", "Paris."), ("What is 2 + 2?", "4."),
    ("Name a primary colour.", "Red."), ("What is the largest planet?", "Jupiter."),
    ("What do bees make?", "Honey."), ("What is frozen water called?", "Ice."),
    ("How many legs does a spider have?", "Eight."), ("What is the opposite of hot?", "Cold."),
    ("Which animal says moo?", "A cow."), ("What colour is the sky on a clear day?", "Blue."),
    ("What is the capital of Italy?", "Rome."), ("How many days are in a week?", "Seven."),
    ("What gas do plants absorb?", "Carbon dioxide."), ("What is H2O?", "Water."),
    ("Who wrote Hamlet?", "William Shakespeare."), ("What is the boiling point of water in Celsius?", "100 degrees."),
]
RAMBLE = " Well, that is a big question and"


def make_pairs(n: int = 16, *, tweak: str = "") -> list[PreferencePair]:
    pairs = []
    for i, (q, a) in enumerate(FACTS[:n]):
        pairs.append(PreferencePair(
            id=f"p{i}", instruction_id=f"i{i}", category="qa",
            prompt=f"Instruction: {q}\nResponse:", chosen=f" {a}{tweak}\nEND",
            rejected=RAMBLE + f" {q.split()[-1].lower()}", negative_type="verbose_vague", chosen_source="sft_model",
        ))
    return pairs


def small_cfg(**over) -> DPOConfig:
    """fp32 unless a test asks otherwise: the comparisons here are at fp32 tolerances, and the default
    ``auto`` autocasts to bf16 on CPUs with AVX-512 BF16 or AMX (test_mixed_precision covers that path)."""
    base = dict(batch_size=4, max_steps=2, logging_steps=1, learning_rate=1e-2, max_length=128, warmup_ratio=0.0,
                lora={"r": 4, "alpha": 8, "dropout": 0.0}, mixed_precision="no")
    base.update(over)
    return DPOConfig(**base)


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_folder, tmp_path_factory) -> Path:
    """An SFT-like adapter with non-zero weights, so that merged SFT != base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_folder)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    folder = tmp_path_factory.mktemp("sft-adapter")
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shared_ref_cache(tmp_path_factory) -> Path:
    """One reference cache for the loss-type runs: the same pairs on the same base model hit it."""
    return tmp_path_factory.mktemp("ref-cache")


def _logps(model, tok, pairs, *, add_bos=False):
    from cai_bootstrap.training.logprobs import completion_logprobs

    prompts = [p.prompt for p in pairs]
    chosen = [s for s, _ in completion_logprobs(model, tok, prompts, [p.chosen for p in pairs], add_bos=add_bos)]
    rejected = [s for s, _ in completion_logprobs(model, tok, prompts, [p.rejected for p in pairs], add_bos=add_bos)]
    return chosen, rejected


def _close(a, b, tol=1e-3) -> bool:
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) < tol


# --- arguments and parity ---------------------------------------------------------------------


def test_trainer_arguments_same_for_both_inits_and_parity(tmp_path, tiny_model_folder):
    from trl import DPOConfig as TRLDPOConfig

    cfg = DPOConfig(loss_type="robust", label_smoothing=0.1, mixed_precision="no")
    a = trainer_arguments(cfg, out_dir=tmp_path / "dpo", seed=3)
    b = trainer_arguments(cfg, out_dir=tmp_path / "dpo_only", seed=3)
    assert {k for k in a if a[k] != b[k]} == {"output_dir"}
    assert parity_check(a, b) == []
    assert json.loads(json.dumps(a)) == a  # recorded as is
    assert a["loss_type"] == ["robust"] and a["label_smoothing"] == 0.1
    import torch

    assert a["use_cpu"] is (not torch.cuda.is_available()) and a["report_to"] == "none"
    assert a["bf16"] is False  # pinned; `auto` per device is test_mixed_precision's
    assert a["activation_checkpointing"] is False and a["lr_scheduler_type"] == "cosine"
    assert a["precompute_ref_log_probs"] is True
    TRLDPOConfig(**a)  # TRL accepts every key
    # label smoothing only means something for robust
    assert trainer_arguments(DPOConfig(label_smoothing=0.1), out_dir=tmp_path, seed=3)["label_smoothing"] == 0.0

    planted = trainer_arguments(DPOConfig(loss_type="robust", label_smoothing=0.1, beta=0.2, mixed_precision="no"),
                                out_dir=tmp_path / "dpo_only", seed=3)
    diffs = parity_check(a, planted)
    assert len(diffs) == 1 and diffs[0].startswith("beta:")
    assert parity_check(a, {**b, "seed": 4}) == ["seed: 3 != 4"]


def facts(cfg: DPOConfig, init: str, tmp_path, *, pairs=None, processes=1, **trained) -> dict:
    out = dpo.planned_facts(cfg, init, pairs or make_pairs(4), out_dir=tmp_path / init, seed=3, dtype="float32",
                            quantization="none", processes=processes)
    return {**out, **trained}


def test_parity_check_what_makes_the_comparison_fair(tmp_path, tiny_model_folder):
    cfg = DPOConfig()
    ref = facts(cfg, "sft", tmp_path)
    parity = check_parity(ref, facts(cfg, "base", tmp_path), dpo.PLANNED_FACTS, cfg)
    assert parity.checked_against == "dpo" and parity.same == list(dpo.PLANNED_FACTS)
    assert parity.declared_differences == []
    assert check_parity(None, ref, dpo.PLANNED_FACTS, cfg).as_dict() == {
        "checked_against": None, "same": [], "declared_differences": []}  # the first run: nothing to compare

    def differences(mine, keys=dpo.PLANNED_FACTS, reference=ref, cfg=cfg):
        with pytest.raises(ParityError) as e:
            check_parity(reference, mine, keys, cfg)
        return e.value.differences

    assert differences(facts(DPOConfig(beta=0.2), "base", tmp_path)) == ["beta: 0.1 != 0.2"]
    assert differences(facts(cfg, "base", tmp_path, pairs=make_pairs(5)))[0].startswith("pairs_sha256: ")
    assert differences(facts(cfg, "base", tmp_path, processes=2)) == [
        "num_processes: 1 != 2 (the global batch differs)"]
    # unknown here (the parent of launched processes): skipped, the processes check them
    assert check_parity(ref, facts(cfg, "base", tmp_path, processes=None), dpo.PLANNED_FACTS, cfg)
    unknown = dpo.planned_facts(cfg, "base", None, out_dir=tmp_path, seed=3, dtype="float32", quantization="none",
                                processes=None)
    assert unknown["pairs_sha256"] is None
    assert check_parity(ref, unknown, dpo.PLANNED_FACTS, cfg).same == ["trainer_args", "lora_args", "precision"]
    other_lora = facts(DPOConfig(lora={"r": 8}), "base", tmp_path)
    assert differences(other_lora) == ["lora.r: 16 != 8"]
    other = "no" if ref["precision"]["mixed_precision"] == "bf16" else "bf16"  # e.g. run on another machine
    mixed = {**facts(cfg, "base", tmp_path), "precision": {**ref["precision"], "mixed_precision": other}}
    assert differences(mixed) == [f"precision.mixed_precision: {ref['precision']['mixed_precision']!r} != {other!r}"]
    # a learning rate of its own: an undeclared difference fails ...
    assert differences(facts(DPOConfig(learning_rate=1e-4), "base", tmp_path)) == ["learning_rate: 5e-05 != 0.0001"]
    # ... the declared override is reported, in either order of the runs
    declared = DPOConfig(dpo_only_learning_rate=1e-4)
    for first, second in (("sft", "base"), ("base", "sft")):
        parity = check_parity(facts(declared, first, tmp_path), facts(declared, second, tmp_path),
                              dpo.PLANNED_FACTS, declared)
        lrs = (5e-05, 0.0001) if first == "sft" else (0.0001, 5e-05)
        assert parity.declared_differences == [
            f"learning_rate: {lrs[0]} != {lrs[1]} (declared by dpo.dpo_only_learning_rate)"]
        assert "trainer_args" not in parity.same and "lora_args" in parity.same
    assert trainer_arguments(declared, out_dir=tmp_path, seed=0, init="base")["learning_rate"] == 1e-4
    assert trainer_arguments(declared, out_dir=tmp_path, seed=0, init="sft")["learning_rate"] == 5e-5
    # ... but declares nothing else
    assert differences(facts(declared.model_copy(update={"beta": 0.3}), "base", tmp_path),
                       reference=facts(declared, "sft", tmp_path), cfg=declared) == ["beta: 0.1 != 0.3"]

    # what each run trained on
    trained = dict(pairs_used_sha256="abc", steps=4, pairs_seen=32, tokens_seen=2000)
    ref_t = {**ref, **trained}
    assert check_parity(ref_t, facts(cfg, "base", tmp_path, **trained), dpo.TRAINED_FACTS, cfg).same == list(
        dpo.TRAINED_FACTS)
    assert differences(facts(cfg, "base", tmp_path, **{**trained, "steps": 8, "tokens_seen": 4000}),
                       dpo.TRAINED_FACTS, ref_t) == ["steps: 4 != 8", "tokens_seen: 2000 != 4000"]
    # a run recorded before these facts existed cannot vouch for anything
    assert differences(facts(cfg, "base", tmp_path), reference={"init": "sft"})[0] == (
        "trainer_args: not recorded by the dpo run (re-run it)")

    with pytest.raises(ParityError, match="beta"):
        train_dpo("base", str(tiny_model_folder), make_pairs(4), DPOConfig(beta=0.5),
                  out_dir=tmp_path / "x", seed=3, reference=facts(cfg, "sft", tmp_path))
    assert not (tmp_path / "x").exists()  # refused before anything ran


# --- reference at step 0, tokenization -----------------------------------------------------------


@pytest.mark.parametrize("init", ["base", "sft"])
def test_step0_reference_is_the_starting_model(init, tiny_model_folder, sft_adapter, tmp_path, tokenizer):
    from cai_bootstrap.models.loading import load_model

    pairs = make_pairs(6)
    setup = build_trainer(init, str(tiny_model_folder), pairs, small_cfg(), out_dir=tmp_path / "out", seed=0,
                          sft_adapter=sft_adapter if init == "sft" else None)
    trainer, ds = setup.trainer, setup.trainer.train_dataset
    ref_c, ref_r = list(ds["ref_chosen_logps"]), list(ds["ref_rejected_logps"])
    assert list(ds["id"]) == [p.id for p in pairs]

    # the policy (fresh LoRA, B = 0) scores exactly like the precomputed reference
    pol_c, pol_r = _logps(trainer.model, tokenizer, pairs)
    assert _close(pol_c, ref_c, 1e-4) and _close(pol_r, ref_r, 1e-4)

    # ... and the reference is the starting model: merged SFT for init sft, the base for init base
    base = load_model(str(tiny_model_folder)).model
    merged = load_model(str(tiny_model_folder), adapters=[sft_adapter]).model
    base_c, _ = _logps(base, tokenizer, pairs)
    merged_c, _ = _logps(merged, tokenizer, pairs)
    assert not _close(base_c, merged_c, 1e-2)  # the SFT adapter does change the model
    start_c = merged_c if init == "sft" else base_c
    other_c = base_c if init == "sft" else merged_c
    assert _close(ref_c, start_c, 1e-4) and not _close(ref_c, other_c, 1e-2)
    assert (setup.provenance["start_fingerprint"] != setup.provenance["base_fingerprint"]) == (init == "sft")

    # plain text as TRL tokenized it: no chat template, no BOS, prompt + completion + one EOS
    eos = tokenizer.eos_token_id
    for row, p in zip(ds, pairs, strict=True):
        enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        assert row["prompt_ids"] == enc(p.prompt)
        assert row["chosen_ids"] == enc(p.chosen) + [eos]
        assert row["rejected_ids"] == enc(p.rejected) + [eos]
        assert row["prompt_ids"] + row["chosen_ids"] == enc(p.prompt + p.chosen) + [eos]
        specials = set(tokenizer.all_special_ids)
        assert not specials & set(row["prompt_ids"] + row["chosen_ids"][:-1] + row["rejected_ids"][:-1])
    assert tokenizer.decode(ds[0]["prompt_ids"] + ds[0]["chosen_ids"]) == (
        pairs[0].prompt + pairs[0].chosen + tokenizer.eos_token)


def test_add_bos_and_pair_hygiene(tiny_model_folder, tmp_path, tokenizer):
    pairs = make_pairs(4)
    bad = [
        pairs[0].model_copy(update={"id": "special", "chosen": " Paris.<|im_end|>\nEND"}),
        pairs[1].model_copy(update={"id": "long", "chosen": " " + "very " * 80 + "long.\nEND"}),
    ]
    setup = build_trainer("base", str(tiny_model_folder), pairs + bad, small_cfg(max_length=64),
                          out_dir=tmp_path / "o", seed=0, add_bos=True)
    ds = setup.trainer.train_dataset
    assert list(ds["id"]) == [p.id for p in pairs]
    report = setup.trainer.data_policy.report
    assert report["pairs_dropped"] == {"special_token_text": 1, "too_long": 1} and report["pairs_used"] == 4
    bos = tokenizer.bos_token_id
    for row, p in zip(ds, pairs, strict=True):
        assert row["prompt_ids"] == [bos] + tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        assert row["prompt_ids"].count(bos) == 1
    # the reference log-probs were computed with that BOS
    ref_c = list(ds["ref_chosen_logps"])
    assert _close(ref_c, _logps(setup.trainer.model, tokenizer, pairs, add_bos=True)[0], 1e-4)
    assert not _close(ref_c, _logps(setup.trainer.model, tokenizer, pairs, add_bos=False)[0], 1e-3)

    # a tokenizer that adds BOS by itself (Llama style): stripped unless add_bos, never doubled
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "bos-model"
    shutil.copytree(tiny_model_folder, folder)
    AutoTokenizer.from_pretrained(tiny_model_folder, add_bos_token=True).save_pretrained(folder)
    for add_bos in (False, True):
        setup = build_trainer("base", str(folder), pairs, small_cfg(), out_dir=tmp_path / "o3", seed=0,
                              add_bos=add_bos)
        assert setup.trainer.data_policy.report["implicit_bos_stripped"] is (not add_bos)
        for row, p in zip(setup.trainer.train_dataset, pairs, strict=True):
            assert row["prompt_ids"] == [bos] * add_bos + tokenizer(p.prompt, add_special_tokens=False)["input_ids"]

    with pytest.raises(DPODataError, match="no preference pair"):
        build_trainer("base", str(tiny_model_folder), bad[:1], small_cfg(), out_dir=tmp_path / "o2", seed=0)


# --- short runs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_short_run_each_loss(loss_type, tiny_model_folder, sft_adapter, tmp_path, shared_ref_cache):
    from cai_bootstrap.models.loading import load_model

    cfg = small_cfg(loss_type=loss_type, label_smoothing=0.1 if loss_type == "robust" else 0.0)
    init = "sft" if loss_type == "sigmoid" else "base"
    result = train_dpo(init, str(tiny_model_folder), make_pairs(), cfg, out_dir=tmp_path / "dpo", seed=0,
                       sft_adapter=sft_adapter if init == "sft" else None, cache_dir=shared_ref_cache)
    rec = json.loads((tmp_path / "dpo" / "training.json").read_text())
    assert rec["init"] == init and rec["loss_type"] == loss_type
    assert rec["trainer_args"] == result.trainer_args and rec["trainer_args"]["loss_type"] == [loss_type]
    assert rec["steps"] == 2 and rec["pairs_used"] == 16 and rec["pairs_dropped"] == {}
    assert [h["step"] for h in rec["history"]] == [1, 2]
    for h in rec["history"]:
        assert {"loss", "rewards/accuracies", "rewards/margins", "learning_rate"} <= set(h)
    assert rec["history"][0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # step 1: policy == reference
    assert 0.0 <= rec["final_reward_accuracy"] <= 1.0
    assert rec["final_reward_margin"] == rec["history"][-1]["rewards/margins"] != 0.0
    assert rec["start_fingerprint"] and rec["base_fingerprint"] and rec["wall_time_s"] > 0
    assert (rec["sft_adapter"] is not None) == (init == "sft")
    assert result.metrics["final_reward_accuracy"] == rec["final_reward_accuracy"]

    loaded = load_model(str(tiny_model_folder), adapters=[result.adapter_dir])  # the adapter loads
    assert loaded.model is not None

    assert rec["pairs_seen"] == 2 * 4 and rec["tokens_seen"] == rec["parity_facts"]["tokens_seen"] > 0
    assert rec["parity"] == {"checked_against": None, "same": [], "declared_differences": []}

    if init == "sft":  # the DPO-only run with its own, declared learning rate passes the parity check
        declared = cfg.model_copy(update={"dpo_only_learning_rate": 2e-2})
        train_dpo("base", str(tiny_model_folder), make_pairs(), declared, out_dir=tmp_path / "dpo_only",
                  seed=0, reference=rec["parity_facts"], cache_dir=shared_ref_cache)
        other = json.loads((tmp_path / "dpo_only" / "training.json").read_text())
        assert other["learning_rate"] == other["trainer_args"]["learning_rate"] == 2e-2
        assert other["parity"] == {
            "checked_against": "dpo", "same": [k for k in (*dpo.PLANNED_FACTS, *dpo.TRAINED_FACTS) if k != "trainer_args"],
            "declared_differences": ["learning_rate: 0.01 != 0.02 (declared by dpo.dpo_only_learning_rate)"]}
        assert other["tokens_seen"] == rec["tokens_seen"] and other["steps"] == rec["steps"]


# --- reference log-prob cache ---------------------------------------------------------------------


def test_ref_cache(tiny_model_folder, tmp_path):
    cache = tmp_path / "cache"
    folder = str(tiny_model_folder)

    def run(name, cfg, pairs):
        r = train_dpo("base", folder, pairs, cfg, out_dir=tmp_path / name, seed=0, cache_dir=cache)
        return r, json.loads((tmp_path / name / "training.json").read_text())

    def build(cfg, pairs):  # the reference log-probs are settled when the trainer is built
        trainer = build_trainer("base", folder, pairs, cfg, out_dir=tmp_path / "b", seed=0, cache_dir=cache).trainer
        return trainer.ref_cache.info, trainer.ref_forward_batches

    cfg = small_cfg()
    a, rec_a = run("a", cfg, make_pairs(8))
    assert a.metrics["ref_cache_hit"] is False and a.metrics["ref_forward_batches"] == 2
    key = rec_a["ref_cache"]["key"]
    assert sorted(p.name for p in cache.iterdir()) == [f"ref-{key}.pt"] == [Path(rec_a["ref_cache"]["path"]).name]

    b, rec_b = run("b", cfg, make_pairs(8))  # same key: loaded, not recomputed, same training
    assert b.metrics["ref_cache_hit"] is True and b.metrics["ref_forward_batches"] == 0
    assert rec_b["ref_cache"]["key"] == key
    assert [h["loss"] for h in rec_b["history"]] == [h["loss"] for h in rec_a["history"]]
    assert [h["rewards/margins"] for h in rec_b["history"]] == [h["rewards/margins"] for h in rec_a["history"]]

    info, forwards = build(small_cfg(beta=0.3, loss_type="ipo"), make_pairs(8))  # not part of the key
    assert info["hit"] is True and info["key"] == key and forwards == 0

    info, forwards = build(cfg, make_pairs(8, tweak=" Yes"))  # other pairs: another key
    assert info["hit"] is False and info["key"] != key and forwards == 2
    assert len(list(cache.iterdir())) == 2


def test_ref_cache_key_parts():
    kw = dict(ref_fingerprint="f", pairs_digest=dpo.pairs_sha(make_pairs(3)), tokens_digest="t",
              max_length=128, add_bos=False, precision="float32/none")
    key, parts = dpo.ref_cache_key(**kw)
    assert parts["trl_version"] and key == dpo.ref_cache_key(**kw)[0]
    for change in ({"ref_fingerprint": "g"}, {"max_length": 64}, {"add_bos": True},
                   {"pairs_digest": dpo.pairs_sha(make_pairs(3, tweak="!"))}):
        assert dpo.ref_cache_key(**{**kw, **change})[0] != key


# --- padding-free forward -----------------------------------------------------------------------


def test_packed_forward_gives_trls_padded_loss_and_gradients(tiny_model_folder, tmp_path):
    """dpo.packing only changes speed: the same loss, metrics and LoRA gradients as TRL's own forward."""
    import torch

    pairs = make_pairs(8)
    results = {}
    for packing in (False, True):
        torch.manual_seed(0)
        setup = build_trainer("base", str(tiny_model_folder), pairs, small_cfg(packing=packing),
                              out_dir=tmp_path / str(packing), seed=0)
        trainer = setup.trainer
        assert trainer.packed == packing
        model = trainer.model
        torch.manual_seed(1)
        with torch.no_grad():  # a policy away from the reference, so every term has a gradient
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.05)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
        assert int(batch["attention_mask"].sum()) < 0.8 * batch["attention_mask"].numel()  # padding to save
        model.train()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        results[packing] = (float(loss.detach()), grads, metrics, list(trainer.train_dataset["ref_chosen_logps"]))
    (l0, g0, m0, r0), (l1, g1, m1, r1) = results[False], results[True]
    assert _close(r0, r1, 1e-4)  # the reference pass, packed
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        assert float((g1[k] - g0[k]).norm() / g0[k].norm()) < 1e-4, k
    for k in ("rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected", "entropy", "mean_token_accuracy"):
        if k in m0:
            assert m1[k] == pytest.approx(m0[k], rel=1e-4, abs=1e-5), k
