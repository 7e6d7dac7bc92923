"""Process-group helpers: who is named when a peer fails, and a rank that never joins."""

import time

import pytest
import torch


def test_peers_name_the_missing_rank_when_it_can_be_known():
    from geodnn.parallel.group import RankContext

    cpu = torch.device("cpu")
    two, five = RankContext(0, 2, 0, "gloo", cpu, 5.0), RankContext(2, 5, 2, "gloo", cpu, 5.0)
    assert two.peers() == "rank 1"  # a collective of two: the other one
    assert five.peers() == "another rank"
    assert five.peers(five.below, five.above) == "rank 1 or rank 3"
    assert RankContext(0, 5, 0, "gloo", cpu, 5.0).peers(None, 1) == "rank 1"


def test_a_rank_that_never_joins_is_one_line(monkeypatch):
    import torch.distributed as dist

    from geodnn.parallel.group import RankFailureError, init_ranks

    def store_timeout(*args, **kwargs):
        raise dist.DistStoreError("wait timeout after 20000ms, keys: /default_pg/0//cpu//0\n  x")

    monkeypatch.setattr(dist, "init_process_group", store_timeout)
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RankFailureError) as info:
        init_ranks(timeout_s=20)
    assert str(info.value) == (
        "rank 0: the 2 ranks did not all join at 127.0.0.1:29999 within 20 s (a rank died or "
        "hangs while starting, or the address is unreachable): wait timeout after 20000ms, keys: "
        "/default_pg/0//cpu//0"
    )


def test_only_a_rendezvous_failure_is_a_rank_that_never_joined(monkeypatch):
    import torch.distributed as dist

    from geodnn.parallel.group import init_ranks

    def no_nccl(*args, **kwargs):
        raise RuntimeError("Distributed package doesn't have NCCL built in")

    monkeypatch.setattr(dist, "init_process_group", no_nccl)
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RuntimeError, match="NCCL built in"):  # not blamed on a missing rank
        init_ranks(timeout_s=3, backend="gloo")


def test_nccl_group_times_out_after_the_waits_that_name_a_silent_rank(monkeypatch):
    """NCCL's watchdog aborts the process at the group's timeout: the waits' own (which raise
    the one-line error naming the rank) must come first there; gloo raises in the wait itself."""
    import torch.distributed as dist

    from geodnn.parallel.group import RankFailureError, _join

    seen = {}
    record = lambda backend, **kw: seen.update({backend: kw})  # noqa: E731
    monkeypatch.setattr(dist, "init_process_group", record)
    _join("nccl", 0, 2, 60.0)
    _join("gloo", 0, 2, 60.0)
    assert seen["nccl"]["timeout"].total_seconds() == 90.0
    assert seen["gloo"]["timeout"].total_seconds() == 60.0

    def store_timeout(*args, **kwargs):
        raise dist.DistStoreError("wait timeout after 90000ms")

    monkeypatch.setattr(dist, "init_process_group", store_timeout)
    with pytest.raises(RankFailureError, match="did not all join at .* within 90 s"):
        _join("nccl", 0, 2, 60.0)  # the wait the message quotes is the group's


@pytest.mark.parametrize(
    "message, failed",
    [
        ("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:54149", True),
        ("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 4000ms for recv", True),
        ("Read error [127.0.0.1]:6829: Connection reset by peer", True),
        ("NCCL error: remote process exited or there was a network error", True),
        ("[../gloo/transport/tcp/pair.cc:...] Application timeout caused pair closure", True),
        ("ncclSystemError: System call failed... unexpected exit of a remote peer", True),
        ("[../gloo/gloo/types.h:...] Enforce fail: nbytes == expected (64 vs. 128) on peer", False),
        ("NCCL error: invalid usage", False),
    ],
)
def test_a_link_failure_is_told_from_a_bug_in_what_was_sent(message, failed):
    from geodnn.parallel.group import is_link_failure

    assert is_link_failure(RuntimeError(message)) is failed


def test_a_peer_that_died_is_not_said_to_have_timed_out():
    """A closed connection fails at once: the timeout is no part of what happened."""
    from geodnn.parallel.group import RankContext, no_answer

    ctx = RankContext(0, 2, 0, "gloo", torch.device("cpu"), 20.0)
    closed = RuntimeError("[../pair.cc:553] Connection closed by peer [127.0.0.1]:38838")
    silent = RuntimeError("[../unbound_buffer.cc:81] Timed out waiting 20000ms for recv")
    assert str(no_answer(ctx, "rank 1", "the down boundary message", closed)) == (
        "rank 0: rank 1 did not complete the down boundary message before the connection closed "
        "(rank 1 died or the link broke): Connection closed by peer [127.0.0.1]:38838"
    )
    assert "within 20 s (rank 1 hangs, died, or the link broke)" in str(
        no_answer(ctx, "rank 1", "the down boundary message", silent)
    )


def _all_reduce_with_a_hung_rank() -> None:
    from geodnn.parallel.group import init_ranks, shutdown, wait_or_fail

    ctx = init_ranks(timeout_s=3, backend="gloo")
    try:
        if ctx.rank == 1:
            time.sleep(60)  # hung: never fails on its own
        work = torch.distributed.all_reduce(torch.ones(1), async_op=True)
        wait_or_fail(work, ctx, None, "the stats all-reduce")
    finally:
        shutdown()


@pytest.mark.timeout(90)
def test_a_rank_hung_in_a_collective_is_named_by_the_ranks_that_timed_out():
    """With 3+ ranks a collective's timeout cannot say who is missing: the ranks that time out
    say so in the rendezvous store, and the silent one is named."""
    from geodnn.parallel.group import RankFailureError
    from geodnn.parallel.launch import spawn

    with pytest.raises(RankFailureError) as info:
        spawn(_all_reduce_with_a_hung_rank, 3, timeout_s=60)
    first = str(info.value).split("; ")[0]
    assert "rank 1 did not complete the stats all-reduce within 3 s" in first, str(info.value)


LAUNCHER_VARS = (
    "LOCAL_RANK",
    "SLURM_LOCALID",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "LOCAL_WORLD_SIZE",
    "SLURM_STEP_TASKS_PER_NODE",
    "SLURM_NODEID",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MPI_LOCALNRANKS",
)


@pytest.mark.parametrize(
    "env, rank, size",
    [
        ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 1, 2),  # torchrun
        # srun: 4 tasks on each of the first two nodes, 3 on the third (this one)
        ({"SLURM_LOCALID": "2", "SLURM_STEP_TASKS_PER_NODE": "4(x2),3", "SLURM_NODEID": "2"}, 2, 3),
        # mpirun inside an sbatch script: the script's SLURM_LOCALID 0 is not the rank's
        ({"OMPI_COMM_WORLD_LOCAL_RANK": "3", "SLURM_LOCALID": "0"}, 3, 16),
        ({"OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}, 0, 8),
        ({"MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "4"}, 2, 4),  # MPICH, Intel MPI
        ({"LOCAL_RANK": "1", "SLURM_LOCALID": "0"}, 1, 16),  # torchrun's, inside an allocation
        ({}, 5, 16),  # none: the global rank and size, right on one machine
    ],
)
def test_a_rank_s_place_on_its_machine_comes_from_whichever_launcher_started_it(
    monkeypatch, env, rank, size
):
    """Outside torchrun (srun, mpirun) LOCAL_RANK is unset, and the global rank (5 of 16 on
    four machines) is no GPU index there."""
    from geodnn.parallel.group import local_rank, local_world_size

    for key in LAUNCHER_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in {"WORLD_SIZE": "16", **env}.items():
        monkeypatch.setenv(key, value)
    assert (local_rank(5), local_world_size()) == (rank, size)


def test_a_rank_whose_local_rank_has_no_gpu_is_refused_in_one_line(monkeypatch):
    from geodnn.errors import GeodnnError
    from geodnn.parallel.group import rank_gpu

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert rank_gpu(9, 1) == torch.device("cuda", 1)
    with pytest.raises(
        GeodnnError, match="rank 5: its local rank 5 has no GPU .*has 4.*LOCAL_RANK"
    ):
        rank_gpu(5, 5)
