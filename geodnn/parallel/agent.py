"""`python -m geodnn.parallel.agent`: torchrun (`torch.distributed.run`, the same options and
engine) as `launch` runs it for `--workers N`. When a rank fails, the user sees that rank's own
one-line error, or one line naming the rank that crashed or was killed, instead of torchrun's
35-line traceback and its agent's log lines. Users of torchrun itself see torchrun's report.
Three more differences: the agent waits SHUTDOWN_GRACE_S (not 30 s) for a rank to end after
SIGTERM, it stops its ranks when the launcher dies, even by SIGKILL, and its ranks stop when it
dies (`follow_agent`)."""

from __future__ import annotations

import logging
import os
import signal
import sys

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from ..runtime import follow_parent
from .group import AGENT_ENV
from .launch import LAUNCHER_ENV, SHUTDOWN_GRACE_S, reported_ranks


def failed_rank_line(error: ChildFailedError, reported: set[int]) -> str | None:
    """One line for torchrun's report of failed ranks: the first failure, unless that rank
    printed its own error (it left an exit code: `report_exit_code`)."""
    rank, failure = error.get_first_failure()
    if rank in reported:
        return None
    if failure.exitcode < 0:
        how = f"was killed by {failure.signal_name()}"
    else:
        how = f"crashed (exit code {failure.exitcode}; its traceback, if any, is above)"
    return f"geodnn: error: rank {rank} (pid {failure.pid}) {how}; the other ranks were stopped"


def quiet_agent_logs() -> None:
    """Only errors worth a user's eye from torchrun's agent: it logs each rank's stop as a
    warning and each failure as an error, which the one-line report says already."""
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def stop_ranks_quickly(grace_s: float = SHUTDOWN_GRACE_S) -> None:
    """torchrun's agent stops the other ranks of a failed job with SIGTERM and waits 30 s for
    them before SIGKILL (its process context's default), so a stopped or stuck rank made a job
    fail 30 s after `timeout_s`. Every such wait is capped at `grace_s`; on a torch without
    this hook the agent keeps its own waits."""
    try:
        from torch.distributed.elastic.multiprocessing.api import PContext
    except ImportError:
        return
    close = PContext.close

    def close_quickly(self, death_sig=None, timeout: float = grace_s) -> None:
        close(self, death_sig, min(timeout, grace_s))

    PContext.close = close_quickly


def follow_launcher() -> bool:
    """Get SIGTERM when `launch`'s process dies (Linux), so a launcher killed with SIGKILL does
    not leave the agent and its ranks training unwatched: the agent stops them as on any
    SIGTERM. False when the launcher is already gone."""
    return follow_parent(LAUNCHER_ENV)  # True when started by hand


def main(argv: list[str] | None = None) -> int:
    """torchrun (`torch.distributed.run`, same options) for `launch`: when a rank fails, one
    line naming it instead of torchrun's 35-line traceback after the rank's own message; stopped
    by a signal (`launch` passes SIGTERM on), it exits 128 + the signal without a traceback."""
    quiet_agent_logs()
    stop_ranks_quickly()
    if not follow_launcher():
        return 128 + signal.SIGTERM
    os.environ[AGENT_ENV] = str(os.getpid())  # its ranks stop when it dies (`follow_agent`)
    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as error:
        line = failed_rank_line(error, reported_ranks())
        if line:
            print(line, file=sys.stderr)
        return 1
    except SignalException as stop:
        return 128 + int(stop.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
