"""De-duplication, near-duplicate pairs, the stratified split and the leakage check."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cai_bootstrap.data.dedup import (
    deduplicate,
    fit_weights,
    near_duplicate_pairs,
    shingles,
    similarity,
    weighted_jaccard,
)
from cai_bootstrap.data.pool import builtin_pool
from cai_bootstrap.data.sampling import stratified_sample
from cai_bootstrap.data.split import (
    LeakageError,
    TemplateLeakageError,
    allocate,
    check_leakage,
    check_template_leakage,
    purge_leaks,
    shared_templates,
    split,
    split_by_template,
)
from cai_bootstrap.formats import normalize
from cai_bootstrap.schemas import CATEGORIES, InstructionRecord


def rec(i, text, category="open"):
    return InstructionRecord(id=f"r{i}", instruction=text, category=category, source="user")


def recs(texts, category="open"):
    return [rec(i, t, category) for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def pool():
    return builtin_pool()


# ---- similarity ------------------------------------------------------------------------------


def test_same_frame_different_slot_is_not_a_near_duplicate(pool):
    a, b = "What is the capital of France?", "What is the capital of Spain?"
    assert similarity(a, b) < 0.7
    assert similarity(a, b, [r.instruction for r in pool]) < 0.6
    assert deduplicate(recs([a, b])).dropped == []


def test_plural_variant_is_a_near_duplicate(pool):
    a, b = "Write one sentence about the ocean.", "Write one sentence about the oceans."
    assert similarity(a, b) >= 0.7
    assert similarity(a, b, [r.instruction for r in pool]) >= 0.7
    result = deduplicate(recs([a, b]))
    assert [r.instruction for r in result.kept] == [a]
    (d,) = result.dropped
    assert (d.reason, d.duplicate_of, d.record.instruction) == ("near", "r0", b) and d.similarity >= 0.7


def test_small_edits_are_near_duplicates_in_a_realistic_collection(pool):
    corpus = [r.instruction for r in pool]
    assert similarity("Write a short poem about dark chocolate.", "Write a short poem about dark chocolates!", corpus) >= 0.9
    assert similarity("Explain why the sky is blue.", "Please explain why the sky is blue.", corpus) >= 0.7
    assert similarity("Explain why the sky is blue.", "Explain why the sea is salty.", corpus) < 0.5


def test_shingles_are_unigrams_and_bigrams_of_folded_words():
    assert shingles("The Cities, the cities!") == {"city", "city city"}
    assert shingles("Boxes of glass") == {"boxe", "of", "glass", "boxe of", "of glass"}
    assert shingles("The a") == {"the", "a", "the a"}  # nothing but articles: kept
    assert shingles("...") == frozenset()


def test_similarity_is_symmetric_and_bounded():
    w = fit_weights(["a b c", "b c d", "x y"])
    a, b = shingles("a b c"), shingles("b c d")
    assert weighted_jaccard(a, b, w) == weighted_jaccard(b, a, w)
    assert 0 < weighted_jaccard(a, b, w) < 1
    assert weighted_jaccard(a, a, w) == 1.0


# ---- deduplicate -----------------------------------------------------------------------------


def test_exact_duplicates_after_normalisation():
    texts = ["List three fruits.", "list THREE fruits!", "  List three   fruits ", "Name a river in Asia."]
    result = deduplicate(recs(texts))
    assert [r.id for r in result.kept] == ["r0", "r3"]
    assert [(d.record.id, d.reason, d.duplicate_of, d.similarity) for d in result.dropped] == [
        ("r1", "exact", "r0", 1.0), ("r2", "exact", "r0", 1.0)]
    assert result.counts == {"exact": 2, "near": 0}


def test_first_occurrence_wins_and_points_to_the_kept_record():
    texts = ["Describe a quiet morning in the mountains.", "Describe quiet mornings in the mountains.",
             "Describe a quiet morning in the mountain.", "Tell me about volcanoes."]
    result = deduplicate(recs(texts))
    assert [r.id for r in result.kept] == ["r0", "r3"]
    assert {d.record.id: d.duplicate_of for d in result.dropped} == {"r1": "r0", "r2": "r0"}
    result = deduplicate(list(reversed(recs(texts))))
    assert [r.id for r in result.kept] == ["r3", "r2"]


def test_threshold_validation():
    with pytest.raises(ValueError):
        deduplicate([], threshold=0)
    with pytest.raises(ValueError):
        near_duplicate_pairs([], [], threshold=1.5)


def test_builtin_pool_survives_dedup(pool):
    result = deduplicate(pool)
    assert result.counts["exact"] == 0
    assert len(result.dropped) <= 0.02 * len(pool)
    assert len(result.kept) >= 1000


def test_dedup_of_a_large_pool_with_copies(pool):
    # ~5,000 records: the pool, then each instruction again with a trivial edit
    noisy = list(pool) + [r.model_copy(update={"id": r.id + "-copy", "instruction": r.instruction.upper() + "!!"})
                          for r in pool] + [r.model_copy(update={"id": r.id + "-pl", "instruction": "Please: " + r.instruction})
                                            for r in pool[:800]]
    result = deduplicate(noisy)
    assert result.counts["exact"] == len(pool)
    assert {r.id for r in result.kept} <= {r.id for r in pool}
    assert result.counts["near"] >= 700  # "Please: ..." copies of the pool


# ---- against brute force ---------------------------------------------------------------------

VOCAB = "the a of cat cats dog river rivers write describe blue red one two".split()
TEXTS = st.lists(st.lists(st.sampled_from(VOCAB), min_size=1, max_size=7).map(" ".join), min_size=1, max_size=25)
THRESHOLDS = st.sampled_from([0.3, 0.5, 0.7, 0.9])


def brute_pairs(a, b, t):
    w = fit_weights([*a, *b])
    out = []
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            s = 1.0 if normalize(x) == normalize(y) else weighted_jaccard(shingles(x), shingles(y), w)
            if s >= t:
                out.append((f"a{i}", f"b{j}", s))
    return out


@settings(max_examples=80, deadline=None)
@given(a=TEXTS, b=TEXTS, t=THRESHOLDS)
def test_near_duplicate_pairs_equal_brute_force(a, b, t):
    ra = [InstructionRecord(id=f"a{i}", instruction=x, category="open", source="user") for i, x in enumerate(a)]
    rb = [InstructionRecord(id=f"b{j}", instruction=y, category="open", source="user") for j, y in enumerate(b)]
    got = near_duplicate_pairs(ra, rb, t)
    want = brute_pairs(a, b, t)
    assert [(x, y) for x, y, _ in got] == [(x, y) for x, y, _ in want]
    assert all(math.isclose(g[2], w[2]) for g, w in zip(got, want))


@settings(max_examples=80, deadline=None)
@given(texts=TEXTS, t=THRESHOLDS)
def test_deduplicate_equals_brute_force(texts, t):
    w = fit_weights(texts)
    kept: list[int] = []
    want = []
    for i, x in enumerate(texts):
        if any(normalize(texts[k]) == normalize(x) for k in kept):
            want.append((i, "exact"))
        elif any(weighted_jaccard(shingles(x), shingles(texts[k]), w) >= t for k in kept):
            want.append((i, "near"))
        else:
            kept.append(i)
    result = deduplicate(recs(texts), threshold=t)
    assert [r.id for r in result.kept] == [f"r{k}" for k in kept]
    assert [(d.record.id, d.reason) for d in result.dropped] == [(f"r{i}", why) for i, why in want]
    for d in result.dropped:
        assert d.similarity >= t and d.duplicate_of in {r.id for r in result.kept}


# ---- split -----------------------------------------------------------------------------------


def test_split_is_stratified(pool):
    train, test = split(pool, 0.1, seed=0)
    assert len(test) == round(0.1 * len(pool)) and len(train) + len(test) == len(pool)
    assert {r.id for r in train}.isdisjoint(r.id for r in test)
    overall, in_test = Counter(r.category for r in pool), Counter(r.category for r in test)
    for c in CATEGORIES:
        assert abs(in_test[c] - len(test) * overall[c] / len(pool)) <= 1, c
    # both parts keep the input order
    order = {r.id: i for i, r in enumerate(pool)}
    assert [order[r.id] for r in test] == sorted(order[r.id] for r in test)
    assert [order[r.id] for r in train] == sorted(order[r.id] for r in train)


def test_split_is_seeded(pool):
    a = split(pool, 200, seed=1)
    assert a == split(pool, 200, seed=1)
    b = split(pool, 200, seed=2)
    assert {r.id for r in a[1]} != {r.id for r in b[1]}
    assert len(a[1]) == len(b[1]) == 200


def test_every_category_with_two_items_gets_a_test_item():
    records = ([rec(i, f"qa item {i}", "qa") for i in range(200)]
               + [rec(300, "format one", "format"), rec(301, "format two", "format")]
               + [rec(400, "the only completion", "completion")])
    train, test = split(records, 5, seed=0)
    cats = Counter(r.category for r in test)
    assert cats["format"] == 1 and cats["qa"] == 4 and len(test) == 5
    assert Counter(r.category for r in train)["format"] == 1


def test_allocate_edge_cases():
    assert allocate({"a": 50, "b": 50}, 10) == {"a": 5, "b": 5}
    assert allocate({"a": 1, "b": 2, "c": 100}, 3) == {"a": 0, "b": 1, "c": 2}
    assert sum(allocate({"a": 3, "b": 3, "c": 3}, 8).values()) == 6  # one left in train per category


@pytest.mark.parametrize("size", [0, 1.0, 0.0, 10, -1, True, "5"])
def test_split_rejects_bad_sizes(size):
    with pytest.raises((ValueError, TypeError)):
        split(recs(["a b c"] * 10), size, seed=0)


@settings(max_examples=100, deadline=None)
@given(counts=st.dictionaries(st.sampled_from(CATEGORIES), st.integers(1, 40), min_size=1),
       frac=st.floats(0.05, 0.6), seed=st.integers(0, 10))
def test_split_properties(counts, frac, seed):
    records = [rec(f"{c}{i}", f"{c} {i}", c) for c, n in counts.items() for i in range(n)]
    n_test = round(frac * len(records))
    if not 1 <= n_test < len(records):
        return
    train, test = split(records, frac, seed)
    assert len(test) == n_test
    assert sorted(r.id for r in train + test) == sorted(r.id for r in records)
    in_test = Counter(r.category for r in test)
    in_train = Counter(r.category for r in train)
    multi = [c for c, n in counts.items() if n >= 2]
    for c in multi:
        assert in_train[c] >= 1
    if n_test >= len(multi):
        assert all(in_test[c] >= 1 for c in multi)


# ---- split by template ------------------------------------------------------------------------


def templated(category: str, template: str, n: int) -> list[InstructionRecord]:
    return [InstructionRecord(id=f"{template}-{i}", instruction=f"{template} item {i}", category=category,
                              source="builtin", template=template) for i in range(n)]


def check_template_split(records, held, n_test):
    """The properties every template-disjoint split has."""
    ids = [r.id for part in held for r in part]
    assert sorted(ids) == sorted(r.id for r in records)  # a partition: nothing lost, nothing twice
    train_templates = {r.template for r in held.train if r.template}
    assert not train_templates & {r.template for r in held.test if r.template}  # no template on both sides
    assert not train_templates & {r.template for r in held.surplus if r.template}
    assert len(held.test) <= n_test
    order = {r.id: i for i, r in enumerate(records)}
    for part in held:
        assert [order[r.id] for r in part] == sorted(order[r.id] for r in part)


@pytest.mark.parametrize("name, n_pool, n_test", [("stage1.yaml", None, 300), ("quick.yaml", 600, 40)])
def test_template_split_of_the_builtin_pool_keeps_every_category(pool, name, n_pool, n_test):
    records = stratified_sample(pool, n_pool, 0, "builtin")
    for seed in range(3):
        held = split_by_template(records, n_test, seed)
        check_template_split(records, held, n_test)
        assert len(held.test) == n_test, name
        assert {r.category for r in held.test} == set(CATEGORIES), name
        assert {r.category for r in held.train} == set(CATEGORIES), name
        # each category's share follows the pool's, and no category is tested on one template only
        overall, in_test = Counter(r.category for r in records), Counter(r.category for r in held.test)
        for c in CATEGORIES:
            assert abs(in_test[c] - n_test * overall[c] / len(records)) <= 1, c
            assert len({r.template for r in held.test if r.category == c}) >= 2, c
        assert not shared_templates(held.train, held.test)
        check_template_leakage(held.train, held.test)
    assert split_by_template(records, n_test, 1) == split_by_template(records, n_test, 1)
    assert split_by_template(records, n_test, 1).test != split_by_template(records, n_test, 2).test


def test_template_split_leaves_one_template_for_training_and_skips_single_template_categories():
    records = templated("qa", "a", 5) + templated("qa", "b", 40) + templated("open", "only", 30)
    held = split_by_template(records, 20, seed=0)
    check_template_split(records, held, 20)
    assert {r.category for r in held.test} == {"qa"}  # one template cannot be on one side only
    assert [r.template for r in held.train if r.category == "open"] == ["only"] * 30
    assert len({r.template for r in held.train if r.category == "qa"}) == 1


def test_items_without_a_template_are_units_of_their_own():
    records = [rec(i, f"user item {i}", "open") for i in range(20)]
    held = split_by_template(records, 5, seed=0)
    assert len(held.test) == 5 and not held.surplus and len(held.train) == 15


@settings(max_examples=150, deadline=None)
@given(layout=st.dictionaries(st.sampled_from(CATEGORIES), st.lists(st.integers(1, 25), min_size=1, max_size=6),
                              min_size=1),
       frac=st.floats(0.05, 0.5), seed=st.integers(0, 20))
def test_template_split_properties(layout, frac, seed):
    records = [r for c, sizes in layout.items() for k, n in enumerate(sizes) for r in templated(c, f"{c}-t{k}", n)]
    n_test = round(frac * len(records))
    if not 1 <= n_test < len(records):
        return
    held = split_by_template(records, n_test, seed)
    check_template_split(records, held, n_test)
    alloc = allocate(Counter(r.category for r in records), n_test)
    in_test, in_train = Counter(r.category for r in held.test), Counter(r.category for r in held.train)
    for c, sizes in layout.items():
        assert in_test[c] <= alloc[c]
        if len(sizes) >= 2:
            assert in_train[c] >= 1  # every category keeps a template for training
            if alloc[c]:
                assert in_test[c] >= 1  # and is tested wherever the allocation gives it items
        else:
            assert in_test[c] == 0


def test_template_leakage_is_caught():
    train = templated("qa", "capital", 3)
    test = templated("qa", "capital", 5)[3:] + templated("qa", "symbol", 2)
    with pytest.raises(TemplateLeakageError, match="(?s)1 template.*capital") as e:
        check_template_leakage(train, test)
    assert e.value.shared == {"capital": (["capital-0", "capital-1", "capital-2"], ["capital-3", "capital-4"])}
    check_template_leakage(train, test[2:])


# ---- leakage ---------------------------------------------------------------------------------


def test_planted_near_duplicate_is_caught(pool):
    train, test = split(pool, 0.1, seed=0)
    train, _ = purge_leaks(train, test)
    check_leakage(train, test)  # clean after the purge
    victim = next(r for r in test if r.template == "tr-summarize")
    planted = victim.model_copy(update={"id": "planted", "instruction": "Please s" + victim.instruction[1:]})
    copy = victim.model_copy(update={"id": "copied", "instruction": victim.instruction.lower()})
    with pytest.raises(LeakageError) as e:
        check_leakage([*train, planted, copy], test)
    pairs = {(p.train_id, p.test_id) for p in e.value.pairs}
    assert pairs == {("planted", victim.id), ("copied", victim.id)}
    assert f"test {victim.id} ~ train planted" in str(e.value)
    assert "1 test item(s)" in str(e.value)


def test_purge_drops_only_leaking_training_items(pool):
    train, test = split(pool, 0.1, seed=3)
    victim = test[5]
    leaky = victim.model_copy(update={"id": "leaky", "instruction": victim.instruction.upper()})
    kept, purged = purge_leaks([*train, leaky], test)
    assert [(p.record.id, p.test_id, p.similarity) for p in purged if p.record.id == "leaky"] == [("leaky", victim.id, 1.0)]
    assert {r.id for r in kept} | {p.record.id for p in purged} == {r.id for r in train} | {"leaky"}
    assert len(purged) <= 0.02 * len(train)
    check_leakage(kept, test)


def test_purge_with_nothing_to_purge():
    train, test = recs(["List three fruits.", "Name a river."]), [rec(9, "Describe a storm at sea.")]
    assert purge_leaks(train, test) == (train, [])
