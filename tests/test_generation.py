import pytest

from cai_bootstrap.formats import STOP_STRINGS, prompt_for
from cai_bootstrap.generation.engine import Decoding, Engine, encode_prompts, finish, length_batches
from cai_bootstrap.models.loading import load_model

PROMPTS = [prompt_for(q) for q in (
    "Name a color.", "What is the capital of France?", "List three fruits that are red and sweet.",
    "Write one sentence about the ocean.", "What is 7 plus 5?", "Hi",
    "Respond to this message: I lost my keys again this morning and I am late.",
)]


@pytest.fixture(scope="module")
def tiny(tiny_model_folder):
    return load_model(str(tiny_model_folder))


def test_greedy_output_identical_whatever_the_batch_size(tiny):
    d = Decoding(max_new_tokens=12, stop_strings=())
    outs = {bs: [g.raw_text for g in Engine(tiny.model, tiny.tokenizer, batch_size=bs).generate(PROMPTS, d)]
            for bs in (1, 3, 7)}
    assert outs[1] == outs[3] == outs[7]
    assert all(outs[1])


def test_output_order_matches_input_order(tiny):
    d = Decoding(max_new_tokens=6, stop_strings=())
    single = [Engine(tiny.model, tiny.tokenizer, batch_size=1).generate([p], d)[0] for p in PROMPTS]
    batched = Engine(tiny.model, tiny.tokenizer, batch_size=4).generate(PROMPTS, d)
    assert [g.prompt_tokens for g in batched] == [g.prompt_tokens for g in single]
    assert [g.raw_text for g in batched] == [g.raw_text for g in single]


def test_length_batches_group_similar_lengths():
    lengths = [5, 50, 6, 49, 7, 48]
    batches = length_batches(lengths, 2)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert [sorted(lengths[i] for i in b) for b in batches] == [[49, 50], [7, 48], [5, 6]] or \
        max(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) <= 41
    assert batches[0] == [1, 3]


def test_prompts_are_plain_text_and_bos_is_explicit(tokenizer):
    p = prompt_for("Say hi.")
    plain = tokenizer(p, add_special_tokens=False).input_ids
    assert encode_prompts(tokenizer, [p], add_bos=False) == [plain]
    assert encode_prompts(tokenizer, [p], add_bos=True) == [[tokenizer.bos_token_id, *plain]]
    # a chat template would wrap the text in special tokens; the engine never does
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") not in plain


def test_pad_token_is_distinct_from_eos(tiny):
    tok = tiny.tokenizer
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    assert tiny.provenance["pad_is_eos"] is False


def test_padding_never_reaches_the_model_as_content(tiny):
    """A short prompt padded in a batch with a long one generates what it generates alone."""
    d = Decoding(max_new_tokens=8, stop_strings=())
    short, long = prompt_for("Hi"), prompt_for("Explain in detail why the sky is blue during the day " * 3)
    alone = Engine(tiny.model, tiny.tokenizer, batch_size=1).generate([short], d)[0]
    together = Engine(tiny.model, tiny.tokenizer, batch_size=2).generate([long, short], d)[1]
    assert alone.raw_text == together.raw_text


def test_finish_reasons(tokenizer):
    ids = tokenizer(" Paris.\nEND\nmore", add_special_tokens=False).input_ids
    g = finish(tokenizer, ids, STOP_STRINGS, 5)
    assert (g.text, g.stop_string, g.finish_reason) == ("Paris.", "\nEND", "stop")
    assert g.raw_text.startswith(" Paris.\nEND")
    ids = tokenizer(" Paris.", add_special_tokens=False).input_ids + [tokenizer.eos_token_id, 5, 6]
    g = finish(tokenizer, ids, STOP_STRINGS, 5)
    assert (g.text, g.finish_reason, g.completion_tokens) == ("Paris.", "eos", len(ids) - 2)
    ids = tokenizer(" Paris is big", add_special_tokens=False).input_ids
    g = finish(tokenizer, ids, STOP_STRINGS, 5)
    assert (g.finish_reason, g.stop_string) == ("length", None)
    ids = tokenizer(" Paris.\nInstruction: next", add_special_tokens=False).input_ids
    g = finish(tokenizer, ids, STOP_STRINGS, 5)
    assert (g.text, g.stop_string) == ("Paris.", "\nInstruction:")


def test_generation_stops_at_stop_string(tiny):
    """With a stop string that the tiny model emits, generation ends there and the text is cut."""
    d = Decoding(max_new_tokens=10, stop_strings=())
    free = Engine(tiny.model, tiny.tokenizer, batch_size=1).generate([PROMPTS[0]], d)[0]
    assert free.finish_reason == "length" and len(free.raw_text) > 4
    stop = free.raw_text[2:5]
    g = Engine(tiny.model, tiny.tokenizer, batch_size=1).generate(
        [PROMPTS[0]], Decoding(max_new_tokens=10, stop_strings=(stop,)))[0]
    assert g.finish_reason == "stop" and g.stop_string == stop
    assert stop not in g.text and g.completion_tokens < 10
    # in a batch, the early-stopped row keeps its own token count (padding is not counted)
    both = Engine(tiny.model, tiny.tokenizer, batch_size=2).generate(
        [PROMPTS[0], PROMPTS[2]], Decoding(max_new_tokens=10, stop_strings=(stop,)))
    assert both[0].completion_tokens == g.completion_tokens and both[0].raw_text == g.raw_text


def test_sampling_is_seeded(tiny):
    d = Decoding(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=3, stop_strings=())
    a = [g.raw_text for g in Engine(tiny.model, tiny.tokenizer, batch_size=4).generate(PROMPTS, d)]
    b = [g.raw_text for g in Engine(tiny.model, tiny.tokenizer, batch_size=4).generate(PROMPTS, d)]
    c = [g.raw_text for g in Engine(tiny.model, tiny.tokenizer, batch_size=4).generate(
        PROMPTS, Decoding(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=4, stop_strings=()))]
    assert a == b and a != c


@pytest.mark.e2e
def test_real_model_greedy_batch_invariance():
    lm = load_model("smollm2-135m")
    d = Decoding(max_new_tokens=12)
    one = [g.raw_text for g in Engine(lm.model, lm.tokenizer, batch_size=1).generate(PROMPTS[:4], d)]
    four = [g.raw_text for g in Engine(lm.model, lm.tokenizer, batch_size=4).generate(PROMPTS[:4], d)]
    assert one == four
    assert any("Paris" in t for t in one)


@pytest.mark.e2e
def test_rows_finishing_at_different_steps_leave_the_same_output(monkeypatch):
    """Finished rows leave the batch and the last live rows move into their KV-cache slots; the
    greedy output is still that of one prompt at a time. (The real model: the tiny random one
    repeats one token, so its rows all end together.)"""
    from cai_bootstrap.generation import engine

    lm = load_model("smollm2-135m")

    orders = []
    real = engine._fill_order
    monkeypatch.setattr(engine, "_fill_order", lambda keep, batch: orders.append(real(keep, batch)) or orders[-1])
    d = Decoding(max_new_tokens=24, stop_strings=(".", "\n"))  # rows stop at different steps
    batched = Engine(lm.model, lm.tokenizer, batch_size=7).generate(PROMPTS, d)
    single = [Engine(lm.model, lm.tokenizer, batch_size=1).generate([p], d)[0] for p in PROMPTS]
    assert [g.raw_text for g in batched] == [g.raw_text for g in single]
    assert len({g.completion_tokens for g in batched}) > 2
    assert any(src != slot for order in orders for slot, src in enumerate(order))  # a row really moved


def test_fill_order_moves_only_rows_past_the_new_size():
    from cai_bootstrap.generation.engine import _fill_order

    assert _fill_order([0, 2, 3, 5], 6) == [0, 5, 2, 3]
    assert _fill_order([0, 1, 2], 4) == [0, 1, 2]  # the last row finished: nothing moves
    assert _fill_order([3, 4], 5) == [3, 4]
    assert _fill_order([1, 4, 6, 7], 8) == [4, 1, 6, 7]


def test_sliced_lm_head_gives_the_same_logits_and_is_removed_after(tiny, monkeypatch):
    import torch

    from cai_bootstrap.models import lm_head

    monkeypatch.setattr(lm_head, "vocab_slice", lambda tokens: 1000)  # several slices, the last one partial
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        plain = tiny.model(input_ids=ids).logits
        with lm_head.sliced_lm_head(tiny.model):
            assert "forward" in vars(tiny.model.get_output_embeddings())
            sliced = tiny.model(input_ids=ids).logits
    assert "forward" not in vars(tiny.model.get_output_embeddings())
    torch.testing.assert_close(sliced, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", [[0, 4, 2], [2, 0, 1]], ids=["movers-fill-holes", "any-order"])
def test_preallocated_layer_keeps_the_selected_rows(order):
    import torch

    from cai_bootstrap.generation.engine import _preallocated_layer

    layer = _preallocated_layer(capacity=6)()
    keys = torch.arange(5 * 2 * 4 * 3, dtype=torch.float32).view(5, 2, 4, 3)
    layer.update(keys, -keys)
    layer.batch_select_indices(torch.tensor(order))
    assert torch.equal(layer.keys, keys[order]) and torch.equal(layer.values, -keys[order])
    assert layer.get_seq_length() == 4 and layer._k.shape[2] == 6  # the capacity is kept
