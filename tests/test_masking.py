"""Golden tests for response-only masks with the real SmolLM2 tokenizer.

Every check decodes the supervised tokens and compares them with the text that must be learned:
`` {response}\\nEND`` followed by EOS (``<|im_end|>``, id 2, for SmolLM2).
"""

from __future__ import annotations

import io

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cai_bootstrap.formats import RESPONSE_SEPARATOR, completion_for, prompt_for, training_text
from cai_bootstrap.training.masking import (
    IGNORE_INDEX,
    Dropped,
    Encoded,
    MaskingError,
    ResponseOnlyCollator,
    check_invariants,
    encode_dataset,
    encode_item,
    encode_pair,
    encode_raw,
    inspect_masks,
    render_masks,
    separator_variants,
    supervised_token_count,
)

EOS_TEXT = "<|im_end|>"


def decode(tokenizer, ids):
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def supervised_text(tokenizer, enc: Encoded) -> str:
    return decode(tokenizer, [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX])


def prompt_text(tokenizer, enc: Encoded) -> str:
    return decode(tokenizer, [t for t, label in zip(enc.input_ids, enc.labels) if label == IGNORE_INDEX])


def both(tokenizer, instruction, response, max_length=512, **kw):
    pair = encode_pair(tokenizer, prompt_for(instruction), response, max_length=max_length, **kw)
    raw = encode_raw(tokenizer, training_text(instruction, response), max_length=max_length, **kw)
    return pair, raw


def test_canonical_example_golden_ids(tokenizer):
    pair, raw = both(tokenizer, "hi", "ok")
    assert isinstance(pair, Encoded)
    tokens = tokenizer.convert_ids_to_tokens(pair.input_ids)
    assert tokens == ["Instruction", ":", "Ġhi", "Ċ", "Response", ":", "Ġok", "Ċ", "END", EOS_TEXT]
    assert pair.labels == [IGNORE_INDEX] * 6 + pair.input_ids[6:]
    assert pair.input_ids[-1] == tokenizer.eos_token_id == 2
    assert (pair.n_prompt_tokens, pair.n_supervised_tokens, pair.truncated_prompt_tokens) == (6, 4, 0)
    assert pair.attention_mask == [1] * 10
    assert raw == pair


def test_no_bos_by_default_and_explicit_bos_is_unsupervised(tokenizer):
    plain = encode_pair(tokenizer, prompt_for("hi"), "ok", max_length=64)
    with_bos = encode_pair(tokenizer, prompt_for("hi"), "ok", max_length=64, add_bos=True)
    assert tokenizer.bos_token_id not in plain.input_ids
    assert with_bos.input_ids == [tokenizer.bos_token_id] + plain.input_ids
    assert with_bos.labels == [IGNORE_INDEX] + plain.labels
    assert with_bos.n_prompt_tokens == plain.n_prompt_tokens + 1
    raw_bos = encode_raw(tokenizer, training_text("hi", "ok"), max_length=64, add_bos=True)
    assert raw_bos == with_bos


AWKWARD = [
    pytest.param("Explain what '\nResponse:' means", "It marks where the answer starts.", id="separator-in-instruction"),
    pytest.param("Say Response: twice\nResponse:\nResponse:", "Response: Response:", id="many-separators"),
    pytest.param("Translate to Japanese: good morning", "おはようございます 🌅 — 早上好", id="cjk-emoji"),
    pytest.param("Emoji only", "👍🏽👨‍👩‍👧", id="zwj-emoji"),
    pytest.param("List two items", "\n- one\n- two", id="starts-with-newline"),
    pytest.param("Punctuate", "!?... yes.", id="starts-with-punctuation"),
    pytest.param("Quote", ":) fine", id="starts-with-colon-punct"),
    pytest.param("Indent", "   indented", id="starts-with-spaces"),
    pytest.param("Trailing", "trailing spaces   ", id="trailing-spaces"),
    pytest.param("Blank lines", "a\n\n\nb\n", id="newlines-before-end"),
    pytest.param("Instruction ends in newline\n", "ok", id="instruction-trailing-newline"),
    pytest.param("Instruction ends in space ", "ok", id="instruction-trailing-space"),
    pytest.param("", "empty instruction still works", id="empty-instruction"),
    pytest.param("Mention END", "The word END\nis not the end", id="end-inside-response"),
]


@pytest.mark.parametrize(("instruction", "response"), AWKWARD)
def test_supervised_span_decodes_to_completion(tokenizer, instruction, response):
    pair, raw = both(tokenizer, instruction, response)
    for enc in (pair, raw):
        assert isinstance(enc, Encoded), enc
        assert supervised_text(tokenizer, enc) == completion_for(response) + EOS_TEXT
        assert prompt_text(tokenizer, enc) == prompt_for(instruction)
        assert check_invariants(tokenizer, enc) is None
    assert raw.labels == pair.labels and raw.input_ids == pair.input_ids


def test_separator_inside_instruction_takes_last_occurrence(tokenizer):
    text = "Instruction: Explain what \nResponse: means\nResponse: A label.\nEND"
    enc = encode_raw(tokenizer, text, max_length=128)
    assert supervised_text(tokenizer, enc) == " A label.\nEND" + EOS_TEXT
    # The instruction's own separator is in the prompt, unsupervised.
    assert prompt_text(tokenizer, enc) == "Instruction: Explain what \nResponse: means\nResponse:"
    variants = separator_variants(tokenizer)
    occurrences = sum(
        1
        for v in variants
        for i in range(len(enc.input_ids))
        if tuple(enc.input_ids[i : i + len(v)]) == v and len(v) == max(map(len, variants))
    )
    assert occurrences == 2  # the search saw both and chose the last


def test_response_containing_separator_is_split_at_it_in_raw_text(tokenizer):
    # Documented limitation: raw text cannot tell a separator inside the response from the real one,
    # and the last-separator rule puts the response's head into the prompt. The structured path is exact.
    response = "first\nResponse: second"
    pair, raw = both(tokenizer, "q", response)
    assert supervised_text(tokenizer, pair) == completion_for(response) + EOS_TEXT
    assert supervised_text(tokenizer, raw) == " second\nEND" + EOS_TEXT


def test_no_space_after_colon(tokenizer):
    enc = encode_raw(tokenizer, "Instruction: hi\nResponse:ok\nEND", max_length=64)
    assert tokenizer.convert_ids_to_tokens(enc.input_ids)[5:] == [":", "ok", "Ċ", "END", EOS_TEXT]
    assert supervised_text(tokenizer, enc) == "ok\nEND" + EOS_TEXT
    assert enc.n_prompt_tokens == 6


def test_few_shot_raw_text_supervises_only_the_last_response(tokenizer):
    text = training_text("a", "A") + "\n\n" + training_text("b", "B")
    enc = encode_raw(tokenizer, text, max_length=128)
    assert supervised_text(tokenizer, enc) == " B\nEND" + EOS_TEXT
    assert prompt_text(tokenizer, enc) == training_text("a", "A") + "\n\n" + prompt_for("b")


def test_trailing_whitespace_after_end_is_ignored(tokenizer):
    enc = encode_raw(tokenizer, training_text("hi", "ok") + "\n  \n", max_length=64)
    assert enc == encode_pair(tokenizer, prompt_for("hi"), "ok", max_length=64)


def test_separator_variants_cover_plain_tokenization(tokenizer):
    variants = separator_variants(tokenizer)
    plain = tuple(tokenizer(RESPONSE_SEPARATOR, add_special_tokens=False).input_ids)
    assert plain in variants
    assert tuple(tokenizer("Response:", add_special_tokens=False).input_ids) in variants


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param("Instruction: hi\nok\nEND", "no_separator", id="no-separator"),
        pytest.param("Instruction: hi\nEND\nResponse: ok", "no_end", id="separator-only-after-end"),
        pytest.param("Instruction: hi\nResponse: ok", "no_end", id="end-missing"),
        pytest.param("Instruction: hi\nResponse: ok\nEND.", "no_end", id="end-not-last"),
        pytest.param("Instruction: hi\nResponse:   \nEND", "empty_response", id="empty-response"),
        pytest.param("Instruction: hi\nResponse::)\nEND", "boundary_merged", id="colon-merges-with-response"),
        pytest.param("Instruction: hi\nResponse: ok<|im_end|>\nEND", "special_token_text", id="special-token"),
        pytest.param("Instruction: hi Response: ok\nEND", "no_separator", id="separator-without-newline"),
    ],
)
def test_unfindable_boundary_is_dropped(tokenizer, text, reason):
    result = encode_raw(tokenizer, text, max_length=64)
    assert isinstance(result, Dropped)
    assert result.reason == reason
    assert result.detail


@pytest.mark.parametrize("bad", ["\U00040000", "\x04", "\U00080000"], ids=["plane4", "ctrl-04", "plane8"])
def test_text_the_tokenizer_cannot_represent_is_dropped(tokenizer, bad):
    # SmolLM2's vocabulary has no token for bytes 0xF1-0xF2 nor 0x04, and silently drops them.
    for instruction, response in ((f"x{bad}", "ok"), ("x", f"ok {bad}")):
        pair, raw = both(tokenizer, instruction, response)
        assert isinstance(pair, Dropped) and pair.reason == "lossy_tokenization", pair
        assert isinstance(raw, Dropped) and raw.reason == "lossy_tokenization", raw
    assert isinstance(encode_pair(tokenizer, prompt_for("x"), "ok \U0001F600", max_length=64), Encoded)


def test_structured_drops(tokenizer):
    assert encode_pair(tokenizer, "Instruction: hi", "ok", max_length=64).reason == "bad_prompt"
    assert encode_pair(tokenizer, prompt_for("hi"), " \n ", max_length=64).reason == "empty_response"
    assert encode_pair(tokenizer, prompt_for("hi"), "a<|endoftext|>", max_length=64).reason == "special_token_text"


# ---------------------------------------------------------------------------------------------
# truncation


def test_long_prompt_is_left_truncated_keeping_separator_and_completion(tokenizer):
    instruction = " ".join(f"word{i}" for i in range(200))
    response = "The answer."
    full = encode_pair(tokenizer, prompt_for(instruction), response, max_length=4096)
    max_length = 40
    for enc in both(tokenizer, instruction, response, max_length=max_length):
        assert isinstance(enc, Encoded)
        assert len(enc.input_ids) == max_length
        assert enc.truncated_prompt_tokens == full.n_prompt_tokens - enc.n_prompt_tokens > 0
        assert enc.input_ids == full.input_ids[enc.truncated_prompt_tokens :]  # dropped from the left only
        assert supervised_text(tokenizer, enc) == completion_for(response) + EOS_TEXT
        kept = prompt_text(tokenizer, enc)
        assert kept.endswith("word199" + RESPONSE_SEPARATOR)
        assert not kept.startswith("Instruction:")


def test_truncation_respects_minimum_prompt_length(tokenizer):
    instruction = " ".join(f"w{i}" for i in range(100))
    response = "short"
    n_completion = len(tokenizer(completion_for(response), add_special_tokens=False).input_ids) + 1
    at_floor = encode_pair(
        tokenizer, prompt_for(instruction), response, max_length=n_completion + 16, min_prompt_tokens=16
    )
    assert isinstance(at_floor, Encoded) and at_floor.n_prompt_tokens == 16
    below = encode_pair(
        tokenizer, prompt_for(instruction), response, max_length=n_completion + 15, min_prompt_tokens=16
    )
    assert isinstance(below, Dropped) and below.reason == "too_long"
    assert "max_length" in below.detail


def test_long_response_is_dropped_never_cut(tokenizer):
    response = "long " * 100
    for enc in both(tokenizer, "hi", response, max_length=50):
        assert isinstance(enc, Dropped) and enc.reason == "too_long"


def test_short_prompt_that_does_not_fit_is_dropped(tokenizer):
    # prompt (6 tokens) is below the minimum; it must be kept whole or the example dropped.
    enc = encode_pair(tokenizer, prompt_for("hi"), "ok", max_length=9)
    assert isinstance(enc, Dropped) and enc.reason == "too_long"
    assert isinstance(encode_pair(tokenizer, prompt_for("hi"), "ok", max_length=10), Encoded)


# ---------------------------------------------------------------------------------------------
# invariants, dataset, collator, inspection


def test_end_and_eos_always_supervised(tokenizer):
    for instruction, response in [("a", "b"), ("x" * 50, "y\n" * 20), ("数学", "1 + 1 = 2")]:
        for enc in both(tokenizer, instruction, response, max_length=64):
            sup = [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]
            assert sup[-1] == tokenizer.eos_token_id
            assert tokenizer.convert_ids_to_tokens(sup[-3:-1]) == ["Ċ", "END"]
            assert enc.labels[: enc.n_prompt_tokens] == [IGNORE_INDEX] * enc.n_prompt_tokens


def test_check_invariants_catches_broken_masks(tokenizer):
    good = encode_pair(tokenizer, prompt_for("hi"), "ok", max_length=64)
    assert check_invariants(tokenizer, good) is None
    no_eos = Encoded(good.input_ids[:-1], good.labels[:-1], good.attention_mask[:-1], 6, 3)
    assert "EOS" in check_invariants(tokenizer, no_eos)
    prompt_supervised = Encoded(good.input_ids, list(good.input_ids), good.attention_mask, 6, 4)
    assert "prompt" in check_invariants(tokenizer, prompt_supervised)
    end_masked = Encoded(good.input_ids, good.labels[:-2] + [IGNORE_INDEX, 2], good.attention_mask, 6, 4)
    assert check_invariants(tokenizer, end_masked) is not None


def test_encode_dataset_counts_drops_and_raises_past_share(tokenizer):
    good = [{"id": f"g{i}", "prompt": prompt_for(f"q{i}"), "response": f"a{i}"} for i in range(9)]
    bad = [{"id": "b0", "text": "Instruction: no separator here\nEND"}]
    encoded, drops = encode_dataset(tokenizer, good + bad, max_length=64, add_bos=False, max_drop_share=0.1)
    assert len(encoded) == 9 and drops == {"no_separator": 1}
    with pytest.raises(MaskingError) as err:
        encode_dataset(tokenizer, good + bad, max_length=64, add_bos=False, max_drop_share=0.05)
    message = str(err.value)
    assert "1 of 10" in message and "no_separator: 1" in message and "5.0%" in message and "b0" in message
    encoded, drops = encode_dataset(tokenizer, good, max_length=64, add_bos=False)
    assert len(encoded) == 9 and drops == {}


def test_encode_item_rejects_malformed_records(tokenizer):
    with pytest.raises(MaskingError, match="r1"):
        encode_item(tokenizer, {"id": "r1", "instruction": "x"}, max_length=64)


def test_collator_padding_is_never_supervised(tokenizer):
    a = encode_pair(tokenizer, prompt_for("hi"), "ok", max_length=64)
    b = encode_pair(tokenizer, prompt_for("a much longer instruction here"), "and a longer answer", max_length=64)
    pad = tokenizer.pad_token_id
    assert pad == tokenizer.eos_token_id  # the dangerous case: pad id is the EOS id
    batch = ResponseOnlyCollator(pad_token_id=pad, pad_to_multiple_of=8)([a, b.__dict__])
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= len(b.input_ids)
    for row, enc in enumerate((a, b)):
        n = len(enc.input_ids)
        assert batch["input_ids"][row, :n].tolist() == enc.input_ids
        assert batch["labels"][row, :n].tolist() == enc.labels
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == pad).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        # the real EOS stays supervised even though padding uses the same id
        assert batch["labels"][row, n - 1].item() == tokenizer.eos_token_id
    assert supervised_token_count(batch) == a.n_supervised_tokens + b.n_supervised_tokens
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype


def test_inspect_and_render_masks(tokenizer):
    from rich.console import Console

    records = [
        {"id": "p", "prompt": prompt_for("hi"), "response": "ok"},
        {"id": "r", "text": "Instruction: hi\nResponse:ok\nEND"},
        {"id": "x", "text": "Instruction: broken"},
        {"id": "not-shown", "prompt": prompt_for("hi"), "response": "ok"},
    ]
    rows = inspect_masks(tokenizer, records, 3)
    assert [r["id"] for r in rows] == ["p", "r", "x"]
    assert rows[0]["supervised_text"] == " ok\nEND" + EOS_TEXT and rows[0]["dropped"] is None
    assert (rows[0]["n_prompt_tokens"], rows[0]["n_supervised_tokens"]) == (6, 4)
    assert rows[1]["supervised_text"] == "ok\nEND" + EOS_TEXT
    assert rows[2]["dropped"] == "no_end" and rows[2]["supervised_text"] is None
    console = Console(file=io.StringIO(), width=100, color_system="truecolor", force_terminal=True)
    render_masks(tokenizer, records, 3, console=console)
    out = console.file.getvalue()
    assert "DROPPED (no_end)" in out and "supervised 4" in out and "\x1b[" in out


# ---------------------------------------------------------------------------------------------
# property: never a wrong mask

# Printable text mixed with the format's own pieces, so separators and END turn up in odd places.
TEXT = st.lists(
    st.one_of(
        st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=8),
        st.sampled_from(["\n", " ", ":", "Response", "END", "\nResponse:", "\nEND", "Instruction:", "\t"]),
    ),
    max_size=8,
).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(instruction=TEXT, response=TEXT)
def test_property_supervised_span_is_the_completion_or_dropped(tokenizer, instruction, response):
    pair, raw = both(tokenizer, instruction, response, max_length=1024)
    if not response.strip():
        assert isinstance(pair, Dropped) and pair.reason == "empty_response"
        return
    missing = (0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xF1, 0xF2)  # bytes absent from SmolLM2's vocabulary
    if any(b in missing for b in training_text(instruction, response).encode()):
        assert isinstance(pair, Dropped) and pair.reason == "lossy_tokenization"
        assert isinstance(raw, Dropped)  # both paths refuse
        return
    assert isinstance(pair, Encoded), pair  # nothing else can go wrong with a structured pair
    assert supervised_text(tokenizer, pair) == completion_for(response) + EOS_TEXT
    assert prompt_text(tokenizer, pair) == prompt_for(instruction)
    assume(RESPONSE_SEPARATOR not in completion_for(response))  # the documented raw-text ambiguity
    if isinstance(raw, Dropped):
        pytest.fail(f"raw text dropped: {raw}")  # canonical text always has a clean boundary here
    assert supervised_text(tokenizer, raw) == completion_for(response) + EOS_TEXT
    assert (raw.input_ids, raw.labels) == (pair.input_ids, pair.labels)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT.map(lambda t: "Instruction: " + t))
def test_property_raw_text_never_supervises_prompt(tokenizer, text):
    """Arbitrary (often malformed) raw text: either dropped, or the mask matches the char-space split."""
    result = encode_raw(tokenizer, text, max_length=1024)
    if isinstance(result, Dropped):
        assert result.reason in {
            "no_end", "no_separator", "empty_response", "boundary_merged", "special_token_text", "lossy_tokenization"
        }
        return
    stripped = text.rstrip()
    cut = stripped.rfind(RESPONSE_SEPARATOR, 0, len(stripped) - len("\nEND")) + len(RESPONSE_SEPARATOR)
    assert prompt_text(tokenizer, result) == stripped[:cut]
    assert supervised_text(tokenizer, result) == stripped[cut:] + EOS_TEXT
