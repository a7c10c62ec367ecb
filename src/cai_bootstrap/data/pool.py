"""The built-in instruction pool: templates x fillers, shipped as JSON data in ``data/builtin/``.

``templates.json`` holds ``{"templates": [...]}``; each template is an object with

``id``                 ``[a-z0-9-]+``, unique; records are ``b-<id>-<n>`` (n counts from 0 in the
                       template's expansion order, so ids are stable as long as the data is).
``category``           one of ``schemas.CATEGORIES``. ``qa`` means "a short correct answer exists":
                       a qa template must give ``reference_answers``. Open questions without one
                       correct answer ("Explain why ...") are category ``open``.
``text``               the instruction with ``{slot}`` or ``{slot.field}`` placeholders
                       (``{{`` and ``}}`` for literal braces).
``fillers``            ``{slot: list name}`` — the filler list a slot draws from; ``name[a:b]`` takes
                       a slice, so templates that share a frame can use disjoint parts of a list.
``reference_answers``  optional; aliases of the short answer, each rendered like ``text``. An entry
                       that is exactly ``"{slot.field}"`` where the field holds a list expands to
                       that list.
``constraints``        optional; IFEval instructions as constraint specs (``constraints.CONSTRAINT_PARAMS``:
                       ``{"type": <IFEval id>, **kwargs}``). A parameter (or an element of a list
                       parameter) that is exactly ``"{slot}"``/``"{slot.field}"`` takes the filler
                       value as is (an int stays an int, a list a list); other strings are rendered
                       like ``text``.
``combine``            ``"product"`` (default): every combination of the slots' lists, first slot
                       slowest. ``"cycle"``: as many items as the longest list, item k takes element
                       ``k % len`` of each list — for parameters (word limits, phrases) that should
                       vary without multiplying the content into near-duplicates.
``max_items``          optional; keep a deterministic sample (seeded by the template id) of this
                       many combinations, in expansion order.
``note``               optional free text.

``fillers.json`` holds ``{"fillers": {name: [items]}}``; items of a list are all scalars (strings,
integers) or all objects whose values are strings, integers or lists of strings.

Anything malformed raises ``TemplateError`` naming the file and the template (or filler list).
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ..constraints import validate_spec
from ..formats import normalize
from ..schemas import CATEGORIES, InstructionRecord

TEMPLATES_FILE = "templates.json"
FILLERS_FILE = "fillers.json"

_TEMPLATE_KEYS = {
    "id", "category", "text", "fillers", "reference_answers", "constraints", "combine", "max_items", "note",
}
_ID = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_SLOT_REF = re.compile(rf"({_NAME})(?:\[(\d*):(\d*)\])?")
_TOKEN = re.compile(rf"\{{\{{|\}}\}}|\{{({_NAME})(?:\.({_NAME}))?\}}|[{{}}]")
_WHOLE = re.compile(rf"\{{({_NAME})(?:\.({_NAME}))?\}}")


class TemplateError(ValueError):
    """A built-in template or filler list is malformed."""


@dataclass(frozen=True)
class Template:
    id: str
    category: str
    text: str
    slots: tuple[tuple[str, tuple[Any, ...]], ...]  # (slot, resolved filler values), in order
    reference_answers: tuple[str, ...] = ()
    constraints: tuple[dict[str, Any], ...] = ()
    combine: str = "product"
    max_items: int | None = None
    source: str = TEMPLATES_FILE

    def combinations(self) -> list[dict[str, Any]]:
        """The slot bindings this template expands to, in expansion order (after max_items)."""
        names = [s for s, _ in self.slots]
        lists = [v for _, v in self.slots]
        if not lists:
            combos: list[tuple[Any, ...]] = [()]
        elif self.combine == "cycle":
            n = max(len(v) for v in lists)
            combos = [tuple(v[k % len(v)] for v in lists) for k in range(n)]
        else:
            combos = list(itertools.product(*lists))
        if self.max_items is not None and len(combos) > self.max_items:
            keep = sorted(random.Random(f"cai-bootstrap:{self.id}").sample(range(len(combos)), self.max_items))
            combos = [combos[i] for i in keep]
        return [dict(zip(names, c)) for c in combos]

    def render(self, binding: dict[str, Any]) -> tuple[str, list[str], list[dict[str, Any]]]:
        """(instruction, reference answers, constraints) for one slot binding."""
        where = f"{self.source}: template {self.id!r}"
        text = _render(self.text, binding, where)
        refs: list[str] = []
        for entry in self.reference_answers:
            whole = _WHOLE.fullmatch(entry)
            value = _lookup(whole, binding, where) if whole else None
            if whole and isinstance(value, list):
                refs.extend(str(v) for v in value)
            else:
                refs.append(_render(entry, binding, where))
        refs = [r for r in dict.fromkeys(r.strip() for r in refs) if r]
        specs = []
        for spec in self.constraints:
            rendered: dict[str, Any] = {}
            for key, value in spec.items():
                if key != "type" and isinstance(value, str):
                    value = self._param(value, binding, where)
                elif key != "type" and isinstance(value, list):
                    value = [self._param(v, binding, where) if isinstance(v, str) else v for v in value]
                rendered[key] = value
            try:
                specs.append(validate_spec(rendered))
            except ValueError as e:
                raise TemplateError(f"{where}: constraint {rendered}: {e}") from None
        return text, refs, specs


    @staticmethod
    def _param(value: str, binding: dict[str, Any], where: str) -> Any:
        whole = _WHOLE.fullmatch(value)
        return _lookup(whole, binding, where) if whole else _render(value, binding, where)


def _lookup(match: re.Match[str], binding: dict[str, Any], where: str) -> Any:
    slot, field = match.group(1), match.group(2)
    if slot not in binding:
        raise TemplateError(f"{where}: placeholder {{{slot}}} has no filler list (add it to 'fillers')")
    value = binding[slot]
    if field is None:
        if isinstance(value, dict):
            raise TemplateError(f"{where}: slot {slot!r} holds objects; use {{{slot}.<field>}}")
        return value
    if not isinstance(value, dict):
        raise TemplateError(f"{where}: slot {slot!r} holds plain values; {{{slot}.{field}}} has no field")
    if field not in value:
        raise TemplateError(f"{where}: filler item {value} of slot {slot!r} has no field {field!r}")
    return value[field]


def _render(text: str, binding: dict[str, Any], where: str) -> str:
    def sub(m: re.Match[str]) -> str:
        tok = m.group(0)
        if tok == "{{":
            return "{"
        if tok == "}}":
            return "}"
        if m.group(1) is None:
            raise TemplateError(f"{where}: stray {tok!r} in {text!r} (write {tok * 2} for a literal brace)")
        value = _lookup(m, binding, where)
        if isinstance(value, (list, dict)):
            raise TemplateError(f"{where}: placeholder {tok} is a {type(value).__name__}, not text")
        return str(value)

    return _TOKEN.sub(sub, text)


def _placeholders(text: str) -> set[str]:
    return {m.group(1) for m in _TOKEN.finditer(text) if m.group(1)}


def _check_filler_list(name: str, items: Any, where: str) -> None:
    if not isinstance(items, list) or not items:
        raise TemplateError(f"{where}: filler list {name!r} must be a non-empty list")
    kinds = {"object" if isinstance(i, dict) else "scalar" for i in items}
    if len(kinds) > 1:
        raise TemplateError(f"{where}: filler list {name!r} mixes objects and plain values")
    for item in items:
        values = item.values() if isinstance(item, dict) else [item]
        for v in values:
            ok = (isinstance(v, (str, int)) and not isinstance(v, bool)) or (
                isinstance(v, list) and v and all(isinstance(x, str) and x.strip() for x in v)
            )
            if not ok or (isinstance(v, str) and not v.strip()):
                raise TemplateError(f"{where}: filler list {name!r}: bad item {item!r}")


def parse_templates(
    raw_templates: Any,
    raw_fillers: Any,
    templates_file: str = TEMPLATES_FILE,
    fillers_file: str = FILLERS_FILE,
) -> list[Template]:
    """Validate the two JSON documents and resolve every template's filler lists."""
    if not isinstance(raw_fillers, dict) or not isinstance(raw_fillers.get("fillers"), dict):
        raise TemplateError(f"{fillers_file}: expected an object with a 'fillers' object")
    fillers: dict[str, list[Any]] = raw_fillers["fillers"]
    for name, items in fillers.items():
        _check_filler_list(name, items, fillers_file)
    if not isinstance(raw_templates, dict) or not isinstance(raw_templates.get("templates"), list):
        raise TemplateError(f"{templates_file}: expected an object with a 'templates' list")

    out: list[Template] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_templates["templates"]):
        tid = raw.get("id") if isinstance(raw, dict) else None
        where = f"{templates_file}: template {tid!r}" if isinstance(tid, str) else f"{templates_file}: template #{i}"
        if not isinstance(raw, dict):
            raise TemplateError(f"{where}: must be an object")
        if not isinstance(tid, str) or not _ID.fullmatch(tid):
            raise TemplateError(f"{where}: 'id' must match [a-z0-9-]+")
        if tid in seen:
            raise TemplateError(f"{where}: duplicate id")
        seen.add(tid)
        unknown = set(raw) - _TEMPLATE_KEYS
        if unknown:
            raise TemplateError(f"{where}: unknown keys {sorted(unknown)}")
        if raw.get("category") not in CATEGORIES:
            raise TemplateError(f"{where}: category {raw.get('category')!r} is not one of {list(CATEGORIES)}")
        text = raw.get("text")
        if not isinstance(text, str) or not text.strip():
            raise TemplateError(f"{where}: 'text' must be a non-empty string")
        slot_refs = raw.get("fillers", {})
        if not isinstance(slot_refs, dict):
            raise TemplateError(f"{where}: 'fillers' must map slot -> filler list name")
        slots = []
        for slot, ref in slot_refs.items():
            m = _SLOT_REF.fullmatch(ref) if isinstance(ref, str) else None
            if not re.fullmatch(_NAME, slot) or m is None:
                raise TemplateError(f"{where}: bad filler binding {slot!r}: {ref!r}")
            if m.group(1) not in fillers:
                raise TemplateError(f"{where}: slot {slot!r} uses unknown filler list {m.group(1)!r} (not in {fillers_file})")
            values = fillers[m.group(1)]
            if "[" in ref:
                a = int(m.group(2)) if m.group(2) else 0
                b = int(m.group(3)) if m.group(3) else len(values)
                if not 0 <= a < b <= len(values):
                    raise TemplateError(f"{where}: slice {ref!r} is outside {m.group(1)!r} ({len(values)} items)")
                values = values[a:b]
            slots.append((slot, tuple(values)))
        refs = raw.get("reference_answers", [])
        if not isinstance(refs, list) or not all(isinstance(r, str) and r.strip() for r in refs):
            raise TemplateError(f"{where}: 'reference_answers' must be a list of non-empty strings")
        if raw["category"] == "qa" and not refs:
            raise TemplateError(f"{where}: a qa template needs reference_answers (use category 'open' otherwise)")
        specs = raw.get("constraints", [])
        if not isinstance(specs, list) or not all(isinstance(s, dict) for s in specs):
            raise TemplateError(f"{where}: 'constraints' must be a list of objects")
        combine = raw.get("combine", "product")
        if combine not in ("product", "cycle"):
            raise TemplateError(f"{where}: 'combine' must be 'product' or 'cycle'")
        max_items = raw.get("max_items")
        if max_items is not None and (isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1):
            raise TemplateError(f"{where}: 'max_items' must be a positive integer")
        used = _placeholders(text)
        for r in refs:
            used |= _placeholders(r)
        for s in specs:
            for v in s.values():
                for part in v if isinstance(v, list) else [v]:
                    if isinstance(part, str):
                        used |= _placeholders(part)
        bound = {s for s, _ in slots}
        if used - bound:
            raise TemplateError(f"{where}: placeholders without a filler list: {sorted(used - bound)}")
        if bound - _placeholders(text):
            raise TemplateError(f"{where}: filler slots not used in 'text': {sorted(bound - _placeholders(text))}")
        tpl = Template(
            id=tid,
            category=raw["category"],
            text=text,
            slots=tuple(slots),
            reference_answers=tuple(refs),
            constraints=tuple(specs),
            combine=combine,
            max_items=max_items,
            source=templates_file,
        )
        # Render every combination now, so that a bad filler surfaces here with the template's name.
        for binding in tpl.combinations():
            instruction, answers, _ = tpl.render(binding)
            if raw["category"] == "qa" and not answers:
                raise TemplateError(f"{where}: no reference answer for {instruction!r}")
        out.append(tpl)
    return out


def _read_json(name: str) -> Any:
    path = resources.files("cai_bootstrap.data").joinpath("builtin", name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TemplateError(f"{name}: missing from the package (cai_bootstrap/data/builtin/)") from None
    except json.JSONDecodeError as e:
        raise TemplateError(f"{name}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None


def load_builtin_templates() -> list[Template]:
    """The shipped templates, validated, with their filler lists resolved."""
    return parse_templates(_read_json(TEMPLATES_FILE), _read_json(FILLERS_FILE))


def expand(template: Template) -> list[InstructionRecord]:
    """Every instruction of one template, ids ``b-<template>-<n>``."""
    records = []
    for n, binding in enumerate(template.combinations()):
        text, refs, specs = template.render(binding)
        records.append(
            InstructionRecord(
                id=f"b-{template.id}-{n}",
                instruction=text,
                category=template.category,  # type: ignore[arg-type]
                source="builtin",
                reference_answers=refs,
                constraints=specs,
                template=template.id,
            )
        )
    return records


def builtin_pool(templates: list[Template] | None = None) -> list[InstructionRecord]:
    """All built-in instructions, deterministic, in template order.

    Raises TemplateError if two templates produce the same instruction (after
    ``formats.normalize``): the shipped data must not contain exact duplicates.
    """
    templates = load_builtin_templates() if templates is None else templates
    records: list[InstructionRecord] = []
    seen: dict[str, str] = {}
    for tpl in templates:
        for rec in expand(tpl):
            key = normalize(rec.instruction)
            if key in seen:
                raise TemplateError(
                    f"{tpl.source}: template {tpl.id!r}: {rec.instruction!r} duplicates {seen[key]}"
                )
            seen[key] = rec.id
            records.append(rec)
    return records
