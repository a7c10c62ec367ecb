"""The nine evaluation criteria on hand-labelled responses, including ones that must fail."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cai_bootstrap.evaluation import criteria as C
from cai_bootstrap.formats import cut_response, prompt_for
from cai_bootstrap.schemas import EvalResponse, EvalScore, InstructionRecord


def make_item(instruction="What is the capital of France?", category="qa", refs=(), constraints=()):
    return InstructionRecord(
        id="t1",
        instruction=instruction,
        category=category,
        source="builtin",
        reference_answers=list(refs),
        constraints=list(constraints),
    )


def make_response(raw: str, item: InstructionRecord | None = None, finish_reason=None, max_new_tokens=128):
    """An EvalResponse as the engine would write it for this raw completion."""
    cut = cut_response(raw)
    if finish_reason is None:
        finish_reason = "stop" if cut.marker else "eos"
    return EvalResponse(
        id="t1",
        model="m",
        prompt=prompt_for(item.instruction if item else "Q?"),
        raw_text=raw,
        response=cut.response,
        stop_string=cut.marker if finish_reason == "stop" else None,
        finish_reason=finish_reason,
        prompt_tokens=10,
        completion_tokens=20,
        max_new_tokens=max_new_tokens,
    )


FRANCE = make_item(refs=["Paris"])
GOOD = make_response(" Paris is the capital of France.\nEND", FRANCE)
RAMBLE = make_response(" Paris.\nInstruction: What is the capital of Spain?\nResponse: Madrid.", FRANCE)


def test_criteria_names_and_order():
    assert C.CRITERIA == (
        "ends_with_end",
        "proper_structure",
        "no_rambling",
        "addresses_instruction",
        "appropriate_length",
        "no_unwarranted_refusal",
        "factually_correct",
        "coherent",
        "on_topic",
    )


def test_a_good_answer_passes_everything():
    scores = C.score(FRANCE, GOOD)
    assert list(scores) == list(C.CRITERIA)
    assert all(v is True for v in scores.values()), scores
    EvalScore(id="t1", model="m", category="qa", criteria=scores)  # fits the artifact schema


def test_rambling_into_a_new_instruction():
    assert C.ends_with_end(FRANCE, RAMBLE) is False
    assert C.no_rambling(FRANCE, RAMBLE) is False
    assert C.factually_correct(FRANCE, RAMBLE) is True  # what it did answer is right
    assert C.proper_structure(FRANCE, RAMBLE) is True  # the cut body is clean


# ---- ends_with_end ----------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [" Paris.\nEND", "Paris\nEND\n", " END", "END", " Paris.\nEND\nInstruction: x"])
def test_ends_with_end(raw):
    assert C.ends_with_end(FRANCE, make_response(raw)) is True


@pytest.mark.parametrize(
    "raw",
    [
        " Paris.",  # eos without END
        " Paris. END",  # END not on its own line
        " Paris.\nENDING soon",  # END as part of a word
        " Paris.\nUser: thanks\nEND",  # a runaway marker came first
        " Paris.\nend",
        "",
    ],
)
def test_does_not_end_with_end(raw):
    assert C.ends_with_end(FRANCE, make_response(raw)) is False


# ---- proper_structure --------------------------------------------------------------------------


def test_proper_structure():
    assert C.proper_structure(FRANCE, GOOD) is True
    assert C.proper_structure(FRANCE, make_response(" \nEND")) is False  # empty body
    assert C.proper_structure(FRANCE, make_response(" Paris. Response: Paris.\nEND")) is False
    assert C.proper_structure(FRANCE, make_response(" Paris<|eot_id|> more\nEND")) is False
    assert C.proper_structure(FRANCE, make_response(" Paris [/INST]\nEND")) is False
    assert C.proper_structure(FRANCE, make_response(" ### Instruction: more\nEND")) is False


# ---- no_rambling -------------------------------------------------------------------------------


def test_no_rambling():
    assert C.no_rambling(FRANCE, GOOD) is True
    assert C.no_rambling(FRANCE, make_response(" Paris.")) is True  # eos is fine
    assert C.no_rambling(FRANCE, make_response(" Paris is " + "very " * 50, finish_reason="length")) is False
    assert C.no_rambling(FRANCE, make_response(" Paris.\nQuestion: and Spain?")) is False
    assert C.no_rambling(FRANCE, make_response(" Paris.<|im_start|>user")) is False
    # the raw text says it ran away even if the engine recorded no stop string
    assert C.no_rambling(FRANCE, make_response(" Paris.\nHuman: ok", finish_reason="eos")) is False


# ---- addresses_instruction ---------------------------------------------------------------------


def test_addresses_instruction_positive():
    assert C.addresses_instruction(FRANCE, GOOD) is True
    assert C.addresses_instruction(FRANCE, make_response(" Paris.\nEND")) is True  # reference
    no_ref = make_item("Explain why volcanoes erupt.", category="open")
    assert C.addresses_instruction(no_ref, make_response(" Volcanoes erupt when magma rises.\nEND")) is True
    completion = make_item("Complete the sentence: The sun rises in the", category="completion")
    assert C.addresses_instruction(completion, make_response(" east.\nEND")) is True
    fruits = make_item("List three fruits.", category="format",
                       constraints=[{"type": "detectable_format:number_bullet_lists", "num_bullets": 3}])
    assert C.addresses_instruction(fruits, make_response(" Sure:\n- apple\n- pear\n- plum\nEND")) is True
    joke = make_item("Tell me a joke.", category="open")  # one topic word: benefit of doubt
    assert C.addresses_instruction(joke, make_response(" Why did the chicken cross the road?\nEND")) is True


def test_addresses_instruction_negative():
    assert C.addresses_instruction(FRANCE, make_response(" \nEND")) is False
    assert C.addresses_instruction(FRANCE, make_response(" I'm sorry, but I cannot help with that.\nEND")) is False
    assert C.addresses_instruction(FRANCE, make_response(" What is the capital of France?\nEND")) is False
    no_ref = make_item("Explain why volcanoes erupt.", category="open")
    assert C.addresses_instruction(no_ref, make_response(" Cats like to sleep in the sun.\nEND")) is False
    completion = make_item("Complete the sentence: The sun rises in the", category="completion")
    assert C.addresses_instruction(completion, make_response(" The sun rises in the\nEND")) is False
    joke = make_item("Tell me a joke.", category="open")
    assert C.addresses_instruction(joke, make_response(" ha ha ha ha ha ha ha ha\nEND")) is False


# ---- appropriate_length ------------------------------------------------------------------------


def test_long_but_correct_answer_passes_appropriate_length():
    long = " Paris. " + "It has a long history of art, food and culture. " * 20 + "\nEND"
    assert C.appropriate_length(FRANCE, make_response(long)) is True
    wrong_long = long.replace("Paris", "Lyon")
    assert C.appropriate_length(FRANCE, make_response(wrong_long)) is False
    no_ref = make_item("Why is the sky blue?")
    assert C.appropriate_length(no_ref, make_response(long)) is False


def test_appropriate_length_category_bounds():
    completion = make_item("Complete the sentence: The sun rises in the", category="completion")
    assert C.appropriate_length(completion, make_response(" east.\nEND")) is True
    assert C.appropriate_length(completion, make_response(" east " + "and more " * 40 + "\nEND")) is False
    assert C.appropriate_length(completion, make_response(" ...\nEND")) is False  # no word at all
    assert C.appropriate_length(FRANCE, make_response(" \nEND")) is False


def test_appropriate_length_stated_bounds_win():
    short = make_item("Describe Paris in at most 5 words.", category="constrained",
                      constraints=[{"type": "length_constraints:number_words", "relation": "less than", "num_words": 6}], refs=["Paris"])
    assert C.appropriate_length(short, make_response(" Paris: lovely, old, bright.\nEND")) is True
    assert C.appropriate_length(short, make_response(" Sure, here it is:\nParis is lovely.\nEND")) is True  # loose
    # a stated maximum binds even a correct answer
    assert C.appropriate_length(short, make_response(" Paris is a lovely old bright city.\nEND")) is False
    essay = make_item("Write about rivers in at least 300 words.", category="open",
                      constraints=[{"type": "length_constraints:number_words", "relation": "at least", "num_words": 300}])
    text = " " + "Rivers carry water to the sea. " * 50 + "\nEND"  # 300 words > the open bound of 250
    assert C.appropriate_length(essay, make_response(text)) is True
    assert C.appropriate_length(essay, make_response(" Rivers flow.\nEND")) is False
    assert C.appropriate_length(essay, make_response(" " + "Rivers carry water to the sea. " * 110)) is False
    two = make_item("Describe rain in exactly two sentences.", category="constrained",
                    constraints=[{"type": "length_constraints:number_sentences", "relation": "at least", "num_sentences": 2},
                                 {"type": "length_constraints:number_sentences", "relation": "less than", "num_sentences": 3}])
    assert C.appropriate_length(two, make_response(" Rain falls. It is wet.\nEND")) is True
    assert C.appropriate_length(two, make_response(" Rain falls. It is wet. I like it.\nEND")) is False


# ---- refusal, facts, coherence ------------------------------------------------------------------


def test_no_unwarranted_refusal():
    assert C.no_unwarranted_refusal(FRANCE, GOOD) is True
    assert C.no_unwarranted_refusal(FRANCE, make_response(" I'm sorry, but as an AI I cannot\nEND")) is False
    assert C.no_unwarranted_refusal(FRANCE, make_response(" As an AI, I don't know.\nEND")) is False


def test_factually_correct():
    assert C.factually_correct(make_item(), GOOD) is None  # no reference
    assert C.factually_correct(FRANCE, GOOD) is True
    assert C.factually_correct(FRANCE, make_response(" Lyon.\nEND")) is False
    months = make_item("How many months are in a year?", refs=["12", "twelve"])
    assert C.factually_correct(months, make_response(" Twelve.\nEND")) is True
    eggs = make_item("How many eggs are in a dozen?", refs=["12"])
    assert C.factually_correct(eggs, make_response(" twelve\nEND")) is True
    assert C.factually_correct(eggs, make_response(" 120 eggs\nEND")) is False


def test_coherent():
    assert C.coherent(FRANCE, GOOD) is True
    assert C.coherent(FRANCE, make_response(" " + "I like it. " * 30, finish_reason="length")) is False
    assert C.coherent(FRANCE, make_response(" %%%@@@###&&&\nEND")) is False
    assert C.coherent(FRANCE, make_response(" \nEND")) is False


# ---- on_topic ----------------------------------------------------------------------------------


def test_on_topic():
    volcano = make_item("Explain why volcanoes erupt.", category="open")
    assert C.on_topic(volcano, make_response(" A volcano erupts when gas pressure builds up.\nEND")) is True
    off = " Cats sleep for most of the day and enjoy warm sunny windows.\nEND"
    assert C.on_topic(volcano, make_response(off)) is False
    assert C.on_topic(volcano, make_response(" Magma.\nEND")) is None  # too short to judge by words
    assert C.on_topic(volcano, make_response(" \nEND")) is False
    assert C.on_topic(FRANCE, make_response(" Paris.\nEND")) is True  # reference match
    assert C.on_topic(make_item("Please explain.", category="open"), make_response(off)) is None
    completion = make_item("Complete the sentence: The sun rises in the", category="completion")
    assert C.on_topic(completion, make_response(off)) is None


# ---- checks -----------------------------------------------------------------------------------


def test_score_checks():
    assert C.score_checks(FRANCE, GOOD) == (None, None)
    lower = make_item("Name a colour in lowercase.", category="constrained",
                      constraints=[{"type": "change_case:english_lowercase"},
                                   {"type": "length_constraints:number_words", "relation": "less than", "num_words": 9}])
    assert C.score_checks(lower, make_response(" the sky is blue and clear today\nEND")) == (True, True)
    assert C.score_checks(lower, make_response(" Sure thing!\nthe sky is blue and clear today\nEND")) == (False, True)
    assert C.score_checks(lower, make_response(" The sky is blue and clear today\nEND")) == (False, False)


def test_score_refuses_a_mismatched_id():
    other = make_item().model_copy(update={"id": "t2"})
    with pytest.raises(ValueError):
        C.score(other, GOOD)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200), st.sampled_from(["stop", "eos", "length"]))
def test_score_never_raises(raw, finish):
    r = make_response(raw)
    if finish != "stop":
        r = r.model_copy(update={"finish_reason": finish, "stop_string": None})
    item = make_item(refs=["Paris"], constraints=[{"type": "length_constraints:number_words", "relation": "less than", "num_words": 6}])
    scores = C.score(item, r)
    assert set(scores) == set(C.CRITERIA)
    assert all(v in (True, False, None) for v in scores.values())
    assert C.score_checks(item, r)[0] in (True, False)


# ---- addresses_instruction: degenerate answers (hand-labelled, both directions) -----------------

STORY = make_item("Write a short story about a baby dragon who meets a stranger on a train.", category="open")
FORMAL = make_item("Rewrite this sentence to sound more formal: hey whats up, can u send me the file",
                   category="transformation")
PROVERB = make_item("Complete the proverb: Curiosity killed the", category="completion", refs=["cat"])
SUMMARY = make_item("Summarize in one sentence: Bees collect nectar from flowers and turn it into honey, which "
                    "they store in their hives for the winter.", category="transformation",
                    constraints=[{"type": "length_constraints:number_sentences", "relation": "less than",
                                  "num_sentences": 2}])
PAST = make_item("Rewrite in the past tense: She walks to school.", category="transformation")
PLURAL = make_item("Change this sentence to the plural: The cat sits on the mat.", category="transformation")
QUESTION = make_item("Turn this statement into a question: The sky is blue.", category="transformation")
LOWER = make_item("Rewrite in lowercase: THE CAT SAT", category="format")
TRANSLATE = make_item("Translate into French: Good morning", category="transformation")
YES_NO = make_item("Answer with yes or no: Is the sun a star?", category="constrained", refs=["yes"],
                   constraints=[{"type": "length_constraints:number_words", "relation": "less than", "num_words": 2}])
CHOICE = make_item("Which is bigger, an elephant or a mouse?", category="open")
MESSAGE = make_item("Respond to this message: I got a new puppy!", category="transformation")
MARKET = make_item("Describe a busy market.", category="open")
ELEVATOR = make_item("Explain how an elevator works.", category="open")


@pytest.mark.parametrize("item, text", [
    (STORY, "The baby dragon is a baby dragon who meets a stranger on a train."),  # tautology
    (STORY, "A baby dragon meets a stranger on a train."),  # the prompt, restated
    (FORMAL, "hey whats up, can u send me the file"),  # the input, unchanged
    (FORMAL, "Hey, whats up? Can u send me the file."),  # case and punctuation only
    (FORMAL, "Here it is: hey whats up can u send me the file"),  # the input in a frame
    (PROVERB, "Curiosity killed the"),  # a bare fragment of the prompt
    (PROVERB, "Curiosity"),
    (SUMMARY, "Bees collect nectar from flowers and turn it into honey, which they store in their hives "
              "for the winter."),  # summary = the passage
    (PAST, "She walks to school."),
    (PLURAL, "The cat sits on the mat."),
    (QUESTION, "The sky is blue."),
    (LOWER, "THE CAT SAT"),  # a case task judges case
    (TRANSLATE, "Good morning"),
    (YES_NO, "Is the sun a star?"),  # the question handed back
    (MESSAGE, "I got a new puppy!"),
    (FRANCE, "The capital of France."),  # restates the question, no answer
    (MARKET, "A busy market."),
    (ELEVATOR, "The elevator is a type of elevator that moves up aais."),  # circular (the demo's sft)
    (ELEVATOR, "An elevator is a kind of elevator."),
])
def test_addresses_instruction_fails_degenerate_answers(item, text):
    assert C.addresses_instruction(item, make_response(f" {text}\nEND", item)) is False


@pytest.mark.parametrize("item, text", [
    (STORY, "A baby dragon named Ember boarded the night train and shared her snacks with an old sailor, "
            "who told her stories of the sea."),
    (FORMAL, "Hello, could you please send me the file?"),
    (PROVERB, "Curiosity killed the cat."),
    (PROVERB, "cat"),
    (SUMMARY, "Bees make honey from nectar and store it for winter."),
    (PAST, "She walked to school."),  # one word changed: a correct transformation is a near-copy by design
    (PLURAL, "The cats sit on the mats."),
    (QUESTION, "Is the sky blue?"),
    (LOWER, "the cat sat"),
    (YES_NO, "Yes."),
    (YES_NO, "No."),  # wrong, but it picks an offered option: an attempt, not a fragment
    (CHOICE, "A mouse."),
    (MESSAGE, "Congratulations on your new puppy! What is its name?"),
    (FRANCE, "The capital of France is Paris."),
    (FRANCE, "Lyon is the capital of France."),  # wrong, but an attempt: factually_correct judges it
    (MARKET, "The busy market is full of people buying fruit and bread."),
    (ELEVATOR, "An elevator is a kind of lift: a motor pulls its car up and down a shaft on steel cables."),
    (ELEVATOR, "The elevator is a type of elevator. A motor pulls the car up and down a shaft on steel "
               "cables, and a counterweight balances it."),  # a weak start, then an explanation
])
def test_addresses_instruction_keeps_passing_good_answers(item, text):
    assert C.addresses_instruction(item, make_response(f" {text}\nEND", item)) is True


# ---- factually_correct: the answer, not a mention (hand-labelled, both directions) -------------

SUM = make_item("What is 8 plus 9?", refs=["17", "seventeen"])
TIMES = make_item("What is 5 times 1?", refs=["5"])
SPIDER = make_item("How many legs does a spider have?", refs=["8", "eight"])
CONTINENT = make_item("On which continent is France?", refs=["Europe"])
STAR = make_item("Is the sun a star?", refs=["yes"])
GRAMS = make_item("How many grams are in a kilogram?", refs=["1000"])
HALF = make_item("What is half of 7?", refs=["3.5"])


@pytest.mark.parametrize("item, text", [
    (SUM, "It could be 15, 16, 17 or 18."),  # hedged list of candidates
    (SUM, "Between 16 and 18."),
    (SUM, "Maybe 17, maybe 18."),
    (SUM, "15. Actually, 17."),  # takes itself back
    (SUM, "It is not 17, it is 18."),  # the reference only negated
    (SUM, "170"),  # numbers compare as numbers, not substrings
    (TIMES, "5 times 1 is 6."),  # the operand echoed is not the answer
    (TIMES, "1"),
    (CONTINENT, "Not Europe, it is in Asia."),
    (CONTINENT, "It is not in Europe."),
    (CONTINENT, "Europe, Asia or Africa."),
    (CONTINENT, "Europe. Actually, Asia."),
    (STAR, "Yes. Actually no."),  # contradicts itself
    (STAR, "No, it is a planet."),
    (STAR, "The sun is a star, no doubt about it."),  # no yes/no answer at all: "no doubt" is not one
    (FRANCE, "Lyon, not Paris."),
    (FRANCE, "Paris or Lyon."),
])
def test_factually_correct_fails_hedged_negated_and_contradicted_answers(item, text):
    assert C.factually_correct(item, make_response(f" {text}\nEND", item)) is False


@pytest.mark.parametrize("item, text", [
    (SUM, "8 plus 9 is 17."),  # a correct answer inside a full sentence
    (SUM, "Seventeen."),  # number words as digits
    (SUM, "17.0"),
    (SUM, "The answer is 17, not 18."),
    (TIMES, "5 times 1 is 5."),
    (TIMES, "5"),
    (SPIDER, "A spider has eight legs and two body parts."),  # other numbers that are not alternatives
    (GRAMS, "There are 1,000 grams in a kilogram."),
    (HALF, "Half of 7 is 3.5."),
    (CONTINENT, "France is in Europe, not Asia."),
    (CONTINENT, "Europe."),
    (STAR, "Yes, the sun is a star."),
    (STAR, "Yes it is."),
    (STAR, "I think yes."),
    (STAR, "Well, yes."),
    (STAR, "The sun is a star, so the answer is yes."),
    (FRANCE, "No doubt about it: the capital of France is Paris."),
    (FRANCE, "It is Paris, actually."),
])
def test_factually_correct_keeps_passing_correct_answers(item, text):
    assert C.factually_correct(item, make_response(f" {text}\nEND", item)) is True
