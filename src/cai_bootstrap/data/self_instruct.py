"""Self-instruct, the pure part: build the list prompt, parse the base model's continuation.

The base model sees a numbered list of seed instructions and continues it (Wang et al., 2023,
adapted for a base model: no chat template, no "Instruction:" format, just a list)::

    Here is a list of diverse tasks. ...
    1. What is the capital of Kenya?
    ...
    8. Rewrite in the past tense: The baker opens the shop at six.
    9.

The model's text continues item 9 (without its number), then usually writes ``10. ...`` and so on.
``parse_numbered_list`` turns that continuation into instructions and says why it dropped the rest.

Parsing rules (decisions, documented here and tested):

* Line 1 is item ``start``. Then every line ``N. text`` / ``N) text`` is an item; numbering gaps are
  fine (10, 12), a number that does not increase (the model restarted a list) **stops** parsing.
* A blank line after some text **stops** parsing: a base model that leaves the list rarely comes back.
* A line holding a template marker (``Instruction:``, ``Response:``, ``Input:``, ``Output:``, chat
  markers) is dropped and **stops** parsing: the model has run away into another format.
* An unnumbered line continues the previous item if that item ends with ``:`` (an instruction
  followed by its input on the next line); otherwise it is dropped (``meta`` if it talks about the
  list, else ``unnumbered``).
* An item is dropped as ``meta`` ("Here are more tasks:"), ``no_letters``, ``too_short`` (< 3
  words), ``too_long`` (> 60 words), ``unbalanced`` (brackets or double quotes that do not pair up),
  ``incomplete`` (ends with ``:`` and no input follows), ``duplicate`` (same as an earlier item or
  an ``exclude`` text after ``formats.normalize``), ``truncated`` (see below).
* Truncation: a line that ends without punctuation is fine in the middle of the list (lists often
  omit the final period, and the next number shows the line was finished). Only the **last** line of
  a continuation that may have been cut off (it does not end with a newline, and the caller did not
  pass ``complete=True`` because generation stopped at EOS or a stop string) is dropped as
  ``truncated`` when it does not end in ``. ? ! " ' ) ]``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence

from ..formats import TEMPLATE_MARKERS, normalize, words
from ..schemas import InstructionRecord

PROMPT_HEADER = (
    "Here is a list of diverse tasks that a helpful assistant can do. Each task is one "
    "self-contained instruction on a single line: questions, writing, rewriting, lists, "
    "explanations and tasks with formatting rules.\n"
)
MIN_WORDS = 3
MAX_WORDS = 60

# Markers that show the model left the list for the training/chat format.
RUNAWAY_MARKERS: tuple[str, ...] = (
    *TEMPLATE_MARKERS,
    "Input:",
    "Output:",
    "User:",
    "Assistant:",
    "Human:",
    "<|endoftext|>",
    "###",
)
_NUMBERED = re.compile(r"^(\d{1,4})\s*[.)]\s*(.*)$")
_META = re.compile(
    r"^(?:"
    r"here\s+(?:are|is)\b|the\s+following\b|below\s+(?:are|is)\b|sure\b|okay\b|ok\b|note\s*:|"
    r"(?:some\s+)?more\s+(?:tasks|examples|instructions|ideas)\b|"
    r"(?:list\s+of\s+)?(?:tasks|examples|instructions)\s*(?:\d+\s*)?(?:[-–:]|$)|"
    r"(?:i\s+hope|hope\s+this|these\s+(?:tasks|are)|this\s+list|let\s+me\s+know)\b"
    r")",
    re.IGNORECASE,
)
_TERMINAL = tuple(".?!\"')]”’")
_PAIRS = (("(", ")"), ("[", "]"), ("{", "}"))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def build_prompt(
    seeds: Sequence[InstructionRecord], rng: random.Random, n_shown: int = 8
) -> tuple[str, int]:
    """A numbered list of up to ``n_shown`` seed instructions, ending with the next number.

    Diversity-guided: seeds are drawn round-robin over categories (category order and the pick
    inside each category come from ``rng``), so a prompt shows as many categories as possible;
    then the chosen lines are shuffled. Returns the prompt and the number the model continues.
    """
    if n_shown < 1:
        raise ValueError("n_shown must be at least 1")
    by_category: dict[str, list[str]] = {}
    seen: set[str] = set()
    for rec in seeds:
        key = normalize(rec.instruction)
        if key and key not in seen:
            seen.add(key)
            by_category.setdefault(rec.category, []).append(_one_line(rec.instruction))
    if not by_category:
        raise ValueError("build_prompt needs at least one seed instruction")
    categories = sorted(by_category)
    rng.shuffle(categories)
    queues = {c: rng.sample(by_category[c], len(by_category[c])) for c in categories}
    chosen: list[str] = []
    while len(chosen) < n_shown and any(queues.values()):
        for c in categories:
            if queues[c] and len(chosen) < n_shown:
                chosen.append(queues[c].pop())
    rng.shuffle(chosen)
    lines = "".join(f"{i}. {text}\n" for i, text in enumerate(chosen, start=1))
    nxt = len(chosen) + 1
    return f"{PROMPT_HEADER}{lines}{nxt}.", nxt


def _clean(text: str) -> str:
    text = text.strip()
    if text.startswith(("- ", "* ", "• ")):
        text = text[2:].strip()
    while len(text) > 4 and text.startswith("**") and text.endswith("**"):
        text = text[2:-2].strip()
    for q in ('"', "“"):
        closing = "”" if q == "“" else q
        if len(text) > 2 and text.startswith(q) and text.endswith(closing) and text.count('"') <= 2:
            text = text[1:-1].strip()
    return text


def _has_marker(text: str) -> bool:
    return any(m in text for m in RUNAWAY_MARKERS)


def _is_meta(text: str) -> bool:
    return bool(_META.match(text.strip(" *#-")))


def _unbalanced(text: str) -> bool:
    for a, b in _PAIRS:
        depth = 0
        for ch in text:
            depth += (ch == a) - (ch == b)
            if depth < 0:
                return True
        if depth:
            return True
    return text.count('"') % 2 == 1 or text.count("“") != text.count("”")


def _reason(text: str, may_be_truncated: bool) -> str | None:
    if not re.search(r"[^\W\d_]", text):
        return "no_letters"
    if _is_meta(text):
        return "meta"
    n = len(words(text))
    if n < MIN_WORDS:
        return "too_short"
    if n > MAX_WORDS:
        return "too_long"
    if may_be_truncated and not text.endswith(_TERMINAL):
        return "truncated"
    if _unbalanced(text):
        return "unbalanced"
    if text.endswith(":"):
        return "incomplete"
    return None


def parse_numbered_list(
    text: str,
    start: int,
    *,
    complete: bool = False,
    exclude: Iterable[str] = (),
    max_items: int | None = None,
) -> tuple[list[str], list[tuple[str, str]]]:
    """Parse a list continuation into (kept instructions, dropped (text, reason)), both in text order.

    ``complete=True`` says the generation ended by itself (EOS or a stop string), so its last line
    is not cut off. ``exclude``: texts that count as already seen (e.g. the seeds shown).
    ``max_items``: stop after this many items (kept or dropped).
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    items: list[str] = []  # item texts in order, before the checks
    item_lines: list[int] = []  # the line each item starts on
    scan_dropped: list[tuple[int, str, str]] = []  # (line, text, reason) found while scanning
    last_number = start - 1
    ended_early = False  # parsing stopped before the end of the text
    last_line_is_item = False  # the last line read belongs to the last item
    seen_text = False
    for i, raw in enumerate(lines):
        line = raw.strip()
        if not line:
            if seen_text:
                ended_early = True
                break
            continue
        seen_text = True
        m = _NUMBERED.match(line)
        starts_item = i == 0 or m is not None
        if starts_item and max_items is not None and len(items) >= max_items:
            ended_early = True
            break
        if _has_marker(line):
            scan_dropped.append((i, line, "template_marker"))
            ended_early = True
            break
        last_line_is_item = True
        if i == 0:
            # The continuation of item `start`; tolerate a model that repeats the number.
            items.append(m.group(2).strip() if m and int(m.group(1)) == start else line)
            item_lines.append(i)
            last_number = start
        elif m:
            number = int(m.group(1))
            if number <= last_number:
                ended_early = True  # the model restarted the list
                break
            last_number = number
            items.append(m.group(2).strip())
            item_lines.append(i)
        elif items and items[-1].endswith(":") and not _is_meta(line):
            items[-1] = f"{items[-1]} {line}"
        else:
            scan_dropped.append((i, line, "meta" if _is_meta(line) else "unnumbered"))
            last_line_is_item = False

    may_cut = last_line_is_item and not (ended_early or complete or text.endswith("\n"))
    seen = {normalize(t) for t in exclude}
    kept: list[str] = []
    found: list[tuple[int, str, str]] = list(scan_dropped)
    for k, item in enumerate(items):
        cleaned = _clean(item)
        reason = _reason(cleaned, may_cut and k == len(items) - 1)
        if reason is None:
            key = normalize(cleaned)
            if key in seen:
                reason = "duplicate"
            else:
                seen.add(key)
        if reason is None:
            kept.append(cleaned)
        else:
            found.append((item_lines[k], cleaned, reason))
    dropped = [(t, r) for _, t, r in sorted(found, key=lambda x: x[0])]
    return kept, dropped
