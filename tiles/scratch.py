"""Scratch files beside an output (a store being built, a map being written): their names tag
the machine and process that writes them, and a lock beside each dies with that process, so a
later run can remove what a killed one left without touching one still running."""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
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


IN_USE_SUFFIX = ".in-use" + LOCK_SUFFIX  # beside a store or run folder: `using` holds it
TAKE_TRIES = 10  # lock files removed under `_take` before it gives up on locking


class InUse(BlockingIOError):
    """Another process holds a store or run folder in a way that excludes this use."""


def in_use_lock(path: Path) -> Path:
    """The lock file beside `path` (`.NAME.in-use.lock`) that its users hold."""
    return path.with_name(f".{path.name}{IN_USE_SUFFIX}")


@contextlib.contextmanager
def using(path: Path, exclusive: bool = False) -> Iterator[None]:
    """Hold `path`'s use lock while the block runs: shared by its readers (trainings reading
    a tile store) or exclusive to one writer (a command writing a run folder, a build
    replacing a store), who removes the lock file on the way out. Raises `InUse` at once where
    another holder excludes this one; where no lock can be had (no fcntl, a read-only folder,
    a file system without locks) the block runs unguarded, as before locks."""
    lock = _take(in_use_lock(Path(path).resolve()), exclusive)  # a link's target's lock
    try:
        yield
    finally:
        if lock is not None:
            if exclusive:  # no one else holds it: a reader that opens it next sees it gone
                with contextlib.suppress(OSError):
                    os.unlink(lock.name)
            lock.close()


def held_or_refused(
    path: Path,
    refusal: Callable[[], Exception],
    exclusive: bool = False,
    held: contextlib.ExitStack | None = None,
) -> contextlib.ExitStack:
    """`using(path)` entered on `held` (a new stack by default), which the caller closes;
    where another holder excludes this use, `held` is closed and `refusal()` raised (the
    caller's one-line message) instead of `InUse`."""
    held = held if held is not None else contextlib.ExitStack()
    try:
        held.enter_context(using(path, exclusive))
    except InUse:
        held.close()
        raise refusal() from None
    return held


def _take(lock_path: Path, exclusive: bool) -> IO[str] | None:
    """The locked lock file, or None without locks. A file its last holder removed between
    our opening and locking it is no lock any more: open the one now at the path."""
    if fcntl is None:
        return None
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    for _ in range(TAKE_TRIES):
        try:  # readable too: NFS takes a shared flock as a read lock, which needs it
            lock = open(lock_path, "a+")  # noqa: SIM115 (held by the caller)
        except OSError:
            return None
        try:
            fcntl.flock(lock, mode)
        except BlockingIOError:
            lock.close()
            raise InUse(lock_path) from None
        except OSError:  # no locks on this file system
            lock.close()
            return None
        try:
            held, there = os.fstat(lock.fileno()), os.stat(lock_path)
            if (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino):
                return lock
        except OSError:  # removed meanwhile
            pass
        lock.close()
    return None  # a file system whose files never compare the same: unguarded
