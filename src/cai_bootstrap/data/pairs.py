"""Assembling preference pairs: one pair per training item, chosen vs one rejected completion.

Pure functions: the caller generates the chosen responses (SFT model, or the SFT data as fallback)
and the base model's raw completions, and fills each pair's ``margin``/``confident`` afterwards
with :func:`cai_bootstrap.training.logprobs.completion_logprobs`.

The mix of negative kinds
-------------------------
1. ``on_policy``: ``allocate(N, {on_policy: share, rule: 1 - share})`` items get the base model's
   own completion as rejected, drawn at random (seeded) among items that have a usable one. Too few
   such items: all of them are used, the missing seats are a ``shortfall`` of ``on_policy`` and
   those items take rule-built kinds instead.
2. The M remaining items are split over the five rule-built kinds by ``allocate(M, weights)``.
   ``incorrect_fact`` only applies to items with reference answers (for which a wrong answer can be
   built). If there are too few of them among the M, first on-policy items with references are
   swapped with rule items without references that also have an on-policy completion (counts
   unchanged). If still too few, ``incorrect_fact`` takes every eligible item, the missing seats are
   its ``shortfall``, and the rest is re-balanced: ``allocate(M - filled, other weights)``, so the
   other kinds keep their exact proportions among themselves. If every other weight is zero, the
   items left over get no kind (``unassigned``; dropped as such by :func:`build_pairs`).
3. Which item gets which kind is a seeded shuffle; counts are exact, membership is random.

A kind that was assigned but cannot be built for that item (``off_topic`` with no unrelated item
in the pool, in practice) drops the item with reason ``no_negative:<kind>``; so the realised mix
is the plan minus reported drops.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from ..config import NEGATIVE_KINDS
from ..formats import completion_for, prompt_for
from ..schemas import NEGATIVE_TYPES, InstructionRecord, NegativeRecord, PreferencePair
from .negatives import NEGATIVE_BUILDERS

ON_POLICY = "on_policy"
INCORRECT_FACT = "incorrect_fact"


def allocate(n: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split n into exact integer counts proportional to weights (largest remainder method).

    Each count is the floor of its quota ``n * w / sum(w)``; the seats left over go to the largest
    fractional parts, ties broken by larger weight, then by name. Arithmetic is exact (fractions),
    the counts sum to n and a zero weight gets zero.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if not weights:
        raise ValueError("weights must not be empty")
    for k, w in weights.items():
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight of {k!r} must be finite and >= 0, got {w!r}")
    ws = {k: Fraction(w) for k, w in weights.items()}
    total = sum(ws.values())
    if total <= 0:
        raise ValueError("weights must have a positive sum")
    quotas = {k: n * w / total for k, w in ws.items()}
    counts = {k: math.floor(q) for k, q in quotas.items()}
    left = n - sum(counts.values())
    order = sorted(ws, key=lambda k: (-(quotas[k] - counts[k]), -ws[k], k))
    for k in order[:left]:
        counts[k] += 1
    return counts


@dataclass(frozen=True)
class KindPlan:
    """Which kind of rejected completion each item gets, and how that compares with the weights."""

    assignment: dict[str, str]  # item id -> kind, in item order; unassigned items are absent
    targets: dict[str, int]  # the counts the weights ask for, before any shortfall
    counts: dict[str, int]  # the counts assigned
    shortfall: dict[str, int]  # kind -> seats that could not be filled (only kinds with a shortfall)
    unassigned: list[str] = field(default_factory=list)  # ids that no kind with weight > 0 could take


def _rule_weights(weights: Mapping[str, float]) -> dict[str, float]:
    unknown = set(weights) - set(NEGATIVE_KINDS)
    if unknown:
        raise ValueError(f"unknown negative kinds {sorted(unknown)}; known: {list(NEGATIVE_KINDS)}")
    out = {k: float(weights.get(k, 0.0)) for k in NEGATIVE_KINDS}
    if any(not math.isfinite(w) or w < 0 for w in out.values()) or sum(out.values()) <= 0:
        raise ValueError("negative weights must be finite, >= 0 and have a positive sum")
    return out


def plan_kinds(
    items: Sequence[InstructionRecord],
    weights: Mapping[str, float],
    on_policy_share: float,
    has_on_policy: Iterable[str],
    seed: int,
    *,
    fact_ok: Iterable[str] | None = None,
) -> KindPlan:
    """The kind of every item (see the module docstring for the rules).

    ``fact_ok``: ids that can take incorrect_fact (default: items with reference answers).
    """
    if not 0 <= on_policy_share <= 1:
        raise ValueError("on_policy_share must be in [0, 1]")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("item ids must be unique")
    rule_w = _rule_weights(weights)
    on_ok = set(has_on_policy)
    fact_set = {it.id for it in items if it.reference_answers} if fact_ok is None else set(fact_ok)
    shortfall: dict[str, int] = {}

    n_on = allocate(len(items), {ON_POLICY: on_policy_share, "rule": 1 - on_policy_share})[ON_POLICY]
    rng = random.Random(f"{seed}:on_policy")
    candidates = [i for i in ids if i in on_ok]
    rng.shuffle(candidates)
    on_policy = candidates[:n_on]
    if len(on_policy) < n_on:
        shortfall[ON_POLICY] = n_on - len(on_policy)
    on_set = set(on_policy)
    rule = [i for i in ids if i not in on_set]
    targets = {ON_POLICY: n_on, **allocate(len(rule), rule_w)}

    need = targets.get(INCORRECT_FACT, 0)
    eligible = [i for i in rule if i in fact_set]
    if len(eligible) < need:  # swap on-policy items that could take incorrect_fact with ones that cannot
        out = [i for i in on_policy if i in fact_set]
        into = [i for i in rule if i not in fact_set and i in on_ok]
        for a, b in list(zip(out, into))[: need - len(eligible)]:
            on_set.discard(a)
            on_set.add(b)
        on_policy = [i for i in on_policy if i in on_set] + [i for i in into if i in on_set]
        rule = [i for i in ids if i not in on_set]
        eligible = [i for i in rule if i in fact_set]

    rng = random.Random(f"{seed}:kinds")
    assignment: dict[str, str] = {i: ON_POLICY for i in on_policy}
    counts = dict.fromkeys((ON_POLICY, *NEGATIVE_KINDS), 0)
    counts[ON_POLICY] = len(on_policy)
    filled = min(need, len(eligible))
    if filled < need:
        shortfall[INCORRECT_FACT] = need - filled
        others_w = {k: w for k, w in rule_w.items() if k != INCORRECT_FACT}
        rest = allocate(len(rule) - filled, others_w) if sum(others_w.values()) > 0 else {}
    else:
        rest = {k: v for k, v in targets.items() if k not in (ON_POLICY, INCORRECT_FACT)}
    shuffled = list(eligible)
    rng.shuffle(shuffled)
    for i in shuffled[:filled]:
        assignment[i] = INCORRECT_FACT
    counts[INCORRECT_FACT] = filled
    remaining = [i for i in rule if i not in assignment]
    rng.shuffle(remaining)
    pos = 0
    for kind in NEGATIVE_KINDS:
        if kind == INCORRECT_FACT:
            continue
        k = rest.get(kind, 0)
        for i in remaining[pos:pos + k]:
            assignment[i] = kind
        counts[kind] = k
        pos += k
    unassigned = [i for i in ids if i not in assignment]
    ordered = {i: assignment[i] for i in ids if i in assignment}
    return KindPlan(ordered, targets, counts, shortfall, unassigned)


def assign_kinds(
    items: Sequence[InstructionRecord],
    weights: Mapping[str, float],
    on_policy_share: float,
    has_on_policy: Iterable[str],
    seed: int,
) -> dict[str, str]:
    """item id -> kind; see :func:`plan_kinds` for the counts and shortfall."""
    return plan_kinds(items, weights, on_policy_share, has_on_policy, seed).assignment


def item_rng(seed: int, item_id: str, kind: str) -> random.Random:
    """The generator a negative is built with: independent of the order items are processed in."""
    return random.Random(f"{seed}:{item_id}:{kind}")


@dataclass
class PairsBuild:
    """What :func:`build_pairs` returns; unpacks as ``pairs, negatives, dropped``."""

    pairs: list[PreferencePair]
    negatives: list[NegativeRecord]
    dropped: Counter  # reason -> items without a pair
    plan: KindPlan
    notes: Counter = field(default_factory=Counter)  # not drops: e.g. unusable on-policy completions

    def __iter__(self) -> Iterator:
        return iter((self.pairs, self.negatives, self.dropped))


def build_pairs(
    items: Sequence[InstructionRecord],
    chosen: Mapping[str, tuple[str, str]],
    base_raw: Mapping[str, str],
    weights: Mapping[str, float],
    on_policy_share: float,
    seed: int,
) -> PairsBuild:
    """One PreferencePair (and its NegativeRecord) per usable item, in item order.

    ``chosen``: id -> (clean response text, "sft_model" | "sft_data"); the pair's chosen is
    ``formats.completion_for(response)``. ``base_raw``: id -> the base model's raw completion, used
    as is as the on-policy rejected text. Dropped (Counter reasons): ``no_chosen`` (missing or blank
    response), ``unassigned``, ``no_negative:<kind>``, ``negative_equals_chosen:<kind>``.
    An on-policy completion that is blank or equal to the chosen one is not used (it would give no
    pair): the item is not offered for on-policy and takes a rule-built kind instead; counted in
    ``notes`` as ``on_policy_unusable:blank`` / ``on_policy_unusable:equals_chosen``.
    """
    dropped: Counter = Counter()
    notes: Counter = Counter()
    usable: list[InstructionRecord] = []
    completions: dict[str, str] = {}
    for it in items:
        entry = chosen.get(it.id)
        if entry is None or not entry[0].strip():
            dropped["no_chosen"] += 1
            continue
        usable.append(it)
        completions[it.id] = completion_for(entry[0].strip())
    on_ok: set[str] = set()
    for it in usable:
        raw = base_raw.get(it.id)
        if raw is None:
            continue
        if not raw.strip():
            notes["on_policy_unusable:blank"] += 1
        elif raw.strip() == completions[it.id].strip():
            notes["on_policy_unusable:equals_chosen"] += 1
        else:
            on_ok.add(it.id)
    others = [(it, chosen[it.id][0].strip()) for it in usable]

    def attempt(it: InstructionRecord, kind: str) -> tuple[str, str] | None:
        return NEGATIVE_BUILDERS[kind](it, chosen[it.id][0].strip(), item_rng(seed, it.id, kind), others)

    fact_ok = {it.id for it in usable if it.reference_answers and attempt(it, INCORRECT_FACT) is not None}
    plan = plan_kinds(usable, weights, on_policy_share, on_ok, seed, fact_ok=fact_ok)
    if plan.unassigned:
        dropped["unassigned"] += len(plan.unassigned)

    pairs: list[PreferencePair] = []
    negatives: list[NegativeRecord] = []
    for it in usable:
        kind = plan.assignment.get(it.id)
        if kind is None:
            continue
        if kind == ON_POLICY:
            rejected, how = base_raw[it.id], "base_model_raw_completion"
        else:
            built = attempt(it, kind)
            if built is None:
                dropped[f"no_negative:{kind}"] += 1
                continue
            rejected, how = built
        if not rejected.strip() or rejected.strip() == completions[it.id].strip():
            dropped[f"negative_equals_chosen:{kind}"] += 1
            continue
        prompt = prompt_for(it.instruction)
        negatives.append(NegativeRecord(
            id=f"neg-{it.id}", instruction_id=it.id, prompt=prompt, response=rejected,
            negative_type=kind, how=how,
        ))
        pairs.append(PreferencePair(
            id=f"pair-{it.id}", instruction_id=it.id, category=it.category, prompt=prompt,
            chosen=completions[it.id], rejected=rejected, negative_type=kind,
            chosen_source=chosen[it.id][1],
        ))
    return PairsBuild(pairs, negatives, dropped, plan, notes)


def realised_mix(pairs: Iterable[PreferencePair]) -> dict[str, int]:
    """Pairs per negative type, every type listed (zeros included), in schemas.NEGATIVE_TYPES order."""
    counts = Counter(p.negative_type for p in pairs)
    return {k: counts.get(k, 0) for k in NEGATIVE_TYPES}
