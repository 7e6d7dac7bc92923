"""The local subproblems of one ADMM layer update, each solved without autograd.

Every function here works on one layer's tensors only: a per-pixel proximal step on the
class-weighted cross-entropy (head), the closed-form ReLU z-step (hidden layers), the ridge
least-squares W-step on unfolded patches, and the conjugate-gradient p-step whose operator is a
convolution and whose adjoint is a transposed convolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch.nn import functional as F
from torch.nn.grad import conv2d_weight

from ..metrics import IGNORE_INDEX
from ..runtime import compiled_loops


def weighted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """Class-weighted mean cross-entropy ignoring IGNORE_INDEX; 0 when every pixel is ignored."""
    if not bool((labels != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, weight=weights, ignore_index=IGNORE_INDEX)


def head_prox(
    z0: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None,
    nu: float,
    newton_steps: int = 4,
) -> torch.Tensor:
    """Per-pixel argmin_z  w_y * CE(z; y) + nu/2 ||z - z0||^2; ignored pixels stay at z0.

    z0 is (B, C, H, W) logits. Damped Newton on each pixel's C-dimensional strictly convex problem
    (Hessian w (diag s - s s^T) + nu I), solved for all pixels at once.
    """
    b, c, h, w = z0.shape
    z0f = z0.permute(0, 2, 3, 1).reshape(-1, c)
    y = labels.reshape(-1)
    keep = y != IGNORE_INDEX
    if not bool(keep.any()):
        return z0.clone()
    zk, yk = z0f[keep], y[keep]
    wk = weights[yk] if weights is not None else torch.ones_like(zk[:, 0])
    if c == 2:
        z = _binary_prox(zk, yk, wk, nu, newton_steps)
        out = z0f.clone()
        out[keep] = z
        return _like(out.reshape(b, h, w, c).permute(0, 3, 1, 2), z0)
    onehot = F.one_hot(yk, c).to(zk.dtype)
    z = zk.clone()
    eye = torch.eye(c, dtype=zk.dtype, device=zk.device)
    for _ in range(newton_steps):
        s = torch.softmax(z, dim=1)
        grad = wk[:, None] * (s - onehot) + nu * (z - zk)
        hess = wk[:, None, None] * (torch.diag_embed(s) - s[:, :, None] * s[:, None, :])
        hess = hess + nu * eye
        z = z - torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
    out = z0f.clone()
    out[keep] = z
    return _like(out.reshape(b, h, w, c).permute(0, 3, 1, 2), z0)


def _like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`x` in `ref`'s memory layout (NCHW or channels_last), so later element-wise passes
    over both stay on the fast same-layout path."""
    last = ref.dim() == 4 and ref.is_contiguous(memory_format=torch.channels_last)
    return x.contiguous(memory_format=torch.channels_last if last else torch.contiguous_format)


def _binary_prox(z0, y, w, nu: float, steps: int) -> torch.Tensor:
    """Two classes: CE depends on d = z1 - z0 only, so the prox is a scalar Newton on d.

    With z = m (1, 1) + d/2 (-1, 1), ||z - z0||^2 = 2 (m - m0)^2 + (d - d0)^2 / 2: m stays, and
    d solves min w softplus(-s d) + nu/4 (d - d0)^2 with s = +1 for class 1, -1 for class 0.
    """
    sign = y.to(z0.dtype) * 2 - 1
    d0 = z0[:, 1] - z0[:, 0]
    d = d0.clone()
    for _ in range(steps):
        sig = torch.sigmoid(-sign * d)  # probability of the wrong class
        grad = -w * sign * sig + 0.5 * nu * (d - d0)
        hess = w * sig * (1 - sig) + 0.5 * nu
        d = d - grad / hess
    shift = 0.5 * (d - d0)
    return torch.stack([z0[:, 0] - shift, z0[:, 1] + shift], dim=1)


def relu_z_step(z0: torch.Tensor, q: torch.Tensor, fit: float) -> torch.Tensor:
    """Closed form of argmin_z (z - z0)^2 + fit * (q - relu(z))^2, element-wise.

    Both branches (z <= 0 and z >= 0) are solved exactly and the cheaper one is kept, so a unit
    that is off (z0 < 0) can be switched on when its target q is large enough.
    """
    # z >= 0 branch: z = s / (1 + fit) with s = z0 + fit q, cost fit / (1 + fit) (q - z0)^2;
    # z <= 0 branch: z = min(z0, 0), cost relu(z0)^2 + fit q^2. Their cost difference times
    # (1 + fit) is s^2 for z0 >= 0 and fit (fit q^2 + 2 q z0 - z0^2) for z0 < 0, so the z >= 0
    # branch wins exactly where s > sqrt(1 + fit) relu(-z0): one comparison instead of both
    # costs (these are the solver's most frequent full-size passes, and memory-bound).
    s = torch.add(z0, q, alpha=fit)
    off = torch.clamp(z0, max=0.0)
    # the branch choice as a 0/1 float mask and a blend: torch.where and bool comparisons are
    # several times slower than these arithmetic passes on CPU
    take_pos = torch.add(s, off, alpha=math.sqrt(1.0 + fit)).sign_().clamp_(min=0.0)
    return torch.addcmul(off, take_pos, s.div_(1.0 + fit).sub_(off))


@dataclass
class TargetChange:
    """A hidden layer's target change dz = z* - z0 and the root mean squares its step needs."""

    dz: torch.Tensor
    dz_rms: float
    request_rms: float


def hidden_target_change(
    z0: torch.Tensor, request: torch.Tensor, pull: float, fit: float
) -> TargetChange:
    """dz = z* - z0 for a ReLU layer: q = relu(z0) + pull * request (the q-step; with a dual the
    caller passes u + rho request as the request), then z* = `relu_z_step`(z0, q, fit).

    On the CPU this is one compiled loop (geodnn.solvers.kernels) instead of ~10 full-size torch
    passes: it reads z0 and the request once and writes dz once, which matters most when ranks
    share a memory bus. Elsewhere, or for tensors of different layouts, the torch passes.
    """
    loop = _cpu_loop() if _shared_dense_layout(z0, request) else None
    if loop is None:
        q = torch.relu(z0).add_(request, alpha=pull)
        dz = relu_z_step(z0, q, fit).sub_(z0)
        return TargetChange(dz, rms(dz), rms(request))
    dz = torch.empty_like(z0)  # z0's strides: the flat views below index the same elements
    dz_sq, request_sq = loop(
        _flat(z0), _flat(request), _flat(dz), np.float32(pull), np.float32(fit)
    )
    n = max(z0.numel(), 1)
    return TargetChange(dz, math.sqrt(dz_sq / n), math.sqrt(request_sq / n))


@cache
def _cpu_loop():
    """The compiled loop, or None without numba (or with GEODNN_FUSED=0, for comparisons)."""
    loops = compiled_loops("geodnn.solvers.kernels", "hidden_change_loop")
    return None if loops is None else loops[0]


def _shared_dense_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both CPU float32, same shape and strides, and dense (NCHW or channels_last)."""
    dense = a.is_contiguous() or (
        a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last)
    )
    return (
        a.device.type == "cpu"
        and a.dtype == b.dtype == torch.float32
        and a.shape == b.shape
        and a.stride() == b.stride()
        and dense
    )


def _flat(t: torch.Tensor) -> np.ndarray:
    """A dense tensor's elements as a 1-D array view, in memory order."""
    return torch.as_strided(t, (t.numel(),), (1,)).numpy()


def rms(t: torch.Tensor) -> float:
    """Root mean square in one pass (no squared temporary)."""
    return float(torch.linalg.vector_norm(t)) / math.sqrt(max(t.numel(), 1))


def patch_gram(
    p: torch.Tensor, kernel_size: int, dilation: int, padding: int, stride: int
) -> torch.Tensor:
    """Mean outer product of unfolded patches with a trailing 1 (bias): (D, D), D = C k^2 + 1,
    indexed as the flattened conv weight (channel-major, then kernel row and column).

    `stride` subsamples output pixels (every stride-th row and column) to make the Gram cheap; it
    is a running curvature estimate, so a subsample is enough. The patch rows are gathered
    tap by tap from strided NHWC views straight into one matrix (tap-major): no unfold, which is
    slow on channels_last input, and no separate reshape and bias-column copies.
    """
    b, c, h, w = p.shape
    k, d = kernel_size, dilation
    x = p.permute(0, 2, 3, 1)  # NHWC: a free view of channels_last input
    ho = (h + 2 * padding - d * (k - 1) - 1) // stride + 1
    wo = (w + 2 * padding - d * (k - 1) - 1) // stride + 1
    # zeros stand for the padding: only the taps' in-bounds samples are copied, so the full
    # input is never padded (a copy of the whole crop batch, for 1 / stride^2 of it)
    cols = torch.zeros(b, ho, wo, k * k * c + 1, dtype=p.dtype, device=p.device)
    for tap in range(k * k):
        i, j = divmod(tap, k)
        rows, kept_rows = _in_bounds(i * d - padding, stride, ho, h)
        columns, kept_columns = _in_bounds(j * d - padding, stride, wo, w)
        cols[:, kept_rows, kept_columns, tap * c : (tap + 1) * c] = x[:, rows, columns]
    cols[..., -1] = 1.0
    cols = cols.reshape(-1, cols.shape[-1])
    gram = cols.T @ cols / cols.shape[0]
    # tap-major (tap * C + channel) -> the weight's channel-major order (channel * k^2 + tap)
    order = torch.arange(k * k * c + 1, device=p.device)
    order[:-1] = order[:-1].reshape(k * k, c).T.reshape(-1)
    return gram[order][:, order]


def _in_bounds(offset: int, stride: int, n_out: int, size: int) -> tuple[slice, slice]:
    """(input slice, output slice) of the samples offset + stride m, m < n_out, that fall
    inside [0, size); the others read the zero padding."""
    first = max(0, -(offset // stride))  # the smallest m with offset + stride m >= 0
    last = max(first, min(n_out, (size - 1 - offset) // stride + 1))
    start = offset + stride * first
    return slice(start, start + stride * (last - first), stride), slice(first, last)


def patch_cross(
    p: torch.Tensor, dz: torch.Tensor, weight_shape: torch.Size, dilation: int, padding: int
) -> torch.Tensor:
    """Mean of patch x dz over pixels, (C_out, D): the least-squares right-hand side.

    Computed as a convolution weight-gradient (no unfold of the full crop), plus a bias column.
    """
    n = dz.shape[0] * dz.shape[2] * dz.shape[3]
    cross_w = conv2d_weight(p, weight_shape, dz, padding=padding, dilation=dilation)
    cross_b = dz.sum(dim=(0, 2, 3))
    return torch.cat([cross_w.reshape(weight_shape[0], -1), cross_b[:, None]], dim=1) / n


def weight_matrix(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A conv layer's [W b] as one (C_out, C_in k^2 + 1) matrix: the W-step's layout."""
    return torch.cat([weight.reshape(weight.shape[0], -1), bias[:, None]], dim=1)


def add_step(
    weight: torch.Tensor, bias: torch.Tensor, step: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) moved by a step in the `weight_matrix` layout."""
    new = weight_matrix(weight, bias) + step
    return new[:, :-1].reshape(weight.shape).contiguous(), new[:, -1].contiguous()


def ridge_step(
    weight: torch.Tensor,
    bias: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor,
    lam: float,
    max_rel_step: float,
    normalized: float = 0.0,
) -> tuple[torch.Tensor, float]:
    """Ridge step dW = argmin mean ||dW x - dz||^2 + lam ||dW||^2 = cross (gram + lam I)^-1, in
    the `weight_matrix` layout, and its size relative to [W b] before the cap.

    This is the least-squares refit towards the target z* = z + dz with a pull (lam) to the old
    weights. The step is capped to `max_rel_step` of the weights' norm (a trust region; 0 = off),
    or rescaled to exactly `normalized` of it when that is > 0.
    """
    d = gram.shape[0]
    system = gram + lam * torch.eye(d, dtype=gram.dtype, device=gram.device)
    step = torch.linalg.solve(system, cross.T).T
    rel = float(step.norm() / weight_matrix(weight, bias).norm().clamp(min=1e-12))
    if normalized > 0 and rel > 0:
        step = step * (normalized / rel)
    elif max_rel_step > 0 and rel > max_rel_step:
        step = step * (max_rel_step / rel)
    return step, rel


def cg_p_step(
    residual: torch.Tensor,
    weight: torch.Tensor,
    dilation: int,
    padding: int,
    rho: float,
    steps: int,
) -> torch.Tensor:
    """Input change dp ~ argmin ||W * dp - r||^2 + rho ||dp||^2 by `steps` CG iterations from 0.

    W * dp is the layer's (bias-free) convolution and its adjoint the transposed convolution, so
    the normal equations (W^T W + rho I) dp = W^T r are never formed. The curvature d^T A d is
    ||W d||^2 + rho ||d||^2 (the small output side), and the last iteration skips the residual
    and direction updates no one reads: one CG step costs one transposed convolution, one
    convolution and two passes over dp's size instead of twice that and ten passes.
    """

    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, padding=padding, dilation=dilation)

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(y, weight, padding=padding, dilation=dilation)

    r = adjoint(residual)  # the normal equations' right-hand side; x = 0, so also the residual
    d, x = r, None
    rr = _sq(r)
    dd = rr
    for step in range(steps):
        if rr <= 1e-30:
            break
        wd = forward(d)
        alpha = rr / max(_sq(wd) + rho * dd, 1e-30)
        x = d * alpha if x is None else x.add_(d, alpha=alpha)
        if step == steps - 1:
            break
        r = r - alpha * (adjoint(wd) + rho * d)
        rr_new = _sq(r)
        d = r + (rr_new / rr) * d
        rr, dd = rr_new, _sq(d)
    return torch.zeros_like(r) if x is None else x


def _sq(t: torch.Tensor) -> float:
    """||t||^2 in one pass (no squared temporary)."""
    return float(torch.linalg.vector_norm(t)) ** 2
