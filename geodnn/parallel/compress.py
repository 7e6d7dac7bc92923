"""Compressed boundary messages: b-bit affine quantization with error feedback.

A message tensor is quantized per channel (dim 1 of a (B, C, H, W) tensor, else per tensor) to
`bits` <= 8 with a per-channel offset and scale, codes packed 8/bits per byte (bits 3, 5, 6, 7 use
a 4- or 8-bit container). Error feedback: the sender keeps what quantization lost and adds it to the
next message on the same boundary and slot, so over many messages nothing is lost on average.
Encoded layout (one uint8 buffer): [offsets float32 x G][scales float32 x G][packed codes].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import GeodnnError

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


def _grouped(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    """View as (groups, -1) with the channel axis first."""
    if groups == 1:
        return tensor.reshape(1, -1)
    return tensor.transpose(0, 1).reshape(groups, -1)


def _ungrouped(grouped: torch.Tensor, shape: torch.Size, groups: int) -> torch.Tensor:
    if groups == 1:
        return grouped.reshape(shape)
    swapped = (shape[1], shape[0], *shape[2:])
    return grouped.reshape(swapped).transpose(0, 1).contiguous()


def pack_codes(codes: torch.Tensor, container: int) -> torch.Tensor:
    """Pack integer codes < 2**container into bytes, 8 // container codes per byte."""
    per_byte = 8 // container
    flat = codes.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    lanes = flat.reshape(-1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, dtype=torch.int32) * container
    return (lanes << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, container: int, count: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `count` codes as int32."""
    per_byte = 8 // container
    shifts = torch.arange(per_byte, dtype=torch.int32) * container
    lanes = (packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << container) - 1)
    return lanes.reshape(-1)[:count]


def encoded_nbytes(shape: torch.Size, settings: CompressionSettings) -> int:
    """Size in bytes of an encoded tensor of `shape` (known in advance from the shape alone)."""
    count = int(torch.Size(shape).numel())
    per_byte = 8 // settings.container_bits
    return 8 * _groups(torch.Size(shape), settings.per_channel) + -(-count // per_byte)


def encode(tensor: torch.Tensor, settings: CompressionSettings) -> torch.Tensor:
    """Quantize a float tensor into one uint8 buffer (see the module docstring for its layout)."""
    x = tensor.detach().float().cpu()
    groups = _groups(x.shape, settings.per_channel)
    grouped = _grouped(x, groups)
    low = grouped.min(dim=1).values if grouped.shape[1] else torch.zeros(groups)
    high = grouped.max(dim=1).values if grouped.shape[1] else torch.zeros(groups)
    levels = (1 << settings.bits) - 1
    scale = ((high - low) / levels).clamp(min=1e-12)
    codes = torch.round((grouped - low[:, None]) / scale[:, None]).clamp(0, levels)
    header = torch.cat([low, scale]).contiguous().view(torch.uint8)
    return torch.cat([header, pack_codes(codes, settings.container_bits)])


def decode(buffer: torch.Tensor, shape: torch.Size, settings: CompressionSettings) -> torch.Tensor:
    """Rebuild the float32 tensor of `shape` from an `encode`d buffer."""
    shape = torch.Size(shape)
    groups = _groups(shape, settings.per_channel)
    head = buffer[: 8 * groups].clone().view(torch.float32)
    low, scale = head[:groups], head[groups:]
    codes = unpack_codes(buffer[8 * groups :], settings.container_bits, shape.numel())
    grouped = codes.reshape(groups, -1).float() * scale[:, None] + low[:, None]
    return _ungrouped(grouped, shape, groups)


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

    def encode(self, tensor: torch.Tensor, slot: int = 0, generation: int = 0) -> torch.Tensor:
        x = tensor.detach().float().cpu()
        kept = self.residuals.get(slot)
        if (
            self.settings.error_feedback
            and kept is not None
            and kept.generation == generation
            and kept.error.shape == x.shape
        ):
            x = x + kept.error
        buffer = encode(x, self.settings)
        if self.settings.error_feedback:
            error = x - decode(buffer, x.shape, self.settings)
            self.residuals[slot] = _Residual(generation, error)
        return buffer

    def state_dict(self) -> dict:
        return {
            str(slot): {"generation": r.generation, "error": r.error}
            for slot, r in self.residuals.items()
        }

    def load_state_dict(self, state: dict) -> None:
        self.residuals = {
            int(slot): _Residual(int(r["generation"]), r["error"].cpu())  # encoding runs on CPU
            for slot, r in state.items()
        }
