"""YAML read strictly: a key given twice in one mapping is an error naming both lines (PyYAML keeps
the last one silently), and the line of every key is kept so that later validation errors can say
``file:line``."""

from __future__ import annotations

from typing import Any

import yaml

from .errors import UserError

KeyPath = tuple[str, ...]


class YAMLSourceError(UserError, ValueError):
    """Text that is not valid YAML, or a mapping with a duplicate key; the message has file:line,
    ``problem`` the same without the place."""

    def __init__(self, where: str, problem: str):
        self.problem = problem
        super().__init__(f"{where}: {problem}")


def parse(text: str, source: str) -> tuple[Any, dict[KeyPath, int]]:
    """The document (None when there is none) and the 1-based line of every mapping key by key path
    (list items by their index). ``source`` names the text in messages: a file, or ``--set a=b``."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        lines: dict[KeyPath, int] = {}
        _walk(node, (), lines, source, set())
        return loader.construct_document(node), lines
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise YAMLSourceError(where, f"not valid YAML: {problem}") from None
    except yaml.YAMLError as e:  # no position (e.g. a stream error)
        raise YAMLSourceError(source, f"not valid YAML: {e}") from None
    finally:
        loader.dispose()


def _walk(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int], source: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias of a node already walked (possibly of itself)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<:` merges and complex keys: not part of our schema, left to validation
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in first:
                dotted = ".".join((*path, key))
                raise YAMLSourceError(f"{source}:{line}", f"{dotted}: duplicate key (first at line {first[key]}); "
                                      f"YAML would keep only the last one")
            first[key] = line
            lines[(*path, key)] = line
            _walk(value_node, (*path, key), lines, source, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, str(i))] = item.start_mark.line + 1
            _walk(item, (*path, str(i)), lines, source, seen)
