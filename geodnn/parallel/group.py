"""Process-group set-up for the layer-parallel runtime, from the environment torchrun provides.

gloo on CPU (one compute thread per rank by default, so N ranks on N cores do not fight), NCCL
on CUDA with device cuda:LOCAL_RANK. Every collective and every wait carries a timeout: a rank that
dies or hangs makes its neighbours fail with `RankFailureError` naming it, never a silent hang.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import GeodnnError
from ..runtime import follow_parent

DEFAULT_TIMEOUT_S = 120.0
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RankFailureError(GeodnnError):
    """A peer rank did not answer within the timeout: it died, hangs, or the link broke."""


def link_cause(exc: BaseException) -> str:
    """The transport's reason in a few words: the first two sentences of its first line,
    without gloo's source tag ("Timed out after 4 seconds waiting for clients. 1/2 clients
    joined", not "[.../pair.cc:553] Connection closed ... Check the logs of the remote ...")."""
    lines = str(exc).splitlines() or [type(exc).__name__]
    line = re.sub(r"^\[[^\]]*\]\s*", "", lines[0])
    return ". ".join(line.split(". ")[:2]).rstrip(".")[:200]


@dataclass(frozen=True)
class RankContext:
    """Who this process is in the job and where it computes."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    timeout_s: float

    @property
    def below(self) -> int | None:
        """The rank owning the layers just below this rank's block (None for the first)."""
        return self.rank - 1 if self.rank > 0 else None

    @property
    def above(self) -> int | None:
        """The rank owning the layers just above this rank's block (None for the last)."""
        return self.rank + 1 if self.rank + 1 < self.world_size else None

    @property
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)

    def peers(self, *ranks: int | None) -> str:
        """Who may be missing, for an error message: the given ranks that exist ("rank 1",
        "rank 0 or rank 2"), else, with two ranks, the other one, else "another rank"."""
        named = [r for r in ranks if r is not None]
        if not named and self.world_size == 2:
            named = [1 - self.rank]
        return " or ".join(f"rank {r}" for r in named) or "another rank"


def free_port() -> int:
    """A TCP port that was free a moment ago on this host (for tests and single-machine runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        missing = ", ".join(k for k in ENV_KEYS if k not in os.environ)
        raise GeodnnError(
            f"environment variable(s) {missing} not set: start multi-rank training with "
            "`geodnn train CONFIG --workers N` or `torchrun --nproc-per-node N -m pipelines.train`"
        )
    return int(value)


# Where launchers say which of a machine's ranks a process is, and how many run there: torchrun,
# Open MPI and MPICH/Intel MPI (mpirun), then Slurm's srun (last: an mpirun inside an sbatch
# script inherits the script's SLURM_LOCALID 0); the first one set is taken.
LOCAL_RANK_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")


def _first_env_int(names: tuple[str, ...]) -> int | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def slurm_tasks_on_this_node() -> int | None:
    """srun's tasks on this node, from SLURM_STEP_TASKS_PER_NODE ("4(x2),3": 4 on each of the
    first two nodes, 3 on the third) and SLURM_NODEID; None outside srun or when unreadable."""
    spec, node = os.environ.get("SLURM_STEP_TASKS_PER_NODE"), os.environ.get("SLURM_NODEID")
    if not spec or node is None or not node.isdigit():
        return None
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            return None
        counts += [int(match[1])] * int(match[2] or 1)
    return counts[int(node)] if int(node) < len(counts) else None


def local_rank(rank: int) -> int:
    """This process's index among the job's ranks on this machine (it picks cuda:local_rank):
    from torchrun, mpirun or srun; else the global rank, right on one machine only."""
    found = _first_env_int(LOCAL_RANK_VARS)
    return rank if found is None else found


def local_world_size() -> int:
    """Ranks of this job on this machine: torchrun's LOCAL_WORLD_SIZE (or mpirun's, srun's;
    else WORLD_SIZE, right on one machine only; else 1)."""
    found = _first_env_int(LOCAL_SIZE_VARS)
    if found is None and os.environ.get("SLURM_LOCALID") is not None:
        found = slurm_tasks_on_this_node()
    return found if found is not None else int(os.environ.get("WORLD_SIZE", "1"))


def gpu_per_rank() -> bool:
    """Whether each of this machine's ranks can have a GPU of its own (rank r takes
    cuda:LOCAL_RANK; two ranks cannot share one GPU under NCCL)."""
    return 0 < local_world_size() <= torch.cuda.device_count()


def default_backend() -> str:
    """nccl with a GPU per rank, else gloo on the CPU."""
    return "nccl" if gpu_per_rank() else "gloo"


# The pid of the torchrun agent `geodnn train --workers N` runs (geodnn.parallel.agent sets it).
AGENT_ENV = "GEODNN_AGENT_PID"


def follow_agent(rank: int) -> None:
    """A rank of `geodnn.parallel.agent` gets SIGTERM when the agent dies (Linux), even by
    SIGKILL: torchrun's ranks would train on unwatched otherwise, beside the rerun a user then
    starts in the same run folder. Refused when the agent is gone already."""
    if not follow_parent(AGENT_ENV):  # unset: torchrun run by hand, or spawn (their own watch)
        agent = os.environ[AGENT_ENV]
        raise RankFailureError(f"rank {rank}: its torchrun agent (pid {agent}) is gone; stopping")


def init_ranks(
    timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None, threads: int | None = 1
) -> RankContext:
    """Join the process group described by torchrun's environment variables.

    `backend` defaults to nccl when this machine has a GPU for each of its ranks (rank r takes
    cuda:LOCAL_RANK), else gloo on the CPU; `threads` (CPU only) sets torch's intra-op threads
    per rank (None leaves torch's default).
    """
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    follow_agent(rank)
    local = local_rank(rank)
    _env_int("MASTER_PORT")
    if not os.environ.get("MASTER_ADDR"):
        _env_int("MASTER_ADDR")
    if backend is None:
        backend = default_backend()
    if backend == "nccl":
        device = rank_gpu(rank, local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if threads is not None:
            torch.set_num_threads(threads)
    if not dist.is_initialized():
        _join(backend, rank, world_size, timeout_s)
    return RankContext(rank, world_size, local, backend, device, float(timeout_s))


def rank_gpu(rank: int, local: int) -> torch.device:
    """cuda:local, refused in one line when this machine has no such GPU (a launcher that does
    not say the local rank, on several machines: the global rank is no GPU index there)."""
    gpus = torch.cuda.device_count()
    if local >= gpus:
        raise GeodnnError(
            f"rank {rank}: its local rank {local} has no GPU (this machine has {gpus}); launch "
            "with torchrun, or set LOCAL_RANK and LOCAL_WORLD_SIZE per machine"
        )
    return torch.device("cuda", local)


# The rendezvous store's errors: a rank that never came, an address nobody listens on.
JOIN_FAILURES = tuple(
    getattr(dist, name) for name in ("DistStoreError", "DistNetworkError") if hasattr(dist, name)
) + (TimeoutError,)


def group_timeout_s(backend: str, timeout_s: float) -> float:
    """The process group's own timeout. NCCL's watchdog aborts the whole process when it
    passes, so there it is set later than the waits' `timeout_s`: a silent rank is then our
    one-line error naming it (`wait_or_fail`), not an abort. Gloo raises in the waiting call."""
    return timeout_s + max(10.0, 0.5 * timeout_s) if backend == "nccl" else timeout_s


def _join(backend: str, rank: int, world_size: int, timeout_s: float) -> None:
    """init_process_group; a rank that never joins (died or hung at start-up, or an unreachable
    MASTER_ADDR) is a one-line RankFailureError, not torch's store traceback. No `device_id`:
    it would create NCCL's communicators inside this call (outside the waits that name a
    silent rank); the rank's GPU is set as the current device before, so no call guesses it."""
    try:
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=group_timeout_s(backend, timeout_s)),
        )
    except JOIN_FAILURES as exc:  # not a missing NCCL build or a bad backend name: raised
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        waited = group_timeout_s(backend, timeout_s)
        raise RankFailureError(
            f"rank {rank}: the {world_size} ranks did not all join at {where} within "
            f"{waited:g} s (a rank died or hangs while starting, or the address is "
            f"unreachable): {link_cause(exc)}"
        ) from exc


def shutdown() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def rank_group(
    timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None, threads: int | None = 1
) -> Iterator[RankContext]:
    """`init_ranks` for the duration of a with-block, always leaving the group afterwards."""
    ctx = init_ranks(timeout_s, backend, threads)
    try:
        yield ctx
    finally:
        shutdown()


def no_answer(ctx: RankContext, who: str, what: str, exc: BaseException) -> RankFailureError:
    """The one-line error of a communication `who` (`RankContext.peers`) did not complete:
    within the timeout, or cut short by a closed connection (a peer that died: no waiting)."""
    cause = link_cause(exc)
    timed_out = TIMED_OUT.search(cause) is not None
    store = _failure_store()
    say_failed(store, ctx)
    if timed_out and who == "another rank":  # a step all ranks take: who else timed out in it?
        who = " or ".join(f"rank {r}" for r in silent_ranks(store, ctx)) or who
    if timed_out:
        how = f"within {ctx.timeout_s:g} s ({who} hangs, died, or the link broke)"
    else:
        how = f"before the connection closed ({who} died or the link broke)"
    return RankFailureError(f"rank {ctx.rank}: {who} did not complete {what} {how}: {cause}")


TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)
# Each failing rank says so in the rendezvous store, so a rank that timed out in a collective can
# name the ranks that did not: the silent ones (a hung rank never fails on its own).
FAILED_KEY = "geodnn/failed/{}"
SILENT_GRACE_S = 3.0  # how long the others get to time out too (their waits began near ours)


def _failure_store():
    """A fresh connection to the job's rendezvous store with a short timeout, or None (a
    private torch API: no names rather than an error)."""
    try:
        store = dist.distributed_c10d._get_default_store().clone()
        store.set_timeout(datetime.timedelta(seconds=SILENT_GRACE_S))
        return store
    except Exception:
        return None


def say_failed(store, ctx: RankContext) -> None:
    with contextlib.suppress(Exception):
        if store is not None:
            store.set(FAILED_KEY.format(ctx.rank), "1")


def silent_ranks(store, ctx: RankContext) -> list[int]:
    """The other ranks that have not failed within SILENT_GRACE_S of this one: in a collective
    every live rank times out near the same moment, so these are the ones that hang or froze.
    Empty when the store does not answer."""
    if store is None:
        return []
    others = [r for r in range(ctx.world_size) if r != ctx.rank]
    deadline = time.monotonic() + SILENT_GRACE_S
    try:
        while True:
            silent = [r for r in others if not store.check([FAILED_KEY.format(r)])]
            if not silent or time.monotonic() > deadline:
                return silent
            time.sleep(0.1)
    except Exception:
        return []


def wait_or_fail(work, ctx: RankContext, peer: int | None, what: str) -> None:
    """Wait for one communication; a timeout or a broken link raises, naming the peer rank
    (`peer` None for a collective, where any rank may be the one missing)."""
    try:
        work.wait(timeout=ctx.timeout)
    except RuntimeError as exc:
        raise no_answer(ctx, ctx.peers(peer), what, exc) from exc


def call_or_fail(ctx: RankContext, what: str, collective, *args, **kwargs):
    """Run a blocking collective (one without async_op, e.g. broadcast_object_list); the process
    group's timeout or a broken link raises RankFailureError, as `wait_or_fail` does."""
    try:
        return collective(*args, **kwargs)
    except RuntimeError as exc:
        raise no_answer(ctx, ctx.peers(), what, exc) from exc


# What gloo and NCCL say when the other end is gone or silent (not a bug in what was sent).
LINK_FAILURE = re.compile(
    r"connection (closed|reset|refused|abort)|timed out|broken pipe|pair closure"
    r"|remote (process exited|peer)|communicator was aborted"
    r"|watchdog caught collective operation timeout",
    re.IGNORECASE,
)


def is_link_failure(exc: BaseException) -> bool:
    """Whether a communication library's error says a peer or the link failed (a timeout, a
    closed connection), as opposed to a bug in what was sent (sizes, types, devices)."""
    return isinstance(exc, getattr(dist, "DistNetworkError", ())) or bool(
        LINK_FAILURE.search(str(exc))
    )


def broadcast_from_leader(ctx: RankContext, tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Collective: every rank's `tensor` becomes rank 0's (in place, on the rank's device)."""
    wait_or_fail(dist.broadcast(tensor, src=0, async_op=True), ctx, None, what)
    return tensor


@torch.no_grad()
def share_module(ctx: RankContext, module: torch.nn.Module, what: str) -> torch.nn.Module:
    """Collective: `module` moved to this rank's device with rank 0's parameters and buffers
    (one flat broadcast), so that every rank can evaluate the whole model."""
    module.to(ctx.device)
    tensors = [*module.parameters(), *module.buffers()]
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    broadcast_from_leader(ctx, flat, what)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return module


def all_reduce_sum(ctx: RankContext, tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Collective: every rank's `tensor` becomes the sum over ranks (in place)."""
    wait_or_fail(dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True), ctx, None, what)
    return tensor


def all_gather_rows(ctx: RankContext, rows: torch.Tensor, what: str) -> torch.Tensor:
    """Collective: every rank's (n_r, ...) `rows`, n_r may differ, concatenated in rank order
    on every rank (padded to the longest for the transfer)."""
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    counts = [torch.empty_like(count) for _ in range(ctx.world_size)]
    wait_or_fail(dist.all_gather(counts, count, async_op=True), ctx, None, what)
    longest = max(int(c) for c in counts)
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    wait_or_fail(dist.all_gather(parts, padded, async_op=True), ctx, None, what)
    return torch.cat([part[: int(c)] for part, c in zip(parts, counts, strict=True)])


def post_or_fail(op, tensor: torch.Tensor, peer: int, tag: int, ctx: RankContext, what: str):
    """Post dist.isend / dist.irecv to `peer`; a broken link (peer gone) names the peer rank."""
    try:
        return op(tensor, peer, tag=tag)
    except RuntimeError as exc:
        raise RankFailureError(
            f"rank {ctx.rank}: cannot exchange {what} with rank {peer} (rank {peer} died or the "
            f"link broke): {link_cause(exc)}"
        ) from exc
