"""`python -m geodnn.parallel.selfcheck`: check a multi-rank set-up before a long run.

Run it under torchrun exactly as training would be run (one machine or several). Each rank steps
a block of a toy chain of stateful layers through the real boundary exchange; rank 0 compares
the result with the same chain stepped in one process and prints one line. `--fail-rank` makes a
rank die or hang on purpose, to see the job fail within the timeout with that rank named.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from .blocks import JacobiBlock, jacobi_reference
from .compress import CompressionSettings
from .exchange import BoundaryExchange, BoundaryMessage
from .group import RankFailureError, call_or_fail, init_ranks, shutdown
from .launch import report_exit_code
from .partition import even_blocks

SHAPE = (2, 3, 5, 4)


class ToyChain:
    """A chain of tiny stateful layers coupled to both neighbours, deterministic per layer."""

    def __init__(self, layers: range, depth: int) -> None:
        self.depth = depth
        self.state = {
            i: torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i)) for i in layers
        }
        self.calls = {i: 0 for i in layers}

    def step(self, layer: int, below, above):
        """Computed on the CPU, whatever device the messages travelled on (CUDA under NCCL), so
        the ranks' results stay bit-identical to the one-process reference."""
        x = 0.6 * self.state[layer]
        if below is not None:
            x = x + 0.3 * below.tensor.cpu().tanh() + 0.01 * below.slot
        if above is not None:
            x = x - 0.2 * above.tensor.cpu().sin()
        self.state[layer] = x
        t = self.calls[layer]
        self.calls[layer] += 1
        up = None if layer == self.depth - 1 else BoundaryMessage(t % 3, t // 3, x.relu() + 0.1)
        down = None if layer == 0 else BoundaryMessage(t % 3, t // 3, 0.5 * x)
        return up, down


def run_rank(
    depth: int = 6,
    iterations: int = 7,
    bits: int | None = None,
    timeout_s: float = 30.0,
    fail_rank: int | None = None,
    fail_mode: str = "die",
    fail_at: int = 2,
) -> dict:
    """One rank's share of the self-check (call inside a process group's environment)."""
    ctx = init_ranks(timeout_s=timeout_s)
    try:
        start, stop = even_blocks(depth, ctx.world_size)[ctx.rank]
        chain = ToyChain(range(start, stop), depth)
        compression = CompressionSettings(bits=bits) if bits else None
        exchange = BoundaryExchange(ctx, compression)
        block = JacobiBlock(start, stop, chain.step, exchange)
        for t in range(iterations):
            if ctx.rank == fail_rank and t == fail_at:
                _fail(fail_mode)
            block.iterate()
        states = {k: v for k, v in chain.state.items()}
        gathered: list = [None] * ctx.world_size if ctx.rank == 0 else None
        call_or_fail(ctx, "the self-check gather", dist.gather_object, states, gathered, dst=0)
        result = {"rank": ctx.rank, "bytes_per_iteration": exchange.stats.per_iteration()}
        if ctx.rank == 0:
            merged = {k: v for part in gathered for k, v in part.items()}
            reference = ToyChain(range(depth), depth)
            jacobi_reference(reference.step, depth, iterations)
            gap = max((merged[i] - reference.state[i]).abs().max().item() for i in range(depth))
            result["max_abs_gap"] = gap
            result["state"] = merged
        return result
    finally:
        shutdown()


def _fail(mode: str) -> None:
    if mode == "die":
        os._exit(3)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer or `kill -9` does
    if mode == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)  # frozen: deaf to SIGTERM until killed
    time.sleep(3600)  # "hang": the neighbours must give up on their own


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m geodnn.parallel.selfcheck")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=7)
    parser.add_argument(
        "--bits", type=int, default=None, help="compress messages to this many bits"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before a peer is dead")
    parser.add_argument(
        "--fail-rank", type=int, default=None, help="make this rank fail on purpose"
    )
    parser.add_argument("--fail-mode", choices=("die", "kill", "stop", "hang"), default="die")
    args = parser.parse_args(argv)
    code = _check(args)
    report_exit_code(code)  # this rank's error, if any, is printed: `launch` says no more
    return code


def _check(args: argparse.Namespace) -> int:
    try:
        result = run_rank(
            args.depth, args.iterations, args.bits, args.timeout, args.fail_rank, args.fail_mode
        )
    except RankFailureError as exc:
        print(f"geodnn: error: {exc}", file=sys.stderr)
        return 1
    if result["rank"] == 0:
        gap = result["max_abs_gap"]
        exact = gap == 0.0 if args.bits is None else gap < 0.1
        sent = result["bytes_per_iteration"]["bytes_sent"]
        status = "ok" if exact else "MISMATCH"
        print(f"selfcheck {status}: max gap to one process {gap:.3g}, rank 0 sent {sent:.0f} B/it")
        return 0 if exact else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
