"""Errors of the job layer (configs, run folders); one line, naming the file and the fix."""

import errno
import re
from pathlib import Path


class PipelineError(Exception):
    """A config, run folder or job argument is wrong."""


class DamagedRunError(PipelineError):
    """A run folder to resume lost or damaged a file it needs (`path`: what is wrong, `what`);
    the fix depends on the command (`geodnn train --overwrite`, `geodnn run --force`)."""

    def __init__(self, path: Path, what: str, fix: str) -> None:
        super().__init__(f"{path}: {what}; {fix}")
        self.path, self.what = path, what


# PyTorch's allocators, CPU and CUDA, when an allocation fails (a RuntimeError, not MemoryError)
_ALLOCATION = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes|out of memory")


def out_of_memory(exc: BaseException) -> str | None:
    """One line for an allocation that failed (NumPy's MemoryError, PyTorch's CPU or CUDA
    allocator), saying how to ask for less; None for any other error."""
    if not isinstance(exc, MemoryError):
        found = _ALLOCATION.search(str(exc)) if isinstance(exc, RuntimeError) else None
        if found is None:
            return None
        if found.group(1):
            return f"out of memory ({int(found.group(1)) / 1e9:.3g} GB asked for); {_LESS}"
    return f"out of memory; {_LESS}"


_LESS = (
    "ask for less: in training a smaller [train] batch_size, [data] crop or solver slots, "
    "in prediction a smaller --chunk or --batch"
)


# The system refused a file: one line naming it and what to check.
REFUSED = {
    errno.EACCES: "check its folder's permissions",
    errno.EPERM: "check its folder's permissions",
    errno.EROFS: "pick a folder on a writable disk",
    errno.ENOSPC: "free some disk space",
    errno.EDQUOT: "free some of your disk quota",
    errno.ENOTDIR: "a folder on its path is a file: pick another path",
}


def refused_file(exc: OSError) -> str | None:
    """One line for a file the system refused (permissions, read-only or full disk, a file
    where a folder should be); None for other OS errors (a read error, a lost connection), which
    keep their traceback."""
    if exc.errno not in REFUSED:
        return None
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror}; {REFUSED[exc.errno]}"


def system_refusal(exc: BaseException) -> str | None:
    """One line for what the system refused a command (a file, memory), which the CLI and each
    rank report without a traceback; None for anything else."""
    return refused_file(exc) if isinstance(exc, OSError) else out_of_memory(exc)
