"""Compressed boundary messages: bounded error, packing, and error feedback without drift."""

from __future__ import annotations

import io

import pytest
import torch

from geodnn.errors import GeodnnError
from geodnn.parallel import compress
from geodnn.parallel.compress import (
    CompressionSettings,
    ErrorFeedbackEncoder,
    decode,
    encode,
    encoded_nbytes,
    pack_codes,
    unpack_codes,
)


def _message(seed: int = 0, shape=(4, 6, 16, 16)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.1, 10.0, shape[1]).view(1, -1, 1, 1)
    return torch.randn(shape, generator=g) * scales


@pytest.mark.parametrize("container", [1, 2, 4, 8])
def test_pack_round_trip(container):
    codes = torch.randint(0, 2**container, (37,), generator=torch.Generator().manual_seed(1))
    packed = pack_codes(codes, container)
    assert packed.numel() == -(-37 * container // 8)
    assert torch.equal(unpack_codes(packed, container, 37), codes.to(torch.uint8))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_error_bounded_by_half_a_step(bits, per_channel):
    x = _message()
    settings = CompressionSettings(bits=bits, per_channel=per_channel, error_feedback=False)
    y = decode(encode(x, settings), x.shape, settings)
    dims = (0, 2, 3) if per_channel else (0, 1, 2, 3)
    step = (x.amax(dim=dims, keepdim=True) - x.amin(dim=dims, keepdim=True)) / (2**bits - 1)
    assert ((y - x).abs() <= step / 2 + 1e-5).all()


def test_per_channel_beats_per_tensor_on_mixed_scales():
    x = _message()
    errors = {}
    for per_channel in (True, False):
        s = CompressionSettings(bits=4, per_channel=per_channel, error_feedback=False)
        errors[per_channel] = (decode(encode(x, s), x.shape, s) - x).pow(2).mean().item()
    assert errors[True] < errors[False]


def test_eight_bits_are_about_four_times_smaller():
    x = _message(shape=(8, 16, 32, 32))
    settings = CompressionSettings(bits=8)
    buffer = encode(x, settings)
    assert buffer.dtype == torch.uint8 and buffer.numel() == encoded_nbytes(x.shape, settings)
    ratio = x.numel() * 4 / buffer.numel()
    assert 3.9 < ratio <= 4.0
    assert x.numel() * 4 / encoded_nbytes(x.shape, CompressionSettings(bits=4)) > 7.8


def test_error_feedback_makes_running_mean_converge():
    base = _message(seed=3, shape=(2, 3, 8, 8))
    g = torch.Generator().manual_seed(5)
    truths = [base + 0.05 * torch.randn(base.shape, generator=g) for _ in range(200)]

    def mean_gap(feedback: bool, steps: int) -> float:
        enc = ErrorFeedbackEncoder(CompressionSettings(bits=2, error_feedback=feedback))
        s = enc.settings
        decoded = [decode(enc.encode(t, slot=0, generation=0), t.shape, s) for t in truths[:steps]]
        gap = torch.stack(decoded).mean(0) - torch.stack(truths[:steps]).mean(0)
        return gap.abs().max().item()

    with_fb = [mean_gap(True, n) for n in (10, 50, 200)]
    without = mean_gap(False, 200)
    assert with_fb[2] < with_fb[1] < with_fb[0]
    assert with_fb[2] < 0.1 * without


def test_residual_reset_on_new_generation_and_kept_per_slot():
    enc = ErrorFeedbackEncoder(CompressionSettings(bits=2))
    x = _message(shape=(1, 2, 4, 4))
    enc.encode(x, slot=0, generation=0)
    enc.encode(2 * x, slot=1, generation=0)
    assert set(enc.residuals) == {0, 1}
    first = enc.residuals[0].error.clone()
    plain = ErrorFeedbackEncoder(CompressionSettings(bits=2))
    # a new generation for slot 0 starts from zero residual: same bytes as a fresh encoder
    assert torch.equal(enc.encode(x, slot=0, generation=1), plain.encode(x))
    restored = ErrorFeedbackEncoder(enc.settings)
    restored.load_state_dict(enc.state_dict())
    assert torch.equal(restored.residuals[1].error, enc.residuals[1].error)
    # the fresh residual of generation 1 is that of encoding x alone, as for generation 0
    assert torch.equal(first, enc.residuals[0].error)


def test_residuals_survive_a_weights_only_save_and_the_next_encode_is_the_same():
    """A resumed sender carries the same error as the one that went on: its next message on
    each slot has the same bytes."""
    enc = ErrorFeedbackEncoder(CompressionSettings(bits=2))
    for i, slot in enumerate([0, 1, 0]):
        enc.encode(_message(seed=i, shape=(2, 3, 5, 4)), slot=slot, generation=1)
    buffer = io.BytesIO()
    torch.save(enc.state_dict(), buffer)
    buffer.seek(0)
    resumed = ErrorFeedbackEncoder(enc.settings)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    fresh = ErrorFeedbackEncoder(enc.settings)
    for slot in (0, 1):
        x = _message(seed=10 + slot, shape=(2, 3, 5, 4))
        sent = enc.encode(x, slot=slot, generation=1)
        assert torch.equal(resumed.encode(x, slot=slot, generation=1), sent)
        assert not torch.equal(fresh.encode(x, slot=slot, generation=1), sent)  # error carried


def test_bits_out_of_range_is_a_user_error():
    with pytest.raises(GeodnnError, match="bits"):
        CompressionSettings(bits=12)


def _paths_encode(x, settings, nhwc, monkeypatch, compiled: bool):
    """Encode two messages on one slot (the second carries the first's error) on one path."""
    runs = []
    if compiled:  # count the compiled passes, so a silent fallback to torch cannot pass
        original = compress._quantize_compiled
        monkeypatch.setattr(
            compress, "_quantize_compiled", lambda *a: runs.append(1) or original(*a)
        )
    else:
        monkeypatch.setattr(compress, "_cpu_loops", lambda: None)
    enc = ErrorFeedbackEncoder(settings)
    buffers = [enc.encode(m, slot=0, generation=0, nhwc=nhwc) for m in (x, 0.5 * x)]
    decoded = [decode(b, x.shape, settings, nhwc=nhwc) for b in buffers]
    monkeypatch.undo()
    assert len(runs) == (2 if compiled else 0)
    return buffers, decoded, enc.residuals[0].error


@pytest.mark.parametrize("bits", [4, 8])
def test_compiled_loops_match_the_torch_passes_bit_for_bit(bits, monkeypatch):
    pytest.importorskip("numba")
    x = _message(seed=7, shape=(3, 5, 9, 7)).contiguous(memory_format=torch.channels_last)
    settings = CompressionSettings(bits=bits)
    compiled = _paths_encode(x, settings, True, monkeypatch, compiled=True)
    plain = _paths_encode(x, settings, True, monkeypatch, compiled=False)
    for got, want in zip(compiled[0] + compiled[1], plain[0] + plain[1]):
        assert torch.equal(got, want)
    assert torch.equal(compiled[2], plain[2])  # the carried error too


@pytest.mark.parametrize("nhwc", [True, False])
def test_wire_order_round_trip_keeps_the_tensor(nhwc):
    x = _message(seed=2, shape=(2, 3, 5, 4))
    if nhwc:
        x = x.contiguous(memory_format=torch.channels_last)
    settings = CompressionSettings(bits=8, error_feedback=False)
    buffer = encode(x, settings, nhwc=nhwc)
    y = decode(buffer, x.shape, settings, nhwc=nhwc)
    assert y.shape == x.shape and y.is_contiguous(
        memory_format=torch.channels_last if nhwc else torch.contiguous_format
    )
    step = (x.amax(dim=(0, 2, 3)) - x.amin(dim=(0, 2, 3))).view(1, -1, 1, 1) / 255
    assert ((y - x).abs() <= step / 2 + 1e-5).all()
    # NHWC codes: channel varies fastest on the wire
    codes = buffer[8 * 3 :]
    first_pixel = torch.round((x[0, :, 0, 0] - x.amin(dim=(0, 2, 3))) / step.view(-1))
    if nhwc:  # NHWC: the first pixel's three channels come first
        assert torch.equal(codes[:3].float(), first_pixel)
    else:  # NCHW: the first channel's first row comes first
        row = torch.round((x[0, 0, 0, :4] - x[:, 0].min()) / step.view(-1)[0])
        assert torch.equal(codes[:4].float(), row)
