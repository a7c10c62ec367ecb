"""Assembling preference pairs: one pair per DPO prompt, both sides written by the SFT model itself.

For every prompt the SFT model has sampled several responses; :mod:`.ranking` picks the chosen one (it
passes every verified check and ends with END) and a worse one of the *same* policy as rejected
(``negative_type="on_policy"``), or says why the prompt gives no pair.

A configurable share of the prompts with an acceptable sample (``synthetic_share``, for ablations)
instead pairs that sample with a rule-built negative (:mod:`.negatives`):

1. ``allocate(U, {synthetic: share, on_policy: 1 - share})`` of the U prompts with an acceptable
   sample are drawn at random (seeded); each keeps its chosen sample (the on-policy chosen where it
   has one, else its first acceptable sample) and gets a rule-built rejected side.
2. Those prompts are split over the five rule-built kinds by ``allocate(M, weights)``.
   ``incorrect_fact`` only applies to items with reference answers for which a wrong answer can be
   built. If there are too few, ``incorrect_fact`` takes every eligible item, the missing seats are
   its ``shortfall``, and the rest is re-balanced: ``allocate(M - filled, other weights)``, so the
   other kinds keep their exact proportions among themselves. If every other weight is zero, the
   items left over get no kind (``unassigned``).
3. Which item gets which kind is a seeded shuffle; counts are exact, membership is random.

A kind that was assigned but cannot be built for that item (``off_topic`` with no unrelated item
in the pool, in practice) leaves the prompt without a pair, reason ``no_negative:<kind>``; every
prompt without a pair is counted by reason.
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
from .ranking import Choice, Sample, choose_pair

ON_POLICY = "on_policy"
INCORRECT_FACT = "incorrect_fact"
SYNTHETIC = "synthetic"


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
    """Which rule-built kind each item gets, and how that compares with the weights."""

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
    seed: int,
    *,
    fact_ok: Iterable[str] | None = None,
) -> KindPlan:
    """The rule-built kind of every item (see the module docstring for the rules).

    ``fact_ok``: ids that can take incorrect_fact (default: items with reference answers).
    """
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("item ids must be unique")
    rule_w = _rule_weights(weights)
    fact_set = {it.id for it in items if it.reference_answers} if fact_ok is None else set(fact_ok)
    shortfall: dict[str, int] = {}
    targets = allocate(len(ids), rule_w)
    need = targets[INCORRECT_FACT]
    eligible = [i for i in ids if i in fact_set]

    rng = random.Random(f"{seed}:kinds")
    assignment: dict[str, str] = {}
    counts = dict.fromkeys(NEGATIVE_KINDS, 0)
    filled = min(need, len(eligible))
    if filled < need:
        shortfall[INCORRECT_FACT] = need - filled
        others_w = {k: w for k, w in rule_w.items() if k != INCORRECT_FACT}
        rest = allocate(len(ids) - filled, others_w) if sum(others_w.values()) > 0 else {}
    else:
        rest = {k: v for k, v in targets.items() if k != INCORRECT_FACT}
    shuffled = list(eligible)
    rng.shuffle(shuffled)
    for i in shuffled[:filled]:
        assignment[i] = INCORRECT_FACT
    counts[INCORRECT_FACT] = filled
    remaining = [i for i in ids if i not in assignment]
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


def item_rng(seed: int, item_id: str, kind: str) -> random.Random:
    """The generator a negative is built with: independent of the order items are processed in."""
    return random.Random(f"{seed}:{item_id}:{kind}")


def synthetic_ids(ids: Sequence[str], share: float, seed: int) -> set[str]:
    """``allocate(len(ids), {synthetic: share, on_policy: 1 - share})`` ids drawn at random (seeded)."""
    if not 0 <= share <= 1:
        raise ValueError(f"synthetic_share must be in [0, 1], got {share!r}")
    n = allocate(len(ids), {SYNTHETIC: share, ON_POLICY: 1 - share})[SYNTHETIC] if ids else 0
    order = list(ids)
    random.Random(f"{seed}:synthetic").shuffle(order)
    return set(order[:n])


@dataclass
class PairsBuild:
    """What :func:`build_pairs` returns; unpacks as ``pairs, negatives, no_pair``."""

    pairs: list[PreferencePair]
    negatives: list[NegativeRecord]
    no_pair: Counter  # reason -> prompts without a pair
    plan: KindPlan  # the rule-built kinds of the synthetic share
    choices: dict[str, Choice]  # item id -> the ranking of its samples
    basis: Counter = field(default_factory=Counter)  # per pair: verified:<problem> | critic | synthetic:<kind>

    def __iter__(self) -> Iterator:
        return iter((self.pairs, self.negatives, self.no_pair))


def _chosen_index(choice: Choice) -> int | None:
    """The on-policy chosen sample, else the first acceptable one (None: no sample is acceptable)."""
    if choice.chosen is not None:
        return choice.chosen
    return next((i for i, p in enumerate(choice.problems) if p is None), None)


def build_pairs(
    items: Sequence[InstructionRecord],
    samples: Mapping[str, Sequence[Sample]],
    *,
    weights: Mapping[str, float],
    synthetic_share: float,
    seed: int,
    critic: Mapping[str, Sequence[float]] | None = None,
    min_gap: float = 0.0,
) -> PairsBuild:
    """At most one PreferencePair (and its NegativeRecord) per item, in item order.

    ``samples``: item id -> the SFT model's samples for it (every item must have some).
    ``critic``: item id -> one critic margin per sample, for the items where every sample is
    acceptable (others are ignored). Every item either gives a pair or is counted in ``no_pair``.
    """
    missing = [it.id for it in items if not samples.get(it.id)]
    if missing:
        raise ValueError(f"no samples for {len(missing)} item(s), e.g. {missing[0]!r}")
    critic = critic or {}
    choices = {it.id: choose_pair(it, samples[it.id], critic.get(it.id), min_gap) for it in items}
    chosen_index = {it.id: _chosen_index(choices[it.id]) for it in items}
    acceptable = [it for it in items if chosen_index[it.id] is not None]
    synthetic = synthetic_ids([it.id for it in acceptable], synthetic_share, seed)
    chosen_text = {it.id: samples[it.id][chosen_index[it.id]].text for it in acceptable}
    others = [(it, chosen_text[it.id]) for it in acceptable]

    def attempt(it: InstructionRecord, kind: str) -> tuple[str, str] | None:
        return NEGATIVE_BUILDERS[kind](it, chosen_text[it.id], item_rng(seed, it.id, kind), others)

    rule_items = [it for it in acceptable if it.id in synthetic]
    fact_ok = {it.id for it in rule_items if it.reference_answers and attempt(it, INCORRECT_FACT) is not None}
    plan = plan_kinds(rule_items, weights, seed, fact_ok=fact_ok)

    no_pair: Counter = Counter()
    basis: Counter = Counter()
    pairs: list[PreferencePair] = []
    negatives: list[NegativeRecord] = []
    for it in items:
        choice, its = choices[it.id], samples[it.id]
        if it.id in synthetic:
            kind = plan.assignment.get(it.id)
            if kind is None:
                no_pair["unassigned"] += 1
                continue
            built = attempt(it, kind)
            if built is None:
                no_pair[f"no_negative:{kind}"] += 1
                continue
            rejected, how = built
            why = f"synthetic:{kind}"
        elif choice.paired:
            kind, rejected = ON_POLICY, its[choice.rejected].completion()
            why = choice.basis
            how = f"sft_sample:{choice.rejected}/{len(its)}:{why}; chosen sample {choice.chosen}"
        else:
            no_pair[choice.basis] += 1
            continue
        chosen = completion_for(chosen_text[it.id])
        if not rejected.strip() or rejected.strip() == chosen.strip():
            no_pair[f"negative_equals_chosen:{kind}"] += 1
            continue
        prompt = prompt_for(it.instruction)
        basis[why] += 1
        negatives.append(NegativeRecord(
            id=f"neg-{it.id}", instruction_id=it.id, prompt=prompt, response=rejected, negative_type=kind, how=how,
        ))
        pairs.append(PreferencePair(
            id=f"pair-{it.id}", instruction_id=it.id, category=it.category, prompt=prompt,
            chosen=chosen, rejected=rejected, negative_type=kind, chosen_source="sft_model",
        ))
    assert len(pairs) + sum(no_pair.values()) == len(items), "every prompt gives a pair or a reason"
    return PairsBuild(pairs, negatives, no_pair, plan, choices, basis)


def realised_mix(pairs: Iterable[PreferencePair]) -> dict[str, int]:
    """Pairs per negative type, every type listed (zeros included), in schemas.NEGATIVE_TYPES order."""
    counts = Counter(p.negative_type for p in pairs)
    return {k: counts.get(k, 0) for k in NEGATIVE_TYPES}
