"""IFEval: Google's official checks, offline, through the project's entry points.

Every one of the 25 instruction ids goes through the project's entry points (constraints.verdicts,
and ``cai-bootstrap score`` on IFEval-format files) and through the official functions called
directly; the verdicts must be identical. The expected strict verdicts are hand-labelled from
IFEval's definitions, so a wrapper that changed the semantics fails here too.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cai_bootstrap import constraints, official_ifeval
from cai_bootstrap.cli import app
from cai_bootstrap.evaluation import ifeval
from cai_bootstrap.schemas import ArtifactError, EvalScore

# sha256 of NLTK's English punkt_tab tables in a canonical form (each table's lines sorted, tables
# joined by a blank line), computed from an independent copy of NLTK's punkt_tab download (the one
# llama-index-core 0.14.25 redistributes).
NLTK_PUNKT_TAB_ENGLISH_SHA256 = "2a489ed73163880aba0222671b8a412fb02fed9ed6c31b2d5b6364fd24381838"

# id -> (kwargs as IFEval writes them, [(response, expected strict verdict)]). Edge cases per id:
# boundary counts, markdown bullets, case with digits, fences, trailing punctuation, keyword
# substrings, non-English text.
CORPUS: dict[str, tuple[dict, list[tuple[str, bool]]]] = {
    "keywords:existence": ({"keywords": ["cat"]}, [
        ("My category is done.", True),  # a substring counts
        ("CAT!", True), ("A dog.", False)]),
    "keywords:frequency": ({"keyword": "sea", "frequency": 2, "relation": "at least"}, [
        ("The sea. The seashell.", True), ("The sea.", False), ("SEA sea", True)]),
    "keywords:forbidden_words": ({"forbidden_words": ["red"]}, [
        ("I see a reddish sky.", True),  # whole words only
        ("Red sky at night.", False), ("blue", True)]),
    "keywords:letter_frequency": ({"letter": "z", "let_frequency": 1, "let_relation": "less than"}, [
        ("Zebra", False), ("horse", True), ("", False)]),
    "language:response_language": ({"language": "fr"}, [
        ("Bonjour, je m'appelle Marie et j'habite à Paris depuis dix ans avec ma famille.", True),
        ("Hello, my name is Mary and I have lived in London for ten years with my family.", False)]),
    "length_constraints:number_sentences": ({"num_sentences": 2, "relation": "less than"}, [
        ("Dr. Smith went home. He slept.", False), ("One sentence only.", True),
        ("Mr. Smith arrived at noon.", True), ("It is 3.14 or so.", True)]),
    "length_constraints:number_paragraphs": ({"num_paragraphs": 2}, [
        ("First part.\n***\nSecond part.", True), ("First part.\n\nSecond part.", False),
        ("***\nFirst.\n***\nSecond.", True), ("First.\n***\n***\nSecond.", False)]),
    "length_constraints:number_words": ({"num_words": 3, "relation": "less than"}, [
        ("don't stop", False),  # don, t, stop
        ("U.S.A.", False), ("two words", True), ("1,000", True)]),
    "length_constraints:nth_paragraph_first_word": (
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "today"}, [
            ("Hi.\n\nToday, we go.", True), ('Hi.\n\n"Today" we go.', True),
            ("Hi.\n\nTodays we go.", False), ("Hi.\nToday we go.", False)]),
    "detectable_content:number_placeholders": ({"num_placeholders": 2}, [
        ("Dear [name], see you on [date].", True), ("Dear [name].", False)]),
    "detectable_content:postscript": ({"postscript_marker": "P.S."}, [
        ("Hi.\nP.S. bye", True), ("Hi.\np. s. bye", True), ("Hi. PS bye", False)]),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, [
        ("* a\n* b", True), ("- a\n- b", True), ("1. a\n2. b", False),  # numbered lists are not bullets
        ("**bold**\n* a\n* b", True), ("* a\n* b\n---", False)]),
    "detectable_format:constrained_response": ({}, [
        ("My answer is yes.", True), ("My answer is Yes.", False), ("Well... My answer is maybe.", True)]),
    "detectable_format:number_highlighted_sections": ({"num_highlights": 2}, [
        ("*a* and **b**", True), ("*a* only", False), ("* * and *x*", False)]),
    "detectable_format:multiple_sections": ({"section_spliter": "Section", "num_sections": 2}, [
        ("Section 1\nfoo\nSection 2\nbar", True), ("SECTION 1\nfoo\nSECTION 2\nbar", False)]),
    "detectable_format:json_format": ({}, [
        ('```json\n{"a": 1}\n```', True),  # a fence around the whole answer passes strict
        ('{"a": 1}', True), ('Here it is: {"a": 1}', False), ('"just a string"', True)]),
    "detectable_format:title": ({}, [
        ("<<My Title>>\ntext", True), ("<< >>\ntext", False), ("<<a\nb>>", False)]),
    "combination:two_responses": ({}, [
        ("Answer A\n******\nAnswer B", True), ("Answer A\n******\nAnswer A", False), ("Only one", False)]),
    "combination:repeat_prompt": ({"prompt_to_repeat": "Write a poem."}, [
        ("write a poem. Roses are red.", True), ("Sure! Write a poem.", False)]),
    "startend:end_checker": ({"end_phrase": "Any other questions?"}, [
        ("Done. Any other questions?", True), ('Done. any other questions?"', True),
        ("Done. Any other questions", False), ("Done. Any other questions?.", False)]),
    "change_case:capital_word_frequency": ({"capital_frequency": 2, "capital_relation": "at least"}, [
        ("NASA and the USA", True), ("Nasa and the Usa", False), ("U.S.A. rocks", False)]),
    "change_case:english_capital": ({}, [
        ("HELLO WORLD, THIS IS A TEST OF 123 THINGS.", True), ("HELLO World", False),
        ("ПРИВЕТ, МИР! Я ЗДЕСЬ С МОИМИ ДРУЗЬЯМИ ИЗ МОСКВЫ.", False)]),  # upper case, but not English
    "change_case:english_lowercase": ({}, [
        ("hello world, this is a short test with 123 numbers.", True),
        ("bonjour le monde, je suis ici avec mes amis de paris.", False),  # not English
        ("Sure:\nhello world, this is a short test.", False)]),
    "punctuation:no_comma": ({}, [("a b", True), ("a, b", False), ("a，b", True)]),  # only the ASCII comma
    "startend:quotation": ({}, [('"hello"', True), ('"', False), ("hello", False), (' "hi" \n', True)]),
}
# HF-style kwargs: every other key present and null (as in the google/IFEval dataset release).
NULL_KEYS = {"num_highlights": None, "relation": None, "num_words": None}


def official_verdicts(ids: list[str], kwargs: list[dict], prompt: str, response: str) -> tuple[list[bool], list[bool]]:
    """The official functions called directly, with IFEval's own input object."""
    utils = official_ifeval.official().utils
    inp = utils.InputExample(key=1, instruction_id_list=ids, prompt=prompt, kwargs=kwargs)
    return (utils.test_instruction_following_strict(inp, response).follow_instruction_list,
            utils.test_instruction_following_loose(inp, response).follow_instruction_list)


def _cases():
    return [pytest.param(instruction_id, kwargs, response, expected, id=f"{instruction_id}-{k}")
            for instruction_id, (kwargs, responses) in CORPUS.items() for k, (response, expected) in enumerate(responses)]


def test_corpus_covers_every_official_id():
    assert set(CORPUS) == set(official_ifeval.instruction_ids()) == set(constraints.CONSTRAINT_TYPES)
    assert len(CORPUS) == 25


@pytest.mark.parametrize("instruction_id,kwargs,response,expected", _cases())
def test_entry_point_gives_the_official_verdicts(instruction_id, kwargs, response, expected):
    spec = constraints.from_ifeval(instruction_id, {**{k: None for k in NULL_KEYS if k not in kwargs}, **kwargs})
    ours = constraints.verdicts([spec], response, "prompt")
    assert ours == official_verdicts([instruction_id], [kwargs], "prompt", response)
    assert ours[0] == [expected]  # hand-labelled from IFEval's definition
    assert constraints.check(spec, response) is expected
    assert constraints.check(spec, response, loose=True) is ours[1][0]


def test_loose_variants_are_ifevals():
    lower = {"type": "change_case:english_lowercase"}
    text = "Sure, here it is:\nhello world, this is a short test with numbers."
    assert constraints.check_all([lower], text) == (False, True)  # the first line dropped
    bold = {"type": "startend:end_checker", "end_phrase": "the end"}
    assert constraints.check_all([bold], "That is **the end**") == (False, True)  # '*' removed
    assert constraints.check_all([lower], "   ") == (False, False)  # empty fails, strict and loose
    assert constraints.check_all([], "anything") == (None, None)


def test_kwarg_shapes_are_the_official_ones():
    mod = official_ifeval.official()
    for instruction_id, cls in mod.registry.INSTRUCTION_DICT.items():
        assert sorted(cls(instruction_id).get_instruction_args_keys()) == sorted(constraints.CONSTRAINT_PARAMS[instruction_id])
    assert set(constraints.LANGUAGES) == set(mod.util.LANGUAGE_CODES)


@pytest.mark.parametrize("spec,problem", [
    ({"type": "length_constraints:number_words", "num_words": 5}, "needs 'relation'"),
    ({"type": "length_constraints:number_words", "num_words": 0, "relation": "less than"}, "positive integer"),
    ({"type": "length_constraints:number_words", "num_words": 5, "relation": "at most"}, "must be one of"),
    ({"type": "keywords:existence", "keywords": []}, "non-empty list"),
    ({"type": "keywords:existence", "keywords": ["(unclosed"]}, "does not compile"),
    ({"type": "keywords:letter_frequency", "letter": "ab", "let_frequency": 1, "let_relation": "at least"}, "one ASCII letter"),
    ({"type": "language:response_language", "language": "xx"}, "IFEval language code"),
    ({"type": "punctuation:no_comma", "extra": 1}, "unknown keys"),
    ({"type": "max_words", "n": 3}, "unknown constraint type"),
    ({"type": "length_constraints:nth_paragraph_first_word", "num_paragraphs": 1, "nth_paragraph": 2,
      "first_word": "a"}, "must not exceed"),
])
def test_bad_specs_are_refused(spec, problem):
    # The official code would fill a missing or falsy kwarg with a random value: refuse it instead.
    with pytest.raises(ValueError, match=problem):
        constraints.validate_spec(spec)


def test_punkt_tables_are_nltks_english(tmp_path):
    from nltk.tokenize.punkt import load_punkt_params

    folder = official_ifeval.write_punkt_tab(tmp_path)

    class Dir:  # load_punkt_params takes NLTK's path pointer; this is the part of it that it uses
        def join(self, name):
            return folder / name

    p = load_punkt_params(Dir())
    tables = [sorted(p.abbrev_types), sorted("\t".join(c) for c in p.collocations), sorted(p.sent_starters),
              sorted(f"{k}\t{v}" for k, v in p.ortho_context.items())]
    canon = "\n\n".join("\n".join(t) for t in tables)
    assert hashlib.sha256(canon.encode()).hexdigest() == NLTK_PUNKT_TAB_ENGLISH_SHA256


OFFLINE = r"""
import socket, sys
def refuse(*a, **k):
    raise RuntimeError("network use")
socket.socket.connect = refuse
socket.create_connection = refuse
import nltk
nltk.download = refuse
from cai_bootstrap import constraints
spec = {"type": "length_constraints:number_sentences", "num_sentences": 2, "relation": "less than"}
assert constraints.check(spec, "Dr. Smith went home. He slept.") is False
assert constraints.check(spec, "Mr. Smith arrived.") is True
caps = {"type": "change_case:capital_word_frequency", "capital_frequency": 1, "capital_relation": "at least"}
assert constraints.check(caps, "NASA flies.") is True  # nltk.word_tokenize: punkt again
assert "lm_eval.tasks" not in sys.modules and "lm_eval.api" not in sys.modules, "the task registry was imported"
print("ok")
"""


def test_offline_with_empty_nltk_data(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NLTK")}
    env.update(NLTK_DATA=str(tmp_path / "empty_nltk_data"), HOME=str(tmp_path / "home"),
               CAI_BOOTSTRAP_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    (tmp_path / "empty_nltk_data").mkdir()
    out = subprocess.run([sys.executable, "-c", OFFLINE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"
    written = tmp_path / "cache" / "nltk_data"
    assert sorted(p.name for p in written.rglob("*.t*")) == sorted(official_ifeval.PUNKT_FILES)


# --------------------------------------------------------------------------------------------
# IFEval's files through the CLI
# --------------------------------------------------------------------------------------------


def _corpus_files(tmp_path: Path) -> tuple[Path, Path, list[tuple[str, list[str], list[dict], str]]]:
    """Every corpus case as one IFEval prompt (plus one prompt with three instructions)."""
    cases = []
    for instruction_id, (kwargs, responses) in CORPUS.items():
        for k, (response, _) in enumerate(responses):
            cases.append((f"Prompt {len(cases)}: {instruction_id} case {k}.", [instruction_id], [kwargs], response))
    cases.append(("Write about the sea in lowercase, without commas, in fewer than 9 words.",
                  ["change_case:english_lowercase", "punctuation:no_comma", "length_constraints:number_words"],
                  [{}, {}, {"relation": "less than", "num_words": 9}], "Sure!\nthe sea is calm and wide"))
    inputs, responses = tmp_path / "input_data.jsonl", tmp_path / "responses.jsonl"
    inputs.write_text("".join(json.dumps({"key": 1000 + k, "prompt": p, "instruction_id_list": ids, "kwargs": kw}) + "\n"
                              for k, (p, ids, kw, _) in enumerate(cases)))
    # Responses in another order: they are matched by prompt.
    responses.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, _, _, r in reversed(cases)))
    return inputs, responses, cases


def test_score_cli_on_ifeval_files_gives_the_official_verdicts(tmp_path):
    inputs, responses, cases = _corpus_files(tmp_path)
    result = CliRunner().invoke(app, ["score", str(responses), "--tests", str(inputs), "--json"])
    assert result.exit_code == 0, result.output
    records = [EvalScore.model_validate_json(line) for line in result.output.splitlines()]
    assert [r.id for r in records] == [str(1000 + k) for k in range(len(cases))]  # key as id, input order
    for record, (prompt, ids, kwargs, response) in zip(records, cases):
        strict, loose = official_verdicts(ids, kwargs, prompt, response)
        assert record.instruction_id_list == ids
        assert (record.follow_instruction_list_strict, record.follow_instruction_list_loose) == (strict, loose)
        assert (record.checks_strict, record.checks_loose) == (all(strict), all(loose))
    assert (records[-1].checks_strict, records[-1].checks_loose) == (False, True)
    table = CliRunner().invoke(app, ["score", str(responses), "--tests", str(inputs)])
    assert table.exit_code == 0 and "ifeval_inst_level_loose" in table.output


def test_ifeval_input_file_errors_name_line_and_field(tmp_path):
    bad = tmp_path / "input_data.jsonl"
    good = {"key": 1, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    bad.write_text("\n".join([
        json.dumps(good),
        json.dumps({**good, "key": 2, "prompt": "A.", "kwargs": []}),
        json.dumps({**good, "key": 3, "prompt": "B.", "instruction_id_list": ["keywords:nothing"]}),
        json.dumps({**good, "key": 4, "prompt": "C.", "instruction_id_list": ["length_constraints:number_words"],
                    "kwargs": [{"num_words": 5, "relation": "most"}]}),
        json.dumps({**good, "prompt": "D."}),
        json.dumps({"key": 6, "prompt": "E.", "instruction_id_list": ["punctuation:no_comma"]}),
        "{not json",
    ]) + "\n")
    with pytest.raises(ArtifactError) as e:
        ifeval.load_inputs(bad)
    problems = e.value.problems
    assert f"{bad}:2: kwargs: has 0 entries for 1 instruction ids" in problems
    assert any(p.startswith(f"{bad}:3: instruction_id_list.0: unknown constraint type 'keywords:nothing'") for p in problems)
    assert any(p.startswith(f"{bad}:4: instruction_id_list.0: constraint 'length_constraints:number_words': 'relation'")
               for p in problems)
    assert f"{bad}:5: key: duplicate '1' (first at line 1)" in problems
    assert f"{bad}:6: kwargs: missing" in problems
    assert any(p.startswith(f"{bad}:7: (json):") for p in problems)
    result = CliRunner().invoke(app, ["score", str(bad), "--tests", str(bad)])
    assert result.exit_code == 1 and f"{bad}:2: kwargs" in result.output


def test_ifeval_response_file_errors(tmp_path):
    inputs, _, cases = _corpus_files(tmp_path)
    items = ifeval.load_inputs(inputs)
    bad = tmp_path / "r.jsonl"
    bad.write_text("\n".join([
        json.dumps({"prompt": cases[0][0], "response": "x"}),
        json.dumps({"prompt": cases[0][0], "response": "y"}),
        json.dumps({"prompt": "Never asked.", "response": "z"}),
        json.dumps({"prompt": cases[1][0], "response": 3}),
    ]) + "\n")
    with pytest.raises(ArtifactError) as e:
        ifeval.load_responses(bad, items)
    assert e.value.problems == [
        f"{bad}:2: prompt: a second response to item '1000' (first at line 1)",
        f"{bad}:3: prompt: matches no test item's prompt",
        f"{bad}:4: response: must be a string",
    ]
    few = tmp_path / "few.jsonl"
    few.write_text(json.dumps({"prompt": cases[0][0], "response": "x"}) + "\n")
    with pytest.raises(ArtifactError, match=f"no response for {len(cases) - 1} test item"):
        ifeval.load_responses(few, items)


def test_four_metrics_known_answer():
    def s(i, ids, strict, loose):
        return EvalScore(id=str(i), model="m", category="constrained", criteria={}, checks_strict=all(strict),
                         checks_loose=all(loose), instruction_id_list=ids, follow_instruction_list_strict=strict,
                         follow_instruction_list_loose=loose)

    a, b = "punctuation:no_comma", "detectable_format:title"
    scores = [s(1, [a, b], [True, False], [True, True]), s(2, [a], [True], [True]), s(3, [b], [False], [False]),
              EvalScore(id="4", model="m", category="qa", criteria={})]  # no instructions: not counted
    m = ifeval.model_metrics(scores)
    assert (m["prompt_level_strict"]["k"], m["prompt_level_strict"]["n"]) == (1, 3)
    assert (m["prompt_level_loose"]["k"], m["prompt_level_loose"]["n"]) == (2, 3)
    assert (m["inst_level_strict"]["k"], m["inst_level_strict"]["n"]) == (2, 4)
    assert (m["inst_level_loose"]["k"], m["inst_level_loose"]["n"]) == (3, 4)
    assert m["per_instruction"] == {a: {"n": 2, "strict": 1.0, "loose": 1.0}, b: {"n": 2, "strict": 0.0, "loose": 0.5}}


def test_readme_lists_exactly_the_supported_ids():
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## IFEval", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([a-z_]+:[a-z_]+)`", section))
    assert listed == set(official_ifeval.instruction_ids())
