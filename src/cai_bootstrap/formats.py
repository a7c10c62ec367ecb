"""The canonical Instruction/Response/END format, few-shot prompts, stop strings and cleaning.

Training text is ``Instruction: {instruction}\\nResponse: {response}\\nEND`` followed by EOS.
The prompt is everything up to and including ``Response:``; the completion starts with the space.
Base models are prompted as plain text: never through a chat template.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

INSTRUCTION_PREFIX = "Instruction:"
RESPONSE_SEPARATOR = "\nResponse:"
END_MARKER = "END"
END_SUFFIX = "\n" + END_MARKER

# Where a base model runs past its answer. The first one found ends the response.
# "\nEND" is the one that means "finished cleanly".
RUNAWAY_MARKERS: tuple[str, ...] = (
    "\nInstruction:",
    "\nResponse:",
    "\nUser:",
    "\nAssistant:",
    "\nQuestion:",
    "\nHuman:",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
)
STOP_STRINGS: tuple[str, ...] = (END_SUFFIX, *RUNAWAY_MARKERS)

# Residue of templates that must never appear inside a cleaned response.
TEMPLATE_MARKERS: tuple[str, ...] = ("Instruction:", "Response:", "<|im_start|>", "<|im_end|>")


def prompt_for(instruction: str) -> str:
    """The zero-shot prompt for one instruction (what the model completes)."""
    return f"{INSTRUCTION_PREFIX} {instruction}{RESPONSE_SEPARATOR}"


def completion_for(response: str) -> str:
    """The supervised completion: a space, the response, a newline and END (EOS is added by the tokenizer step)."""
    return f" {response}{END_SUFFIX}"


def training_text(instruction: str, response: str) -> str:
    return prompt_for(instruction) + completion_for(response)


@dataclass(frozen=True)
class Example:
    instruction: str
    response: str


def few_shot_prompt(instruction: str, examples: Sequence[Example]) -> str:
    """Worked examples in the canonical format, each ending in END, then the open prompt."""
    shots = "\n\n".join(training_text(e.instruction, e.response) for e in examples)
    return (shots + "\n\n" if shots else "") + prompt_for(instruction)


def choose_shots(
    pool: Sequence[Example], k: int, seed: int, key: str, exclude: str
) -> list[Example]:
    """Draw k examples deterministically from (seed, key); never the item's own instruction."""
    candidates = [e for e in pool if normalize(e.instruction) != normalize(exclude)]
    rng = random.Random(f"{seed}:{key}")
    return rng.sample(candidates, min(k, len(candidates)))


@dataclass(frozen=True)
class Cut:
    """A raw generation split at its first stop marker."""

    response: str  # stripped text before the marker
    marker: str | None  # the marker found first, or None

    @property
    def ended_cleanly(self) -> bool:
        return self.marker == END_SUFFIX


def first_stop(raw: str, stops: Sequence[str] = STOP_STRINGS) -> tuple[int, str | None]:
    """Index and text of the earliest stop string in raw, or (len(raw), None)."""
    best, found = len(raw), None
    for s in stops:
        i = raw.find(s)
        if i != -1 and (i < best or (i == best and found is not None and len(s) > len(found))):
            best, found = i, s
    return best, found


def cut_response(raw: str, stops: Sequence[str] = STOP_STRINGS) -> Cut:
    """Cut a raw generation at the first stop marker and strip it.

    A response that is exactly ``END`` at the start (no leading newline) also counts as END.
    """
    text = raw
    if text.lstrip().startswith(END_MARKER) and not text.lstrip()[len(END_MARKER):len(END_MARKER) + 1].isalnum():
        return Cut("", END_SUFFIX)
    i, marker = first_stop(text, stops)
    return Cut(text[:i].strip(), marker)


_WS = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """Lower case, punctuation removed, white space folded: the key for exact de-duplication."""
    return _WS.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def words(text: str) -> list[str]:
    return normalize(text).split()
