"""The canonical format, cleaning at stop markers (property tests) and the SFT quality filters."""

from hypothesis import given
from hypothesis import strategies as st

from cai_bootstrap.data.sft_quality import qc_reason
from cai_bootstrap.formats import (
    END_SUFFIX,
    RUNAWAY_MARKERS,
    STOP_STRINGS,
    Example,
    choose_shots,
    cut_response,
    few_shot_prompt,
    prompt_for,
    training_text,
)
from cai_bootstrap.schemas import InstructionRecord

marker_free = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80).filter(
    lambda t: not any(s in t for s in STOP_STRINGS) and not t.lstrip().startswith("END"))


def test_canonical_format():
    assert prompt_for("Name a color.") == "Instruction: Name a color.\nResponse:"
    assert training_text("Name a color.", "Blue.") == "Instruction: Name a color.\nResponse: Blue.\nEND"


@given(marker_free, st.sampled_from(STOP_STRINGS), st.text(max_size=40))
def test_cut_keeps_exactly_the_text_before_the_first_marker(body, marker, tail):
    cut = cut_response(body + marker + tail)
    assert cut.response == body.strip()
    assert cut.marker == marker
    assert cut.ended_cleanly == (marker == END_SUFFIX)


@given(marker_free)
def test_text_without_markers_is_only_stripped(body):
    cut = cut_response(body)
    assert cut.response == body.strip() and cut.marker is None


def test_earliest_marker_wins_and_is_recorded():
    cut = cut_response(" Paris.\nInstruction: next\nEND")
    assert (cut.response, cut.marker) == ("Paris.", "\nInstruction:")
    assert not cut.ended_cleanly


def test_few_shot_prompt_never_contains_the_item_and_is_deterministic():
    pool = [Example(f"Question {i}?", f"Answer {i}.") for i in range(10)]
    shots = choose_shots(pool, 3, seed=1, key="item-7", exclude="Question 7?")
    assert len(shots) == 3 and all(s.instruction != "Question 7?" for s in shots)
    assert shots == choose_shots(pool, 3, seed=1, key="item-7", exclude="Question 7?")
    assert shots != choose_shots(pool, 3, seed=2, key="item-7", exclude="Question 7?")
    p = few_shot_prompt("Question 7?", shots)
    assert p.endswith(prompt_for("Question 7?")) and p.count("\nEND") == 3
    assert "\\n" not in p


def item(**kw):
    base = {"id": "a", "instruction": "Write one sentence about the ocean.", "category": "constrained",
            "source": "builtin"}
    return InstructionRecord(**{**base, **kw})


def test_qc_keeps_a_good_response():
    assert qc_reason(item(), "The ocean covers most of the planet and holds countless forms of life.",
                     "\nEND", "stop") is None


def test_qc_reasons():
    it = item()
    assert qc_reason(it, "   ", "\nEND", "stop") == "empty"
    assert qc_reason(it, "The ocean is deep and", None, "length") == "truncated"
    for marker in RUNAWAY_MARKERS[:4]:
        assert qc_reason(it, "The ocean is deep.", marker, "stop") == "runaway"
    assert qc_reason(it, "The ocean. Response: more", "\nEND", "stop") == "template_residue"
    assert qc_reason(it, "Write one sentence about the ocean.", "\nEND", "stop") == "copies_instruction"
    assert qc_reason(it, "I'm sorry, but as an AI I cannot help with that.", "\nEND", "stop") == "refusal"
    lower = item(instruction="Describe a cat in all lowercase letters.", category="format",
                 constraints=[{"type": "change_case:english_lowercase"}])
    assert qc_reason(lower, "A Cat Is Soft And Purrs.", "\nEND", "stop") == "constraint_failed"
    assert qc_reason(lower, "a cat is soft and purrs.", "\nEND", "stop") is None
    capital = item(instruction="What is the capital of Sweden?", category="qa", reference_answers=["Stockholm"])
    assert qc_reason(capital, "Sweden is a country in Europe.", "\nEND", "stop") == "incorrect_answer"
    assert qc_reason(capital, "The capital of Sweden is Stockholm.", "\nEND", "stop") is None
    assert qc_reason(it, "ocean ocean ocean ocean ocean ocean ocean ocean ocean ocean ocean ocean", "\nEND",
                     "stop") == "incoherent"
