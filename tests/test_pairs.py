"""Contrastive on-policy pairs: ranking the SFT model's samples (verified checks, then the critic; ties
and all-bad sets give no pair), assembly with a synthetic share, the disjoint SFT/DPO prompt split,
and each pair diagnostic on hand-built pairs with known answers."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from cai_bootstrap.data.pair_diagnostics import (
    diagnose,
    margin_summary,
    opening,
    response_length,
    stock_openings,
    surface_rule,
)
from cai_bootstrap.data.pairs import allocate, build_pairs, realised_mix
from cai_bootstrap.data.prompt_split import SplitError, load_split, split_prompts
from cai_bootstrap.data.ranking import (
    ALL_TIE,
    IDENTICAL_SAMPLES,
    NO_ACCEPTABLE_SAMPLE,
    Sample,
    choose_pair,
    critic_candidates,
    problem,
)
from cai_bootstrap.data.sft_quality import qc_reason
from cai_bootstrap.formats import END_SUFFIX, prompt_for
from cai_bootstrap.schemas import InstructionRecord, NegativeRecord, PreferencePair

WEIGHTS = {"refusal": 1.0, "format_violation": 1.0, "incorrect_fact": 1.0, "off_topic": 1.0, "verbose_vague": 1.0}


def rec(id, instruction, category="open", refs=(), constraints=(), template=None):
    return InstructionRecord(id=id, instruction=instruction, category=category, source="user",
                             reference_answers=list(refs), constraints=list(constraints), template=template)


def s(text: str, ending: str = "end") -> Sample:
    """A sample as the engine reports it: ended with END, by EOS, by a new turn, or at the token limit."""
    if ending == "end":
        return Sample(text, f" {text}\nEND", "\nEND", "stop")
    if ending == "eos":
        return Sample(text, f" {text}", None, "eos")
    if ending == "runaway":
        return Sample(text, f" {text}\nInstruction:", "\nInstruction:", "stop")
    return Sample(text, f" {text}", None, "length")


FRANCE = rec("q-fr", "What is the capital of France?", "qa", ["Paris"], template="qa-capital")
LIST3 = rec("c-list", "List three fruits as bullet points.", "format",
            constraints=[{"type": "detectable_format:number_bullet_lists", "num_bullets": 3}])
SEA = rec("o-sea", "Describe the sea in one sentence.", "open")


# --------------------------------------------------------------------------------------------
# checks of one sample


def test_problem_is_the_sft_data_gate_plus_end():
    assert problem(FRANCE, s("The capital of France is Paris.")) is None
    assert problem(FRANCE, s("Paris.", "eos")) == "no_end"  # acceptable text, but it never wrote END
    assert problem(FRANCE, s("Paris is the capital and", "length")) == "truncated"
    assert problem(FRANCE, s("Paris.", "runaway")) == "runaway"
    assert problem(FRANCE, s("Lyon.")) == "incorrect_answer"
    assert problem(FRANCE, s("I'm sorry, but I can't help with that.")) == "refusal"
    assert problem(LIST3, s("- Apple\n- Banana")) == "constraint_failed"
    assert problem(LIST3, s("- Apple\n- Banana\n- Pear")) is None
    for text in ("Lyon.", "Paris.", "I'm sorry, but I can't help with that."):  # the same gate as the SFT data
        assert problem(FRANCE, s(text)) == qc_reason(FRANCE, text, "\nEND", "stop")


def test_a_sample_keeps_what_the_policy_wrote_unless_it_ended_cleanly():
    assert s("Paris.").completion() == " Paris.\nEND"
    assert s("Paris.", "runaway").completion() == " Paris.\nInstruction:"
    assert s("Paris.", "eos").completion() == " Paris."


# --------------------------------------------------------------------------------------------
# ranking


def test_verified_difference_prefers_the_same_format_then_the_closest_length():
    samples = [s("The capital of France is Paris."), s("Paris."), s("Lyon is a big city in France, and it is the capital."),
               s("Rome."), s("Paris", "eos")]
    choice = choose_pair(FRANCE, samples)
    # the wrong answers that end with END are rejected candidates; "Paris." vs "Rome." are closest in length
    assert (choice.chosen, choice.rejected, choice.basis) == (1, 3, "verified:incorrect_answer")
    assert choice.problems == (None, None, "incorrect_answer", "incorrect_answer", "no_end")


def test_a_format_failure_is_rejected_when_it_is_the_only_worse_sample():
    choice = choose_pair(FRANCE, [s("Paris."), s("Paris. The capital of Spain is", "length"), s("Paris.")])
    assert (choice.chosen, choice.rejected, choice.basis) == (0, 1, "verified:truncated")
    choice = choose_pair(FRANCE, [s("Paris.", "runaway"), s("It is Paris.")])
    assert (choice.chosen, choice.rejected, choice.basis) == (1, 0, "verified:runaway")


def test_all_bad_sets_give_no_pair():
    for samples in ([s("Lyon."), s("Rome."), s("Berlin.")],  # every answer wrong
                    [s("Paris.", "eos"), s("Paris", "length"), s("Paris.", "runaway")],  # never ended with END
                    [s("- Apple\n- Banana")] * 3):
        item = LIST3 if "Apple" in samples[0].text else FRANCE
        choice = choose_pair(item, samples)
        assert not choice.paired and choice.basis == NO_ACCEPTABLE_SAMPLE
        assert None not in choice.problems


def test_ties_give_no_pair_unless_the_critic_separates_them():
    texts = ["The sea is vast and blue.", "Waves roll over the deep sea.", "The sea covers most of the Earth.",
             "The sea is salty water."]
    samples = [s(t) for t in texts]
    assert critic_candidates(SEA, samples)
    assert choose_pair(SEA, samples).basis == ALL_TIE
    choice = choose_pair(SEA, samples, critic=[0.5, 2.0, -1.0, 0.1], min_gap=1.0)
    assert (choice.chosen, choice.rejected, choice.basis) == (1, 2, "critic")
    assert choose_pair(SEA, samples, critic=[0.5, 0.9, 0.0, 0.1], min_gap=1.0).basis == ALL_TIE  # gap 0.9
    # identical answers (up to case and punctuation) are a tie whatever the critic says
    same = [s("The sea is blue."), s("the sea is blue"), s("The sea is blue!")]
    assert not critic_candidates(SEA, same)
    assert choose_pair(SEA, same, critic=[3.0, -3.0, 0.0], min_gap=1.0).basis == IDENTICAL_SAMPLES
    # a copy of the chosen answer is never its rejected side
    choice = choose_pair(SEA, [s(texts[0]), s(texts[1]), s(texts[0] + "!")], critic=[2.0, 0.0, 1.9], min_gap=1.0)
    assert (choice.chosen, choice.rejected) == (0, 1)
    # a verified difference decides before the critic is asked
    choice = choose_pair(SEA, [s(texts[0]), s("I'm sorry, but I can't help with that.")], critic=[-5.0, 5.0])
    assert (choice.chosen, choice.rejected, choice.basis) == (0, 1, "verified:refusal")
    with pytest.raises(ValueError, match="critic"):
        choose_pair(SEA, samples, critic=[1.0])


# --------------------------------------------------------------------------------------------
# assembly


def scripted_items():
    """Items with samples whose pair (or reason for none) is known."""
    fr = FRANCE
    lst = LIST3
    sea = SEA
    tie = rec("o-tie", "Describe rain in one sentence.", "open")
    bad = rec("q-bad", "What is 6 times 7?", "qa", ["42"])
    same = rec("o-same", "Name a colour.", "open")
    samples = {
        fr.id: [s("Paris."), s("Lyon."), s("Paris.")],
        lst.id: [s("- Apple\n- Banana\n- Pear"), s("- Apple\n- Banana"), s("Apples, pears.", "length")],
        sea.id: [s("The sea is vast."), s("I'm sorry, but I can't help with that.")],
        tie.id: [s("Rain falls from clouds."), s("Rain is water from the sky.")],
        bad.id: [s("41."), s("44.")],
        same.id: [s("Blue."), s("Blue.")],
    }
    return [fr, lst, sea, tie, bad, same], samples


def test_pairs_from_samples_and_prompts_without_a_pair_by_reason():
    items, samples = scripted_items()
    built = build_pairs(items, samples, weights=WEIGHTS, synthetic_share=0.0, seed=0)
    pairs, negatives, no_pair = built
    assert [p.instruction_id for p in pairs] == ["q-fr", "c-list", "o-sea"]
    assert no_pair == Counter({ALL_TIE: 1, NO_ACCEPTABLE_SAMPLE: 1, IDENTICAL_SAMPLES: 1})
    assert len(pairs) + sum(no_pair.values()) == len(items)
    assert built.basis == Counter({"verified:incorrect_answer": 1, "verified:constraint_failed": 1,
                                   "verified:refusal": 1})
    by_id = {p.instruction_id: p for p in pairs}
    assert (by_id["q-fr"].chosen, by_id["q-fr"].rejected) == (" Paris.\nEND", " Lyon.\nEND")
    # the list answer keeps its real newlines; the rejected list ends with END too (same format)
    assert by_id["c-list"].chosen == " - Apple\n- Banana\n- Pear\nEND"
    assert by_id["c-list"].rejected == " - Apple\n- Banana\nEND"
    for p, n in zip(pairs, negatives, strict=True):
        assert PreferencePair.model_validate(p.model_dump()) == p
        assert NegativeRecord.model_validate(n.model_dump()) == n
        assert p.negative_type == n.negative_type == "on_policy" and p.rejected == n.response
        assert p.prompt == n.prompt == prompt_for({i.id: i for i in items}[p.instruction_id].instruction)
        assert p.chosen.endswith(END_SUFFIX) and p.chosen_source == "sft_model"
        assert all("\\n" not in t for t in (p.prompt, p.chosen, p.rejected))
        assert n.how.startswith("sft_sample:")
    assert realised_mix(pairs)["on_policy"] == 3
    # every sample was judged once: the ranking of each prompt is kept for the report
    assert built.choices["q-bad"].problems == ("incorrect_answer", "incorrect_answer")


def test_synthetic_share_takes_random_prompts_with_an_acceptable_sample():
    topics = ("volcanoes penguins bicycles gardens glaciers lighthouses violins deserts rainbows tigers").split()
    items = [rec(f"o{k:03d}", f"Write one sentence about {topics[k % 10]} ({k}).", "open", template=f"t{k % 10}")
             for k in range(200)]
    samples = {it.id: [s(f"{topics[k % 10].capitalize()} are interesting, case {k}."),
                       s("I'm sorry, but I can't help with that.")] for k, it in enumerate(items)}
    samples[items[0].id] = [s("Blue.", "eos")]  # no acceptable sample: never synthetic either
    built = build_pairs(items, samples, weights=WEIGHTS, synthetic_share=0.2, seed=3)
    mix = realised_mix(built.pairs)
    rule = {k: v for k, v in mix.items() if k != "on_policy"}
    assert sum(rule.values()) == allocate(199, {"synthetic": 0.2, "on_policy": 0.8})["synthetic"] == 40
    assert mix["on_policy"] == 159 and built.no_pair == Counter({NO_ACCEPTABLE_SAMPLE: 1})
    # no reference answers here: incorrect_fact cannot be built, the other kinds share its seats exactly
    assert built.plan.shortfall == {"incorrect_fact": 8}
    assert rule == {"incorrect_fact": 0, **allocate(40, {k: 1.0 for k in WEIGHTS if k != "incorrect_fact"})}
    for p in built.pairs:  # the chosen side is the SFT model's acceptable sample, whatever the rejected side
        k = int(p.instruction_id[1:])
        assert p.chosen == f" {topics[k % 10].capitalize()} are interesting, case {k}.\nEND"
    again = build_pairs(items, samples, weights=WEIGHTS, synthetic_share=0.2, seed=3)
    assert [p.model_dump() for p in again.pairs] == [p.model_dump() for p in built.pairs]
    other = build_pairs(items, samples, weights=WEIGHTS, synthetic_share=0.2, seed=4)
    assert {p.id for p in other.pairs if p.negative_type != "on_policy"} != {
        p.id for p in built.pairs if p.negative_type != "on_policy"}
    # a tie prompt drawn for the synthetic share does get a pair: its first acceptable sample is chosen
    items2, samples2 = scripted_items()
    all_synthetic = build_pairs(items2, samples2, weights={"refusal": 1.0}, synthetic_share=1.0, seed=0)
    assert {p.instruction_id for p in all_synthetic.pairs} == {"q-fr", "c-list", "o-sea", "o-tie", "o-same"}
    tie = next(p for p in all_synthetic.pairs if p.instruction_id == "o-tie")
    assert tie.chosen == " Rain falls from clouds.\nEND" and tie.negative_type == "refusal"


def test_an_unbuildable_kind_leaves_the_prompt_without_a_pair_by_reason():
    items = [rec(f"v{k}", f"Explain why volcanoes erupt ({k}).", "open", template="t") for k in range(4)]
    samples = {it.id: [s("Volcanoes erupt because magma rises.")] for it in items}  # one template: no off-topic
    built = build_pairs(items, samples, weights={"off_topic": 1.0}, synthetic_share=1.0, seed=0)
    assert built.pairs == [] and built.no_pair == Counter({"no_negative:off_topic": 4})


def test_build_pairs_needs_samples_for_every_item():
    with pytest.raises(ValueError, match="no samples for 1 item"):
        build_pairs([FRANCE], {}, weights=WEIGHTS, synthetic_share=0.0, seed=0)
    with pytest.raises(ValueError, match="synthetic_share"):
        build_pairs([FRANCE], {FRANCE.id: [s("Paris.")]}, weights=WEIGHTS, synthetic_share=1.5, seed=0)


# --------------------------------------------------------------------------------------------
# disjoint SFT / DPO prompts


def pool(n=200):
    cats = ["qa", "open", "format", "constrained"]
    return [rec(f"i{k:03d}", f"Instruction number {k}.", cats[k % 4] if k < 160 else "qa") for k in range(n)]


def test_split_is_disjoint_complete_and_stratified():
    items = pool()
    split = split_prompts(items, 0.3, seed=1)
    assert set(split.sft).isdisjoint(split.dpo) and set(split.sft) | set(split.dpo) == {i.id for i in items}
    assert len(split.dpo) == 60 and split.dpo_share == 0.3 and split.seed == 1
    by_cat = Counter(i.category for i in items)
    dpo_cat = Counter(i.category for i in items if i.id in set(split.dpo))
    for cat, n in by_cat.items():
        assert abs(dpo_cat[cat] - 0.3 * n) <= 1, cat
    assert split_prompts(items, 0.3, seed=1) == split
    assert split_prompts(items, 0.3, seed=2).dpo != split.dpo
    assert split.sft == [i.id for i in items if i.id in set(split.sft)]  # pool order
    tiny = pool(2)
    assert (len(split_prompts(tiny, 0.1, 0).dpo), len(split_prompts(tiny, 0.9, 0).dpo)) == (1, 1)
    with pytest.raises(ValueError):
        split_prompts(items, 1.0, 0)


def test_load_split_checks_the_file_against_the_pool(tmp_path):
    items = pool(20)
    path = tmp_path / "prompt_split.json"
    split = split_prompts(items, 0.5, 0)
    path.write_text(json.dumps(split.model_dump()))
    sft, dpo = load_split(path, items)
    assert [i.id for i in sft] == split.sft and [i.id for i in dpo] == split.dpo

    def error(data) -> str:
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        with pytest.raises(SplitError) as e:
            load_split(path, items)
        return str(e.value)

    good = split.model_dump()
    assert error("{\n  broken") .startswith(f"{path}:2: (json):")
    assert f"{path}: dpo_share:" in error({**good, "dpo_share": 1.5})
    assert f"{path}: sft:" in error({k: v for k, v in good.items() if k != "sft"})
    assert "on both sides" in error({**good, "sft": good["sft"] + good["dpo"][:1]})
    assert "not in the training pool, e.g. 'zzz'" in error({**good, "dpo": good["dpo"] + ["zzz"]})
    assert "on neither side, e.g." in error({**good, "dpo": good["dpo"][1:]})
    assert "listed twice" in error({**good, "dpo": good["dpo"] + good["dpo"][:1]})
    path.unlink()
    with pytest.raises(SplitError, match="file not found"):
        load_split(path, items)


# --------------------------------------------------------------------------------------------
# diagnostics, on hand-built pairs with known answers


def pair(k, chosen, rejected, margin=None, kind="on_policy"):
    return PreferencePair(id=f"p{k}", instruction_id=f"i{k}", category="open", prompt=f"Instruction: q{k}\nResponse:",
                          chosen=chosen, rejected=rejected, negative_type=kind, chosen_source="sft_model",
                          margin=margin)


def test_surface_rule():
    pairs = [
        pair(0, " Paris.\nEND", " Paris is the capital"),  # missing END
        pair(1, " Blue.\nEND", " I am sorry, but no.\nEND", kind="refusal"),  # stock opening x3 ...
        pair(2, " Red.\nEND", " I am sorry, I cannot.\nEND", kind="refusal"),
        pair(3, " Green.\nEND", " I am sorry but I won't.\nEND", kind="refusal"),
        pair(4, " The sea is big.\nEND", " The sea is small.\nEND"),  # shared by 3 rejected, but a chosen opens so
        pair(5, " Sun.\nEND", " The sea is wet.\nEND"),
        pair(6, " Moon.\nEND", " The sea is dry.\nEND"),
        pair(7, " Star.\nEND", " Well, this depends.\nEND"),  # shared by 2 rejected only
        pair(8, " Comet.\nEND", " Well, this varies.\nEND"),
    ]
    assert opening(" I'm sorry, but I can't.") == "im sorry but" and opening(" I am sorry!") == "i am sorry"
    stock = stock_openings(pairs)
    assert stock == {"i am sorry"}
    assert [surface_rule(p, stock) for p in pairs] == [
        "missing_end", "stock_opening", "stock_opening", "stock_opening", None, None, None, None, None]
    d = diagnose(pairs, 1.0)["surface_separable"]
    assert d == {"share": round(4 / 9, 4), "count": 4, "by_rule": {"missing_end": 1, "stock_opening": 3},
                 "stock_openings": ["i am sorry"]}
    # "I'm sorry" is another opening ("im sorry ..."): two of a kind are not stock
    assert stock_openings(pairs[:2] + [pair(2, " Red.\nEND", " I'm sorry, I cannot.\nEND")]) == set()
    # a rejected side that ends with END is not separable by END, nor one whose chosen lacks it too
    assert surface_rule(pair(9, " a\nEND", " b\nEND"), set()) is None
    assert surface_rule(pair(9, " a", " b"), set()) is None


def test_length_diagnostic_does_not_count_end():
    assert response_length(" Paris.\nEND") == 6 == response_length(" Paris.") == response_length("Paris.\nEND\n")
    assert response_length(" END is a word\nEND") == len("END is a word")
    pairs = [pair(0, " abc\nEND", " abcd"),  # rejected longer by a character (END not counted)
             pair(1, " abcd\nEND", " abc\nEND"),  # chosen longer
             pair(2, " abc\nEND", " xyz\nEND"),  # same length
             pair(3, " a\nEND", " a longer one\nEND")]
    d = diagnose(pairs, 1.0)["length"]
    assert d == {"rejected_longer": 0.5, "chosen_longer": 0.25, "same_length": 0.25,
                 "counts": {"rejected_longer": 2, "chosen_longer": 1, "same_length": 1}}


def test_margin_distribution_already_ranked_and_confident():
    pairs = [pair(k, f" c{k}\nEND", f" r{k}\nEND", margin=m) for k, m in enumerate([-1.0, 0.0, 0.5, 2.0, 3.0])]
    m = margin_summary(pairs, confident_margin=1.0)
    assert m["n"] == 5 and m["mean"] == 0.9
    assert m["already_ranked"] == 0.6 and m["confident"] == 0.4  # > 0: 0.5, 2, 3; > 1: 2, 3
    assert m["quantiles"] == {"q00": -1.0, "q10": -0.6, "q25": 0.0, "q50": 0.5, "q75": 2.0, "q90": 2.6, "q100": 3.0}
    assert margin_summary(pairs[:1] + [pair(9, " a\nEND", " b\nEND")], 1.0)["n"] == 1  # no margin: not counted
    assert margin_summary([], 1.0)["quantiles"] is None


def test_sources_and_definitions():
    pairs = [pair(0, " a\nEND", " b\nEND"), pair(1, " a\nEND", " b\nEND", kind="refusal"),
             pair(2, " a\nEND", " b\nEND")]
    d = diagnose(pairs, 1.0)
    assert d["pairs"] == 3 and d["sources"]["on_policy"] == 2 and d["sources"]["refusal"] == 1
    assert d["sources"]["verbose_vague"] == 0
    assert set(d["definitions"]) == {"surface_separable", "length", "margin", "sources"}
    empty = diagnose([], 1.0)
    assert empty["surface_separable"]["share"] is None and empty["length"]["rejected_longer"] is None
