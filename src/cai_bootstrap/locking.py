"""One command at a time on a run directory: an exclusive lock on ``RUN/.lock``.

The lock is the kernel's (``flock``), so it goes with its process however that ends: a killed
command never leaves a run locked on its own machine. The file says who holds it (pid, host,
command, start) for messages. A record left by a process on another machine cannot be checked
from here; it is reported with how to clear it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .console import console
from .errors import UserError

LOCK_FILE = ".lock"


class RunInUse(UserError):
    """Another command holds the run directory, or may (a record from another machine)."""


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')} (`cai-bootstrap {holder.get('command')}`, "
            f"started {holder.get('started')})")


def _read(fd: int) -> dict[str, Any] | None:
    data = os.pread(fd, 65536, 0)
    try:
        holder = json.loads(data.decode("utf-8")) if data.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}  # written by something else: no one we can name
    return holder if isinstance(holder, dict) else {}


def lock_holder(run_dir: Path) -> dict[str, Any] | None:
    """Who holds the run's lock now (its record), or None when no process on this machine does."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd) or {}
        holder = _read(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        # free here; a record from another machine may still stand for a live process there
        return holder if holder and holder.get("host") != socket.gethostname() else None
    finally:
        os.close(fd)


class RunLock:
    """``with RunLock(run_dir, command):`` holds the run directory for one command."""

    def __init__(self, run_dir: Path, command: str):
        self.path = Path(run_dir) / LOCK_FILE
        self.command = command
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                who = describe(holder) if holder else "another command (starting or ending just now)"
                raise RunInUse(f"{self.path.parent} is in use by {who}: one command at a time works on a run "
                               f"directory; wait for it to finish") from None
            except OSError as e:  # a file system without locks: go on, but say what is not guarded
                console.print(f"[yellow]note: cannot lock {self.path} ({e.strerror}); make sure no other command "
                              f"works on this run directory meanwhile[/]", highlight=False, soft_wrap=True)
                break
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder removed the file as we opened it: lock the new one
        left = _read(fd)
        here = socket.gethostname()
        if left and left.get("host") != here:
            os.close(fd)
            raise RunInUse(f"{self.path} was left by {describe(left)}, and this machine ({here}) cannot tell "
                           f"whether that command still runs; if it does not, delete {self.path} and try again")
        if left:
            console.print(f"note: {self.path.parent} was held by {describe(left)}, which ended without "
                          f"releasing it; its running steps count as interrupted", highlight=False, soft_wrap=True)
        record = {"pid": os.getpid(), "host": here, "command": self.command,
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiting process re-checks the file
            os.close(self.fd)
            self.fd = None
