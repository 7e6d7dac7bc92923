"""Compiled CPU loops (numba) for the solver's memory-bound element-wise work.

Imported lazily by `geodnn.solvers.subproblems`, which falls back to torch when numba is missing
or the tensors are not plain CPU float32 arrays. Compiled once per machine (cached on disk).
"""

from __future__ import annotations

import math

import numba
import numpy as np

# reassociation lets the two sums vectorize; no finite-math flags, so NaNs still propagate
_FAST = {"reassoc", "contract", "arcp", "nsz"}


@numba.njit(cache=True, nogil=True, fastmath=_FAST)
def hidden_change_loop(
    z0: np.ndarray, request: np.ndarray, out: np.ndarray, pull: np.float32, fit: np.float32
) -> tuple[float, float]:
    """out = z* - z0 for a ReLU layer in one pass (see `subproblems.hidden_target_change`);
    returns the sums of squares of out and of the request."""
    root = np.float32(math.sqrt(1.0 + fit))
    scale = np.float32(1.0 / (1.0 + fit))
    zero = np.float32(0.0)
    dz_sq = 0.0
    request_sq = 0.0
    for i in range(z0.size):
        z = z0[i]
        r = request[i]
        s = z + fit * (max(z, zero) + pull * r)
        off = min(z, zero)
        d = (s * scale if s + root * off > zero else off) - z
        out[i] = d
        dz_sq += d * d
        request_sq += r * r
    return dz_sq, request_sq
