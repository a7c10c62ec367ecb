"""Verifiable constraints: hand-labelled pass/fail cases per type, strict vs loose, spec validation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cai_bootstrap.constraints import (
    CONSTRAINT_PARAMS,
    check,
    check_all,
    count_sentences,
    count_words,
    list_items,
    loose_variants,
    split_sentences,
    validate_spec,
)

# (spec, passing response, failing response) for every constraint type, judged strictly.
CASES = [
    ({"type": "max_words", "n": 5}, "Paris is the capital.", "Paris is the capital of France."),
    ({"type": "min_words", "n": 5}, "Paris is the capital of France.", "Paris."),
    ({"type": "num_list_items", "n": 3}, "- apple\n- pear\n- plum", "- apple\n- pear"),
    ({"type": "num_list_items", "n": 2}, "1. Mix.\n2) Bake.", "1. Mix.\n2) Bake.\n3. Eat."),
    ({"type": "num_sentences", "n": 2}, "It rains. We stay in!", "It rains. We stay in. We read."),
    ({"type": "no_commas"}, "Red and blue and green.", "Red, blue and green."),
    ({"type": "no_commas"}, "Red and blue.", "Red，blue."),
    ({"type": "all_lowercase"}, "the sky is blue.", "The sky is blue."),
    ({"type": "all_uppercase"}, "THE SKY IS BLUE!", "THE SKY IS Blue!"),
    ({"type": "json_format"}, '{"name": "Ada", "age": 36}', '{"name": "Ada", age: 36}'),
    ({"type": "json_format"}, "[1, 2, 3]", "42"),
    ({"type": "ends_with", "phrase": "Any other questions?"}, "That is all. Any other questions?", "Any other questions? That is all."),
    ({"type": "ends_with", "phrase": "cat"}, "I saw a cat.", "I saw a bobcat."),
    ({"type": "starts_with", "phrase": "Yes"}, "Yes, it is.", "Yesterday it was."),
    ({"type": "starts_with", "phrase": "My answer is"}, "  my answer is 4.", "Well, my answer is 4."),
    ({"type": "contains_keyword", "keyword": "ocean"}, "The Ocean is deep.", "Oceanic trenches are deep."),
    ({"type": "contains_keyword", "keyword": "machine learning"}, "We use Machine\nLearning daily.", "We use machines daily."),
]


def test_every_type_has_a_case():
    assert {spec["type"] for spec, _, _ in CASES} == set(CONSTRAINT_PARAMS)


@pytest.mark.parametrize("spec,good,bad", CASES, ids=[f"{c[0]['type']}-{i}" for i, c in enumerate(CASES)])
def test_strict_pass_and_fail(spec, good, bad):
    assert check(spec, good) is True
    assert check(spec, bad) is False


@pytest.mark.parametrize("spec,good,bad", CASES, ids=[f"{c[0]['type']}-{i}" for i, c in enumerate(CASES)])
def test_loose_accepts_what_strict_accepts(spec, good, bad):
    assert check(spec, good, loose=True) is True


@pytest.mark.parametrize(
    "spec,response",
    [
        ({"type": "starts_with", "phrase": "Dear Sam"}, "Sure, here it is:\nDear Sam, thanks."),
        ({"type": "all_lowercase"}, "Sure, here it is:\nthe sky is blue."),
        ({"type": "no_commas"}, "Sure, here it is:\nRed and blue."),
        ({"type": "max_words", "n": 3}, "Here is my answer:\nParis is lovely."),
        ({"type": "num_sentences", "n": 1}, "Okay.\nParis is lovely."),
        ({"type": "ends_with", "phrase": "See you soon"}, "Bye for now. See you soon.\nHope this helps!"),
        ({"type": "ends_with", "phrase": "See you soon"}, "Bye. **See you soon**"),
        ({"type": "starts_with", "phrase": "Yes"}, "**Yes**, it is."),
        ({"type": "json_format"}, 'Here is the JSON:\n```json\n{"a": 1}\n```'),
        ({"type": "json_format"}, '```\n[1, 2]\n```'),
    ],
)
def test_loose_forgives_preamble_signoff_markdown_and_fences(spec, response):
    assert check(spec, response) is False
    assert check(spec, response, loose=True) is True


@pytest.mark.parametrize(
    "spec,response",
    [
        ({"type": "max_words", "n": 3}, "Paris is a lovely old city."),
        ({"type": "all_lowercase"}, "Intro\nThe Sky Is Blue.\noutro"),
        ({"type": "json_format"}, "```json\n{not json}\n```"),
        ({"type": "contains_keyword", "keyword": "tiger"}, "Sure:\nLions are big.\nBye"),
    ],
)
def test_loose_still_fails_real_violations(spec, response):
    assert check(spec, response, loose=True) is False


def test_empty_response_fails_every_check():
    specs = [{"type": "max_words", "n": 5}, {"type": "no_commas"}]
    for spec in specs:
        assert check(spec, "   ") is False
        assert check(spec, "", loose=True) is False
    assert check_all(specs, "") == (False, False)


def test_case_checks_need_a_letter_with_case():
    for kind in ("all_lowercase", "all_uppercase"):
        assert check({"type": kind}, "123 + 4 = 127") is False
        assert check({"type": kind}, "你好", loose=True) is False


def test_check_all():
    specs = [{"type": "max_words", "n": 5}, {"type": "all_lowercase"}]
    assert check_all([], "Anything") == (None, None)
    assert check_all(specs, "paris, france.") == (True, True)
    assert check_all(specs, "Sure:\nparis, france.") == (False, True)
    assert check_all(specs, "Paris, France.") == (False, False)
    # loose is per constraint: each may use a different variant
    specs2 = [{"type": "starts_with", "phrase": "yes"}, {"type": "ends_with", "phrase": "done"}]
    assert check_all(specs2, "Yes, first.\nmiddle\nlast line") == (False, False)
    assert check_all(specs2, "Intro\nyes it is done\nBye") == (False, True)


def test_word_counting():
    assert count_words("") == 0
    assert count_words("don't stop") == 2
    assert count_words("a well-known fact") == 3
    assert count_words("pi is 3.14 and 1,000 is big") == 7
    assert count_words("Hello,world") == 1  # no space: one run
    assert count_words("Hello, world!") == 2


def test_list_items():
    text = "Intro:\n- a\n  * b\n• c\n1. d\n10) e\n**bold** line\n-no space\n3.14 is pi"
    assert list_items(text) == ["- a", "* b", "• c", "1. d", "10) e"]
    assert list_items("No list here.") == []


def test_sentence_splitting():
    assert split_sentences("Mr. Smith met Dr. Who. They talked!") == ["Mr. Smith met Dr. Who.", "They talked!"]
    assert count_sentences("J. K. Rowling wrote it. Pi is 3.14 roughly.") == 2
    assert count_sentences("First line\nSecond line") == 2
    assert count_sentences('He said "Stop." Then he left.') == 2
    assert count_sentences("Use e.g. apples or i.e. fruit.") == 1
    assert count_sentences("...\n\n") == 0


def test_loose_variants():
    assert loose_variants("a\n*b*\nc") == ["a\n*b*\nc", "*b*\nc", "a\n*b*", "*b*", "a\nb\nc", "b\nc", "a\nb", "b"]
    assert loose_variants("one line") == ["one line"]


@pytest.mark.parametrize(
    "spec,message",
    [
        ("max_words", "must be an object"),
        ({"type": "max_chars", "n": 3}, "unknown constraint type"),
        ({"n": 3}, "unknown constraint type"),
        ({"type": "max_words"}, "needs 'n'"),
        ({"type": "max_words", "n": 0}, "positive integer"),
        ({"type": "max_words", "n": True}, "positive integer"),
        ({"type": "max_words", "n": "5"}, "positive integer"),
        ({"type": "ends_with", "phrase": "  "}, "non-empty string"),
        ({"type": "no_commas", "n": 1}, "unknown keys"),
    ],
)
def test_validate_spec_rejects(spec, message):
    with pytest.raises(ValueError, match=message):
        validate_spec(spec)
    if isinstance(spec, dict):
        with pytest.raises(ValueError):
            check(spec, "text")


# ---- properties ----------------------------------------------------------------------------

ALL_SPECS = [spec for spec, _, _ in CASES]


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_checks_never_raise_and_strict_implies_loose(text):
    for spec in ALL_SPECS:
        strict = check(spec, text)
        loose = check(spec, text, loose=True)
        assert isinstance(strict, bool) and isinstance(loose, bool)
        assert loose or not strict


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=100).filter(lambda t: any(c.lower() != c.upper() for c in t.lower())))
def test_lowercasing_makes_all_lowercase_pass(text):
    assert check({"type": "all_lowercase"}, text.lower())


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=80), st.text(max_size=80))
def test_word_count_is_additive_over_white_space(a, b):
    assert count_words(a + " " + b) == count_words(a) + count_words(b)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=8), min_size=1, max_size=6))
def test_a_keyword_is_found_inside_a_sentence(ws):
    keyword = " ".join(ws)
    assert check({"type": "contains_keyword", "keyword": keyword}, f"Here: {keyword}!")
    assert check({"type": "starts_with", "phrase": keyword}, f"{keyword} is it.")
    assert check({"type": "ends_with", "phrase": keyword}, f"It is {keyword}.")
