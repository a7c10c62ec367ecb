"""Ranking the SFT model's own samples for one prompt: which is chosen, which is rejected, or why none.

Every sample is first checked with what can be verified, the same gate the SFT data passes
(:func:`~cai_bootstrap.data.sft_quality.qc_reason`: empty, truncated, runaway, template residue, a copy
of the instruction, a refusal, a failed IFEval-style constraint, a wrong reference answer, incoherent
text) plus one more: it must end with END. A sample that passes is *acceptable*; the first failed
check is its *problem*.

The pair (:func:`choose_pair`):

1. No acceptable sample: no pair (``no_acceptable_sample``): nothing may be taught as chosen.
2. Some samples have a problem: chosen is acceptable, rejected has a problem (a verified
   difference). Rejected samples that still end with END come first, so that both sides share the
   format and differ in content; among those, the (chosen, rejected) pair closest in length is taken,
   so that length is not what tells them apart (ties: lower indices).
3. Every sample is acceptable: the checks cannot tell them apart. With critic margins, chosen is the
   highest and rejected the lowest when they differ by at least ``min_gap`` (``critic``);
   otherwise no pair (``all_tie``; ``identical_samples`` when every sample has the same text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..formats import END_SUFFIX, completion_for, normalize
from ..schemas import InstructionRecord
from .pair_diagnostics import response_length
from .sft_quality import qc_reason

NO_END = "no_end"  # stopped by EOS without writing END (the other endings are qc_reason's)

# Why a prompt gives no on-policy pair (keys of the pairs report's ``no_pair``).
NO_ACCEPTABLE_SAMPLE = "no_acceptable_sample"
ALL_TIE = "all_tie"
IDENTICAL_SAMPLES = "identical_samples"


@dataclass(frozen=True)
class Sample:
    """One sampled response: the cleaned text and how generation ended."""

    text: str  # cut at the first stop string, stripped
    raw_text: str  # as generated, stop string included
    stop_string: str | None
    finish_reason: str

    @property
    def ended(self) -> bool:
        return self.stop_string == END_SUFFIX

    def completion(self) -> str:
        """The text a pair holds: the canonical completion when the sample ended with END, otherwise
        exactly what the policy wrote (a missing END or a new turn is part of what is rejected)."""
        return completion_for(self.text) if self.ended else self.raw_text


def problem(item: InstructionRecord, sample: Sample) -> str | None:
    """The first verified check the sample fails, or None when it is acceptable."""
    reason = qc_reason(item, sample.text, sample.stop_string, sample.finish_reason)
    if reason is None and not sample.ended:
        return NO_END
    return reason


@dataclass(frozen=True)
class Choice:
    """What :func:`choose_pair` decided for one prompt."""

    chosen: int | None  # sample indices; None when there is no pair
    rejected: int | None
    basis: str  # "verified:<problem of rejected>" | "critic" | a no-pair reason
    problems: tuple[str | None, ...]

    @property
    def paired(self) -> bool:
        return self.chosen is not None


def length(sample: Sample) -> int:
    """Characters of the response as the pair holds it, END and surrounding white space not counted:
    what "longer" means for pairs (see :func:`.pair_diagnostics.response_length`)."""
    return response_length(sample.completion())


def choose_pair(item: InstructionRecord, samples: Sequence[Sample], critic: Sequence[float] | None = None,
                min_gap: float = 0.0) -> Choice:
    """Chosen and rejected among one prompt's samples (rules in the module docstring).

    ``critic``: one margin per sample (used only when every sample is acceptable), or None.
    """
    if critic is not None and len(critic) != len(samples):
        raise ValueError(f"{len(samples)} samples but {len(critic)} critic margins")
    problems = tuple(problem(item, s) for s in samples)
    good = [i for i, p in enumerate(problems) if p is None]
    bad = [i for i, p in enumerate(problems) if p is not None]
    if not good:
        return Choice(None, None, NO_ACCEPTABLE_SAMPLE, problems)
    if bad:
        same_format = [i for i in bad if samples[i].ended]
        pool = same_format or bad
        c, r = min(((c, r) for c in good for r in pool),
                   key=lambda cr: (abs(length(samples[cr[0]]) - length(samples[cr[1]])), cr))
        return Choice(c, r, f"verified:{problems[r]}", problems)
    if len({normalize(s.text) for s in samples}) == 1:
        return Choice(None, None, IDENTICAL_SAMPLES, problems)
    if critic is None:
        return Choice(None, None, ALL_TIE, problems)
    # distinct texts only: two copies of one answer must not be chosen and rejected
    order = sorted(range(len(samples)), key=lambda i: (-critic[i], i))
    c = order[0]
    rest = [i for i in order if normalize(samples[i].text) != normalize(samples[c].text)]
    if not rest or critic[c] - critic[rest[-1]] < min_gap:
        return Choice(None, None, ALL_TIE, problems)
    return Choice(c, rest[-1], "critic", problems)


def critic_candidates(item: InstructionRecord, samples: Sequence[Sample]) -> bool:
    """Whether the critic would be consulted for this prompt (every sample acceptable, not all the same)."""
    return all(problem(item, s) is None for s in samples) and len({normalize(s.text) for s in samples}) > 1
