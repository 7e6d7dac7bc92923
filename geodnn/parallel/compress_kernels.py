"""Compiled CPU loops (numba) for quantizing boundary messages per channel.

A channels_last message is a (rows, channels) array in memory; its per-channel range is a
reduction over the rows, which torch runs at ~2.5 ms per pass on a 4 MB message. These loops read
the message twice in all (range, then codes and what they lose), vectorized across channels.
Imported lazily by `geodnn.parallel.compress`, which uses torch elsewhere or without numba.
"""

from __future__ import annotations

import numba
import numpy as np

# the range may reorder min/max (messages hold no NaN; the loop starts from +-inf, so no
# "ninf"); the codes keep IEEE order and roundings
_RANGE_MATH = {"nnan", "nsz", "reassoc"}


@numba.njit(cache=True, nogil=True, fastmath=_RANGE_MATH)
def feedback_range(
    x: np.ndarray,
    error: np.ndarray,
    add_error: bool,
    out: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
) -> None:
    """out = x (+ error when `add_error`), all (rows, channels); low / high = each channel's
    minimum / maximum of out."""
    rows, channels = x.shape
    lo = np.full(channels, np.inf, dtype=np.float32)
    hi = np.full(channels, -np.inf, dtype=np.float32)
    for r in range(rows):
        for c in range(channels):
            v = x[r, c] + error[r, c] if add_error else x[r, c]
            out[r, c] = v
            lo[c] = min(lo[c], v)
            hi[c] = max(hi[c], v)
    low[:] = lo
    high[:] = hi


@numba.njit(cache=True, nogil=True)
def quantize_loop(
    values: np.ndarray,
    low: np.ndarray,
    scale: np.ndarray,
    inverse: np.ndarray,
    levels: np.float32,
    codes: np.ndarray,
    keep_error: bool,
) -> None:
    """codes = clamp(floor((v - low) * inverse + 1/2), 0, levels), all (rows, channels); with
    `keep_error`, `values` becomes v - (code * scale + low), in decoding's arithmetic."""
    rows, channels = values.shape
    zero = np.float32(0.0)
    half = np.float32(0.5)
    for r in range(rows):
        for c in range(channels):
            v = values[r, c]
            q = min(max(np.floor((v - low[c]) * inverse[c] + half), zero), levels)
            codes[r, c] = np.uint8(q)
            if keep_error:
                values[r, c] = v - (q * scale[c] + low[c])


@numba.njit(cache=True, nogil=True)
def dequantize_loop(codes: np.ndarray, low: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """out = code * scale + low, all (rows, channels): `decode` in one pass."""
    rows, channels = codes.shape
    for r in range(rows):
        for c in range(channels):
            out[r, c] = np.float32(codes[r, c]) * scale[c] + low[c]
