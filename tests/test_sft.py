"""The SFT loop on the tiny random Llama: loss goes down, the adapter loads, the loss is a token mean
over the accumulation window, resume reproduces an uninterrupted run, prompts are never supervised."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cai_bootstrap.config import SFTConfig
from cai_bootstrap.formats import completion_for, prompt_for
from cai_bootstrap.models.loading import fingerprint, load_model
from cai_bootstrap.training import sft
from cai_bootstrap.training.packing import balanced_rows
from cai_bootstrap.training.masking import (IGNORE_INDEX, MaskingError, PackedCollator, ResponseOnlyCollator,
                                            encode_dataset)

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are far too small for two threads; on a shared 2-core machine the
    threads mostly wait for each other (measured ~15x slower than one thread under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WORDS = "the cat sat on a warm mat while rain fell softly over quiet green hills and old stone walls".split()


def make_examples(n: int) -> list[dict]:
    """Responses of very different lengths: every fourth is long (~25 tokens), the rest 1-3 words."""
    out = []
    for i in range(n):
        if i % 4 == 0:
            response = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(24))
        else:
            response = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 3))
        instruction = f"Write item number {i} about {WORDS[i % len(WORDS)]}."
        out.append({"id": f"ex{i}", "prompt": prompt_for(instruction), "response": response})
    return out


def make_cfg(**overrides) -> SFTConfig:
    data = dict(
        lora=dict(r=4, alpha=8, dropout=0.0, target_modules="all-linear"),
        learning_rate=1e-2,
        epochs=1,
        batch_size=4,
        gradient_accumulation_steps=1,
        warmup_ratio=0.0,
        max_length=128,
        eval_share=0.0,
        max_drop_share=0.0,
        save_steps=1000,
        logging_steps=1,
        mixed_precision="no",  # fp32: the comparisons here are at fp32 tolerances; bf16 in test_mixed_precision
    )
    data.update(overrides)
    return SFTConfig.model_validate(data)


def adapter_weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=atol), k


# The reference run, shared: 16 good examples + 1 with a bad prompt, 6 steps over two epochs,
# a checkpoint at step 3, LoRA dropout on (so resume must restore the RNG too).
MAIN_CFG = dict(lora=dict(r=4, alpha=8, dropout=0.1), max_steps=6, save_steps=3, eval_share=0.25,
                max_drop_share=0.1, warmup_ratio=0.2)


def main_examples() -> list[dict]:
    bad = {"id": "bad", "prompt": "no separator here", "response": "x"}
    return make_examples(16) + [bad]


@pytest.fixture(scope="module")
def trained(tiny_model_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-main")
    return sft.train_sft(str(tiny_model_folder), main_examples(), make_cfg(**MAIN_CFG), out_dir=out, seed=3,
                         progress=False)


def test_training_lowers_the_loss_and_writes_a_loadable_adapter(trained, tiny_model_folder):
    from peft import PeftModel

    out = trained.adapter_dir
    m = json.loads((out / "training.json").read_text())
    assert m == json.loads(json.dumps(trained.metrics))
    history = m["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    # Steps 1-3 and 4-6 are the two epochs over the same 12 examples.
    first, second = (sum(h["loss"] for h in history[i:i + 3]) / 3 for i in (0, 3))
    assert second < first - 0.05
    assert all(set(h) >= {"step", "loss", "lr", "tokens_per_s"} for h in history)
    # warmup ceil(0.2 * 6) = 2 steps, linear from 0 (the HF schedule), then cosine down
    assert [h["lr"] for h in history[:3]] == pytest.approx([0.0, 5e-3, 1e-2])
    assert history[3]["lr"] < 1e-2
    assert m["final_train_loss"] == history[-1]["loss"]
    assert math.isfinite(m["eval_loss"]) and [e["step"] for e in m["eval_history"]] == [3]
    assert m["examples"] == {"given": 17, "kept": 16, "dropped": {"bad_prompt": 1}, "train": 12, "eval": 4}
    assert m["hyperparameters"]["total_steps"] == 6 and m["hyperparameters"]["steps_per_epoch"] == 3
    assert m["hyperparameters"]["warmup_steps"] == 2 and m["seed"] == 3
    assert m["lora"]["r"] == 4 and m["lora"]["target_modules"] == "all-linear"
    assert m["quantization"]["quantization"] == "none" and m["base_provenance"]["model"] == str(tiny_model_folder)
    assert m["tokens_per_s"] > 0 and m["supervised_tokens_per_s"] > 0 and m["wall_time_s"] > 0
    assert m["tokens"]["tokens"] > m["tokens"]["supervised_tokens"] > 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints" / "step-3" / "trainer_state.json").is_file()

    base = load_model(str(tiny_model_folder))
    assert m["base_fingerprint"] == fingerprint(base.model)
    ids = base.tokenizer(prompt_for("Say hi."), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base_logits = base.model(ids).logits
        peft_logits = PeftModel.from_pretrained(load_model(str(tiny_model_folder)).model, str(out))(ids).logits
        merged_logits = load_model(str(tiny_model_folder), adapters=[out]).model(ids).logits
    assert not torch.allclose(base_logits, merged_logits, atol=1e-4)
    assert torch.allclose(peft_logits, merged_logits, atol=1e-4)


def test_interrupted_run_resumes_to_the_same_adapter(trained, tiny_model_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    save = sft._save_checkpoint

    class Interrupted(Exception):
        pass

    def save_then_crash(*args, **kwargs):
        path = save(*args, **kwargs)
        raise Interrupted(path)

    monkeypatch.setattr(sft, "_save_checkpoint", save_then_crash)
    with pytest.raises(Interrupted):
        sft.train_sft(str(tiny_model_folder), main_examples(), make_cfg(**MAIN_CFG), out_dir=out, seed=3,
                      progress=False)
    monkeypatch.undo()
    assert not (out / "training.json").exists()
    # Determinism: an independent run with the same seed wrote the same step-3 checkpoint.
    assert_same_weights(adapter_weights(out / "checkpoints/step-3/adapter"),
                        adapter_weights(trained.adapter_dir / "checkpoints/step-3/adapter"))

    resumed = sft.train_sft(str(tiny_model_folder), main_examples(), make_cfg(**MAIN_CFG), out_dir=out, seed=3,
                            resume=True, progress=False)
    assert resumed.metrics["resumed_from_step"] == 3
    assert_same_weights(adapter_weights(out), adapter_weights(trained.adapter_dir), atol=1e-7)
    assert [h["loss"] for h in resumed.metrics["history"]] == pytest.approx(
        [h["loss"] for h in trained.metrics["history"]], abs=1e-6)
    assert resumed.metrics["eval_loss"] == pytest.approx(trained.metrics["eval_loss"], abs=1e-6)

    # A checkpoint from other settings is refused rather than silently mixed in.
    with pytest.raises(RuntimeError, match="different run"):
        sft.train_sft(str(tiny_model_folder), main_examples(), make_cfg(**MAIN_CFG), out_dir=out, seed=4,
                      resume=True, progress=False)


def test_same_seed_gives_the_same_adapter(tiny_model_folder, tmp_path):
    # (The resume test also compares two independent runs' step-3 checkpoints.)
    ex = make_examples(4)
    for name in ("a", "b"):
        sft.train_sft(str(tiny_model_folder), ex, make_cfg(max_steps=1, lora=dict(r=4, alpha=8, dropout=0.1)),
                      out_dir=tmp_path / name, seed=0, progress=False)
    assert_same_weights(adapter_weights(tmp_path / "a"), adapter_weights(tmp_path / "b"))


# --------------------------------------------------------------------------------------------
# the loss is a token mean over the whole accumulation window


def test_window_gradients_equal_one_big_batch_and_differ_from_mean_of_means(tiny_model_folder, tokenizer):
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    encoded, _ = encode_dataset(tokenizer, make_examples(4), max_length=128, max_drop_share=0.0)
    sup = [e.n_supervised_tokens for e in encoded]
    assert max(sup) > 5 * min(sup)  # very uneven supervision
    torch.manual_seed(0)
    model = get_peft_model(load_model(str(tiny_model_folder), trainable=True).model,
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    model.train()
    accelerator = Accelerator()
    collate = ResponseOnlyCollator(tokenizer.pad_token_id)
    whole = collate(encoded)
    halves = [collate([encoded[0], encoded[1]]), collate([encoded[2], encoded[3]])]  # 0 is long, 1-3 short

    def grads():
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return g

    one = sft.train_window(model, [whole], accelerator)
    g_one = grads()
    two = sft.train_window(model, halves, accelerator)
    g_two = grads()
    assert one.supervised_tokens == two.supervised_tokens == sum(sup)
    assert two.loss == pytest.approx(one.loss, abs=1e-5)
    for k in g_one:
        assert torch.allclose(g_one[k], g_two[k], rtol=1e-4, atol=1e-6), k

    # What the test guards against: the mean of per-micro-batch means weights tokens differently.
    for b in halves:
        loss = sft._forward_loss(model, b) / sft.supervised_targets(b["labels"])
        (loss / len(halves)).backward()
    g_naive = grads()
    rel = max(float((g_one[k] - g_naive[k]).norm() / g_one[k].norm()) for k in g_one)
    assert rel > 0.05, rel


def test_accumulation_matches_a_big_batch_end_to_end(tiny_model_folder, tmp_path):
    # 6 examples, global batch 4: step 1 has 4 examples (split 2 + 2), step 2 has 2 (one micro-batch).
    ex = make_examples(6)
    results = {}
    for name, bs, acc in (("big", 4, 1), ("accum", 2, 2)):
        r = sft.train_sft(str(tiny_model_folder), ex, make_cfg(batch_size=bs, gradient_accumulation_steps=acc,
                                                               epochs=1, warmup_ratio=0.0),
                          out_dir=tmp_path / name, seed=0, progress=False)
        assert r.metrics["hyperparameters"]["total_steps"] == 2
        results[name] = r
    big, accum = results["big"].metrics["history"], results["accum"].metrics["history"]
    assert [h["loss"] for h in accum] == pytest.approx([h["loss"] for h in big], abs=1e-5)
    assert_same_weights(adapter_weights(tmp_path / "accum"), adapter_weights(tmp_path / "big"), atol=1e-5)


# --------------------------------------------------------------------------------------------
# masking in the loop


def test_the_loop_trains_on_maskings_labels_only(tiny_model_folder, tokenizer, tmp_path, monkeypatch):
    ex = make_examples(4)
    encoded, _ = encode_dataset(tokenizer, ex, max_length=128, max_drop_share=0.0)
    seen = []
    real = sft._forward_loss

    seen_positions = []

    def spy(model, batch):
        seen.append(batch["labels"].detach().cpu())
        seen_positions.append(batch["position_ids"].detach().cpu())
        return real(model, batch)

    monkeypatch.setattr(sft, "_forward_loss", spy)
    sft.train_sft(str(tiny_model_folder), ex, make_cfg(max_steps=1, batch_size=2, gradient_accumulation_steps=2),
                  out_dir=tmp_path, seed=0, progress=False)
    rows = [row for batch in seen for row in batch.tolist()]
    assert len(rows) == 2  # packing: each micro-batch of 2 short examples fills one row
    rows = [row for _, row in unpack(seen_positions, seen)]
    assert len(rows) == 4
    expected = {tuple(e.labels) for e in encoded}
    got = set()
    for row in rows:
        n = next(len(e.labels) for e in encoded if tuple(row[: len(e.labels)]) == tuple(e.labels))
        assert all(x == IGNORE_INDEX for x in row[n:])  # padding is never supervised
        got.add(tuple(row[:n]))
    assert got == expected
    by_response = {completion_for(x["response"]) for x in ex}
    for e in encoded:  # the supervised tokens spell exactly the completion and EOS, never the prompt
        sup = [t for t in e.labels if t != IGNORE_INDEX]
        assert sup[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(sup[:-1]) in by_response


def test_too_many_masking_drops_fail_before_training(tiny_model_folder, tmp_path):
    ex = make_examples(3) + [{"id": "bad", "prompt": "no separator", "response": "x"}]
    with pytest.raises(MaskingError, match="bad_prompt"):
        sft.train_sft(str(tiny_model_folder), ex, make_cfg(max_drop_share=0.1), out_dir=tmp_path, seed=0,
                      progress=False)
    assert not (tmp_path / "training.json").exists()


# --------------------------------------------------------------------------------------------
# data order and split


def test_plan_is_seeded_and_steps_do_not_depend_on_the_micro_batch():
    lengths = [5, 40, 7, 33, 12, 9, 50, 3, 21, 8]
    a = sft.plan_epoch(lengths, global_batch=4, micro_batch=4, seed=1, epoch=0)
    b = sft.plan_epoch(lengths, global_batch=4, micro_batch=2, seed=1, epoch=0)
    assert a == sft.plan_epoch(lengths, global_batch=4, micro_batch=4, seed=1, epoch=0)
    assert [sum(s, []) for s in a] == [sum(s, []) for s in b]  # same examples per step
    assert sorted(sum(sum(a, []), [])) == list(range(10)) and [len(sum(s, [])) for s in a] == [4, 4, 2]
    assert a != sft.plan_epoch(lengths, global_batch=4, micro_batch=4, seed=1, epoch=1)
    for step in b:  # sorted by length inside a step
        flat = sum(step, [])
        assert [lengths[i] for i in flat] == sorted(lengths[i] for i in flat)
    assert sft.shard([[0], [1], [2]], 2, 0) == [[0], [2]] and sft.shard([[0], [1], [2]], 2, 1) == [[1], None]


def test_eval_split():
    assert sft.eval_count(16, 0.25) == 4 and sft.eval_count(2, 0.01) == 1 and sft.eval_count(1, 0.5) == 0
    assert sft.eval_count(10, 0.0) == 0 and sft.eval_count(3, 0.9) == 2
    train, held = sft.split_indices(10, 0.2, seed=0)
    assert sorted(train + held) == list(range(10)) and len(held) == 2
    assert (train, held) == sft.split_indices(10, 0.2, seed=0)


# --------------------------------------------------------------------------------------------
# packing


def unpack(positions: list, labels: list) -> list[tuple[int, list[int]]]:
    """(row, labels) of every packed example: a new example starts where position_ids restart at 0."""
    out = []
    for pos_batch, lab_batch in zip(positions, labels):
        for r, (pos, lab) in enumerate(zip(pos_batch.tolist(), lab_batch.tolist())):
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            out += [(r, lab[a:b]) for a, b in zip(starts, starts[1:])]
    return out


def test_balanced_rows_split_the_tokens_evenly():
    assert balanced_rows([60, 50, 40, 30, 20, 10], capacity=100) == [[0, 5], [1, 4], [2, 3]]  # 70 tokens each
    assert balanced_rows([5], capacity=100) == [[0]]
    assert balanced_rows([300, 10], capacity=100) == [[0], [1]]  # 3 rows asked for, 2 used
    lengths = [37, 12, 88, 41, 5, 66, 23, 71, 9, 54]
    rows = balanced_rows(lengths, capacity=128)
    loads = [sum(lengths[i] for i in row) for row in rows]
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert len(rows) == math.ceil(sum(lengths) / 128) and max(loads) - min(loads) <= max(lengths)


def test_packed_collator_balances_rows_and_restarts_positions(tokenizer):
    encoded, _ = encode_dataset(tokenizer, make_examples(8), max_length=128, max_drop_share=0.0)
    lengths = [len(e.input_ids) for e in encoded]
    batch = PackedCollator(tokenizer.pad_token_id, row_tokens=64)(encoded)
    rows, width = batch["input_ids"].shape
    assert rows == math.ceil(sum(lengths) / 64) and width < math.ceil(sum(lengths) / rows) + max(lengths)
    # every example appears exactly once, whole, with positions 0..n-1; padding is unsupervised
    pieces = sorted(tuple(ids) for r, ids in unpack([batch["position_ids"]], [batch["input_ids"]]))
    real = sorted(tuple(e.input_ids) for e in encoded)
    pad = tokenizer.pad_token_id
    assert [p for p in pieces if any(t != pad for t in p)] == [r for r in real]
    assert int(batch["attention_mask"].sum()) == sum(lengths)
    assert bool((batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all())


def test_packed_collator_refuses_an_example_that_starts_supervised(tokenizer):
    with pytest.raises(ValueError, match="example 1: its first token is supervised"):
        PackedCollator(0, row_tokens=16)([{"input_ids": [1, 2], "labels": [IGNORE_INDEX, 2]},
                                          {"input_ids": [3, 4], "labels": [3, 4]}])


def lora_tiny(folder):
    """The tiny model with a random (non-zero) LoRA on every linear layer, no dropout, in train mode."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(str(folder), trainable=True).model,
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    return model.train()


def loss_and_grads(model, compute):
    loss = compute()
    loss.backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss), g


def test_packed_rows_give_the_loss_and_gradients_of_padded_rows(tiny_model_folder, tokenizer):
    """Padding-free packing is an optimisation only: same token losses and gradients (fp32, 1e-5)."""
    encoded, _ = encode_dataset(tokenizer, make_examples(8), max_length=128, max_drop_share=0.0)
    model = lora_tiny(tiny_model_folder)
    padded = ResponseOnlyCollator(tokenizer.pad_token_id)(encoded)
    packed = PackedCollator(tokenizer.pad_token_id, row_tokens=128)(encoded)
    assert packed["input_ids"].numel() < 0.8 * padded["input_ids"].numel()  # the padding that is saved
    assert sft.supervised_targets(packed["labels"]) == sft.supervised_targets(padded["labels"])

    loss_padded, g_padded = loss_and_grads(model, lambda: sft._forward_loss(model, padded))
    loss_packed, g_packed = loss_and_grads(model, lambda: sft._forward_loss(model, packed))
    assert loss_packed == pytest.approx(loss_padded, rel=1e-5)
    for k in g_padded:  # fp32 sums in another order: relative error of each gradient tensor
        assert float((g_packed[k] - g_padded[k]).norm() / g_padded[k].norm()) < 1e-5, k
    # and the mask matters: the same rows with one causal mask over the whole row (examples
    # attending to their neighbours) give a different loss
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
    assert abs(float(sft._forward_loss(model, leaky)) - loss_padded) > 1e-3

