"""Atomic writes, file hashes and safe names: a reader never sees a half-written artifact, and a
name from a config never becomes a path."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .errors import UserError


TMP_SUFFIX = ".tmp"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_name(name: str) -> str:
    """A config value that becomes a file name (a model name): letters, digits, ``_ . -``, no ``..``."""
    if not NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{name!r} is not a valid name: it becomes a file name, so use letters, digits, "
                         f"'_', '.' and '-' only, starting with a letter or digit, without '..'")
    return name


class PathOutside(UserError, ValueError):
    """A path built from a run directory that would leave it."""


def inside(root: str | Path, rel: str | Path) -> Path:
    """``root/rel``, refusing a path that leaves ``root`` (``..``, an absolute path). Symbolic links
    inside ``root`` (a data folder on another disk) are the owner's choice and are kept."""
    root = Path(os.path.abspath(root))
    path = Path(os.path.normpath(root / rel))
    if not path.is_relative_to(root):
        raise PathOutside(f"{rel!s} is outside {root}: a run writes only inside its own directory")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temporary file beside the target, then rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save_folder(out_dir: str | Path, save: Callable[[Path], None]) -> Path:
    """``save(folder)`` writes into a temporary folder inside ``out_dir`` (same file system); then each
    file moves into ``out_dir`` with an atomic rename. A process killed while saving leaves every
    file in ``out_dir`` whole (old or new), and the temporary folder for the next run to remove."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save.", suffix=TMP_SUFFIX, dir=out_dir))
    try:
        save(tmp)
        for p in sorted(tmp.iterdir()):
            os.replace(p, out_dir / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def is_orphan(path: Path) -> bool:
    """A temporary file or folder of an interrupted atomic write (``.NAME.xxxx.tmp``)."""
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIX)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def jsonl_line(record: BaseModel | dict) -> str:
    obj = record.model_dump(mode="json") if isinstance(record, BaseModel) else record
    return json.dumps(obj, ensure_ascii=False)


def write_jsonl(path: str | Path, records: Iterable[BaseModel | dict]) -> Path:
    """One JSON object per line; real newlines inside strings are escaped by JSON, never doubled."""
    return atomic_write_text(path, "".join(jsonl_line(r) + "\n" for r in records))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_path(path: str | Path) -> str:
    """Hash of a file, or of a folder's files (names and contents, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
