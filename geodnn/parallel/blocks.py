"""A rank's contiguous block of a layer chain, stepped Jacobi-style with overlapped exchange.

Every iteration each owned layer steps from the messages its neighbours sent at the previous
iteration: `below` (sent up by layer l-1) and `above` (sent down by layer l+1). Messages between
two owned layers are handed over in memory; only the block's two boundary layers talk to other
ranks. Order per iteration: post receives, step the boundary layers (those with a neighbour on
another rank), post their sends, step the other layers while the messages travel, then wait. The
chain's ends are not boundaries: the head's update (the costliest step) would only delay the
request the last rank sends down, and with it the moment its lower neighbour may go on. Layer
steps are opaque callables here, so the schedule is tested with toy layers and reused by the
ADMM runtime.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .exchange import BoundaryExchange

# step(layer, below, above) -> (message up, message down); either may be None.
LayerStepFn = Callable[[int, Any, Any], tuple[Any, Any]]


@dataclass
class Inbox:
    """Messages each layer will consume at the next iteration."""

    below: dict[int, Any] = field(default_factory=dict)
    above: dict[int, Any] = field(default_factory=dict)


@dataclass
class BlockTimes:
    """Seconds spent this iteration (boundary layers, interior layers, waiting on the network)
    and the bytes this rank sent in it."""

    boundary_s: float = 0.0
    interior_s: float = 0.0
    wait_s: float = 0.0
    bytes_sent: int = 0
    per_layer_s: dict[int, float] = field(default_factory=dict)

    @property
    def compute_s(self) -> float:
        return self.boundary_s + self.interior_s


def boundary_first_order(
    start: int, stop: int, remote_below: bool = True, remote_above: bool = True
) -> tuple[list[int], list[int]]:
    """(boundary layers, the other layers) of the block [start, stop): a boundary layer has a
    neighbour on another rank (`remote_below`: a rank below this one; `remote_above`: above)."""
    boundary = [start] if remote_below else []
    if remote_above and stop - 1 not in boundary:
        boundary.append(stop - 1)
    return boundary, [i for i in range(start, stop) if i not in boundary]


@dataclass
class JacobiBlock:
    """Layers [start, stop) of a chain of `layers` layers, owned by one rank."""

    start: int
    stop: int
    step: LayerStepFn
    exchange: BoundaryExchange | None = None
    inbox: Inbox = field(default_factory=Inbox)

    def iterate(self) -> BlockTimes:
        """One Jacobi iteration of every owned layer; fills the inbox for the next one."""
        times, exchange = BlockTimes(), self.exchange
        sent_before = 0
        if exchange is not None:
            sent_before = exchange.stats.bytes_sent
            exchange.post_receives()
        remote = (exchange.has_below, exchange.has_above) if exchange else (False, False)
        boundary, interior = boundary_first_order(self.start, self.stop, *remote)
        out: dict[int, tuple[Any, Any]] = {}
        tic = time.perf_counter()
        for layer in boundary:
            out[layer] = self._step(layer, times)
        if remote[1]:
            exchange.send_up(out[self.stop - 1][0])
        if remote[0]:
            exchange.send_down(out[self.start][1])
        times.boundary_s = time.perf_counter() - tic
        tic = time.perf_counter()
        for layer in interior:
            out[layer] = self._step(layer, times)
        times.interior_s = time.perf_counter() - tic
        from_below = from_above = None
        tic = time.perf_counter()
        if exchange is not None:
            from_below, from_above = exchange.finish()
            times.bytes_sent = exchange.stats.bytes_sent - sent_before
        times.wait_s = time.perf_counter() - tic
        self._deliver(out, from_below, from_above)
        return times

    def _step(self, layer: int, times: BlockTimes) -> tuple[Any, Any]:
        tic = time.perf_counter()
        result = self.step(layer, self.inbox.below.get(layer), self.inbox.above.get(layer))
        times.per_layer_s[layer] = time.perf_counter() - tic
        return result

    def _deliver(self, out: dict[int, tuple[Any, Any]], from_below: Any, from_above: Any) -> None:
        inbox = Inbox()
        for layer in range(self.start, self.stop):
            below = out[layer - 1][0] if layer > self.start else from_below
            above = out[layer + 1][1] if layer < self.stop - 1 else from_above
            inbox.below[layer], inbox.above[layer] = below, above
        self.inbox = inbox


def jacobi_reference(step: LayerStepFn, layers: int, iterations: int) -> Inbox:
    """The same schedule in one process, whole chain as one block: the equivalence reference."""
    block = JacobiBlock(0, layers, step)
    for _ in range(iterations):
        block.iterate()
    return block.inbox
