"""Boundary exchange and the block schedule on toy layers: N ranks equal one process exactly."""

from __future__ import annotations

import pytest
import torch

from geodnn.parallel.blocks import JacobiBlock, boundary_first_order, jacobi_reference
from geodnn.parallel.compress import CompressionSettings
from geodnn.parallel.exchange import (
    HEADER_LEN,
    BoundaryExchange,
    BoundaryMessage,
    ExchangeStats,
    _from_wire,
    _wire_order,
)
from geodnn.parallel.group import RankContext, init_ranks, shutdown
from geodnn.parallel.launch import spawn
from geodnn.parallel.partition import even_blocks
from geodnn.parallel.selfcheck import SHAPE, ToyChain

LAYERS = 6
ITERATIONS = 7


class ResizingChain(ToyChain):
    """The toy chain, but its messages skip some iterations and change size on others, so the
    pre-posted payload receives meet fillers and resized payloads."""

    def step(self, layer: int, below, above):
        below, above = (self._restore(m) for m in (below, above))
        up, down = super().step(layer, below, above)
        t = self.calls[layer] - 1
        return self._reshape(up, t), self._reshape(down, t + 1)

    @staticmethod
    def _reshape(message, t: int):
        if message is None or t % 5 == 3:
            return None
        if t % 4 == 1:  # a different size: one row more, zero-padded
            padded = torch.nn.functional.pad(message.tensor, (0, 0, 0, 1))
            return BoundaryMessage(message.slot, message.generation, padded)
        return message

    @staticmethod
    def _restore(message):
        if message is None or tuple(message.tensor.shape) == SHAPE:
            return message
        return BoundaryMessage(message.slot, message.generation, message.tensor[:, :, :-1])


def _toy_rank(
    runs: list[int | None], chain_type: type = ToyChain, grouped: bool | None = None
) -> list[dict]:
    """One toy run per entry of `runs` (None: float32 messages, else bits), in one group;
    `grouped` forces the NCCL protocol's grouped rounds (None: the backend's default)."""
    ctx = init_ranks(timeout_s=20, backend="gloo")
    try:
        start, stop = even_blocks(LAYERS, ctx.world_size)[ctx.rank]
        results = []
        for bits in runs:
            chain = chain_type(range(start, stop), LAYERS)
            compression = CompressionSettings(bits=bits) if bits else None
            exchange = BoundaryExchange(ctx, compression, grouped=grouped)
            block = JacobiBlock(start, stop, chain.step, exchange)
            for _ in range(ITERATIONS):
                block.iterate()
            results.append({"state": chain.state, "bytes": exchange.stats.per_iteration()})
        return results
    finally:
        shutdown()


@pytest.fixture(scope="module")
def reference() -> dict:
    chain = ToyChain(range(LAYERS), LAYERS)
    jacobi_reference(chain.step, LAYERS, ITERATIONS)
    return chain.state


@pytest.fixture(scope="module")
def two_ranks() -> list[list[dict]]:
    return spawn(_toy_rank, 2, args=([None, 8],), timeout_s=60)


def _merged(results, run: int) -> dict:
    return {k: v for rank in results for k, v in rank[run]["state"].items()}


def test_boundary_layers_come_first():
    assert boundary_first_order(3, 7) == ([3, 6], [4, 5])
    assert boundary_first_order(2, 3) == ([2], [])


def test_chain_ends_are_not_boundaries():
    # the first rank sends only up, the last only down: the stem and head step after the send
    assert boundary_first_order(0, 4, remote_below=False) == ([3], [0, 1, 2])
    assert boundary_first_order(4, 9, remote_above=False) == ([4], [5, 6, 7, 8])
    assert boundary_first_order(0, 5, False, False) == ([], [0, 1, 2, 3, 4])
    assert boundary_first_order(4, 5, True, True) == ([4], [])


def test_two_ranks_reproduce_single_process_exactly(two_ranks, reference):
    merged = _merged(two_ranks, 0)
    assert sorted(merged) == list(range(LAYERS))
    for layer in range(LAYERS):
        assert torch.equal(merged[layer], reference[layer]), layer


def test_bytes_counted_and_compression_shrinks_them(two_ranks, reference):
    numel = torch.Size(SHAPE).numel()
    for rank in two_ranks:  # one message each way per iteration: header + float32 payload
        assert rank[0]["bytes"]["bytes_sent"] == HEADER_LEN * 8 + 4 * numel
        assert rank[0]["bytes"]["bytes_received"] == HEADER_LEN * 8 + 4 * numel
    packed = two_ranks[0][1]["bytes"]["bytes_sent"] - HEADER_LEN * 8
    assert 3.0 < (4 * numel) / packed <= 4.0
    merged = _merged(two_ranks, 1)  # compressed runs stay close (quantization noise only)
    for layer in range(LAYERS):
        assert torch.allclose(merged[layer], reference[layer], atol=0.05)
    assert any(not torch.equal(merged[i], reference[i]) for i in range(LAYERS))


@pytest.mark.parametrize(
    "workers, grouped",
    [(2, None), (3, None), (2, True), (3, True)],
    ids=["2", "3", "2-grouped", "3-grouped"],
)
def test_messages_that_vanish_or_change_size_arrive_intact(workers, grouped):
    """Also in the grouped rounds NCCL needs (headers, then payloads; run here on gloo)."""
    chain = ResizingChain(range(LAYERS), LAYERS)
    jacobi_reference(chain.step, LAYERS, ITERATIONS)
    results = spawn(_toy_rank, workers, args=([None, 8], ResizingChain, grouped), timeout_s=60)
    exact = _merged(results, 0)
    assert sorted(exact) == list(range(LAYERS))
    for layer in range(LAYERS):
        assert torch.equal(exact[layer], chain.state[layer]), layer
        assert torch.allclose(_merged(results, 1)[layer], chain.state[layer], atol=0.05)


class _RecordingExchange:
    """A stand-in exchange for the last of several ranks: records when the block sends."""

    has_below, has_above = True, False

    def __init__(self, events: list) -> None:
        self.events = events
        self.stats = ExchangeStats(bytes_sent=1000)  # earlier iterations' traffic

    def post_receives(self) -> None:
        self.events.append("post")

    def send_up(self, message) -> None:
        self.events.append("send up")

    def send_down(self, message) -> None:
        self.events.append(f"send down {message}")
        self.stats.bytes_sent += 64

    def finish(self):
        self.events.append("finish")
        return "from below", None


def test_last_rank_sends_down_before_the_head_steps():
    events: list = []

    def step(layer, below, above):
        events.append(f"step {layer}")
        return f"up {layer}", f"down {layer}"

    block = JacobiBlock(4, 7, step, _RecordingExchange(events))
    times = block.iterate()
    assert events == ["post", "step 4", "send down down 4", "step 5", "step 6", "finish"]
    assert times.bytes_sent == 64  # this iteration's bytes only
    assert block.inbox.below[4] == "from below" and block.inbox.above[6] is None


def _layout_rank() -> list[tuple[bool, bool]]:
    """Rank 0 sends an NCHW and then a channels_last tensor up; rank 1 reports what came."""
    ctx = init_ranks(timeout_s=20, backend="gloo")
    try:
        exchange = BoundaryExchange(ctx)
        seen = []
        for channels_last in (False, True):
            sent = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).reshape(2, 3, 5, 4)
            if channels_last:
                sent = sent.contiguous(memory_format=torch.channels_last)
            exchange.post_receives()
            exchange.send_up(BoundaryMessage(0, 0, sent))
            exchange.send_down(None)  # every boundary carries a header each iteration
            below, _ = exchange.finish()
            if below is not None:
                got = below.tensor
                seen.append(
                    (torch.equal(got, sent), got.is_contiguous(memory_format=torch.channels_last))
                )
        return seen
    finally:
        shutdown()


def test_messages_arrive_equal_and_in_the_cpu_activation_layout():
    """4-D messages travel in NHWC order: whatever layout was sent, the receiver gets the same
    values as a channels_last tensor (the CPU's activation layout, no copy on either side)."""
    results = spawn(_layout_rank, 2, timeout_s=60)
    assert results[1] == [(True, True), (True, True)]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_wire_order_follows_the_activation_layout_and_round_trips(device):
    """The payload is the tensor's memory as it lies in the device's activation layout: a
    channels_last tensor on the CPU and an NCHW one on a GPU go out as they are (no copy), and
    the receiver rebuilds the same values in that layout. (CPU tensors stand in for the GPU's:
    the order depends only on the device type.)"""
    device = torch.device(device)
    sent = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).reshape(2, 3, 5, 4)
    if device.type == "cpu":
        sent = sent.contiguous(memory_format=torch.channels_last)
    wire = _wire_order(sent, device)
    assert wire.is_contiguous()  # the layout already matches: nothing to copy
    got = _from_wire(wire.contiguous().reshape(-1), sent.shape, device)
    assert torch.equal(got, sent)
    assert got.is_contiguous(memory_format=torch.channels_last) == (device.type == "cpu")
    flat = torch.arange(6.0)
    assert torch.equal(_from_wire(_wire_order(flat, device), flat.shape, device), flat)


def _gap_rank() -> int | None:
    """Rank 0 sends a message up, none, then one of the same size again; rank 1 counts the
    payloads it had to receive after their header (late receives): only the first, whose size
    nobody knew yet."""
    ctx = init_ranks(timeout_s=20, backend="gloo")
    try:
        exchange = BoundaryExchange(ctx)
        tensor = torch.ones(2, 3, 4, 4)
        got = []
        for message in (BoundaryMessage(0, 0, tensor), None, BoundaryMessage(1, 0, 2 * tensor)):
            exchange.post_receives()
            exchange.send_up(message)
            exchange.send_down(None)
            got.append(exchange.finish()[0])
        if ctx.rank == 0:
            return None
        assert got[1] is None and torch.equal(got[2].tensor, 2 * tensor) and got[2].slot == 1
        return exchange.stats.late_receives
    finally:
        shutdown()


def test_a_message_after_an_absent_one_comes_through_the_pre_posted_receive():
    assert spawn(_gap_rank, 2, timeout_s=60) == [None, 1]


def test_nccl_exchanges_in_grouped_rounds():
    """NCCL serializes a rank pair's transfers on one stream: pre-posted receives would
    deadlock there, so that backend uses the grouped rounds by default."""
    cpu = torch.device("cpu")
    assert BoundaryExchange(RankContext(0, 2, 0, "nccl", cpu, 5.0)).grouped is True
    assert BoundaryExchange(RankContext(0, 2, 0, "gloo", cpu, 5.0)).grouped is False
    with pytest.raises(ValueError, match="deadlocks on NCCL"):
        BoundaryExchange(RankContext(0, 2, 0, "nccl", cpu, 5.0), grouped=False)
