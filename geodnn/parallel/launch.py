"""Starting N ranks: `launch` runs torchrun as a subprocess (the `--workers N` path of the CLI);
`spawn` runs a function on N local processes (tests, benchmarks). Both enforce a timeout and name
the rank that failed, so a dead or hung rank never hangs the caller.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.multiprocessing as mp

from ..runtime import StopSignal, stop_signals_raise
from .group import RankFailureError, free_port


def torchrun_command(module: str, argv: Sequence[str], workers: int) -> list[str]:
    """The torchrun command line for one machine (`--standalone` picks a free rendezvous port),
    run through `python -m geodnn.parallel.agent` (torchrun's own launcher, quieter)."""
    return [
        sys.executable,
        "-m",
        "geodnn.parallel.agent",
        "--standalone",
        f"--nproc-per-node={workers}",
        "-m",
        module,
        *argv,
    ]


# The launcher's pid: torchrun's agent (geodnn.parallel.agent) stops when that process dies.
LAUNCHER_ENV = "GEODNN_LAUNCHER_PID"
# Ranks write their exit code here (torchrun itself exits 1 whatever its ranks returned).
EXIT_CODES_ENV = "GEODNN_EXIT_CODES"


def launch(
    argv_for_module: list[str],
    workers: int,
    *,
    module: str = "pipelines.train",
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Run `module` on `workers` local ranks under torchrun; stream output; return the exit code.

    torchrun stops every rank when one fails and names the failed rank in its summary; the code
    returned is the ranks' own (`report_exit_code`: 3 for a divergence, 2 for a user error) where
    they left one, else torchrun's. On timeout the whole process group is killed and 124 is
    returned; SIGTERM, SIGHUP or Ctrl-C to the launcher stop the ranks too.
    """
    if workers < 1:
        raise ValueError("workers must be >= 1")
    command = torchrun_command(module, argv_for_module, workers)
    codes = tempfile.mkdtemp(prefix="geodnn-exit-")
    child_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    child_env.update(env or {}, **{EXIT_CODES_ENV: codes, LAUNCHER_ENV: str(os.getpid())})
    try:
        process = subprocess.Popen(command, env=child_env, start_new_session=True)
        return ranks_exit_code(_wait(process, workers, timeout_s, codes), codes)
    finally:
        shutil.rmtree(codes, ignore_errors=True)


def _wait(process: subprocess.Popen, workers: int, timeout_s: float | None, codes: str) -> int:
    """torchrun's exit code; its process group is killed on timeout, on a stop signal and on
    Ctrl-C (it runs in a session of its own, so nothing else would stop it)."""
    try:
        with stop_signals_raise():
            code = _wait_for_agent(process, workers, timeout_s, codes)
        if code < 0:  # the agent itself was killed: its ranks follow it (`follow_agent`)
            name = signal_name(-code)
            print(
                f"geodnn: error: torchrun's agent (pid {process.pid}) was killed by {name}; "
                "its ranks were stopped",
                file=sys.stderr,
            )
            return 128 - code
        return code
    except subprocess.TimeoutExpired:
        print(
            f"geodnn: error: {workers}-rank job exceeded {timeout_s:g} s; stopping it",
            file=sys.stderr,
        )
        _kill_group(process)
        return 124
    except (StopSignal, KeyboardInterrupt):  # the CLI says which and exits 128 + signal
        _kill_group(process)
        raise


POLL_S = 1.0  # how often the launcher looks at torchrun's agent while it waits
# Polls an agent may stay frozen while its ranks run: it cannot stop them when one fails (and a
# failing rank can hang on the rendezvous store the agent serves), so the launcher stops the job.
FROZEN_POLLS = 10


def _wait_for_agent(
    process: subprocess.Popen, workers: int, timeout_s: float | None, codes: str
) -> int:
    """The agent's exit code, looking at it every POLL_S: an agent frozen (SIGSTOP, a debugger)
    cannot end its job, so the launcher ends it (`FrozenAgent`): at once when none of its ranks
    runs or one of them failed (torchrun would stop the others then), else after FROZEN_POLLS
    (the ranks' rendezvous store, served by the agent, is frozen too)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    frozen_polls = 0
    while True:
        left = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
        try:
            return process.wait(timeout=max(left, 0.0))
        except subprocess.TimeoutExpired:
            if deadline is not None and time.monotonic() >= deadline:
                raise
        frozen = FrozenAgent.look(process.pid, workers, codes)
        frozen_polls = frozen_polls + 1 if frozen is not None else 0
        # twice in a row: not a rank that was just starting
        if (frozen_polls >= 2 and frozen.stuck) or frozen_polls >= FROZEN_POLLS:
            return frozen.end(process)


@dataclass
class FrozenAgent:
    """torchrun's agent found stopped, with what its ranks did: `live` ranks still running,
    `reported` exit codes by rank (`report_exit_code`) of the `workers` ranks."""

    pid: int
    workers: int
    live: list[psutil.Process]
    reported: dict[int, int]

    @classmethod
    def look(cls, pid: int, workers: int, codes: str) -> FrozenAgent | None:
        """None unless the agent is stopped (or traced)."""
        if not is_stopped(pid):
            return None
        live = [r for r in _descendants(pid) if _running(r)]
        return cls(pid, workers, live, read_exit_codes(codes))

    @property
    def failed(self) -> bool:
        return any(code != 0 for code in self.reported.values())

    @property
    def stuck(self) -> bool:
        """Nothing will end the job: no rank runs any more, or one failed."""
        return not self.live or self.failed

    @property
    def finished(self) -> bool:
        """Every rank ended and said it succeeded."""
        return not self.live and len(self.reported) == self.workers and not self.failed

    def end(self, process: subprocess.Popen) -> int:
        """Kill the agent and any rank left (it cannot act on SIGTERM while stopped); say what
        happened; 0 when every rank had finished, else 1 (the ranks' own codes rule)."""
        if self.live and not self.failed:
            how = f"its ranks were stopped after {FROZEN_POLLS * POLL_S:g} s"
        elif self.live:
            how = "a rank failed and the others were stopped"
        elif self.reported:
            how = f"its ranks had {'finished' if self.finished else 'ended'}"
        else:
            how = "none of its ranks was running"
        _kill_group(process)  # at once: it is frozen
        print(
            f"geodnn: {'warning' if self.finished else 'error'}: torchrun's agent (pid "
            f"{self.pid}) was frozen (stopped by a signal or a debugger); {how} and it was "
            "killed",
            file=sys.stderr,
        )
        return 0 if self.finished else 1


def is_stopped(pid: int) -> bool:
    """Whether process `pid` is stopped by a signal or held by a debugger."""
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
    except psutil.Error:
        return False


def _running(process: psutil.Process) -> bool:
    """Alive and not a zombie (a rank that ended but its stopped agent cannot reap)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def read_exit_codes(folder: str) -> dict[int, int]:
    """The exit codes ranks left in `folder` (`report_exit_code`), by rank."""
    prefix = EXIT_CODE_FILE.format("")
    found = {}
    for path in Path(folder).glob(f"{prefix}*"):
        with contextlib.suppress(OSError, ValueError):
            found[int(path.name.removeprefix(prefix))] = int(path.read_text().strip())
    return found


def signal_name(signum: int) -> str:
    """SIGKILL, SIGTERM...; 'signal 34' for one without a name (a real-time signal)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


EXIT_CODE_FILE = "rank{}"  # a rank's file in the EXIT_CODES_ENV folder, by global rank


def report_exit_code(code: int) -> None:
    """Called by a rank before it exits: leave its exit code for `launch` (no-op elsewhere)."""
    folder = os.environ.get(EXIT_CODES_ENV)
    if folder and os.path.isdir(folder):
        name = EXIT_CODE_FILE.format(os.environ.get("RANK", "0"))
        with contextlib.suppress(OSError):
            Path(folder, name).write_text(str(int(code)))


def reported_ranks() -> set[int]:
    """The ranks that left an exit code in EXIT_CODES_ENV's folder (they printed their error;
    read by torchrun's agent, `geodnn.parallel.agent`)."""
    folder = os.environ.get(EXIT_CODES_ENV)
    return set(read_exit_codes(folder)) if folder else set()


def ranks_exit_code(torchrun_code: int, folder: str) -> int:
    """The job's exit code: 0 when torchrun succeeded; else the most telling code a rank left
    (3 divergence before 2 user error before others), else torchrun's."""
    if torchrun_code == 0:
        return 0
    left = read_exit_codes(folder).values()
    for code in (3, 2):
        if code in left:
            return code
    return torchrun_code


def _kill_group(process: subprocess.Popen) -> None:
    """Stop torchrun's agent and every rank. The ranks run in sessions of their own, so the
    agent's process group does not reach them: they are listed first, and any still alive once
    the agent is gone (a stopped or stuck rank the agent gave up on) is killed."""
    ranks = _descendants(process.pid)
    # a frozen agent cannot act on SIGTERM: no grace to wait for
    if is_stopped(process.pid) or not _terminated(process):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    for rank in ranks:
        with contextlib.suppress(psutil.Error):
            rank.kill()


def _terminated(process: subprocess.Popen) -> bool:
    """SIGTERM to the agent's process group; whether the agent ended within its grace (it stops
    its ranks first)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=SHUTDOWN_GRACE_S + 5)
        return True
    except (ProcessLookupError, subprocess.TimeoutExpired):
        return False


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


# Seconds torchrun's agent waits for a rank to end after SIGTERM before SIGKILL (geodnn.parallel.
# agent sets it; torchrun's own default, 30 s, made a hung job fail 30 s after timeout_s).
SHUTDOWN_GRACE_S = 5


def _rank_main(rank: int, fn: Callable, workers: int, port: int, args: tuple, results) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(workers),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        results.put((rank, True, _to_bytes(fn(*args))))
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}"
        results.put((rank, False, message + "\n" + traceback.format_exc()[-2000:]))
        raise


def _to_bytes(value: Any) -> bytes:
    """Serialize a rank's result by value (tensors shared by file descriptor would vanish when the
    rank exits before the parent reads them)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> Any:
    # Our own child's result, produced a moment ago: not an untrusted checkpoint.
    return torch.load(io.BytesIO(data), weights_only=False)


def _collect(results, outcome: dict) -> None:
    while not results.empty():
        rank, ok, value = results.get()
        outcome[rank] = (ok, value)


def _dead(procs, outcome: dict) -> list[int]:
    """Ranks whose process exited abnormally without reporting (killed, os._exit, crash)."""
    return [
        r for r, p in enumerate(procs.processes) if p.exitcode not in (None, 0) and r not in outcome
    ]


def _failures(procs, outcome: dict) -> bool:
    return bool(_dead(procs, outcome)) or any(not ok for ok, _ in outcome.values())


def _failure_message(procs, outcome: dict) -> str:
    """Dead ranks first (the usual root cause), then the ranks that raised."""
    parts = [
        f"rank {r} died (exit code {procs.processes[r].exitcode})" for r in _dead(procs, outcome)
    ]
    parts += [f"rank {r} failed: {value}" for r, (ok, value) in sorted(outcome.items()) if not ok]
    return "; ".join(parts)


def spawn(fn: Callable[..., Any], workers: int, args: tuple = (), timeout_s: float = 60.0) -> list:
    """Run `fn(*args)` on `workers` fresh processes wired as ranks; return each rank's result.

    `fn` must be importable (module level). Raises RankFailureError naming the first rank that
    raised, died or did not finish within `timeout_s`; all other ranks are stopped.
    """
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    port = free_port()
    procs = mp.start_processes(
        _rank_main,
        args=(fn, workers, port, args, results),
        nprocs=workers,
        join=False,
        start_method="spawn",
    )
    outcome: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            _collect(results, outcome)
            if _failures(procs, outcome):
                time.sleep(0.5)  # let the other ranks report: the root cause may come second
                _collect(results, outcome)
                raise RankFailureError(_failure_message(procs, outcome))
            if len(outcome) == workers and all(not p.is_alive() for p in procs.processes):
                break
            if time.monotonic() > deadline:
                late = [r for r in range(workers) if r not in outcome]
                raise RankFailureError(
                    f"rank(s) {late} did not finish within {timeout_s:g} s (hung or deadlocked)"
                )
            time.sleep(0.02)
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.terminate()
        for p in procs.processes:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    return [_from_bytes(outcome[r][1]) for r in range(workers)]
