"""The built-in instruction pool: size, spread, validity, stable ids, facts, template errors."""

from __future__ import annotations

import calendar
import copy
import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from cai_bootstrap.constraints import CONSTRAINT_PARAMS, validate_spec
from cai_bootstrap.data.pool import (
    FILLERS_FILE,
    TEMPLATES_FILE,
    TemplateError,
    _read_json,
    builtin_pool,
    expand,
    load_builtin_templates,
    parse_templates,
)
from cai_bootstrap.formats import TEMPLATE_MARKERS, normalize
from cai_bootstrap.schemas import CATEGORIES


@pytest.fixture(scope="module")
def pool():
    return builtin_pool()


@pytest.fixture(scope="module")
def by_template(pool):
    out: dict[str, list] = {}
    for r in pool:
        out.setdefault(r.template, []).append(r)
    return out


def lookup(pool, instruction):
    hits = [r for r in pool if r.instruction == instruction]
    assert len(hits) == 1, f"{instruction!r} found {len(hits)} times"
    return hits[0]


# ---- size, spread, validity ------------------------------------------------------------------


def test_at_least_1000_distinct_instructions(pool):
    keys = [normalize(r.instruction) for r in pool]
    assert len(set(keys)) >= 1000
    assert len(set(keys)) == len(keys), "builtin_pool must not contain exact duplicates"


def test_every_category_has_a_sensible_share(pool):
    counts = Counter(r.category for r in pool)
    assert set(counts) == set(CATEGORIES)
    for cat, n in counts.items():
        assert n / len(pool) >= 0.10, f"{cat}: {n}/{len(pool)}"
        assert n / len(pool) <= 0.35, f"{cat}: {n}/{len(pool)}"


def test_records_are_valid_and_clean(pool):
    for r in pool:
        assert r.source == "builtin"
        assert r.template and r.id.startswith(f"b-{r.template}-")
        assert "{" not in r.instruction and "}" not in r.instruction, r.instruction
        assert r.instruction == r.instruction.strip() and "  " not in r.instruction
        assert not any(m in r.instruction for m in TEMPLATE_MARKERS)
        for spec in r.constraints:
            assert validate_spec(spec) is spec
            for name, kind in CONSTRAINT_PARAMS[spec["type"]].items():  # ints stay ints, lists lists
                typ = {"int": int, "regex_list": list}.get(kind, str)
                assert type(spec[name]) is typ, (r.id, spec)


def test_ids_unique_and_numbered_per_template(pool, by_template):
    ids = [r.id for r in pool]
    assert len(ids) == len(set(ids))
    for tid, recs in by_template.items():
        assert [r.id for r in recs] == [f"b-{tid}-{n}" for n in range(len(recs))]


def test_ids_stable_across_runs_and_hash_seeds(pool):
    code = (
        "import hashlib, json; from cai_bootstrap.data.pool import builtin_pool; "
        "print(hashlib.sha256(json.dumps([r.model_dump() for r in builtin_pool()]).encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True,  # PYTHONPATH kept: the same sources
            env={"PYTHONHASHSEED": seed, "PATH": "", **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}},
            text=True, check=True,
        ).stdout.strip()
        for seed in ("12345",)
    }
    import hashlib

    here = hashlib.sha256(json.dumps([r.model_dump() for r in pool]).encode()).hexdigest()
    assert digests == {here}
    assert builtin_pool() == pool


def test_qa_has_reference_answers(pool, by_template):
    for r in pool:
        if r.category == "qa":
            assert r.reference_answers, r.id
    for tpl in load_builtin_templates():
        if tpl.reference_answers:
            assert all(r.reference_answers for r in by_template[tpl.id]), tpl.id
    # reference answers are short answers, not sentences
    for r in pool:
        for a in r.reference_answers:
            assert len(a.split()) <= 7 and a == a.strip(), (r.id, a)


def test_other_categories_carry_constraints(pool, by_template):
    for tid, recs in by_template.items():
        if recs[0].category in ("constrained", "format"):
            assert all(r.constraints for r in recs), tid


# ---- facts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "instruction, answer",
    [
        ("What is the capital of France?", "Paris"),
        ("What is the capital of Australia?", "Canberra"),
        ("What is the capital of Canada?", "Ottawa"),
        ("What is the capital of Japan?", "Tokyo"),
        ("What is the chemical symbol for gold?", "Au"),
        ("What is the chemical symbol for iron?", "Fe"),
        ("What is the chemical symbol for sodium?", "Na"),
        ("What is 7 plus 5?", "12"),
        ("What is 7 plus 5?", "twelve"),
        ("What is 9 times 8?", "72"),
        ('What is the opposite of "hot"?', "cold"),
        ('What is the plural of "mouse"?', "mice"),
        ('What is the past tense of "go"?', "went"),
        ("What is a baby kangaroo called?", "joey"),
        ("What sound does a cow make?", "moo"),
        ("Which planet is the third planet from the Sun?", "Earth"),
        ("Which day comes after Sunday?", "Monday"),
        ("Which month comes before January?", "December"),
        ("How many sides does a hexagon have?", "6"),
        ("Who wrote Pride and Prejudice?", "Jane Austen"),
        ("How many legs does a spider have?", "8"),
        ("Complete the proverb: Actions speak louder than", "words"),
        ("Complete the sequence: 1, 2, 4, 8,", "16"),
        ("Which planet is the first planet from the Sun?", "Mercury"),
        ("Answer in one word: What is the largest planet in the Solar System?", "Jupiter"),
        ("Answer with yes or no: Can penguins fly?", "no"),
    ],
)
def test_fact_spot_checks(pool, instruction, answer):
    assert answer in lookup(pool, instruction).reference_answers


def test_arithmetic_answers_are_right(by_template):
    ops = {"qa-plus": ("plus", lambda a, b: a + b), "qa-minus": ("minus", lambda a, b: a - b),
           "qa-times": ("times", lambda a, b: a * b)}
    n = 0
    for tid, (word, fn) in ops.items():
        for r in by_template[tid]:
            m = re.fullmatch(rf"What is (\d+) {word} (\d+)\?", r.instruction)
            assert m, r.instruction
            value = fn(int(m.group(1)), int(m.group(2)))
            assert value >= 0
            assert r.reference_answers[0] == str(value)
            assert len(r.reference_answers) >= 2  # digits and words
            n += 1
    assert n >= 100


def test_sequences_continue_correctly(by_template):
    for r in by_template["comp-sequence"]:
        terms = [int(x) for x in re.findall(r"\d+", r.instruction)]
        assert len(terms) == 4
        d = {terms[i + 1] - terms[i] for i in range(3)}
        q = {terms[i + 1] / terms[i] for i in range(3)}
        if len(d) == 1:
            expected = terms[-1] + d.pop()
        else:
            assert len(q) == 1, r.instruction
            expected = int(terms[-1] * q.pop())
        assert r.reference_answers[0] == str(expected), r.instruction


def test_calendar_facts(by_template):
    months = list(calendar.month_name)[1:]
    days = list(calendar.day_name)
    for r in by_template["qa-month-days"]:
        month = r.instruction.removeprefix("How many days are there in ").removesuffix("?")
        assert month != "February"
        assert r.reference_answers[0] == str(calendar.monthrange(2023, months.index(month) + 1)[1])
    for tid, step, names in [("qa-day-after", 1, days), ("qa-day-before", -1, days),
                             ("qa-month-after", 1, months), ("qa-month-before", -1, months)]:
        recs = by_template[tid]
        assert len(recs) == len(names)
        for r in recs:
            name = r.instruction.rstrip("?").split()[-1]
            assert r.reference_answers == [names[(names.index(name) + step) % len(names)]]


def test_capitals_and_symbols_are_unique_answers(by_template):
    capitals = [r.reference_answers[0] for r in by_template["qa-capital"]]
    assert len(capitals) == len(set(capitals)) >= 60
    symbols = [r.reference_answers[0] for r in by_template["qa-symbol"]]
    assert len(symbols) == len(set(symbols))
    # one-letter aliases would match the pronoun "I" or the article "a" in any response
    for recs in by_template.values():
        for r in recs:
            assert not any(len(a) == 1 and a.isalpha() for a in r.reference_answers), r.id


def test_constraints_agree_with_the_text(by_template):
    words = {2: "two", 3: "three", 4: "four", 5: "five"}
    for r in by_template["fmt-bullets"]:
        (spec,) = r.constraints
        assert f"exactly {words[spec['num_bullets']]} markdown bullet points" in r.instruction
    for r in by_template["fmt-sentences"]:
        assert f"at least {words[r.constraints[0]['num_sentences']]} sentences" in r.instruction
    for tid, phrase in (("fmt-max-words", "fewer than"), ("con-explain-briefly", "fewer than"), ("fmt-min-words", "at least")):
        for r in by_template[tid]:
            assert f"{phrase} {r.constraints[0]['num_words']} words" in r.instruction
    for r in by_template["fmt-ends-with"] + by_template["ifv-end-phrase-scene"]:
        assert f'"{r.constraints[0]["end_phrase"]}"' in r.instruction
    for r in by_template["fmt-starts-with"] + by_template["ifv-second-paragraph-word"]:
        assert f'"{r.constraints[0]["first_word"]}"' in r.instruction
    for r in by_template["fmt-keyword"] + by_template["ifv-keywords-both"]:
        assert all(f'"{k}"' in r.instruction for k in r.constraints[0]["keywords"])
    for r in by_template["ifv-forbidden-two"] + by_template["ifv-forbidden-one"]:
        assert all(f'"{k}"' in r.instruction for k in r.constraints[0]["forbidden_words"])
    for r in by_template["ifv-repeat-poem"] + by_template["ifv-repeat-explain"]:
        assert r.instruction.startswith(r.constraints[0]["prompt_to_repeat"])
    for r in by_template["con-list-three"]:
        assert r.constraints == [{"type": "detectable_format:number_bullet_lists", "num_bullets": 3}]
    for r in by_template["con-one-word"] + by_template["con-yes-no"]:
        assert {"type": "length_constraints:number_words", "relation": "less than", "num_words": 2} in r.constraints
        assert all(len(a.split()) == 1 for a in r.reference_answers)


def test_every_ifeval_id_is_carried_by_two_templates(by_template):
    # A template-disjoint split can then put every id on both sides.
    carriers: dict[str, set[str]] = {}
    for tid, recs in by_template.items():
        for r in recs:
            for spec in r.constraints:
                carriers.setdefault(spec["type"], set()).add(tid)
    assert set(carriers) == set(CONSTRAINT_PARAMS)
    assert {i: sorted(t) for i, t in carriers.items() if len(t) < 2} == {}


def test_cycle_templates_vary_their_parameter(by_template):
    for tid in ("fmt-ends-with", "fmt-bullets", "con-explain-briefly", "fmt-min-words"):
        values = {json.dumps(r.constraints, sort_keys=True) for r in by_template[tid]}
        assert len(values) >= 3, tid


# ---- the template format and its errors ------------------------------------------------------


def small(templates, fillers=None):
    fillers = fillers if fillers is not None else {
        "things": ["apples", "pears", "plums"],
        "limits": [5, 10],
        "countries": [{"country": "France", "capital": ["Paris"]}, {"country": "Peru", "capital": ["Lima"]}],
    }
    return parse_templates({"templates": templates}, {"fillers": fillers}, "t.json", "f.json")


def test_expansion_modes():
    product, cycle, sampled, sliced = small([
        {"id": "p", "category": "constrained", "text": "Name {n} {x}.", "fillers": {"x": "things", "n": "limits"},
         "constraints": [{"type": "length_constraints:number_words", "relation": "less than", "num_words": "{n}"}]},
        {"id": "c", "category": "constrained", "text": "Name {n} {x}.", "fillers": {"x": "things", "n": "limits"},
         "constraints": [{"type": "keywords:existence", "keywords": ["{x}", "x{n}"]}], "combine": "cycle"},
        {"id": "s", "category": "open", "text": "About {x} and {y}.", "fillers": {"x": "things", "y": "things"}, "max_items": 4},
        {"id": "l", "category": "open", "text": "Describe {x}. {{literal}}", "fillers": {"x": "things[1:3]"}},
    ])
    recs = expand(product)
    assert [r.instruction for r in recs] == [
        "Name 5 apples.", "Name 10 apples.", "Name 5 pears.", "Name 10 pears.", "Name 5 plums.", "Name 10 plums."]
    assert recs[1].constraints == [{"type": "length_constraints:number_words", "relation": "less than", "num_words": 10}]
    assert [r.instruction for r in expand(cycle)] == ["Name 5 apples.", "Name 10 pears.", "Name 5 plums."]
    assert expand(cycle)[1].constraints == [{"type": "keywords:existence", "keywords": ["pears", "x10"]}]
    first = [r.instruction for r in expand(sampled)]
    assert len(first) == 4 and first == [r.instruction for r in expand(sampled)]
    assert [r.id for r in expand(sampled)] == ["b-s-0", "b-s-1", "b-s-2", "b-s-3"]
    assert [r.instruction for r in expand(sliced)] == ["Describe pears. {literal}", "Describe plums. {literal}"]


def test_list_valued_reference_answers_expand():
    (tpl,) = small([{"id": "cap", "category": "qa", "text": "Capital of {c.country}?", "fillers": {"c": "countries"},
                     "reference_answers": ["{c.capital}", "the city of {c.country}"]}])
    recs = expand(tpl)
    assert recs[0].reference_answers == ["Paris", "the city of France"]
    assert recs[1].category == "qa" and recs[1].template == "cap"


GOOD = {"id": "ok", "category": "open", "text": "Write about {x}.", "fillers": {"x": "things"}}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"fillers": {"x": "nothing"}}, "unknown filler list 'nothing'"),
        ({"text": "Write about {y}."}, "placeholders without a filler list"),
        ({"category": "chat"}, "category 'chat'"),
        ({"constraints": [{"type": "length_constraints:number_words", "relation": "at least", "num_words": 0}]}, "positive integer"),
        ({"constraints": [{"type": "shout"}]}, "unknown constraint type"),
        ({"category": "qa"}, "needs reference_answers"),
        ({"colour": "red"}, "unknown keys"),
        ({"text": "Write about {x.name}."}, "has no field"),
        ({"text": "Write about {x} }."}, "stray"),
        ({"fillers": {"x": "things[2:9]"}}, "outside"),
        ({"combine": "zip"}, "'combine'"),
        ({"max_items": 0}, "max_items"),
        ({"id": "Bad Id"}, "'id'"),
        ({"text": "Write something.", "fillers": {"x": "things"}}, "not used"),
        ({"fillers": {"x": "limits"}, "constraints": [{"type": "startend:end_checker", "end_phrase": "{x}"}]},
         "non-empty string"),
    ],
)
def test_malformed_template_names_file_and_template(change, message):
    bad = {**GOOD, **change}
    with pytest.raises(TemplateError) as e:
        small([GOOD | {"id": "first"}, bad])
    text = str(e.value)
    assert text.startswith("t.json: template"), text
    assert f"{bad['id']!r}" in text, text
    assert message in text, text


def test_duplicate_template_id():
    with pytest.raises(TemplateError, match=r"t.json: template 'ok': duplicate id"):
        small([GOOD, GOOD])


@pytest.mark.parametrize(
    "fillers, message",
    [
        ({"things": []}, "'things' must be a non-empty list"),
        ({"things": ["a", {"b": "c"}]}, "mixes objects"),
        ({"things": ["a", ""]}, "bad item"),
        ({"things": [True]}, "bad item"),
    ],
)
def test_malformed_filler_list_names_file(fillers, message):
    with pytest.raises(TemplateError) as e:
        small([GOOD], fillers)
    assert str(e.value).startswith("f.json: filler list 'things'") and message in str(e.value)


def test_shipped_data_round_trips_through_parse():
    raw_t, raw_f = _read_json(TEMPLATES_FILE), _read_json(FILLERS_FILE)
    assert len(parse_templates(raw_t, raw_f)) == len(load_builtin_templates()) >= 50
    broken = copy.deepcopy(raw_t)
    broken["templates"][3]["text"] += " {oops}"
    with pytest.raises(TemplateError, match=rf"templates.json: template '{broken['templates'][3]['id']}'"):
        parse_templates(broken, raw_f)


def test_duplicate_instructions_across_templates_are_refused():
    templates = small([GOOD, {**GOOD, "id": "again", "text": "Write about {x}!"}])
    with pytest.raises(TemplateError, match="template 'again'.*duplicates b-ok-0"):
        builtin_pool(templates)
