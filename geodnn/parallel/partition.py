"""Work balancing: split a chain of layers into N contiguous blocks by measured cost.

The iteration time of a layer-parallel run is that of its slowest rank, so blocks are chosen to
minimize the largest block cost (exact, by binary search over the bottleneck with a greedy
feasibility test, which is optimal for contiguous splits), with per-rank memory as a hard limit and
then as the tie-break. Costs come from `profile_layers` on the real shapes, not from layer counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import GeodnnError

Blocks = list[tuple[int, int]]  # [(start, stop), ...] covering 0..n contiguously


@dataclass(frozen=True)
class LayerCost:
    """Measured cost of one layer's step: seconds and bytes of state it keeps."""

    seconds: float
    memory_bytes: float = 0.0


@dataclass(frozen=True)
class Plan:
    """A partition with its predicted cost per rank (seconds, bytes)."""

    blocks: Blocks
    predicted_s: list[float]
    predicted_bytes: list[float]

    @classmethod
    def unpredicted(cls, blocks: Blocks) -> Plan:
        """Blocks nobody measured (an equal split, or those a resumed run's checkpoint kept):
        their predictions are NaN and the balance log leaves them out."""
        return cls(list(blocks), [math.nan] * len(blocks), [math.nan] * len(blocks))

    @property
    def bottleneck_s(self) -> float:
        return max(self.predicted_s)

    def describe(self, measured_s: Sequence[float] | None = None) -> str:
        """One line per rank: layers, predicted (and measured) time, memory."""
        lines = []
        for rank, (start, stop) in enumerate(self.blocks):
            line = f"rank {rank}: layers {start}-{stop - 1} ({stop - start})"
            if not math.isnan(self.predicted_s[rank]):
                mib = self.predicted_bytes[rank] / 2**20
                line += f", predicted {self.predicted_s[rank] * 1e3:.1f} ms, {mib:.1f} MiB"
            if measured_s is not None:
                line += f", measured {measured_s[rank] * 1e3:.1f} ms"
            lines.append(line)
        return "\n".join(lines)


def even_blocks(layers: int, parts: int) -> Blocks:
    """Equal layer counts (the naive split; used when nothing has been measured)."""
    _check(layers, parts)
    bounds = [round(i * layers / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _check(layers: int, parts: int) -> None:
    if parts < 1 or parts > layers:
        raise GeodnnError(
            f"cannot split {layers} layers over {parts} workers: use between 1 and {layers} workers"
        )


def _greedy(values: Sequence[float], memory: Sequence[float], cap: float, mem_cap: float) -> Blocks:
    """Fewest blocks with cost <= cap and memory <= mem_cap each (empty list if impossible)."""
    blocks, start, cost, mem = [], 0, 0.0, 0.0
    for i, (v, m) in enumerate(zip(values, memory)):
        if v > cap or m > mem_cap:
            return []
        if i > start and (cost + v > cap or mem + m > mem_cap):
            blocks.append((start, i))
            start, cost, mem = i, 0.0, 0.0
        cost, mem = cost + v, mem + m
    blocks.append((start, len(values)))
    return blocks


def _fill(blocks: Blocks, parts: int) -> Blocks:
    """Split blocks until there are exactly `parts` (splitting never raises a block's cost)."""
    blocks = list(blocks)
    while len(blocks) < parts:
        i = max(range(len(blocks)), key=lambda j: blocks[j][1] - blocks[j][0])
        start, stop = blocks[i]
        blocks[i : i + 1] = [(start, stop - 1), (stop - 1, stop)]
    return blocks


def _min_cap(values: Sequence[float], feasible: Callable[[float], bool], lo: float) -> float:
    hi = sum(values)
    for _ in range(64):
        if hi - lo <= 1e-12 * max(hi, 1e-300):
            break
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if feasible(mid) else (mid, hi)
    return hi


def balance(
    costs: Sequence[LayerCost | float], parts: int, memory_limit: float | None = None
) -> Plan:
    """Contiguous split of the chain into `parts` blocks minimizing the slowest block.

    `memory_limit` (bytes per rank) is a hard constraint; among the fastest splits, the one with the
    smallest largest-memory block is chosen.
    """
    costs = [c if isinstance(c, LayerCost) else LayerCost(float(c)) for c in costs]
    _check(len(costs), parts)
    seconds = [c.seconds for c in costs]
    memory = [c.memory_bytes for c in costs]
    mem_cap = float("inf") if memory_limit is None else float(memory_limit)
    if max(memory) > mem_cap:
        raise GeodnnError(
            f"one layer needs {max(memory) / 2**20:.1f} MiB, above the {mem_cap / 2**20:.1f} MiB "
            "per-worker limit: raise the limit or shrink the crop pool"
        )

    def fits(cap: float, mcap: float) -> bool:
        blocks = _greedy(seconds, memory, cap, mcap)
        return bool(blocks) and len(blocks) <= parts

    if not fits(sum(seconds), mem_cap):
        raise GeodnnError(
            f"the layers do not fit in {parts} workers under the {mem_cap / 2**20:.1f} MiB limit: "
            "use more workers or raise the limit"
        )
    cap = _min_cap(seconds, lambda c: fits(c, mem_cap), max(seconds) * (1 - 1e-9))
    mcap = _min_cap(memory, lambda m: fits(cap, m), max(memory) * (1 - 1e-9))
    blocks = _fill(_greedy(seconds, memory, cap, min(mcap, mem_cap)), parts)
    return Plan(
        blocks,
        [sum(seconds[a:b]) for a, b in blocks],
        [sum(memory[a:b]) for a, b in blocks],
    )


def profile_layers(
    step: Callable[[int], None],
    layers: int,
    repeats: int = 3,
    memory: Callable[[int], float] | None = None,
    timer: Callable[[], float] = time.perf_counter,
) -> list[LayerCost]:
    """Time `step(layer)` for every layer (median of `repeats`) and read its state bytes."""
    costs = []
    for layer in range(layers):
        samples = []
        for _ in range(repeats):
            tic = timer()
            step(layer)
            samples.append(timer() - tic)
        samples.sort()
        bytes_ = float(memory(layer)) if memory is not None else 0.0
        costs.append(LayerCost(samples[len(samples) // 2], bytes_))
    return costs
