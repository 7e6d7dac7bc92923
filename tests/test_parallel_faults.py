"""Faults: a rank that dies or hangs fails the job within the timeout, naming the rank; a run
killed after a checkpoint resumes to exactly the uninterrupted result."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import torch

from geodnn.errors import CheckpointError, GeodnnError
from geodnn.parallel.admm_rank import RankAdmmSolver, reference_weights
from geodnn.parallel.group import RankContext, RankFailureError, init_ranks, shutdown
from geodnn.parallel.launch import (
    EXIT_CODES_ENV,
    launch,
    ranks_exit_code,
    report_exit_code,
    spawn,
)
from geodnn.parallel.rankstate import (
    latest_iteration,
    load_rank_checkpoint,
    save_rank_checkpoint,
)
from geodnn.parallel.selfcheck import run_rank
from geodnn.solvers.admm import AdmmSettings

try:  # tests/ may or may not be a package
    from .test_parallel_admm import SETTINGS, _model, vegas_batches
except ImportError:
    from test_parallel_admm import SETTINGS, _model, vegas_batches


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_dead_or_hung_rank_fails_fast_and_is_named(mode):
    # the rank's own 4 s timeout fires (the message names the rank), not spawn's 40 s guard
    with pytest.raises(RankFailureError, match="rank 1") as info:
        spawn(run_rank, 2, args=(6, 20, None, 4.0, 1, mode, 2), timeout_s=40)
    if mode == "hang":
        assert "did not complete" in str(info.value)


@pytest.mark.parametrize(
    ("mode", "named"), [("die", "crashed (exit code 3;"), ("kill", "was killed by SIGKILL")]
)
def test_torchrun_job_with_a_dead_rank_names_it_in_one_line(mode, named, capfd):
    argv = ["--fail-rank", "1", "--fail-mode", mode, "--timeout", "4"]
    code = launch(argv, 2, module="geodnn.parallel.selfcheck", timeout_s=60)
    assert code not in (0, 124)
    err = capfd.readouterr().err
    assert "geodnn: error: rank 1 (pid " in err and named in err  # rank 0 printed its own
    assert "rank 0: rank 1 did not complete" in err or "rank 0: cannot exchange" in err
    assert "Traceback" not in err and "ChildFailedError" not in err  # not torchrun's 35 lines
    assert "pair.cc" not in err  # gloo's source tag is cut from the reason


def test_a_rank_that_reported_its_error_gets_no_second_line():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from geodnn.parallel.agent import failed_rank_line

    failure = ProcessFailure(local_rank=1, pid=42, exitcode=3, error_file="<N/A>")
    error = ChildFailedError("pipelines.train", {1: failure})
    assert failed_rank_line(error, reported={1}) is None  # its divergence line is the message
    assert "rank 1 (pid 42) crashed (exit code 3" in failed_rank_line(error, reported={0})


@pytest.mark.slow
def test_launch_timeout_stops_the_whole_job():
    argv = ["--fail-rank", "1", "--fail-mode", "hang", "--timeout", "120"]
    code = launch(argv, 2, module="geodnn.parallel.selfcheck", timeout_s=6)
    assert code == 124  # launch's own timeout stopped the job (the ranks would wait 120 s)


def test_launch_runs_the_selfcheck():
    assert launch([], 2, module="geodnn.parallel.selfcheck", timeout_s=60) == 0


def _admm_segment(data, folder: str, stop_at: int, crash_after_save: bool) -> dict:
    """Run (resuming from `folder` if it holds a checkpoint) to `stop_at`, saving every 3."""
    ctx = init_ranks(timeout_s=20, backend="gloo")
    try:
        solver = RankAdmmSolver(ctx, _model(), data, AdmmSettings.from_dict(SETTINGS), 7)
        state = load_rank_checkpoint(folder, ctx)
        if state is not None:
            solver.load_state_dict(state)
        while solver.iteration < stop_at:
            solver.step()
            if solver.iteration % 3 == 0:
                save_rank_checkpoint(folder, ctx, solver.state_dict())
                if crash_after_save and solver.iteration == 6 and ctx.rank == 1:
                    os._exit(9)  # killed right after the checkpoint
        model = solver.gather_model()
        return {"weights": [p.detach().clone() for p in model.parameters()] if model else None}
    finally:
        shutdown()


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(data_dir, tmp_path):
    data = vegas_batches(data_dir)
    with pytest.raises(RankFailureError, match="rank 1"):
        spawn(_admm_segment, 2, args=(data, str(tmp_path), 10, True), timeout_s=90)
    assert latest_iteration(tmp_path) == 6
    resumed = spawn(_admm_segment, 2, args=(data, str(tmp_path), 10, False), timeout_s=90)
    # the uninterrupted run: N ranks equal one process (test_parallel_admm), so compare to that
    straight = reference_weights(_model(), data, AdmmSettings.from_dict(SETTINGS), 7, 10)
    for a, b in zip(resumed[0]["weights"], straight):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert latest_iteration(tmp_path) == 9
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [
        "rank0-of-2-it9.pt",
        "rank1-of-2-it9.pt",
    ]


def test_resume_with_other_worker_count_is_a_user_error(tmp_path):
    (tmp_path / "ranks-latest.txt").write_text("iteration=3\nworld_size=2\n")
    (tmp_path / "rank0-of-2-it3.pt").write_bytes(b"")
    ctx = RankContext(0, 3, 0, "gloo", torch.device("cpu"), 5.0)
    with pytest.raises(CheckpointError, match="same number of workers"):
        load_rank_checkpoint(tmp_path, ctx)
    with pytest.raises(CheckpointError) as info:  # an empty rank file: one line, the fix
        load_rank_checkpoint(tmp_path, RankContext(0, 2, 0, "gloo", torch.device("cpu"), 5.0))
    said = str(info.value)
    assert "rank0-of-2-it3.pt: this rank's checkpoint cannot be read" in said
    assert "--overwrite" in said and "\n" not in said


@pytest.mark.parametrize("marker", ["", "iteration=3\n", "iteration=three\nworld_size=2\n"])
def test_a_damaged_checkpoint_marker_is_one_line(tmp_path, marker):
    (tmp_path / "ranks-latest.txt").write_text(marker)
    damaged = r"ranks-latest.txt: unreadable or damaged .* --overwrite$"
    with pytest.raises(CheckpointError, match=damaged):
        latest_iteration(tmp_path)


def test_missing_torchrun_environment_is_a_user_error(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(GeodnnError, match="RANK, WORLD_SIZE.*--workers N"):
        init_ranks(timeout_s=5)


def _selfcheck_processes(marker: str) -> list[str]:
    """Command lines of this machine's processes that carry `marker` (pgrep)."""
    found = subprocess.run(["pgrep", "-af", "--", marker], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


LAUNCHER = """
import sys
from geodnn.parallel.launch import launch
from geodnn.runtime import StopSignal
argv = ["--fail-rank", "1", "--fail-mode", sys.argv[2], "--timeout", sys.argv[1]]
try:
    sys.exit(launch(argv, 2, module="geodnn.parallel.selfcheck", timeout_s=100))
except StopSignal as stop:  # as `geodnn` does
    sys.exit(128 + stop.signum)
"""


def _start_launcher(marker_seconds: str, mode: str) -> subprocess.Popen:
    """A launcher of the self-check whose rank 1 fails in `mode`, once torchrun's agent and both
    ranks are up (their command lines carry `--timeout marker_seconds`)."""
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, marker_seconds, mode])
    marker = f"--timeout {marker_seconds}"
    deadline = time.monotonic() + 60
    while len(_selfcheck_processes(marker)) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(_selfcheck_processes(marker)) == 3
    return launcher


def _all_gone(marker_seconds: str, within_s: float = 15) -> bool:
    marker = f"--timeout {marker_seconds}"
    deadline = time.monotonic() + within_s
    while _selfcheck_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    return _selfcheck_processes(marker) == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_a_stopped_launcher_stops_every_rank(stop):
    """torchrun runs in a session of its own: SIGTERM (a scheduler, `kill`, `timeout`) or SIGHUP
    (a closed terminal) to `geodnn train --workers N` must take its ranks down too, even one
    frozen by SIGSTOP (its own session: the agent's process group does not reach it)."""
    seconds = str(290 + int(stop))  # a marker for this test's ranks, which hang far longer
    launcher = _start_launcher(seconds, "stop")
    try:
        time.sleep(1)  # rank 1 has stopped itself
        launcher.send_signal(stop)
        assert launcher.wait(timeout=30) == 128 + stop
        assert _all_gone(seconds)
    finally:  # never leave a hung job behind, whatever failed
        launcher.kill()
        subprocess.run(["pkill", "-KILL", "-f", "--", f"--timeout {seconds}"])


@pytest.mark.timeout(120)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux parent-death signal")
def test_a_killed_launcher_takes_its_agent_and_ranks_down():
    """SIGKILL to the launcher (no handler runs): the agent follows it (Linux parent-death
    signal) and stops its ranks, instead of training on unwatched."""
    seconds = "297"
    launcher = _start_launcher(seconds, "hang")
    try:
        launcher.kill()
        launcher.wait()
        assert _all_gone(seconds)
    finally:
        subprocess.run(["pkill", "-KILL", "-f", "--", f"--timeout {seconds}"])


def _in_the_group(process_line: str) -> bool:
    """Whether a rank (its pgrep line) holds a link to its peer: it has joined the group."""
    import psutil

    try:
        links = psutil.Process(int(process_line.split()[0])).net_connections("tcp")
    except psutil.Error:
        return False
    return sum(c.status == psutil.CONN_ESTABLISHED for c in links) >= 2


@contextlib.contextmanager
def _job_of_agent(seconds: str, joined: bool = True) -> Iterator[tuple[subprocess.Popen, int]]:
    """A launcher of the self-check whose rank 1 hangs (its ranks' command lines carry
    `--timeout seconds`), and its torchrun agent's pid once the ranks are up (with `joined`,
    once they hold their peer links: past init_ranks); everything is killed afterwards."""
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, seconds, "hang"], stderr=subprocess.PIPE, text=True
    )
    marker = f"--timeout {seconds}"
    try:
        deadline = time.monotonic() + 60
        while len(_selfcheck_processes(marker)) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        agent = [p for p in _selfcheck_processes(marker) if "geodnn.parallel.agent" in p]
        ranks = [p for p in _selfcheck_processes(marker) if "geodnn.parallel.agent" not in p]
        while joined and not all(_in_the_group(r) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        yield launcher, int(agent[0].split()[0])
    finally:
        launcher.kill()
        subprocess.run(["pkill", "-KILL", "-f", "--", marker])


@pytest.mark.timeout(120)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux parent-death signal")
def test_a_killed_agent_takes_its_ranks_down_and_the_launcher_says_so():
    """SIGKILL to torchrun's agent: its ranks follow it (they trained on with no parent, and a
    rerun's ranks then wrote the same run folder), and the launcher names what happened."""
    seconds = "296"
    with _job_of_agent(seconds) as (launcher, agent):  # joined: the parent-death signal is set
        os.kill(agent, signal.SIGKILL)
        _, err = launcher.communicate(timeout=30)
        assert launcher.returncode == 128 + signal.SIGKILL
        assert "torchrun's agent (pid" in err and "was killed by SIGKILL" in err
        assert _all_gone(seconds)
        assert "is gone" not in err  # stopped by the signal, not by a late start's own check


@pytest.mark.timeout(120)
def test_a_frozen_agent_does_not_hang_the_launcher():
    """SIGSTOP to torchrun's agent: it can no longer stop its ranks or end the job (and rank 0,
    giving up on the hung rank 1, can hang on the rendezvous store the agent serves), so the
    launcher stops the job itself instead of waiting for ever on the frozen agent."""
    seconds = "6.25"  # rank 0's wait for the hung rank 1, and this test's marker
    with _job_of_agent(seconds) as (launcher, agent):  # joined: they train on while it is frozen
        os.kill(agent, signal.SIGSTOP)
        start = time.monotonic()
        _, err = launcher.communicate(timeout=60)
        assert launcher.returncode not in (0, 124), err
        assert time.monotonic() - start < 30  # FROZEN_POLLS and a few more, not the 100 s
        assert "torchrun's agent (pid" in err and "was frozen" in err, err
        assert "were stopped" in err, err
        assert _all_gone(seconds)


@pytest.mark.timeout(120)
def test_stopping_a_job_whose_agent_is_frozen_kills_it_at_once():
    """SIGTERM to the launcher: a frozen agent cannot act on the SIGTERM passed on, so waiting
    out its grace (10 s) before SIGKILL would only delay the exit."""
    from geodnn.parallel.launch import is_stopped

    seconds = "6.75"
    with _job_of_agent(seconds, joined=False) as (launcher, agent):
        os.kill(agent, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while not is_stopped(agent) and time.monotonic() < deadline:
            time.sleep(0.05)  # the signal is delivered asynchronously
        launcher.send_signal(signal.SIGTERM)
        start = time.monotonic()
        launcher.communicate(timeout=30)
        assert launcher.returncode == 128 + signal.SIGTERM
        assert time.monotonic() - start < 4  # not the 10 s grace a running agent gets
        assert _all_gone(seconds)


def test_a_frozen_agent_s_job_ends_by_what_its_ranks_did(tmp_path):
    from geodnn.parallel.launch import FrozenAgent, read_exit_codes

    (tmp_path / "rank0").write_text("0")
    (tmp_path / "rank1").write_text("0")
    (tmp_path / "rank2").write_text("")  # being written: not read yet
    codes = read_exit_codes(str(tmp_path))
    assert codes == {0: 0, 1: 0}
    done = FrozenAgent(1, 2, [], codes)
    assert done.finished and done.stuck  # every rank succeeded: the job did
    running = FrozenAgent(1, 3, [object()], codes)
    assert not running.stuck and not running.finished  # ranks train on: nothing to end yet
    failed = FrozenAgent(1, 3, [object()], {**codes, 2: 3})
    assert failed.stuck and not failed.finished
    assert FrozenAgent(1, 2, [], {}).stuck  # none ever ran, or all died without a word


@pytest.mark.timeout(120)
def test_a_frozen_rank_fails_the_job_soon_after_the_timeout(capfd):
    """A rank frozen by SIGSTOP ignores torchrun's SIGTERM: the agent now kills it after
    SHUTDOWN_GRACE_S, not its own 30 s, so the job ends near `timeout_s` (4 s here)."""
    argv = ["--fail-rank", "1", "--fail-mode", "stop", "--timeout", "4"]
    # start-up (~5-10 s on a loaded 2-core machine) + 4 s + 5 s grace, well inside launch's own
    # 35 s guard (124); torchrun's 30 s grace took 45-50 s
    code = launch(argv, 2, module="geodnn.parallel.selfcheck", timeout_s=35)
    assert code not in (0, 124)
    assert "rank 0: rank 1 did not complete" in capfd.readouterr().err


def test_the_ranks_exit_code_is_the_jobs(tmp_path, monkeypatch):
    """torchrun exits 1 whatever its ranks returned: a divergence (3) or a user error (2) a rank
    reported is what the launcher returns."""
    monkeypatch.setenv(EXIT_CODES_ENV, str(tmp_path))
    for rank, code in ((0, 3), (1, 1)):
        monkeypatch.setenv("RANK", str(rank))
        report_exit_code(code)
    assert ranks_exit_code(1, str(tmp_path)) == 3
    assert ranks_exit_code(0, str(tmp_path)) == 0
    (tmp_path / "rank0").write_text("2")
    assert ranks_exit_code(1, str(tmp_path)) == 2
    empty = tmp_path / "none"
    empty.mkdir()
    assert ranks_exit_code(-9, str(empty)) == -9


def test_the_agent_knows_which_ranks_reported_their_error(tmp_path, monkeypatch):
    from geodnn.parallel.launch import reported_ranks

    monkeypatch.setenv(EXIT_CODES_ENV, str(tmp_path))
    for rank in (0, 3):
        monkeypatch.setenv("RANK", str(rank))
        report_exit_code(2)
    (tmp_path / "notes").write_text("not a rank's")
    assert reported_ranks() == {0, 3}
    monkeypatch.delenv(EXIT_CODES_ENV)
    assert reported_ranks() == set()
