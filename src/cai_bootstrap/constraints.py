"""Machine-checkable constraints carried by instructions as data, IFEval-style.

A constraint is a dict such as ``{"type": "max_words", "n": 10}``. ``validate_spec`` checks its
shape; the checks themselves live beside it so that QC and evaluation use one implementation.
"""

from __future__ import annotations

from typing import Any

# type -> {param: python type}
CONSTRAINT_PARAMS: dict[str, dict[str, type]] = {
    "max_words": {"n": int},
    "min_words": {"n": int},
    "num_list_items": {"n": int},
    "num_sentences": {"n": int},
    "no_commas": {},
    "all_lowercase": {},
    "all_uppercase": {},
    "json_format": {},
    "ends_with": {"phrase": str},
    "starts_with": {"phrase": str},
    "contains_keyword": {"keyword": str},
}


def validate_spec(spec: Any) -> dict[str, Any]:
    """Return the spec if well formed, else raise ValueError naming what is wrong."""
    if not isinstance(spec, dict):
        raise ValueError(f"constraint must be an object, got {type(spec).__name__}")
    kind = spec.get("type")
    if kind not in CONSTRAINT_PARAMS:
        raise ValueError(f"unknown constraint type {kind!r}; known: {sorted(CONSTRAINT_PARAMS)}")
    params = CONSTRAINT_PARAMS[kind]
    extra = set(spec) - {"type"} - set(params)
    if extra:
        raise ValueError(f"constraint {kind!r} has unknown keys {sorted(extra)}")
    for name, typ in params.items():
        if name not in spec:
            raise ValueError(f"constraint {kind!r} needs {name!r}")
        value = spec[name]
        if typ is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"constraint {kind!r}: {name!r} must be a positive integer")
        if typ is str and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"constraint {kind!r}: {name!r} must be a non-empty string")
    return spec
