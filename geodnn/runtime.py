"""Process-wide settings for long training loops, waiting for a GPU before a timing, and the
switch for the compiled (numba) CPU loops.

A layer step allocates and frees tensors of a few MB many times per iteration. glibc's malloc
serves such blocks with mmap or hands the freed top of its heap back to the kernel, so the next
allocation faults fresh, kernel-zeroed pages in again. Measured on a 2-core VM (depth-8 chain,
batch 16 of 64 px crops): 7,000 page faults and up to 30 % of an ADMM iteration spent in the
kernel zeroing pages. `retain_freed_memory` makes malloc keep freed memory for reuse instead; the
resident set then stays at its peak, which a training loop reaches within its first iterations.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MIB = 1 << 20
# glibc refuses an mmap threshold above 32 MiB on 64-bit; blocks beyond it stay mmapped
MMAP_THRESHOLD = 32 * MIB
TRIM_THRESHOLD = 2**31 - 1  # a C int: at most 2 GiB of free heap top is kept
TOP_PAD = 64 * MIB
OPT_OUT = "GEODNN_RETAIN_FREED_MEMORY"


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask Linux to send this process `signum` when its parent dies (no-op elsewhere): a
    launcher or torchrun agent killed with SIGKILL must not leave its ranks training unwatched.
    Usable as a subprocess preexec_fn."""
    libc = _libc()
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, int(signum))


def follow_parent(pid_env: str) -> bool:
    """Get SIGTERM when the parent process whose pid the environment variable `pid_env` holds
    dies (`die_with_parent`); False when that parent is gone already, True when the variable is
    unset (started by hand: nothing to follow)."""
    parent = os.environ.get(pid_env)
    if not parent:
        return True
    die_with_parent(signal.SIGTERM)
    return os.getppid() == int(parent)


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed heap memory (no mmap for blocks up to 32 MiB, no trimming).

    Returns whether the settings took effect: False off Linux/glibc, when mallopt refuses, or
    when the environment sets GEODNN_RETAIN_FREED_MEMORY=0. Irreversible for the process.
    """
    if os.environ.get(OPT_OUT, "1").strip() in {"0", "false", "no", "off"}:
        return False
    libc = _libc()
    if libc is None:
        return False
    settings = (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (M_TOP_PAD, TOP_PAD),
    )
    applied = all(libc.mallopt(ctypes.c_int(p), ctypes.c_int(v)) == 1 for p, v in settings)
    if not applied:
        log.debug("mallopt refused the allocator settings; freed memory may be returned")
    return applied


def wait_for_device(device: torch.device) -> None:
    """Wait for the work queued on a GPU, so that a wall-clock timing covers it (the CPU runs
    each call to its end, so nothing to wait for there)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


class StopSignal(BaseException):
    """SIGTERM or SIGHUP arrived (see `stop_signals_raise`); `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_received: list[int] = []  # stop signals taken in the current `stop_signals_raise` block


def _raise_stop(signum: int, _frame) -> None:
    _received.append(signum)
    raise StopSignal(signum)


def _raise_interrupt(signum: int, _frame) -> None:
    """Ctrl-C as Python's own handler takes it (KeyboardInterrupt), and recorded."""
    _received.append(signum)
    raise KeyboardInterrupt


def raise_if_stopped() -> None:
    """Raise again the stop (StopSignal) or Ctrl-C (KeyboardInterrupt) that arrived in this
    `stop_signals_raise` block. A signal handler's exception can be swallowed where Python
    ignores exceptions (a `__del__` or a weakref callback running at that moment prints
    "Exception ignored" and goes on; a helper saw `geodnn run` finish after 3 of 16 Ctrl-Cs so):
    call this in long loops and before an irreversible step, such as committing outputs."""
    if _received:
        if _received[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise StopSignal(_received[0])


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP raise StopSignal in the main thread, as Ctrl-C
    raises KeyboardInterrupt (each recorded for `raise_if_stopped`), so every `with` and
    `finally` on the way out runs (temporary files are removed, child processes stopped)
    instead of the process dying where it stands. Only a signal left at its default is taken
    over: one ignored (`nohup` ignores SIGHUP) or handled by the caller stays so. A no-op
    outside the main thread (where handlers are set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    default = [s for s in STOP_SIGNALS if signal.getsignal(s) is signal.SIG_DFL]
    kept = {signum: signal.signal(signum, _raise_stop) for signum in default}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # Python's: recorded too
        kept[signal.SIGINT] = signal.signal(signal.SIGINT, _raise_interrupt)
    outer = bool(kept)  # the block that took the signals over owns the record of them
    if outer:
        _received.clear()
    try:
        yield
    finally:
        for signum, handler in kept.items():
            signal.signal(signum, handler)
        if outer:
            _received.clear()


FUSED_SWITCH = "GEODNN_FUSED"


def compiled_loops(module: str, *names: str) -> tuple | None:
    """The named compiled CPU loops of `module` (absolute name), or None when numba is missing
    or GEODNN_FUSED=0 asks for the torch passes instead (for comparisons)."""
    if os.environ.get(FUSED_SWITCH, "1") == "0":
        return None
    try:
        loops = importlib.import_module(module)
    except ImportError:
        return None
    return tuple(getattr(loops, name) for name in names)


__all__ = [
    "FUSED_SWITCH",
    "OPT_OUT",
    "STOP_SIGNALS",
    "StopSignal",
    "compiled_loops",
    "die_with_parent",
    "raise_if_stopped",
    "retain_freed_memory",
    "stop_signals_raise",
    "wait_for_device",
]
