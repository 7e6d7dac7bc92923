"""Boundary exchange between neighbouring ranks: non-blocking, overlapped with local work.

Rank r talks only to r-1 and r+1. Each iteration it sends one message up (the activation of its top
layer) and one down (the input its bottom layer would like), and receives one of each from its
neighbours, for use at the next iteration (Jacobi). A message travels as a fixed-size int64 header
(present, slot, generation, payload bytes, ndim, shape) then its payload (float32, or uint8 when
compressed); the receiver's header receive is posted at the start of the iteration, so nothing is
negotiated. Plain isend/irecv pairs only: batched send/recv on gloo has hung before.

Use per iteration: `post_receives()`, compute the boundary layers, `send_up`/`send_down`, compute
the interior layers while the messages travel, then `finish()` -> the messages for next iteration.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .compress import CompressionSettings, ErrorFeedbackEncoder, decode
from .group import RankContext, RankFailureError, post_or_fail, wait_or_fail

HEADER_LEN = 12
MAX_DIMS = HEADER_LEN - 5
UP, DOWN = 0, 1  # direction of travel: up = towards higher ranks (activations)
TAGS = {UP: (11, 12), DOWN: (21, 22)}  # (header tag, payload tag) per direction


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

    def post_receives(self) -> None:
        """Post the header receives for this iteration's messages from both neighbours."""
        if self._incoming:
            raise RuntimeError("post_receives called twice without finish()")
        for peer, direction in ((self.ctx.below, UP), (self.ctx.above, DOWN)):
            if peer is None:
                continue
            header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.ctx.device)
            what = "the boundary message header"
            work = post_or_fail(dist.irecv, header, peer, TAGS[direction][0], self.ctx, what)
            self._incoming.append(_Incoming(peer, direction, header, work))

    def send_up(self, message: Any | None) -> None:
        """Send the top layer's message to rank+1 (no-op on the last rank)."""
        if self.ctx.above is not None:
            self._send(self.ctx.above, UP, message)

    def send_down(self, message: Any | None) -> None:
        """Send the bottom layer's message to rank-1 (no-op on the first rank)."""
        if self.ctx.below is not None:
            self._send(self.ctx.below, DOWN, message)

    def finish(self) -> tuple[Any | None, Any | None]:
        """Wait (with timeout) for this iteration's traffic; return (from_below, from_above)."""
        start = time.perf_counter()
        received: dict[int, Any | None] = {UP: None, DOWN: None}
        for incoming in self._incoming:
            received[incoming.direction] = self._receive(incoming)
        for work, peer, what, _tensor in self._outgoing:
            wait_or_fail(work, self.ctx, peer, what)
        self._incoming, self._outgoing = [], []
        self.stats.wait_s += time.perf_counter() - start
        self.stats.iterations += 1
        return received[UP], received[DOWN]

    def _encoder(self, direction: int) -> ErrorFeedbackEncoder:
        if direction not in self._encoders:
            self._encoders[direction] = ErrorFeedbackEncoder(self.compression)
        return self._encoders[direction]

    def _send(self, peer: int, direction: int, message: Any | None) -> None:
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        payload = None
        if message is not None:
            tensor = message.tensor.detach()
            if tensor.dim() > MAX_DIMS:
                raise ValueError(
                    f"boundary tensors have at most {MAX_DIMS} dims, got {tensor.dim()}"
                )
            if self.compression is None:
                payload = tensor.to(self.ctx.device, torch.float32).contiguous()
            else:
                enc = self._encoder(direction).encode(tensor, message.slot, message.generation)
                payload = enc.to(self.ctx.device)
            nbytes = payload.numel() * payload.element_size()
            header[:5] = torch.tensor([1, message.slot, message.generation, nbytes, tensor.dim()])
            header[5 : 5 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
        header_tag, payload_tag = TAGS[direction]
        header = header.to(self.ctx.device)
        what = f"the {'up' if direction == UP else 'down'} boundary message"
        work = post_or_fail(dist.isend, header, peer, header_tag, self.ctx, what)
        self._outgoing.append((work, peer, what, header))
        self.stats.bytes_sent += header.numel() * 8
        if payload is not None:
            work = post_or_fail(dist.isend, payload, peer, payload_tag, self.ctx, what)
            self._outgoing.append((work, peer, what, payload))
            self.stats.bytes_sent += payload.numel() * payload.element_size()
        self.stats.messages_sent += 1

    def _receive(self, incoming: _Incoming) -> Any | None:
        kind = "up" if incoming.direction == UP else "down"
        wait_or_fail(incoming.work, self.ctx, incoming.peer, f"the {kind} boundary message")
        header = incoming.header.cpu()
        self.stats.bytes_received += HEADER_LEN * 8
        present, slot, generation, nbytes, ndim = (int(v) for v in header[:5])
        if not present:
            return None
        shape = torch.Size(int(v) for v in header[5 : 5 + ndim])
        dtype = torch.float32 if self.compression is None else torch.uint8
        payload = torch.empty(nbytes // (4 if dtype == torch.float32 else 1), dtype=dtype)
        payload = payload.to(self.ctx.device)
        tag = TAGS[incoming.direction][1]
        work = post_or_fail(
            dist.irecv, payload, incoming.peer, tag, self.ctx, f"the {kind} payload"
        )
        wait_or_fail(work, self.ctx, incoming.peer, f"the {kind} boundary payload")
        self.stats.bytes_received += nbytes
        if self.compression is None:
            tensor = payload.reshape(shape)
        else:
            tensor = decode(payload.cpu(), shape, self.compression).to(self.ctx.device)
        return self.make_message(slot, generation, tensor)

    def state_dict(self) -> dict:
        """Error-feedback residuals (the only state that must survive a restart)."""
        return {str(d): enc.state_dict() for d, enc in self._encoders.items()}

    def load_state_dict(self, state: dict) -> None:
        for direction, enc_state in state.items():
            self._encoder(int(direction)).load_state_dict(enc_state)


__all__ = ["BoundaryExchange", "BoundaryMessage", "ExchangeStats", "RankFailureError"]
