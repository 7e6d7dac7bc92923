"""Compressed boundary messages: b-bit affine quantization with error feedback.

A message tensor is quantized per channel (dim 1 of a (B, C, H, W) tensor, else per tensor) to
`bits` <= 8 with a per-channel offset and scale, codes packed 8/bits per byte (bits 3, 5, 6, 7 use
a 4- or 8-bit container). Error feedback: the sender keeps what quantization lost and adds it to the
next message on the same boundary and slot, so over many messages nothing is lost on average.
Encoded layout (one uint8 buffer): [offsets float32 x G][scales float32 x G][packed codes], the
codes in wire order: NHWC for channels_last activations (`nhwc`), so no layout copy is made.
Messages are encoded and decoded on their own device (a GPU's stay there). On the CPU the
per-channel work runs as compiled loops (`compress_kernels`): a 16 x 16 x 64 x 64 message's 8-bit
encode with error feedback went 21 -> 1.7-1.8 ms and its decode 3.0 -> 0.32-0.45 ms (one
thread; benchmarks/scaling.py `encode_decode_s_8bit`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import numpy as np
import torch

from ..errors import GeodnnError
from ..runtime import compiled_loops

CONTAINERS = (1, 2, 4, 8)


@dataclass(frozen=True)
class CompressionSettings:
    """How boundary messages are compressed; `bits` None or 32 means plain float32."""

    bits: int = 8
    per_channel: bool = True
    error_feedback: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise GeodnnError(
                f"compression bits must be 1..8, got {self.bits}: set bits = 8 or less"
            )

    @property
    def container_bits(self) -> int:
        return next(c for c in CONTAINERS if c >= self.bits)


def _groups(shape: torch.Size, per_channel: bool) -> int:
    return int(shape[1]) if per_channel and len(shape) >= 2 else 1


@dataclass(frozen=True)
class _Wire:
    """How a message's values are laid out on the wire: `order` permutes the tensor's dims into
    wire order (NHWC for channels_last activations, so no layout copy is made), and `axis` is
    where the channel dim lands (None: one group for the whole tensor)."""

    order: tuple[int, ...]
    axis: int | None

    @classmethod
    def of(cls, shape: torch.Size, per_channel: bool, nhwc: bool) -> _Wire:
        ndim = len(shape)
        nhwc = nhwc and ndim == 4
        order = (0, 2, 3, 1) if nhwc else tuple(range(ndim))
        grouped = per_channel and ndim >= 2
        return cls(order, (3 if nhwc else 1) if grouped else None)

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` permuted into wire order (a view; contiguous for its activation layout)."""
        return tensor.permute(self.order)

    def unview(self, wired: torch.Tensor) -> torch.Tensor:
        """Inverse of `view`: the tensor's own dims again (a view)."""
        inverse = sorted(range(len(self.order)), key=self.order.__getitem__)
        return wired.permute(inverse)

    def per_group(self, values: torch.Tensor, ndim: int) -> torch.Tensor:
        """Per-group values shaped to broadcast against a wire-order tensor."""
        shape = [1] * ndim
        if self.axis is not None:
            shape[self.axis] = values.numel()
        return values.reshape(shape)


def pack_codes(codes: torch.Tensor, container: int) -> torch.Tensor:
    """Pack integer codes < 2**container into bytes, 8 // container codes per byte (the first
    code in the lowest bits)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if container == 8:
        return flat
    per_byte = 8 // container
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    lanes = flat.reshape(-1, per_byte)
    packed = lanes[:, 0].clone()
    for lane in range(1, per_byte):
        packed |= lanes[:, lane] << (lane * container)
    return packed


def unpack_codes(packed: torch.Tensor, container: int, count: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `count` codes as uint8."""
    if container == 8:
        return packed[:count]
    shifts = torch.arange(0, 8, container, dtype=torch.uint8, device=packed.device)
    lanes = (packed.unsqueeze(1) >> shifts) & ((1 << container) - 1)
    return lanes.reshape(-1)[:count]


def encoded_nbytes(shape: torch.Size, settings: CompressionSettings) -> int:
    """Size in bytes of an encoded tensor of `shape` (known in advance from the shape alone)."""
    count = int(torch.Size(shape).numel())
    per_byte = 8 // settings.container_bits
    return 8 * _groups(torch.Size(shape), settings.per_channel) + -(-count // per_byte)


@dataclass
class _Quantized:
    """One message quantized: per-group offset and step, and the codes in wire order."""

    low: torch.Tensor
    scale: torch.Tensor
    codes: torch.Tensor  # uint8, wire order, the tensor's element count
    error: torch.Tensor | None = None  # x - decoded, in the tensor's own dims (feedback only)


def _group_range(wired: torch.Tensor, wire: _Wire, groups: int) -> tuple[torch.Tensor, ...]:
    if wired.numel() == 0:
        zeros = wired.new_zeros(groups)
        return zeros, zeros
    if wire.axis is None:
        low, high = torch.aminmax(wired)
        return low.reshape(1), high.reshape(1)
    dims = tuple(d for d in range(wired.dim()) if d != wire.axis)
    return wired.amin(dim=dims), wired.amax(dim=dims)


def _quantize(
    x: torch.Tensor,
    settings: CompressionSettings,
    nhwc: bool,
    keep_error: bool,
    carried: torch.Tensor | None = None,
) -> _Quantized:
    """Codes of `x` (+ the `carried` error) in wire order, and what they lose (`keep_error`).

    Codes are floor((v - low) x (1 / scale) + 1/2) with the step scale = (high - low) / levels
    per group, in float32; the compiled CPU loops and the torch passes do the same arithmetic."""
    wire = _Wire.of(x.shape, settings.per_channel, nhwc)
    groups = _groups(x.shape, settings.per_channel)
    wired = wire.view(x)
    carried = None if carried is None else wire.view(carried)
    loops = _cpu_loops() if _compiled_applies(wired, carried, wire) else None
    if loops is not None:
        return _quantize_compiled(loops, wired, wire, groups, settings, keep_error, carried)
    if carried is not None:
        wired = wired + carried
    low, high = _group_range(wired, wire, groups)
    scale, inverse = _steps(low, high, settings)
    low_b, scale_b = wire.per_group(low, wired.dim()), wire.per_group(scale, wired.dim())
    codes = (wired - low_b).mul_(wire.per_group(inverse, wired.dim()))
    codes = codes.add_(0.5).floor_().clamp_(0, (1 << settings.bits) - 1)
    lost = None
    if keep_error:
        lost = wire.unview(wired - codes.mul(scale_b).add_(low_b))
    return _Quantized(low, scale, codes.to(torch.uint8).reshape(-1), lost)


def _steps(
    low: torch.Tensor, high: torch.Tensor, settings: CompressionSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group quantization step and its reciprocal (float32)."""
    scale = ((high - low) / ((1 << settings.bits) - 1)).clamp(min=1e-12)
    return scale, 1.0 / scale


def _quantize_compiled(
    loops: tuple,
    wired: torch.Tensor,
    wire: _Wire,
    groups: int,
    settings: CompressionSettings,
    keep_error: bool,
    carried: torch.Tensor | None,
) -> _Quantized:
    """`_quantize` in two compiled passes over the message (see `compress_kernels`)."""
    feedback_range, quantize_loop, _ = loops
    rows = (wired.numel() // groups, groups)
    values = torch.empty(rows, dtype=torch.float32)
    low, high = torch.empty(groups), torch.empty(groups)
    source = wired.reshape(rows).numpy()
    error = source if carried is None else carried.reshape(rows).numpy()
    feedback_range(source, error, carried is not None, values.numpy(), low.numpy(), high.numpy())
    scale, inverse = _steps(low, high, settings)
    codes = torch.empty(rows, dtype=torch.uint8)
    levels = np.float32((1 << settings.bits) - 1)
    arrays = (values.numpy(), low.numpy(), scale.numpy(), inverse.numpy())
    quantize_loop(*arrays, levels, codes.numpy(), keep_error)
    lost = wire.unview(values.reshape(wired.shape)) if keep_error else None
    return _Quantized(low, scale, codes.reshape(-1), lost)


def _compiled_applies(wired: torch.Tensor, carried: torch.Tensor | None, wire: _Wire) -> bool:
    """Whether the compiled loops apply: per-channel groups on the wire's last dim, CPU
    float32, dense in wire order (the carried error too), at least one element."""
    tensors = [wired] if carried is None else [wired, carried]
    return (
        wire.axis is not None
        and wire.axis == wired.dim() - 1
        and wired.numel() > 0
        and all(
            t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
            for t in tensors
        )
    )


@cache
def _cpu_loops() -> tuple | None:
    """The compiled loops, or None without numba (or with GEODNN_FUSED=0, for comparisons)."""
    names = ("feedback_range", "quantize_loop", "dequantize_loop")
    return compiled_loops("geodnn.parallel.compress_kernels", *names)


def encode(tensor: torch.Tensor, settings: CompressionSettings, nhwc: bool = False) -> torch.Tensor:
    """Quantize a float tensor into one uint8 buffer on its device (layout: module docstring).

    `nhwc`: 4-D codes travel in NHWC order (as channels_last activations lie in memory, so
    quantizing them needs no layout copy); `decode` must be told the same."""
    return _buffer(_quantize(tensor.detach().float(), settings, nhwc, keep_error=False), settings)


def _buffer(q: _Quantized, settings: CompressionSettings) -> torch.Tensor:
    header = torch.cat([q.low, q.scale]).contiguous().view(torch.uint8)
    return torch.cat([header, pack_codes(q.codes, settings.container_bits)])


def decode(
    buffer: torch.Tensor, shape: torch.Size, settings: CompressionSettings, nhwc: bool = False
) -> torch.Tensor:
    """Rebuild the float32 tensor of `shape` from an `encode`d buffer, on the buffer's device
    (channels_last when the codes travelled in NHWC order)."""
    shape = torch.Size(shape)
    wire = _Wire.of(shape, settings.per_channel, nhwc)
    groups = _groups(shape, settings.per_channel)
    head = buffer[: 8 * groups].clone().view(torch.float32)
    low, scale = head[:groups], head[groups:]
    codes = unpack_codes(buffer[8 * groups :], settings.container_bits, shape.numel())
    wired_shape = [shape[d] for d in wire.order]
    loops = _cpu_loops()
    cpu_and_not_empty = codes.device.type == "cpu" and shape.numel() > 0
    if loops is not None and cpu_and_not_empty and wire.axis == len(shape) - 1:
        values = torch.empty(wired_shape, dtype=torch.float32)
        rows = (shape.numel() // groups, groups)
        dequantize = loops[2]
        dequantize(
            codes.reshape(rows).numpy(), low.numpy(), scale.numpy(), values.view(rows).numpy()
        )
        return wire.unview(values)
    wired = codes.reshape(wired_shape).float()
    values = wired.mul_(wire.per_group(scale, len(shape))).add_(wire.per_group(low, len(shape)))
    return wire.unview(values)


@dataclass
class _Residual:
    generation: int
    error: torch.Tensor


@dataclass
class ErrorFeedbackEncoder:
    """The sender side of one boundary: encodes messages and carries the quantization residual.

    The residual is kept per slot (a slot's next message describes the same crops) and dropped when
    the slot's generation or the tensor shape changes (new crops: the old error means nothing).
    """

    settings: CompressionSettings
    residuals: dict[int, _Residual] = field(default_factory=dict)

    def encode(
        self, tensor: torch.Tensor, slot: int = 0, generation: int = 0, nhwc: bool = False
    ) -> torch.Tensor:
        """`tensor` plus the slot's carried error, encoded (see `encode`) on its device."""
        x = tensor.detach().float()
        kept = self.residuals.get(slot)
        carried = None
        if (
            self.settings.error_feedback
            and kept is not None
            and kept.generation == generation
            and kept.error.shape == x.shape
        ):
            carried = kept.error.to(x.device)
        q = _quantize(x, self.settings, nhwc, self.settings.error_feedback, carried)
        if q.error is not None:
            self.residuals[slot] = _Residual(generation, q.error)
        return _buffer(q, self.settings)

    def state_dict(self) -> dict:
        return {
            str(slot): {"generation": r.generation, "error": r.error}
            for slot, r in self.residuals.items()
        }

    def load_state_dict(self, state: dict) -> None:
        self.residuals = {
            int(slot): _Residual(int(r["generation"]), r["error"])  # moved to each message's device
            for slot, r in state.items()
        }
