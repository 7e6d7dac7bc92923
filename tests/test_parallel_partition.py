"""Work balancing: exact bottleneck splits, memory limits, and profiling on unequal layers."""

from __future__ import annotations

import itertools

import pytest
import torch

from geodnn.errors import GeodnnError
from geodnn.parallel.partition import LayerCost, Plan, balance, even_blocks, profile_layers


def _brute_force(costs: list[float], parts: int) -> float:
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = [0, *cuts, n]
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds[:-1], bounds[1:])))
    return best


def _is_cover(blocks, n):
    return (
        blocks[0][0] == 0
        and blocks[-1][1] == n
        and all(a < b and b == c for (a, b), (c, _) in zip(blocks, blocks[1:] + [(n, n)]))
    )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("parts", [2, 3, 4])
def test_bottleneck_is_optimal(seed, parts):
    g = torch.Generator().manual_seed(seed)
    costs = (torch.rand(9, generator=g) ** 3 * 10).tolist()
    plan = balance(costs, parts)
    assert len(plan.blocks) == parts and _is_cover(plan.blocks, 9)
    assert plan.bottleneck_s == pytest.approx(_brute_force(costs, parts), rel=1e-9)


def test_unequal_layers_are_not_split_by_count():
    # a heavy head-like layer at the end: equal counts would put it with three others
    costs = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0]
    plan = balance(costs, 2)
    assert plan.blocks == [(0, 6), (6, 8)] or plan.blocks == [(0, 7), (7, 8)]
    assert plan.bottleneck_s < max(sum(costs[a:b]) for a, b in even_blocks(8, 2))


def test_memory_limit_and_tie_break():
    costs = [LayerCost(1.0, 10), LayerCost(1.0, 10), LayerCost(1.0, 100), LayerCost(1.0, 100)]
    # with no limit, 2 blocks of 2 layers: costs 2/2, memory 20/200
    assert balance(costs, 2).blocks == [(0, 2), (2, 4)]
    # a per-rank limit of 105 bytes forbids pairing a big layer with anything else
    plan = balance(costs, 3, memory_limit=105)
    assert plan.blocks == [(0, 2), (2, 3), (3, 4)]
    with pytest.raises(GeodnnError, match="limit"):
        balance(costs, 2, memory_limit=105)
    with pytest.raises(GeodnnError, match="workers"):
        balance(costs, 5)


def test_ties_prefer_lower_peak_memory():
    costs = [LayerCost(1.0, 1), LayerCost(1.0, 50), LayerCost(0.0, 50), LayerCost(1.0, 1)]
    plan = balance(costs, 2)
    assert plan.bottleneck_s == 2.0
    assert max(plan.predicted_bytes) == 51.0  # (0,2)+(2,4) splits the two 50-byte layers


def test_profile_uses_the_timer_and_memory_reader():
    clock = iter(range(1000))
    fake_seconds = {0: 1, 1: 7, 2: 2}
    calls = []

    def timer():
        return float(next(clock))

    def step(layer):
        calls.append(layer)
        for _ in range(fake_seconds[layer] - 1):
            next(clock)

    costs = profile_layers(step, 3, repeats=3, memory=lambda i: 100 * i, timer=timer)
    assert calls == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [c.seconds for c in costs] == [1.0, 7.0, 2.0]
    assert [c.memory_bytes for c in costs] == [0.0, 100.0, 200.0]
    plan = balance(costs, 2)
    assert plan.blocks == [(0, 2), (2, 3)] and plan.bottleneck_s == 8.0


def test_profile_takes_the_median_repeat_so_one_slow_call_does_not_set_the_cost():
    """Repeats of one layer that take 1, 9 and 2 ticks (a warm-up outlier in the middle) cost 2."""
    clock = iter(range(1000))
    ticks = iter([1, 9, 2])

    def timer():
        return float(next(clock))

    def step(layer):
        for _ in range(next(ticks) - 1):
            next(clock)

    [cost] = profile_layers(step, 1, repeats=3, timer=timer)
    assert cost.seconds == 2.0 and cost.memory_bytes == 0.0


def test_describe_lists_predicted_and_measured():
    plan = balance([0.001, 0.002, 0.003], 2)
    text = plan.describe(measured_s=[0.0031, 0.0029])
    assert "rank 0" in text and "predicted" in text and "measured 3.1 ms" in text


def test_blocks_nobody_measured_log_no_prediction():
    """A resumed run's blocks (kept in its checkpoint) logged 'predicted 0.0 ms, 0.0 MiB'."""
    text = Plan.unpredicted([(0, 2), (2, 5)]).describe(measured_s=[0.004, 0.005])
    assert text.splitlines() == [
        "rank 0: layers 0-1 (2), measured 4.0 ms",
        "rank 1: layers 2-4 (3), measured 5.0 ms",
    ]
