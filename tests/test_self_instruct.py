"""Self-instruct prompt building and parsing of a base model's list continuation."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cai_bootstrap.data.self_instruct import (
    MAX_WORDS,
    MIN_WORDS,
    PROMPT_HEADER,
    RUNAWAY_MARKERS,
    build_prompt,
    parse_numbered_list,
)
from cai_bootstrap.formats import words
from cai_bootstrap.schemas import CATEGORIES, InstructionRecord

REASONS = {"meta", "no_letters", "too_short", "too_long", "unbalanced", "incomplete", "duplicate",
           "truncated", "template_marker", "unnumbered"}


def rec(i: int, text: str, category: str) -> InstructionRecord:
    return InstructionRecord(id=f"s{i}", instruction=text, category=category, source="builtin")


SEEDS = [rec(i * 10 + j, f"Seed task {j} of kind {c}.", c) for i, c in enumerate(CATEGORIES) for j in range(10)]


# ---- build_prompt ----------------------------------------------------------------------------


def numbered_lines(prompt: str) -> list[tuple[int, str]]:
    return [(int(m.group(1)), m.group(2)) for m in re.finditer(r"^(\d+)\. (.+)$", prompt, re.MULTILINE)]


def test_prompt_shape():
    prompt, nxt = build_prompt(SEEDS, random.Random(0), n_shown=8)
    assert prompt.startswith(PROMPT_HEADER)
    assert nxt == 9 and prompt.endswith("\n9.")
    lines = numbered_lines(prompt)
    assert [n for n, _ in lines] == list(range(1, 9))
    assert all(text.startswith("Seed task") for _, text in lines)


def test_prompt_is_diverse_across_categories():
    for seed in range(20):
        prompt, _ = build_prompt(SEEDS, random.Random(seed), n_shown=8)
        kinds = [re.search(r"of kind (\w+)", t).group(1) for _, t in numbered_lines(prompt)]
        assert set(kinds) == set(CATEGORIES)  # 8 slots, 6 categories: every one shown
        assert max(kinds.count(k) for k in kinds) == 2


def test_prompt_diversity_with_a_skewed_seed_pool():
    skewed = [rec(i, f"Question number {i} here?", "qa") for i in range(100)]
    skewed += [rec(1000, "Rewrite this sentence politely: Go away.", "transformation"),
               rec(1001, "List three kinds of cheese.", "constrained")]
    prompt, _ = build_prompt(skewed, random.Random(3), n_shown=5)
    assert "Go away" in prompt and "cheese" in prompt  # rare categories are not crowded out


def test_prompt_is_seeded():
    a = build_prompt(SEEDS, random.Random(7))
    assert a == build_prompt(SEEDS, random.Random(7))
    assert len({build_prompt(SEEDS, random.Random(s))[0] for s in range(10)}) > 5


def test_prompt_with_few_seeds_shows_each_once_on_one_line():
    seeds = [rec(1, "Translate to French:\nGood morning.", "transformation"),
             rec(2, "Name a color.", "qa"), rec(3, "name a colour", "qa"), rec(4, "Name a color!", "qa")]
    prompt, nxt = build_prompt(seeds, random.Random(0), n_shown=8)
    assert nxt == 4  # "Name a color!" normalises like "Name a color." and is shown once
    assert "1. " in prompt and "Translate to French: Good morning." in prompt
    assert prompt.count("\n") == PROMPT_HEADER.count("\n") + 3


def test_prompt_needs_seeds():
    with pytest.raises(ValueError):
        build_prompt([], random.Random(0))
    with pytest.raises(ValueError):
        build_prompt(SEEDS, random.Random(0), n_shown=0)


# ---- parse_numbered_list ---------------------------------------------------------------------

MESSY = """ Write a haiku about the first snow of winter.
10. Here are some more tasks:
11. List three ways to save energy at home
12. What is
13. Translate this sentence into Spanish:
The library opens at nine.
15. Explain why the (sky is blue.
16. 12345 !!!
17. Write a haiku about the first snow of winter
18. Describe your favourite meal in one sentence.
Instruction: Write a poem about the sea.
Response: The sea is wide.
19. This line is never reached."""


def test_messy_continuation():
    kept, dropped = parse_numbered_list(MESSY, 9)
    assert kept == [
        "Write a haiku about the first snow of winter.",
        "List three ways to save energy at home",
        "Translate this sentence into Spanish: The library opens at nine.",
        "Describe your favourite meal in one sentence.",
    ]
    assert dropped == [
        ("Here are some more tasks:", "meta"),
        ("What is", "too_short"),
        ("Explain why the (sky is blue.", "unbalanced"),
        ("12345 !!!", "no_letters"),
        ("Write a haiku about the first snow of winter", "duplicate"),
        ("Instruction: Write a poem about the sea.", "template_marker"),
    ]


def test_numbering_gaps_are_fine_but_a_restart_stops():
    text = " Name two rivers in Asia.\n12. Write a limerick about a cat.\n20. Describe a sunrise over the sea.\n1. Name two rivers in Asia.\n2. More text here please."
    kept, dropped = parse_numbered_list(text, 9)
    assert kept == ["Name two rivers in Asia.", "Write a limerick about a cat.", "Describe a sunrise over the sea."]
    assert dropped == []


def test_blank_line_stops():
    text = " Name two rivers in Asia.\n10. Write a limerick about a cat.\n\n11. Describe a sunrise over the sea.\n"
    kept, _ = parse_numbered_list(text, 9)
    assert kept == ["Name two rivers in Asia.", "Write a limerick about a cat."]


def test_leading_blank_lines_do_not_stop():
    kept, _ = parse_numbered_list("\n\n10. Write a limerick about a cat.\n", 9)
    assert kept == ["Write a limerick about a cat."]


@pytest.mark.parametrize("marker", ["Instruction:", "Response:", "Input:", "User:", "<|im_start|>"])
def test_runaway_markers_stop(marker):
    text = f" Name two rivers in Asia.\n10. {marker} Write a limerick.\n11. Describe a sunrise over the sea.\n"
    kept, dropped = parse_numbered_list(text, 9)
    assert kept == ["Name two rivers in Asia."]
    assert dropped == [(f"10. {marker} Write a limerick.", "template_marker")]


def test_truncated_last_line():
    text = " Name two rivers in Asia.\n10. Write a story about a dog who finds a bo"
    kept, dropped = parse_numbered_list(text, 9)
    assert kept == ["Name two rivers in Asia."]
    assert dropped == [("Write a story about a dog who finds a bo", "truncated")]
    # ... unless generation ended by itself, or the line was finished with a newline
    assert parse_numbered_list(text, 9, complete=True)[0][-1] == "Write a story about a dog who finds a bo"
    assert len(parse_numbered_list(text + "\n", 9)[0]) == 2
    # a finished sentence at the very end is kept; a missing period mid-list is fine
    kept, _ = parse_numbered_list(" Name two rivers\n10. Write a story about a dog.", 9)
    assert kept == ["Name two rivers", "Write a story about a dog."]


def test_length_limits():
    long = " ".join(["word"] * (MAX_WORDS + 1))
    ok = " ".join(["word"] * MAX_WORDS) + "."
    kept, dropped = parse_numbered_list(f" Go now.\n10. {long}\n11. {ok}\n", 9)
    assert kept == [ok]
    assert [r for _, r in dropped] == ["too_short", "too_long"]


def test_meta_and_unnumbered_lines():
    text = (" Sure! Here is the rest of the list:\n10. Write a short poem about rain.\n"
            "These tasks cover many topics.\nI hope this helps.\n11. Tasks:\n12. Tell me a joke about cats.\n")
    kept, dropped = parse_numbered_list(text, 9)
    assert kept == ["Write a short poem about rain.", "Tell me a joke about cats."]
    assert dropped == [
        ("Sure! Here is the rest of the list:", "meta"),
        ("These tasks cover many topics.", "meta"),
        ("I hope this helps.", "meta"),
        ("Tasks:", "meta"),
    ]
    kept, dropped = parse_numbered_list(" Write a short poem about rain.\nThe cat sat on the mat.\n", 9)
    assert dropped == [("The cat sat on the mat.", "unnumbered")]


def test_incomplete_and_unbalanced():
    text = ' Translate this sentence into German:\n10. Write the word "hello in five languages.\n11. Summarize [the text below.\n12. Describe a cat (briefly).\n'
    kept, dropped = parse_numbered_list(text, 9)
    assert kept == ["Describe a cat (briefly)."]
    assert [r for _, r in dropped] == ["incomplete", "unbalanced", "unbalanced"]


def test_cleaning_and_repeated_number_and_crlf():
    text = ' 9. **Write a poem about autumn.**\r\n10. "Name three kinds of birds."\r\n11. - Describe a quiet morning.\r\n'
    kept, _ = parse_numbered_list(text, 9)
    assert kept == ["Write a poem about autumn.", "Name three kinds of birds.", "Describe a quiet morning."]


def test_exclude_and_max_items():
    text = " Write a poem about autumn.\n10. Name three kinds of birds.\n11. Describe a quiet morning.\n"
    kept, dropped = parse_numbered_list(text, 9, exclude=["write a POEM about autumn"])
    assert kept == ["Name three kinds of birds.", "Describe a quiet morning."]
    assert dropped == [("Write a poem about autumn.", "duplicate")]
    kept, _ = parse_numbered_list(text, 9, max_items=2)
    assert kept == ["Write a poem about autumn.", "Name three kinds of birds."]


# ---- properties ------------------------------------------------------------------------------

WORD = st.sampled_from("apple river write describe explain the a of blue quickly garden ocean music".split())
INSTRUCTION = st.lists(WORD, min_size=MIN_WORDS, max_size=12).map(lambda ws: " ".join(ws).capitalize() + ".")


@given(items=st.lists(INSTRUCTION, min_size=1, max_size=8, unique_by=lambda s: s.lower()),
       start=st.integers(1, 30), gap=st.integers(1, 3))
def test_round_trip(items, start, gap):
    numbers = [start + k * gap for k in range(len(items))]
    text = " " + items[0] + "".join(f"\n{n}. {t}" for n, t in zip(numbers[1:], items[1:])) + "\n"
    kept, dropped = parse_numbered_list(text, start)
    assert kept == items and dropped == []


@settings(max_examples=100, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=400)
       | st.lists(st.one_of(INSTRUCTION, st.sampled_from(["", "10.", "Instruction: x", "11. Here are more:", "12) ok go"])),
                  max_size=10).map("\n".join))
def test_parse_never_crashes_and_kept_items_are_sane(text):
    kept, dropped = parse_numbered_list(text, 9)
    for item in kept:
        assert MIN_WORDS <= len(words(item)) <= MAX_WORDS
        assert not any(m in item for m in RUNAWAY_MARKERS)
        assert "\n" not in item and item == item.strip()
    assert len({w.lower() for w in kept}) == len(kept)
    assert {r for _, r in dropped} <= REASONS
