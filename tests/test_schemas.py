import json

import pytest

from cai_bootstrap.schemas import (
    ArtifactError,
    InstructionRecord,
    PreferencePair,
    load_jsonl,
    load_kind,
    validate_kind,
)

GOOD_PAIR = {
    "id": "p1", "instruction_id": "i1", "category": "qa", "prompt": "Instruction: x\nResponse:",
    "chosen": "Paris.", "rejected": "I cannot help with that.", "negative_type": "refusal",
    "chosen_source": "sft_model", "margin": 0.4, "confident": True,
}


def write(tmp_path, lines):
    p = tmp_path / "a.jsonl"
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return p


def test_valid_file_loads(tmp_path):
    p = write(tmp_path, [json.dumps(GOOD_PAIR), json.dumps({**GOOD_PAIR, "id": "p2"})])
    pairs = load_jsonl(p, PreferencePair)
    assert [x.id for x in pairs] == ["p1", "p2"]
    assert validate_kind("pairs", p) == (2, [])


@pytest.mark.parametrize("line, expected", [
    ("{not json", ":1: (json): "),
    (json.dumps({k: v for k, v in GOOD_PAIR.items() if k != "chosen"}), ":1: chosen: Field required"),
    (json.dumps({**GOOD_PAIR, "margin": "big"}), ":1: margin: "),
    (json.dumps({**GOOD_PAIR, "chosen": "   "}), ":1: chosen: Value error, must not be empty"),
    (json.dumps({**GOOD_PAIR, "rejected": "Paris."}), "chosen and rejected are the same text"),
    (json.dumps({**GOOD_PAIR, "negative_type": "rude"}), ":1: negative_type: "),
    (json.dumps({**GOOD_PAIR, "surprise": 1}), ":1: surprise: Extra inputs are not permitted"),
    ("[1, 2]", ":1: (record): expected a JSON object"),
])
def test_each_problem_is_reported_with_file_line_field(tmp_path, line, expected):
    p = write(tmp_path, [line])
    n, problems = validate_kind("pairs", p)
    assert n == 0
    assert any(expected in prob for prob in problems), problems
    assert all(prob.startswith(f"{p}:1:") for prob in problems)


def test_duplicate_ids_are_caught_with_both_lines(tmp_path):
    p = write(tmp_path, [json.dumps(GOOD_PAIR), json.dumps(GOOD_PAIR)])
    with pytest.raises(ArtifactError) as e:
        load_jsonl(p, PreferencePair)
    assert e.value.problems == [f"{p}:2: id: duplicate ('p1',) (first at line 1)"]


def test_every_problem_is_listed_not_just_the_first(tmp_path):
    p = write(tmp_path, ["{bad", json.dumps(GOOD_PAIR), "", json.dumps({**GOOD_PAIR, "id": "x", "chosen": ""})])
    n, problems = validate_kind("pairs", p)
    assert n == 1
    assert [prob.split(":")[1] for prob in problems] == ["1", "3", "4"]


def test_constraints_are_validated_inside_instruction_records():
    with pytest.raises(ValueError, match="unknown constraint type"):
        InstructionRecord(id="a", instruction="Say hi.", category="format", source="builtin",
                          constraints=[{"type": "max_wordz", "n": 3}])
    rec = InstructionRecord(id="a", instruction="Say hi.", category="format", source="builtin",
                            constraints=[{"type": "length_constraints:number_words", "relation": "less than",
                                          "num_words": 3}])
    assert rec.constraints[0]["num_words"] == 3


def test_responses_are_unique_per_model_and_id(tmp_path):
    r = {"id": "t1", "model": "base", "prompt": "p", "raw_text": " a", "response": "a", "finish_reason": "eos",
         "prompt_tokens": 3, "completion_tokens": 2, "max_new_tokens": 8}
    p = write(tmp_path, [json.dumps(r), json.dumps({**r, "model": "sft"})])
    assert len(load_kind("responses", p)) == 2
    p = write(tmp_path, [json.dumps(r), json.dumps(r)])
    with pytest.raises(ArtifactError, match="duplicate"):
        load_kind("responses", p)


def test_missing_file_and_unknown_kind(tmp_path):
    with pytest.raises(ArtifactError, match="file not found"):
        load_jsonl(tmp_path / "nope.jsonl", PreferencePair)
    with pytest.raises(KeyError):
        validate_kind("nonsense", tmp_path / "x")
