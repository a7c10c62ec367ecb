"""The self-critic: the base model judges an (instruction, response) pair with one A/B token.

The judging prompt is plain text (no chat template): a short rubric, then worked examples in which
a good reply is labelled ``A`` and a bad one ``B``, then the pair to judge, ending in ``Answer:``.
The critic's score is the margin ``log p(" A") - log p(" B")`` of the next token: positive when the
model prefers "good". Only the two label tokens are compared, so the margin is not diluted by
whatever else the model might write next.

Prompt design (``CRITIC_PROMPT_VERSION`` changes whenever the text below changes):

* The pair is shown as ``Task:`` / ``Reply:``, not ``Instruction:`` / ``Response:``, so the judging
  prompt cannot be mistaken for the training format and a response is never read as a new turn.
* Eight shots, four ``A`` and four ``B``, in the fixed order A B B A B A A B: balanced, no
  alternation or long run that the model could copy instead of judging, and it closes on ``B`` so the
  final label does not lean towards "good" (lenient critics are the usual failure).
* The bad shots are the failure kinds the pipeline cares about: a wrong fact, an unwarranted
  refusal, an off-topic reply, vague filler, and a reply that ignores a stated constraint. The good
  shots include a constraint that is obeyed and a multi-line list, so that format is not a proxy
  for quality.
* Residual label bias is a constant shift of every margin; it does not affect best-of-N (a
  comparison among candidates for one instruction). :func:`calibration_margin` measures it on a
  content-free pair for callers that want to subtract it before thresholding.

Batches are LEFT padded so that every row's last real token is the last column; position ids are
given explicitly (counting from the first real token), so a pair's margin does not depend on the
batch it is in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..generation.engine import encode_prompts, left_padded
from ..training.logprobs import supports_logits_to_keep

CRITIC_PROMPT_VERSION = "critic-ab-v1"
LABEL_GOOD = " A"
LABEL_BAD = " B"

RUBRIC = (
    "A careful teacher grades replies to tasks. A reply is graded A if it is a good answer: correct, "
    "on topic, complete, and it follows everything the task asks for (length, format, wording). "
    "A reply is graded B if it is wrong, off topic, a refusal, vague, incomplete, or ignores what "
    "the task asks for."
)
QUESTION = "Is the reply a good, complete answer to the task?"

# (task, reply, label) — the order of labels is A B B A B A A B (see the module docstring).
SHOTS: tuple[tuple[str, str, str], ...] = (
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "A"),
    ("How many legs does a spider have?", "A spider has six legs.", "B"),
    ("Write a sentence about the ocean.", "I'm sorry, but I can't help with that.", "B"),
    ("List three fruits.", "- Apple\n- Banana\n- Orange", "A"),
    ("Explain why we need sleep.", "My favourite food is pizza with extra cheese.", "B"),
    ("Describe the moon in at most ten words.", "The moon is Earth's bright, rocky natural satellite.", "A"),
    ("Rewrite in lowercase: THE DOG RAN HOME.", "the dog ran home.", "A"),
    (
        "Give a tip for saving money.",
        "There are many factors to consider, and it really depends on various aspects of your "
        "situation, so it is hard to say.",
        "B",
    ),
)


def _block(task: str, reply: str) -> str:
    return f"Task: {task}\nReply: {reply}\n{QUESTION} Answer:"


CRITIC_PREFIX = RUBRIC + "\n\n" + "".join(f"{_block(t, r)} {label}\n\n" for t, r, label in SHOTS)


def critic_prompt(instruction: str, response: str) -> str:
    """The exact text the critic scores; the next token is the verdict."""
    return CRITIC_PREFIX + _block(instruction.strip(), response.strip())


def label_token_ids(tokenizer: Any) -> tuple[int, int]:
    """Token ids of " A" and " B"; fails clearly unless each is one token and tokenizes the same
    after ``Answer:`` as on its own (so the next-token distribution really holds the verdict)."""
    ids = []
    for label in (LABEL_GOOD, LABEL_BAD):
        alone = tokenizer(label, add_special_tokens=False)["input_ids"]
        if len(alone) != 1:
            raise ValueError(
                f"the critic needs {label!r} to be a single token, but this tokenizer splits it into "
                f"{len(alone)} tokens ({alone}); the A/B critic cannot be used with it"
            )
        head = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
        joined = tokenizer("Answer:" + label, add_special_tokens=False)["input_ids"]
        if list(joined) != list(head) + list(alone):
            raise ValueError(
                f"the critic needs 'Answer:' + {label!r} to tokenize as 'Answer:' followed by the "
                f"single token {alone}; this tokenizer gives {joined}"
            )
        ids.append(int(alone[0]))
    if ids[0] == ids[1]:
        raise ValueError("the labels ' A' and ' B' map to the same token")
    return ids[0], ids[1]


def _margins_for_prompts(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, batch_size: int, add_bos: bool
) -> list[float]:
    import torch

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    good, bad = label_token_ids(tokenizer)
    encoded = encode_prompts(tokenizer, prompts, add_bos)
    pad = next((int(c) for c in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if c is not None))
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    out: list[float] = [math.nan] * len(encoded)
    keep_ok = supports_logits_to_keep(model)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                input_ids, mask, positions = left_padded([encoded[i] for i in idx], pad, device)
                kwargs: dict[str, Any] = {"logits_to_keep": 1} if keep_ok else {}
                logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **kwargs).logits[:, -1]
                lp = torch.log_softmax(logits.float(), dim=-1)
                for row, i in enumerate(idx):
                    out[i] = float(lp[row, good] - lp[row, bad])
    finally:
        model.train(was_training)
    return out


def critic_margins(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    add_bos: bool = False,
) -> list[float]:
    """log p(" A") - log p(" B") after the judging prompt, for each (instruction, response), in order."""
    return _margins_for_prompts(
        model, tokenizer, [critic_prompt(i, r) for i, r in pairs], batch_size=batch_size, add_bos=add_bos
    )


def calibration_margin(model: Any, tokenizer: Any, *, add_bos: bool = False) -> float:
    """The margin on a content-free pair ("N/A", "N/A"): the critic's label bias, which callers may
    subtract before comparing margins with a fixed threshold (contextual calibration)."""
    return critic_margins(model, tokenizer, [("N/A", "N/A")], add_bos=add_bos)[0]


def best_of_n(candidates: Sequence[str], margins: Sequence[float]) -> int:
    """Index of the candidate with the highest margin; ties go to the first; NaN ranks lowest."""
    if len(candidates) != len(margins):
        raise ValueError(f"{len(candidates)} candidates but {len(margins)} margins")
    if not candidates:
        raise ValueError("best_of_n needs at least one candidate")
    best, best_value = 0, -math.inf
    for i, m in enumerate(margins):
        value = -math.inf if math.isnan(m) else m
        if value > best_value:
            best, best_value = i, value
    return best
