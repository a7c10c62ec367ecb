"""Shared text predicates: hand-labelled positive and negative cases, plus a few properties."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cai_bootstrap import quality
from cai_bootstrap.formats import RUNAWAY_MARKERS
from cai_bootstrap.quality import (
    content_words,
    copies_instruction,
    has_template_residue,
    is_coherent,
    is_refusal,
    is_runaway,
    matches_reference,
    normalize_answer,
    repetition_ratio,
    stem,
    topic_overlap,
    topic_words,
)


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but as an AI I cannot do that.",
        "I’m sorry, but I can’t help with that.",
        "As an AI language model, I don't have opinions.",
        "I cannot provide that information.",
        "Sorry, I can't answer questions like this.",
        "I apologize, but I must decline.",
        "Unfortunately, I am unable to fulfil this request.",
        "I'm just an AI, so I have no favourite colour.",
        "I can't.",
        "I'm sorry.",
        "I am not able to write poems.",
        "That request goes against my guidelines.",
    ],
)
def test_refusals(text):
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "The capital of France is Paris.",
        "I cannot believe how fast time flies.",  # a completion, not a refusal
        "I'm sorry to hear that. Rest and drink water.",
        "We can help each other.",
        "The robot could not open the door.",
        "",
    ],
)
def test_not_refusals(text):
    assert not is_refusal(text)


def test_copies_instruction():
    q = "What is the capital of France?"
    assert copies_instruction(q, q)
    assert copies_instruction(q, "what is the capital of france")
    assert copies_instruction(q, "What is capital of France?")  # near-identical
    assert copies_instruction(q, "What is the capital of France? What is the capital of France?")
    assert not copies_instruction(q, "What is the capital of France? Paris.")  # echo + answer
    assert not copies_instruction(q, "Paris.")
    assert not copies_instruction(q, "France")  # a word of it is no copy
    assert not copies_instruction("Rewrite in lowercase: THE CAT SAT.", "the cat sat.")
    assert not copies_instruction("Say hello.", "Hello!")
    assert not copies_instruction(q, "")


@pytest.mark.parametrize(
    "text",
    [
        "Paris.\nInstruction: Name a river.",
        "Paris. Response: Paris.",
        "Paris<|im_end|>",
        "<|endoftext|>",
        "### Response: Paris",
        "Sure.\n### Instruction: Name a river.",
        "Paris\nEND",
        "[INST] hi [/INST]",
        "response: Paris",
    ],
)
def test_template_residue(text):
    assert has_template_residue(text)


@pytest.mark.parametrize(
    "text",
    ["Paris.", "The instructions say: stir well.", "The END of the story.", "My response is yes.", "Ends here."],
)
def test_no_template_residue(text):
    assert not has_template_residue(text)


def test_is_runaway():
    for marker in RUNAWAY_MARKERS:
        assert is_runaway(marker)
    assert not is_runaway("\nEND")
    assert not is_runaway(None)


def test_repetition_ratio():
    assert repetition_ratio("") == 0.0
    assert repetition_ratio("The quick brown fox jumps over the lazy dog.") == 0.0
    assert repetition_ratio("the cat sat " * 30) > 0.9
    assert repetition_ratio("Paris Paris Paris Paris") == 0.75
    assert 0.0 <= repetition_ratio("a b a b a b a b") <= 1.0


@pytest.mark.parametrize(
    "text",
    [
        "Paris",
        "12",
        "2 + 2 = 4",
        '{"a": 1, "b": [1, {"c": 2}]}',
        "**Paris** is the capital of France.",
        "- apple\n- pear\n- plum",
        "NASA and HTML are acronyms.",
        "The capital is Paris. The capital is Paris.",  # said twice: tolerated
        "Rhythm and myth.",
        "Bonjour, ça va ? 你好。",
        "---\nA rule above.",
    ],
)
def test_coherent(text):
    assert is_coherent(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "...!?",
        "the weather is nice " * 30,
        "Paris Paris Paris Paris",
        "It is. It is. It is. It is. It is.",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "#@%&~^|#@%&~^| ok",
        "xkcdq zzrtp bvcxz lkjhg",
        "a" * 10 + "b" * 10 + "c" * 30,
    ],
)
def test_incoherent(text):
    assert not is_coherent(text)


def test_stem_maps_forms_together():
    for a, b in [("planets", "planet"), ("chased", "chase"), ("running", "run"), ("flies", "fly"),
                 ("boxes", "box"), ("horses", "horse"), ("baking", "bake"), ("stopped", "stop")]:
        assert stem(a) == stem(b), (a, b)
    assert stem("12") == "12"
    assert stem("bus") == "bus"


def test_content_words():
    assert content_words("The planets are orbiting the Sun!") == {stem("planets"), stem("orbiting"), "sun"}
    assert content_words("It is what it is.") == set()
    assert "7" in content_words("What is 7 times 8?")
    assert content_words("France's capital") == {stem("france"), stem("capital")}


def test_topic_words_drop_instruction_verbs():
    assert topic_words("Write three sentences about volcanoes.") == {stem("volcanoes")}
    assert topic_words("What is the capital of France?") == {stem("capital"), stem("France")}
    assert topic_words("Please explain briefly.") == set()


def test_topic_overlap():
    q = "Explain why volcanoes erupt."
    assert topic_overlap(q, "Volcanoes erupt when magma pressure builds.") == 1.0
    assert topic_overlap(q, "Cats sleep a lot.") == 0.0
    assert topic_overlap("What is the capital of France?", "The capital city is lovely.") == 0.5
    assert topic_overlap("Please explain.", "Anything.") == 0.0


@pytest.mark.parametrize(
    "response,refs",
    [
        ("twelve", ["12"]),
        ("There are 12 months.", ["twelve"]),
        ("The answer is twenty-one.", ["21"]),
        ("Paris.", ["Paris"]),
        ("It is the city of Paris, France.", ["paris"]),
        ("The Pacific Ocean", ["Pacific"]),
        ("About 1,000 people.", ["1000"]),
        ("São Paulo", ["Sao Paulo"]),
        ("one hundred and five", ["105"]),
        ("An apple", ["apple", "pear"]),
        ("Shakespeare's play", ["Shakespeare"]),
    ],
)
def test_matches_reference(response, refs):
    assert matches_reference(response, refs)


@pytest.mark.parametrize(
    "response,refs",
    [
        ("Parisian food is great.", ["Paris"]),
        ("123", ["12"]),
        ("one two", ["3"]),
        ("London.", ["Paris"]),
        ("", ["Paris"]),
        ("The", ["the"]),  # a reference of articles only says nothing
        ("Paris", []),
    ],
)
def test_does_not_match_reference(response, refs):
    assert not matches_reference(response, refs)


def test_normalize_answer():
    assert normalize_answer("The Twelve Apostles!") == "12 apostles"
    assert normalize_answer("two thousand three hundred") == "2300"
    assert normalize_answer("one two three") == "1 2 3"


# ---- properties ----------------------------------------------------------------------------

WORDS = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789"), min_size=1, max_size=10)


@settings(max_examples=150, deadline=None)
@given(st.lists(WORDS, min_size=1, max_size=4))
def test_a_reference_matches_itself_in_context(ws):
    ref = " ".join(ws)
    assume(normalize_answer(ref))
    assert matches_reference(ref, [ref])
    assert matches_reference(f"I think the answer is {ref}, really.", [ref.upper()])


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300), st.text(max_size=100))
def test_predicates_never_raise_and_stay_in_range(text, other):
    assert 0.0 <= repetition_ratio(text) <= 1.0
    assert 0.0 <= topic_overlap(other, text) <= 1.0
    for fn in (is_refusal, has_template_residue, is_coherent):
        assert isinstance(fn(text), bool)
    assert isinstance(copies_instruction(other, text), bool)
    assert isinstance(matches_reference(text, [other]), bool)
    assert isinstance(quality.content_words(text), set)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=100))
def test_a_text_copies_itself(text):
    assume(quality.folded_words(text))
    assert copies_instruction(text, text)
