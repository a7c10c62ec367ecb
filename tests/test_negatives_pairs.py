"""Rule-built negatives (each kind has the property that makes it a negative) and the plan of the
synthetic share (the realised mix follows the weights exactly; shortfalls are reported)."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cai_bootstrap.config import NEGATIVE_KINDS
from cai_bootstrap.constraints import CONSTRAINT_PARAMS, check, count_words
from cai_bootstrap.data.negatives import (
    NEGATIVE_BUILDERS,
    OFF_TOPIC_MAX_OVERLAP,
    REFUSALS,
    VAGUE_CLOSERS,
    VAGUE_MIDDLES,
    VAGUE_OPENERS,
    build_negative,
    constraint_violations,
)
from cai_bootstrap.data.pairs import allocate, plan_kinds
from cai_bootstrap.formats import END_SUFFIX, completion_for
from cai_bootstrap.quality import is_refusal, matches_reference, topic_overlap
from cai_bootstrap.schemas import InstructionRecord


def rec(id, instruction, category="open", refs=(), constraints=(), template=None):
    return InstructionRecord(
        id=id, instruction=instruction, category=category, source="user",
        reference_answers=list(refs), constraints=list(constraints), template=template,
    )


def body(completion: str) -> str:
    """The response text inside a completion: leading space and a final END removed."""
    assert completion.startswith(" ")
    text = completion[1:]
    return text[: -len(END_SUFFIX)] if text.endswith(END_SUFFIX) else text


FRANCE = rec("q-fr", "What is the capital of France?", "qa", ["Paris"], template="qa-capital")
ITALY = rec("q-it", "What is the capital of Italy?", "qa", ["Rome"], template="qa-capital")
JAPAN = rec("q-jp", "What is the capital of Japan?", "qa", ["Tokyo"], template="qa-capital")
TIMES = rec("q-times", "What is 6 times 7?", "qa", ["42", "forty-two"], template="qa-times")
ICE = rec("q-ice", "Answer with yes or no: Is ice cold?", "qa", ["yes"], template="qa-yes-no")
VOLCANO = rec("o-volc", "Explain why volcanoes erupt.", "open")
VOLCANO2 = rec("o-volc2", "Describe volcanoes in two sentences.", "open")
BREAD = rec("o-bread", "Describe how to bake bread at home.", "open")
CHESS = rec("o-chess", "Give advice for a beginner chess player.", "open")

CHOSEN = {
    "q-fr": "The capital of France is Paris.",
    "q-it": "The capital of Italy is Rome.",
    "q-jp": "Tokyo is the capital of Japan.",
    "q-times": "Six times seven is forty-two (42).",
    "q-ice": "Yes, ice is cold.",
    "o-volc": "Volcanoes erupt when pressure from molten magma and gases builds up beneath the crust.",
    "o-volc2": "Volcanoes are openings in the crust. Magma erupts from volcanoes as lava.",
    "o-bread": "Mix flour, water, yeast and salt, let the dough rise, shape it and bake it until golden.",
    "o-chess": "Control the centre, develop your pieces early and keep your king safe by castling.",
}

# One item per IFEval instruction id, with a chosen response that follows it.
W, S = "length_constraints:number_words", "length_constraints:number_sentences"
CONSTRAINED = [
    (rec("c-maxw", "Describe the sea in fewer than 10 words.", "constrained",
         constraints=[{"type": W, "relation": "less than", "num_words": 10}]),
     "The sea is vast, blue and full of life."),
    (rec("c-sent", "Write one sentence about cats.", "constrained",
         constraints=[{"type": S, "relation": "less than", "num_sentences": 2}]),
     "Cats are curious animals."),
    (rec("c-list", "List three fruits as bullet points.", "format",
         constraints=[{"type": "detectable_format:number_bullet_lists", "num_bullets": 3}]),
     "- Apple\n- Banana\n- Orange"),
    (rec("c-comma", "Describe autumn without using commas.", "constrained", constraints=[{"type": "punctuation:no_comma"}]),
     "Autumn brings cool air and golden leaves."),
    (rec("c-lower", "Describe rain using only lowercase letters.", "format",
         constraints=[{"type": "change_case:english_lowercase"}]),
     "rain falls softly on the roof of the old house all night long."),
    (rec("c-upper", "Describe the sun using only capital letters.", "format",
         constraints=[{"type": "change_case:english_capital"}]),
     "THE SUN IS A HOT STAR THAT GIVES US LIGHT AND WARMTH EVERY DAY."),
    (rec("c-json", "Give three facts about owls as a JSON list of strings.", "format",
         constraints=[{"type": "detectable_format:json_format"}]),
     '["Owls hunt at night.", "Owls can turn their heads far.", "Owls have silent wings."]'),
    (rec("c-ends", 'Write a farewell note. Finish with the exact phrase "Goodbye."', "constrained",
         constraints=[{"type": "startend:end_checker", "end_phrase": "Goodbye."}]),
     "It was lovely working with you. Goodbye."),
    (rec("c-starts", 'Thank a friend for a gift in one paragraph that starts with the word "Dear".', "constrained",
         constraints=[{"type": "length_constraints:nth_paragraph_first_word", "num_paragraphs": 1, "nth_paragraph": 1,
                       "first_word": "dear"}]),
     "Dear friend, thank you for the lovely gift."),
    (rec("c-kw", 'Describe a town by the sea. Include the word "harbor".', "constrained",
         constraints=[{"type": "keywords:existence", "keywords": ["harbor"]}]),
     "The town has a busy harbor full of fishing boats."),
    (rec("c-freq", 'Describe a beach; use the word "sand" at least twice.', "constrained",
         constraints=[{"type": "keywords:frequency", "keyword": "sand", "frequency": 2, "relation": "at least"}]),
     "The sand is warm. Children build castles of sand."),
    (rec("c-forbid", 'Describe winter without the word "snow".', "constrained",
         constraints=[{"type": "keywords:forbidden_words", "forbidden_words": ["snow"]}]),
     "Winter brings short days and frosty mornings."),
    (rec("c-letter", 'Describe a dog without the letter "z".', "constrained",
         constraints=[{"type": "keywords:letter_frequency", "letter": "z", "let_frequency": 1, "let_relation": "less than"}]),
     "The dog runs after the ball in the park."),
    (rec("c-lang", "Greet a friend in French.", "format", constraints=[{"type": "language:response_language", "language": "fr"}]),
     "Bonjour mon ami, comment vas-tu aujourd'hui ? Je suis très content de te voir."),
    (rec("c-paras", "Write two paragraphs about tea, separated by ***.", "format",
         constraints=[{"type": "length_constraints:number_paragraphs", "num_paragraphs": 2}]),
     "Tea is a calm drink.\n***\nIt comes from many countries."),
    (rec("c-place", "Write a note template with two placeholders in square brackets.", "format",
         constraints=[{"type": "detectable_content:number_placeholders", "num_placeholders": 2}]),
     "Dear [name], see you on [date]."),
    (rec("c-ps", "Write a note about lunch. Add a postscript starting with P.S.", "format",
         constraints=[{"type": "detectable_content:postscript", "postscript_marker": "P.S."}]),
     "Lunch is at noon.\nP.S. Bring a friend."),
    (rec("c-options", "Is water wet? Answer with one of: My answer is yes. / My answer is no. / My answer is maybe.",
         "constrained", constraints=[{"type": "detectable_format:constrained_response"}]),
     "My answer is yes."),
    (rec("c-high", "Describe a park; highlight one section with *markdown*.", "format",
         constraints=[{"type": "detectable_format:number_highlighted_sections", "num_highlights": 1}]),
     "The park has a *quiet pond* and tall trees."),
    (rec("c-sect", "Explain rain in two sections marked Section 1 and Section 2.", "format",
         constraints=[{"type": "detectable_format:multiple_sections", "section_spliter": "Section", "num_sections": 2}]),
     "Section 1\nClouds gather water.\nSection 2\nThe water falls as rain."),
    (rec("c-title", "Write a poem with a title in double angular brackets.", "format",
         constraints=[{"type": "detectable_format:title"}]),
     "<<Morning>>\nThe sun comes up."),
    (rec("c-two", "Give two names for a cat separated by ******.", "format", constraints=[{"type": "combination:two_responses"}]),
     "Whiskers\n******\nShadow"),
    (rec("c-repeat", "Write a haiku. First repeat the request word for word.", "format",
         constraints=[{"type": "combination:repeat_prompt", "prompt_to_repeat": "Write a haiku."}]),
     "Write a haiku. Leaves fall on the pond."),
    (rec("c-caps", "Advertise a bike with at least two words in capitals.", "format",
         constraints=[{"type": "change_case:capital_word_frequency", "capital_frequency": 2, "capital_relation": "at least"}]),
     "This bike is FAST and LIGHT."),
    (rec("c-quote", "Describe the sky, wrapped in double quotation marks.", "format", constraints=[{"type": "startend:quotation"}]),
     '"The sky is clear and blue today."'),
]
ALL_ITEMS = [FRANCE, ITALY, JAPAN, TIMES, ICE, VOLCANO, VOLCANO2, BREAD, CHESS] + [i for i, _ in CONSTRAINED]
ALL_CHOSEN = {**CHOSEN, **{i.id: r for i, r in CONSTRAINED}}
OTHERS = [(i, ALL_CHOSEN[i.id]) for i in ALL_ITEMS]


def build(kind, item, seed=0, others=OTHERS, chosen=None):
    chosen = ALL_CHOSEN[item.id] if chosen is None else chosen
    return build_negative(kind, item, chosen, random.Random(seed), others)


# --------------------------------------------------------------------------------------------
# negatives


@pytest.mark.parametrize("template", REFUSALS)
def test_every_refusal_template_is_a_refusal(template):
    assert is_refusal(template)


def test_refusal():
    seen = set()
    for seed in range(40):
        completion, how = build("refusal", VOLCANO, seed)
        assert completion.endswith("\nEND") and is_refusal(body(completion))
        seen.add(how)
    assert len(seen) >= 4  # several templates are used


def test_refusal_equal_to_chosen_is_not_returned():
    seed = next(s for s in range(100) if random.Random(s).randrange(len(REFUSALS)) == 0)
    assert build("refusal", VOLCANO, seed, chosen=REFUSALS[1]) is not None
    assert build("refusal", VOLCANO, seed, chosen=REFUSALS[0]) is None


def test_constrained_fixtures_cover_every_constraint_type():
    assert {item.constraints[0]["type"] for item, _ in CONSTRAINED} == set(CONSTRAINT_PARAMS)
    assert len(CONSTRAINED) == 25


@pytest.mark.parametrize("item,chosen", CONSTRAINED, ids=[i.id for i, _ in CONSTRAINED])
def test_constraint_violation_breaks_the_constraint(item, chosen):
    spec = item.constraints[0]
    assert check(spec, chosen), "fixture: the chosen response must satisfy its constraint"
    (broken, kind), = constraint_violations(item, chosen)
    assert kind == spec["type"] and not check(spec, broken)
    hows = set()
    for seed in range(30):
        completion, how = build("format_violation", item, seed)
        hows.add(how)
        if how.startswith("format_violation:constraint:"):
            assert completion.endswith("\nEND")
            assert not check(spec, body(completion))
    assert f"format_violation:constraint:{spec['type']}" in hows


def test_structural_format_violations():
    chosen = CHOSEN["o-bread"]
    subs = set()
    for seed in range(60):
        completion, how = build("format_violation", BREAD, seed)
        sub = how.split(":")[1]
        subs.add(sub)
        if sub == "truncated":
            assert "END" not in completion
            text = completion[1:]
            assert chosen.startswith(text) and len(text) < len(chosen)
            assert not text.endswith((".", "!", "?"))
        elif sub == "missing_end":
            assert completion == " " + chosen
        elif sub == "ramble_no_end":
            assert completion.startswith(f" {chosen}\nInstruction: ") and "\nEND" not in completion
        else:
            pytest.fail(f"unexpected sub-kind {how}")
    assert subs == {"truncated", "missing_end", "ramble_no_end"}  # only endings generation can reach


def test_incorrect_fact_sibling_answer():
    wrongs = set()
    for seed in range(20):
        completion, how = build("incorrect_fact", FRANCE, seed)
        text = body(completion)
        assert completion.endswith("\nEND")
        assert not matches_reference(text, FRANCE.reference_answers)
        assert text.startswith("The capital of France is ")
        wrongs.add(text.removeprefix("The capital of France is ").rstrip("."))
    assert wrongs <= {"Rome", "Tokyo"} and wrongs  # a sibling's answer, same type


def test_incorrect_fact_number_replaces_every_form():
    for seed in range(20):
        completion, how = build("incorrect_fact", TIMES, seed)
        text = body(completion)
        assert not matches_reference(text, TIMES.reference_answers)
        assert "forty-two" not in text and "42" not in text
        assert any(ch.isdigit() for ch in text) and "number" in how


def test_incorrect_fact_yes_no_and_standalone():
    completion, _ = build("incorrect_fact", ICE)
    assert body(completion) == "No, ice is cold."
    # the chosen does not spell the reference: a standalone wrong answer
    completion, how = build("incorrect_fact", FRANCE, chosen="It is the City of Light.")
    assert "standalone" in how and body(completion) in ("Rome.", "Tokyo.")


def test_incorrect_fact_not_applicable():
    assert build("incorrect_fact", VOLCANO) is None  # no reference answers
    lonely = rec("q-lonely", "What is the national animal of Scotland?", "qa", ["unicorn"], template="qa-animal")
    assert build("incorrect_fact", lonely, chosen="The unicorn.", others=[(lonely, "The unicorn.")]) is None


def test_off_topic_low_overlap():
    sources = {r for _, r in OTHERS}
    for seed in range(20):
        completion, how = build("off_topic", VOLCANO, seed)
        text = body(completion)
        assert text in sources and text != CHOSEN["o-volc"] and text != CHOSEN["o-volc2"]
        assert topic_overlap(VOLCANO.instruction, text) <= OFF_TOPIC_MAX_OVERLAP
        assert how.startswith("off_topic:from=")
    only_same_topic = [(VOLCANO, CHOSEN["o-volc"]), (VOLCANO2, CHOSEN["o-volc2"])]
    assert build("off_topic", VOLCANO, others=only_same_topic) is None


SHORT_ANSWERS = ["yes", "no", "true", "false", *map(str, range(0, 21)), "100", "1000"]


def test_vague_pieces_cannot_match_short_answers():
    for piece in VAGUE_OPENERS + VAGUE_MIDDLES + VAGUE_CLOSERS:
        assert not matches_reference(piece, SHORT_ANSWERS), piece


def test_verbose_vague():
    texts = set()
    for seed in range(20):
        for item in (FRANCE, TIMES, ICE, VOLCANO):
            completion, how = build("verbose_vague", item, seed)
            text = body(completion)
            assert completion.endswith("\nEND")
            assert count_words(text) >= 40
            assert not matches_reference(text, item.reference_answers or ["volcanoes"])
            assert not is_refusal(text)
            texts.add(text)
    assert len(texts) > 10  # templates are mixed, not one fixed filler


def test_no_literal_backslash_n_and_distinct_from_chosen():
    for kind in NEGATIVE_KINDS:
        for item in ALL_ITEMS:
            for seed in range(5):
                built = build(kind, item, seed)
                if built is None:
                    continue
                completion, how = built
                assert "\\n" not in completion and "\\n" not in how
                assert completion.strip() != completion_for(ALL_CHOSEN[item.id]).strip()
                if "END" in completion:
                    assert "\nEND" in completion


def test_unknown_kind():
    assert tuple(NEGATIVE_BUILDERS) == NEGATIVE_KINDS
    with pytest.raises(KeyError, match="unknown negative kind"):
        build("sarcasm", VOLCANO)


_TEXT = st.text(alphabet=st.characters(codec="ascii", exclude_characters="\\\r\x0b\x0c"), min_size=1, max_size=80)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chosen=_TEXT.filter(lambda t: t.strip()), kind=st.sampled_from(NEGATIVE_KINDS), seed=st.integers(0, 10**6))
def test_builders_are_deterministic_and_never_return_the_chosen(chosen, kind, seed):
    item = FRANCE if kind == "incorrect_fact" else BREAD
    a = build(kind, item, seed, chosen=chosen)
    b = build(kind, item, seed, chosen=chosen)
    assert a == b
    if a is not None:
        completion, _ = a
        assert completion.strip() and completion.startswith(" ")
        assert completion.strip() != completion_for(chosen.strip()).strip()
        assert "\\n" not in completion


# --------------------------------------------------------------------------------------------
# allocation


def test_allocate_examples():
    w = {"refusal": 2, "format_violation": 1, "incorrect_fact": 1, "off_topic": 0, "verbose_vague": 1}
    assert allocate(750, w) == {"refusal": 300, "format_violation": 150, "incorrect_fact": 150,
                                "off_topic": 0, "verbose_vague": 150}
    assert allocate(10, {"c": 1, "b": 1, "a": 1}) == {"a": 4, "b": 3, "c": 3}  # ties: by name
    assert allocate(3, {"a": 1, "b": 2}) == {"a": 1, "b": 2}
    assert allocate(4, {"a": 0.6, "b": 0.4}) == {"a": 2, "b": 2}  # the larger remainder wins, not the weight
    assert allocate(0, {"a": 1}) == {"a": 0}
    for bad in ({"a": -1, "b": 2}, {"a": 0}, {}, {"a": float("nan")}):
        with pytest.raises(ValueError):
            allocate(5, bad)


@given(n=st.integers(0, 2000),
       weights=st.dictionaries(st.sampled_from("abcdef"), st.floats(0, 10, allow_nan=False), min_size=1)
       .filter(lambda w: sum(w.values()) > 0))
def test_allocate_is_exact_largest_remainder(n, weights):
    counts = allocate(n, weights)
    assert sum(counts.values()) == n and set(counts) == set(weights)
    total = sum(Fraction(w) for w in weights.values())
    for k, w in weights.items():
        quota = n * Fraction(w) / total
        assert math.floor(quota) <= counts[k] <= math.ceil(quota)
        if w == 0:
            assert counts[k] == 0
    assert allocate(n, dict(reversed(list(weights.items())))) == counts  # order of keys is irrelevant
    rem = {k: n * Fraction(w) / total - math.floor(n * Fraction(w) / total) for k, w in weights.items()}
    got_seat = [k for k in weights if counts[k] > math.floor(n * Fraction(weights[k]) / total)]
    passed_over = [k for k in weights if k not in got_seat]
    assert all(rem[a] >= rem[b] for a in got_seat for b in passed_over)  # seats go to the largest remainders


# --------------------------------------------------------------------------------------------
# the rule-built kinds of the synthetic share

TOPICS = ("volcanoes penguins bicycles gardens glaciers lighthouses violins deserts rainbows tigers "
          "satellites bakeries castles rivers telescopes orchards pyramids submarines meadows comets").split()
WEIGHTS = {"refusal": 2, "format_violation": 1, "incorrect_fact": 1, "off_topic": 0, "verbose_vague": 1}


def synthetic(n, ref_every=2):
    items = []
    for k in range(n):
        if k % ref_every == 0:
            a, b = k % 50, k // 50 + 1
            items.append(rec(f"s{k:04d}", f"What is {a} plus {b}? ({k})", "qa", [str(a + b)], template="qa-plus"))
        else:
            topic = TOPICS[k % len(TOPICS)]
            items.append(rec(f"s{k:04d}", f"Write a sentence about {topic} (variant {k}).", "open",
                             template=f"open-{topic}"))
    return items


def items_by_id(items):
    return {i.id: i for i in items}


def test_plan_follows_the_weights_exactly():
    items = synthetic(1000)
    plan = plan_kinds(items, WEIGHTS, seed=7)
    assert plan.counts == plan.targets == allocate(1000, WEIGHTS) == {
        "refusal": 400, "format_violation": 200, "incorrect_fact": 200, "off_topic": 0, "verbose_vague": 200}
    assert not plan.shortfall and not plan.unassigned and list(plan.assignment) == [i.id for i in items]
    by_id = items_by_id(items)
    assert all(by_id[i].reference_answers for i, k in plan.assignment.items() if k == "incorrect_fact")
    other = plan_kinds(items, WEIGHTS, seed=8)
    assert other.counts == plan.counts and other.assignment != plan.assignment  # same counts, other members
    assert plan_kinds(items, WEIGHTS, seed=7) == plan


def test_shortfall_when_few_items_have_references():
    items = synthetic(100, ref_every=20)  # 5 items with references
    plan = plan_kinds(items, dict.fromkeys(NEGATIVE_KINDS, 1.0), seed=0)
    assert plan.targets["incorrect_fact"] == 20 and plan.shortfall == {"incorrect_fact": 15}
    # incorrect_fact takes all 5, the other 95 follow the other weights exactly
    assert plan.counts == {"refusal": 24, "format_violation": 24, "incorrect_fact": 5, "off_topic": 24,
                           "verbose_vague": 23}
    assert allocate(95, {k: 1.0 for k in NEGATIVE_KINDS if k != "incorrect_fact"}) == {
        "refusal": 24, "format_violation": 24, "off_topic": 24, "verbose_vague": 23}
    # nothing else has weight: the items left over get no kind
    plan = plan_kinds(items, {"incorrect_fact": 1.0}, seed=0)
    assert plan.counts["incorrect_fact"] == 5 and plan.shortfall == {"incorrect_fact": 95}
    assert len(plan.unassigned) == 95


def test_plan_kinds_errors():
    items = synthetic(20)
    with pytest.raises(ValueError, match="unknown negative kinds"):
        plan_kinds(items, {"sarcasm": 1.0}, 0)
    with pytest.raises(ValueError, match="positive sum"):
        plan_kinds(items, {"refusal": 0.0}, 0)
    with pytest.raises(ValueError, match="unique"):
        plan_kinds(items + items[:1], WEIGHTS, 0)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 120),
    ref_every=st.integers(1, 12),
    weights=st.fixed_dictionaries({k: st.sampled_from([0.0, 0.5, 1.0, 3.0]) for k in NEGATIVE_KINDS})
    .filter(lambda w: sum(w.values()) > 0),
    seed=st.integers(0, 1000),
)
def test_plan_invariants(n, ref_every, weights, seed):
    items = synthetic(n, ref_every=ref_every)
    plan = plan_kinds(items, weights, seed)
    by_id = items_by_id(items)
    realised = dict.fromkeys(plan.counts, 0)
    for i, kind in plan.assignment.items():
        realised[kind] += 1
        if kind == "incorrect_fact":
            assert by_id[i].reference_answers
        assert weights[kind] > 0, f"kind {kind} has weight 0"
    assert realised == plan.counts
    assert sum(plan.counts.values()) + len(plan.unassigned) == n
    if not plan.shortfall.get("incorrect_fact"):
        assert plan.counts == allocate(n, weights)
    else:
        filled = plan.counts["incorrect_fact"]
        assert filled == plan.targets["incorrect_fact"] - plan.shortfall["incorrect_fact"]
        rest = {k: w for k, w in weights.items() if k != "incorrect_fact"}
        if sum(rest.values()) > 0:
            assert {k: plan.counts[k] for k in rest} == allocate(n - filled, rest)
        assert filled == sum(1 for i in items if i.reference_answers)  # every reference item took it


def test_incorrect_fact_keeps_the_echoed_instruction():
    proverb = rec("q-prov", "Complete the proverb: All's well that ends", "completion", ["well"], template="proverb")
    sibling = rec("q-prov2", "Complete the proverb: The early bird catches the", "completion", ["worm"], template="proverb")
    others = [(proverb, "All's well that ends well."), (sibling, "The early bird catches the worm.")]
    completion, how = build("incorrect_fact", proverb, chosen="All's well that ends well.", others=others)
    # replacing only the answer would leave "well" in the text, which still matches: standalone
    assert body(completion) == "Worm." and "standalone" in how
    completion, how = build("incorrect_fact", sibling, chosen="The early bird catches the worm.", others=others)
    assert body(completion) == "The early bird catches the well." and "replaced" in how
