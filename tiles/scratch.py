"""Scratch files beside an output (a store being built, a map being written): their names tag
the machine and process that writes them, and a lock beside each dies with that process, so a
later run can remove what a killed one left without touching one still running."""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from pathlib import Path
from typing import IO

import psutil

try:  # POSIX; elsewhere scratch files are told apart by host and PID only
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

LOCK_SUFFIX = ".lock"  # beside a scratch file or folder: held (flock) by the run that writes it
LOCK_GRACE_S = 2.0  # between creating a lock file and locking it, it looks unheld


def scratch_tag() -> str:
    """HOST-PID-HEX: which machine and process made a scratch name, and a unique part."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def hold_lock(scratch: Path) -> IO[str] | None:
    """Lock the file beside `scratch` for as long as the run writes it: the lock dies with the
    process, however it ends, so an unheld lock marks an orphan (`is_orphan`) whatever machine,
    container or PID namespace the run was in. None where locks are not to be had."""
    if fcntl is None:
        return None
    lock = open(scratch.with_name(scratch.name + LOCK_SUFFIX), "w")  # noqa: SIM115 (held)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError:  # a file system without locks (some network mounts): host and PID only
        release_lock(lock)
        return None
    return lock


def release_lock(lock: IO[str] | None, keep_file: bool = False) -> None:
    """Unlock; `keep_file` (its scratch was not removed) leaves the unheld lock file that marks
    the scratch as an orphan for the next run (`is_orphan`)."""
    if lock is None:
        return
    if not keep_file:
        with contextlib.suppress(OSError):
            os.unlink(lock.name)
    lock.close()


def is_orphan(scratch: Path, host: str, pid: str) -> bool:
    """Whether no run holds `scratch`'s lock; without a lock file (a file system without locks,
    or made before them), whether it is this machine's and process `pid` is gone. A lock file
    younger than LOCK_GRACE_S counts as held: its run may not have locked it yet."""
    lock_path = scratch.with_name(scratch.name + LOCK_SUFFIX)
    if fcntl is not None and lock_path.is_file():
        with contextlib.suppress(OSError):
            if time.time() - lock_path.stat().st_mtime < LOCK_GRACE_S:
                return False
        try:
            with open(lock_path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:  # held: a run in progress
            return False
    return host == socket.gethostname() and pid.isdigit() and not psutil.pid_exists(int(pid))
