"""IFEval in the evaluation: its file formats, its verdicts per response and its four metrics.

- **Input format** (Google's ``input_data.jsonl``): one ``{"key", "prompt", "instruction_id_list",
  "kwargs"}`` object per line. ``load_inputs`` turns each line into an ``InstructionRecord`` (id =
  the key as text, instruction = the prompt, category ``constrained``, source ``user``, one
  constraint per instruction), so the real 541 prompts can be the held-out set of a run
  (``instructions.test_file``) or the ``--tests`` of ``score``.
- **Response format** (``input_response_data``): one ``{"prompt", "response"}`` object per line,
  matched to the test items by prompt.
- **Verdicts**: ``item_verdicts`` gives the official per-instruction strict and loose verdicts on the
  response as the project stores it: the text cut at the first stop string (``EvalResponse.response``).
- **Metrics** (``summary``): prompt-level strict and loose accuracy (every instruction of a prompt
  followed), instruction-level strict and loose accuracy (instructions pooled over prompts), and
  per-instruction-id pass rates: the four numbers lm-eval's ``ifeval`` task reports, on the same
  definitions.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any

from .. import constraints
from ..schemas import ArtifactError, EvalScore, InstructionRecord, read_json_lines
from .statistics import summarize

INPUT_FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")
RESPONSE_FIELDS = ("prompt", "response")
CHECKED_TEXT = ("the response as scored everywhere in this report: the generated text cut at the first stop "
                "string (END, or a new Instruction:/Response: turn), stripped")
METRICS = ("prompt_level_strict", "prompt_level_loose", "inst_level_strict", "inst_level_loose")


def implementation() -> str:
    return (f"Google's instruction_following_eval as shipped in lm-eval {version('lm-eval')} "
            "(lm_eval/tasks/ifeval), run offline")


# --------------------------------------------------------------------------------------------
# File formats
# --------------------------------------------------------------------------------------------


def _first_object(path: Path) -> dict | None:
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    obj = json.loads(line)
                    return obj if isinstance(obj, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return None


def is_input_file(path: str | Path) -> bool:
    """Whether the file's first record is in IFEval's input format (it has key and instruction_id_list)."""
    obj = _first_object(Path(path))
    return obj is not None and {"key", "instruction_id_list"} <= set(obj)


def is_response_file(path: str | Path) -> bool:
    """Whether the file's first record is in IFEval's response format (prompt and response, no id)."""
    obj = _first_object(Path(path))
    return obj is not None and set(RESPONSE_FIELDS) <= set(obj) and "id" not in obj


def _input_record(obj: dict) -> tuple[InstructionRecord | None, list[tuple[str, str]]]:
    """The record of one input line, or (None, [(field, problem)])."""
    problems = [(f, "missing") for f in INPUT_FIELDS if f not in obj]
    extra = sorted(set(obj) - set(INPUT_FIELDS))
    problems += [(f, "unknown field (IFEval's input format has key, prompt, instruction_id_list, kwargs)")
                 for f in extra]
    if problems:
        return None, problems
    key, prompt, ids, kwargs = (obj[f] for f in INPUT_FIELDS)
    if isinstance(key, bool) or not isinstance(key, (int, str)) or not str(key).strip():
        problems.append(("key", "must be an integer or a non-empty string"))
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append(("prompt", "must be a non-empty string"))
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        problems.append(("instruction_id_list", "must be a non-empty list of instruction ids"))
    if not isinstance(kwargs, list):
        problems.append(("kwargs", "must be a list with one object per instruction id"))
    elif isinstance(ids, list) and len(kwargs) != len(ids):
        problems.append(("kwargs", f"has {len(kwargs)} entries for {len(ids)} instruction ids"))
    if problems:
        return None, problems
    specs = []
    for k, (instruction_id, kw) in enumerate(zip(ids, kwargs)):
        try:
            specs.append(constraints.from_ifeval(instruction_id, kw))
        except ValueError as e:
            problems.append((f"instruction_id_list.{k}", str(e)))
    if problems:
        return None, problems
    return InstructionRecord(id=str(key), instruction=prompt, category="constrained", source="user",
                             constraints=specs), []


def load_inputs(path: str | Path) -> list[InstructionRecord]:
    """IFEval's input_data.jsonl as test items; ArtifactError listing every bad line and field."""
    path = Path(path)
    objects, problems = read_json_lines(path)
    records: list[InstructionRecord] = []
    seen: dict[str, int] = {}
    prompts: dict[str, int] = {}
    for n, obj in objects:
        record, bad = _input_record(obj)
        problems += [f"{path}:{n}: {field}: {problem}" for field, problem in bad]
        if record is None:
            continue
        if record.id in seen:
            problems.append(f"{path}:{n}: key: duplicate {record.id!r} (first at line {seen[record.id]})")
            continue
        if record.instruction in prompts:  # responses are matched by prompt: it must name one item
            problems.append(f"{path}:{n}: prompt: same prompt as line {prompts[record.instruction]}")
            continue
        seen[record.id] = prompts[record.instruction] = n
        records.append(record)
    if problems:
        raise ArtifactError(path, problems)
    return records


def load_test_items(path: str | Path) -> list[InstructionRecord]:
    """A test set in either format: IFEval's input_data.jsonl or InstructionRecord JSONL."""
    from ..schemas import load_jsonl

    return load_inputs(path) if is_input_file(path) else load_jsonl(path, InstructionRecord)


def load_responses(path: str | Path, items: Sequence[InstructionRecord]) -> dict[str, str]:
    """IFEval's response file as {item id: response}, matched by prompt. Every test item needs
    exactly one response (as in IFEval's own evaluation); anything else is an ArtifactError."""
    path = Path(path)
    objects, problems = read_json_lines(path)
    by_prompt = {it.instruction: it.id for it in items}
    out: dict[str, str] = {}
    first: dict[str, int] = {}
    for n, obj in objects:
        where = f"{path}:{n}"
        bad = [(f, "missing") for f in RESPONSE_FIELDS if f not in obj]
        bad += [(f, "unknown field (IFEval's response format has prompt and response)")
                for f in sorted(set(obj) - set(RESPONSE_FIELDS))]
        if not bad:
            if not isinstance(obj["prompt"], str):
                bad.append(("prompt", "must be a string"))
            elif obj["prompt"] not in by_prompt:
                bad.append(("prompt", "matches no test item's prompt"))
            if not isinstance(obj["response"], str):
                bad.append(("response", "must be a string"))
        if bad:
            problems += [f"{where}: {field}: {problem}" for field, problem in bad]
            continue
        item_id = by_prompt[obj["prompt"]]
        if item_id in out:
            problems.append(f"{where}: prompt: a second response to item {item_id!r} (first at line {first[item_id]})")
            continue
        out[item_id], first[item_id] = obj["response"], n
    missing = [it.id for it in items if it.id not in out]
    if missing and not problems:
        shown = ", ".join(repr(i) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
        problems.append(f"{path}: prompt: no response for {len(missing)} test item(s): {shown}")
    if problems:
        raise ArtifactError(path, problems)
    return out


# --------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------


def item_verdicts(item: InstructionRecord, response: str) -> tuple[list[str], list[bool], list[bool]]:
    """(instruction ids, strict, loose) for one response to one item: the official functions."""
    strict, loose = constraints.verdicts(item.constraints, response, item.instruction)
    return [c["type"] for c in item.constraints], strict, loose


def verdict_fields(item: InstructionRecord, response: str) -> dict[str, Any]:
    """The IFEval fields of an EvalScore: prompt-level (None without instructions) and per instruction."""
    ids, strict, loose = item_verdicts(item, response)
    return {
        "checks_strict": all(strict) if ids else None,
        "checks_loose": all(loose) if ids else None,
        "instruction_id_list": ids,
        "follow_instruction_list_strict": strict,
        "follow_instruction_list_loose": loose,
    }


def score_responses(items: Sequence[InstructionRecord], responses: Mapping[str, str], model: str) -> list[EvalScore]:
    """Scores of responses that come without a generation record (IFEval's response format): only
    the IFEval verdicts; the project's criteria need the raw text, stop string and finish reason."""
    return [EvalScore(id=it.id, model=model, category=it.category, criteria={},
                      **verdict_fields(it, responses[it.id])) for it in items]


# --------------------------------------------------------------------------------------------
# The four metrics
# --------------------------------------------------------------------------------------------


def _rate(values: Sequence[bool]) -> dict[str, Any]:
    return asdict(summarize(list(values)))


def model_metrics(scores: Sequence[EvalScore]) -> dict[str, Any]:
    """IFEval's four metrics and per-instruction-id pass rates over one model's scores."""
    scored = [s for s in scores if s.instruction_id_list]
    strict = [v for s in scored for v in s.follow_instruction_list_strict]
    loose = [v for s in scored for v in s.follow_instruction_list_loose]
    per_id: dict[str, dict[str, list[bool]]] = defaultdict(lambda: {"strict": [], "loose": []})
    for s in scored:
        for i, st, lo in zip(s.instruction_id_list, s.follow_instruction_list_strict, s.follow_instruction_list_loose):
            per_id[i]["strict"].append(st)
            per_id[i]["loose"].append(lo)
    return {
        "prompt_level_strict": _rate([bool(s.checks_strict) for s in scored]),
        "prompt_level_loose": _rate([bool(s.checks_loose) for s in scored]),
        "inst_level_strict": _rate(strict),
        "inst_level_loose": _rate(loose),
        "per_instruction": {i: {"n": len(v["strict"]), "strict": sum(v["strict"]) / len(v["strict"]),
                                "loose": sum(v["loose"]) / len(v["loose"])}
                            for i, v in sorted(per_id.items())},
    }


def summary(items: Sequence[InstructionRecord], scores: Sequence[EvalScore], models: Sequence[str],
            filtered_training_data: str) -> dict[str, Any]:
    """The ``ifeval`` section of results.json."""
    by_model: dict[str, list[EvalScore]] = defaultdict(list)
    for s in scores:
        by_model[s.model].append(s)
    with_instructions = [it for it in items if it.constraints]
    return {
        "implementation": implementation(),
        "checked_text": CHECKED_TEXT,
        "filtered_training_data": filtered_training_data,
        "definitions": {
            "prompt_level_strict": "share of prompts whose every instruction is followed by the response as is",
            "prompt_level_loose": "the same, each instruction passing on any of IFEval's loose variants of the "
                                  "response (first line, last line or both removed; markdown '*' removed)",
            "inst_level_strict": "share of instructions followed, pooled over prompts (strict)",
            "inst_level_loose": "share of instructions followed, pooled over prompts (loose)",
            "interval": "Wilson 95% (instruction-level intervals treat instructions as independent; "
                        "they are not, so read them as a lower bound on the uncertainty)",
        },
        "n_prompts": len(with_instructions),
        "n_instructions": sum(len(it.constraints) for it in with_instructions),
        "instruction_ids": sorted({c["type"] for it in with_instructions for c in it.constraints}),
        "models": {m: model_metrics(by_model.get(m, [])) for m in models},
    }


QC_STATEMENT = ("yes: sft-data keeps a response only if it follows every IFEval instruction of its item, strict, "
                "checked by the same official code; IFEval scores are therefore not independent of the SFT data "
                "filter (the other criteria, and any judge, are)")
