"""Boundary exchange between neighbouring ranks: non-blocking, overlapped with local work.

Rank r talks only to r-1 and r+1. Each iteration it sends one message up (the activation of its top
layer) and one down (the input its bottom layer would like), and receives one of each from its
neighbours, for use at the next iteration (Jacobi). A message travels as a fixed-size int64 header
(present, slot, generation, payload bytes, ndim, filler flag, shape) then its payload as bytes
(float32, or uint8 when compressed). Plain isend/irecv pairs only: batched send/recv on gloo has
hung before.

Both receives are posted at the start of the iteration so the payload flows while the layers
compute: gloo moves an unbound buffer only once the receiver has posted it, and a payload receive
posted after the header arrived made every 4 MB message wait for the end of the iteration. The
payload receive is posted with the size of the channel's last payload, which both ends track.
When a message's size differs (pipeline fill) or there is no message, the sender satisfies the
posted receive with a filler of the old size, flags it in the header, and sends the real payload
(if any) under a second tag, which the receiver can only post once the header is in: a late
receive. An absent message leaves the tracked size as it was: ADMM's lowest layer of a block has
no request to send down whenever its own was dropped, and a size reset to zero made the next
message a late receive, holding both ranks to each other (measured at depth 8, 2 ranks, 3
interleaved pairs: 52.9-58.2 ms per iteration before, 49.8-53.8 ms with the size kept).

Use per iteration: `post_receives()`, compute the boundary layers, `send_up`/`send_down`, compute
the interior layers while the messages travel, then `finish()` -> the messages for next iteration.

NCCL (`grouped`, the default with that backend) runs all transfers between two ranks on one
stream in the order they were posted, so a receive posted before the matching send on the other
side waits for ever when that side also received first: the two ranks would deadlock on their
pre-posted receives. There the iteration's sends wait in `_send` and `finish()` moves everything
in two grouped rounds (`batch_isend_irecv`, which NCCL matches in any order): the headers, then
the payloads of the sizes they announce. No fillers, no overlap with the interior layers' compute
(the GPU's kernels run asynchronously anyway). Tested on gloo, where the rounds run the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..model import activation_format, as_activation
from .compress import CompressionSettings, ErrorFeedbackEncoder, decode
from .group import RankContext, RankFailureError, link_cause, post_or_fail, wait_or_fail

HEADER_LEN = 12
MAX_DIMS = HEADER_LEN - 6
UP, DOWN = 0, 1  # direction of travel: up = towards higher ranks (activations)
# (header, payload of the expected size, payload of a new size) tags per direction
TAGS = {UP: (11, 12, 13), DOWN: (21, 22, 23)}


@dataclass
class BoundaryMessage:
    """Fallback message type (duck-typed: anything with slot, generation and tensor works)."""

    slot: int
    generation: int
    tensor: torch.Tensor


@dataclass
class ExchangeStats:
    """Traffic of one rank, cumulative; `per_iteration` divides by the finished iterations."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    iterations: int = 0
    wait_s: float = 0.0
    late_receives: int = 0  # payloads whose receive waited for their header (size changed)

    def per_iteration(self) -> dict[str, float]:
        n = max(self.iterations, 1)
        return {
            "bytes_sent": self.bytes_sent / n,
            "bytes_received": self.bytes_received / n,
            "wait_s": self.wait_s / n,
        }


@dataclass
class _Incoming:
    peer: int
    direction: int
    header: torch.Tensor
    work: Any
    payload: torch.Tensor | None = None  # pre-posted, the channel's previous payload size
    payload_work: Any = None


def _nhwc_wire(device: torch.device, ndim: int) -> bool:
    """Whether a message travels in NHWC order: 4-D ones where the ranks' activations are
    channels_last (the CPU), so they go out and come in without a layout copy on either side;
    on GPUs activations are NCHW and travel as they are. All ranks of a job share one backend,
    hence one device type, so both sides agree."""
    return ndim == 4 and activation_format(device) == torch.channels_last


def _wire_order(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` as a view in its wire order (see `_nhwc_wire`)."""
    return tensor.permute(0, 2, 3, 1) if _nhwc_wire(device, tensor.dim()) else tensor


def _from_wire(flat: torch.Tensor, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """The tensor of `shape` from its wire order (a channels_last view when that was NHWC)."""
    if not _nhwc_wire(device, len(shape)):
        return flat.reshape(shape)
    n, c, h, w = shape
    return flat.reshape(n, h, w, c).permute(0, 3, 1, 2)


def _header(message: Any | None, nbytes: int) -> torch.Tensor:
    """A message's CPU header (present, slot, generation, payload bytes, ndim, filler flag 0,
    shape); all zeros for an absent one."""
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    if message is not None:
        shape = message.tensor.shape
        header[:5] = torch.tensor([1, message.slot, message.generation, nbytes, len(shape)])
        header[6 : 6 + len(shape)] = torch.tensor(shape, dtype=torch.int64)
    return header


@dataclass
class BoundaryExchange:
    """One rank's two boundaries. `compression` None sends float32; else b-bit with feedback."""

    ctx: RankContext
    compression: CompressionSettings | None = None
    make_message: Callable[[int, int, torch.Tensor], Any] = BoundaryMessage
    stats: ExchangeStats = field(default_factory=ExchangeStats)
    _incoming: list[_Incoming] = field(default_factory=list)
    _outgoing: list[tuple[Any, int, str, torch.Tensor]] = field(default_factory=list)
    _encoders: dict[int, ErrorFeedbackEncoder] = field(default_factory=dict)
    # payload bytes of each channel's previous message: what the receiver pre-posts
    _sent_bytes: dict[int, int] = field(default_factory=dict)
    _received_bytes: dict[int, int] = field(default_factory=dict)
    # one zero buffer per channel for fillers (only ever read, so sends may share it)
    _fillers: dict[int, torch.Tensor] = field(default_factory=dict)
    # None: grouped rounds on NCCL, pre-posted point-to-point elsewhere (see the module notes)
    grouped: bool | None = None
    _queued: list[tuple[int, int, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.grouped is None:
            self.grouped = self.ctx.backend == "nccl"
        if not self.grouped and self.ctx.backend == "nccl":
            raise ValueError("pre-posted point-to-point exchange deadlocks on NCCL: grouped=True")

    @property
    def has_below(self) -> bool:
        """Whether a rank below (rank - 1) exists to talk to."""
        return self.ctx.below is not None

    @property
    def has_above(self) -> bool:
        """Whether a rank above (rank + 1) exists to talk to."""
        return self.ctx.above is not None

    def post_receives(self) -> None:
        """Post this iteration's header and (expected-size) payload receives from both
        neighbours, so the messages travel while the layers compute."""
        if self._incoming:
            raise RuntimeError("post_receives called twice without finish()")
        if self.grouped:
            return  # everything moves in `finish`
        for peer, direction in ((self.ctx.below, UP), (self.ctx.above, DOWN)):
            if peer is None:
                continue
            header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.ctx.device)
            what = "the boundary message header"
            work = post_or_fail(dist.irecv, header, peer, TAGS[direction][0], self.ctx, what)
            incoming = _Incoming(peer, direction, header, work)
            expected = self._received_bytes.get(direction, 0)
            if expected:
                incoming.payload = torch.empty(expected, dtype=torch.uint8, device=self.ctx.device)
                incoming.payload_work = post_or_fail(
                    dist.irecv, incoming.payload, peer, TAGS[direction][1], self.ctx, what
                )
            self._incoming.append(incoming)

    def send_up(self, message: Any | None) -> None:
        """Send the top layer's message to rank+1 (no-op on the last rank)."""
        if self.has_above:
            self._send(self.ctx.above, UP, message)

    def send_down(self, message: Any | None) -> None:
        """Send the bottom layer's message to rank-1 (no-op on the first rank)."""
        if self.has_below:
            self._send(self.ctx.below, DOWN, message)

    def finish(self) -> tuple[Any | None, Any | None]:
        """Wait (with timeout) for this iteration's traffic; return (from_below, from_above)."""
        start = time.perf_counter()
        received = self._grouped_rounds() if self.grouped else self._posted_traffic()
        self.stats.wait_s += time.perf_counter() - start
        self.stats.iterations += 1
        return received[UP], received[DOWN]

    def _posted_traffic(self) -> dict[int, Any | None]:
        """Point-to-point mode: wait for the pre-posted receives and the sends; the messages
        received by direction."""
        received: dict[int, Any | None] = {UP: None, DOWN: None}
        for incoming in self._incoming:
            received[incoming.direction] = self._receive(incoming)
        for work, peer, what, _tensor in self._outgoing:
            wait_or_fail(work, self.ctx, peer, what)
        self._incoming, self._outgoing = [], []
        return received

    def _encoder(self, direction: int) -> ErrorFeedbackEncoder:
        if direction not in self._encoders:
            self._encoders[direction] = ErrorFeedbackEncoder(self.compression)
        return self._encoders[direction]

    def _payload(self, direction: int, message: Any) -> torch.Tensor:
        """The message's tensor as the flat bytes that travel (float32, or b-bit encoded)."""
        tensor = message.tensor.detach()
        if tensor.dim() > MAX_DIMS:
            raise ValueError(f"boundary tensors have at most {MAX_DIMS} dims, got {tensor.dim()}")
        if self.compression is None:
            payload = _wire_order(tensor, self.ctx.device).to(self.ctx.device, torch.float32)
            payload = payload.contiguous()
        else:
            nhwc = _nhwc_wire(self.ctx.device, tensor.dim())
            encoder = self._encoder(direction)
            enc = encoder.encode(tensor, message.slot, message.generation, nhwc)
            payload = enc.to(self.ctx.device).contiguous()
        return payload.reshape(-1).view(torch.uint8)

    def _filler(self, direction: int, nbytes: int) -> torch.Tensor:
        """Zeros of `nbytes` that fill a pre-posted receive, allocated once per size."""
        zeros = self._fillers.get(direction)
        if zeros is None or zeros.numel() != nbytes:
            zeros = torch.zeros(nbytes, dtype=torch.uint8, device=self.ctx.device)
            self._fillers[direction] = zeros
        return zeros

    def _send(self, peer: int, direction: int, message: Any | None) -> None:
        payload = None if message is None else self._payload(direction, message)
        nbytes = 0 if payload is None else payload.numel()
        header = _header(message, nbytes)
        if self.grouped:  # sizes travel first there: no filler
            self._queued.append((peer, direction, header.to(self.ctx.device), payload))
            self.stats.messages_sent += 1
            return
        expected = self._sent_bytes.get(direction, 0)
        filler = expected > 0 and nbytes != expected
        header[5] = int(filler)
        what = f"the {'up' if direction == UP else 'down'} boundary message"
        header_tag, expected_tag, resized_tag = TAGS[direction]
        parts = [(header.to(self.ctx.device), header_tag)]
        if filler:
            parts.append((self._filler(direction, expected), expected_tag))
        if payload is not None:
            parts.append((payload, expected_tag if nbytes == expected else resized_tag))
        for tensor, tag in parts:
            work = post_or_fail(dist.isend, tensor, peer, tag, self.ctx, what)
            self._outgoing.append((work, peer, what, tensor))
            self.stats.bytes_sent += tensor.numel() * tensor.element_size()
        if nbytes:  # an absent message keeps the size the receiver pre-posts
            self._sent_bytes[direction] = nbytes
        self.stats.messages_sent += 1

    def _grouped_rounds(self) -> dict[int, Any | None]:
        """Grouped mode: every header to and from both neighbours in one group, then every
        payload of a size a header announced in another; the messages received by direction."""
        peers = [(p, d) for p, d in ((self.ctx.below, UP), (self.ctx.above, DOWN)) if p is not None]
        headers = {d: torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.ctx.device)
                   for _, d in peers}  # fmt: skip
        ops = [dist.P2POp(dist.isend, h, peer) for peer, _, h, _ in self._queued]
        ops += [dist.P2POp(dist.irecv, headers[d], peer) for peer, d in peers]
        self._run_group(ops, "the boundary message headers")
        sizes = {d: int(headers[d][3]) for _, d in peers}
        payloads = {d: torch.empty(n, dtype=torch.uint8, device=self.ctx.device)
                    for d, n in sizes.items() if n}  # fmt: skip
        ops = [dist.P2POp(dist.isend, t, peer) for peer, _, _, t in self._queued if t is not None]
        ops += [dist.P2POp(dist.irecv, payloads[d], peer) for peer, d in peers if d in payloads]
        self._run_group(ops, "the boundary message payloads")
        for *_, payload in self._queued:
            self.stats.bytes_sent += HEADER_LEN * 8 + (0 if payload is None else payload.numel())
        self._queued = []
        received: dict[int, Any | None] = {UP: None, DOWN: None}
        for _, d in peers:
            self.stats.bytes_received += HEADER_LEN * 8 + sizes[d]
            received[d] = self._decoded(headers[d].cpu(), payloads.get(d))
        return received

    def _run_group(self, ops: list, what: str) -> None:
        """Post `ops` as one group (NCCL matches them in any order) and wait for all of them."""
        if not ops:
            return
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as exc:
            raise RankFailureError(
                f"rank {self.ctx.rank}: cannot exchange {what} with its neighbours (one died or "
                f"the link broke): {link_cause(exc)}"
            ) from exc
        for work in works:
            wait_or_fail(work, self.ctx, None, what)

    def _receive(self, incoming: _Incoming) -> Any | None:
        kind = "up" if incoming.direction == UP else "down"
        wait_or_fail(incoming.work, self.ctx, incoming.peer, f"the {kind} boundary message")
        header = incoming.header.cpu()
        self.stats.bytes_received += HEADER_LEN * 8
        present, slot, generation, nbytes, ndim, filler = (int(v) for v in header[:6])
        payload = incoming.payload
        if payload is not None:  # the pre-posted receive: the payload, or a filler to drop
            wait_or_fail(incoming.payload_work, self.ctx, incoming.peer, f"the {kind} payload")
            self.stats.bytes_received += payload.numel()
            payload = None if filler else payload
        if payload is None and nbytes:
            payload = torch.empty(nbytes, dtype=torch.uint8, device=self.ctx.device)
            tag = TAGS[incoming.direction][2]
            what = f"the {kind} boundary payload"
            work = post_or_fail(dist.irecv, payload, incoming.peer, tag, self.ctx, what)
            wait_or_fail(work, self.ctx, incoming.peer, what)
            self.stats.bytes_received += nbytes
            self.stats.late_receives += 1
        if nbytes:
            self._received_bytes[incoming.direction] = nbytes
        return self._decoded(header, payload)

    def _decoded(self, header: torch.Tensor, payload: torch.Tensor | None) -> Any | None:
        """The message a (CPU) header and its payload bytes describe; None when absent."""
        present, slot, generation, _, ndim = (int(v) for v in header[:5])
        if not present:
            return None
        shape = torch.Size(int(v) for v in header[6 : 6 + ndim])
        if self.compression is None:
            tensor = _from_wire(payload.view(torch.float32), shape, self.ctx.device)
        else:
            nhwc = _nhwc_wire(self.ctx.device, len(shape))
            tensor = decode(payload, shape, self.compression, nhwc)
        return self.make_message(slot, generation, as_activation(tensor))

    def state_dict(self) -> dict:
        """Error-feedback residuals (the only state that must survive a restart)."""
        return {str(d): enc.state_dict() for d, enc in self._encoders.items()}

    def load_state_dict(self, state: dict) -> None:
        for direction, enc_state in state.items():
            self._encoder(int(direction)).load_state_dict(enc_state)


__all__ = ["BoundaryExchange", "BoundaryMessage", "ExchangeStats", "RankFailureError"]
