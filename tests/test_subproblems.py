"""Each local ADMM subproblem's closed form or iterative solve against a brute-force answer."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from geodnn.metrics import IGNORE_INDEX
from geodnn.solvers.subproblems import (
    _cpu_loop,
    add_step,
    cg_p_step,
    head_prox,
    hidden_target_change,
    patch_cross,
    patch_gram,
    relu_z_step,
    ridge_step,
    weight_matrix,
    weighted_cross_entropy,
)


def test_relu_z_step_matches_grid_search():
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(400, generator=g, dtype=torch.float64) * 2
    q = torch.randn(400, generator=g, dtype=torch.float64) * 2
    fit = 3.0
    grid = torch.linspace(-8, 8, 160001, dtype=torch.float64)
    cost = (grid[None] - z0[:, None]) ** 2 + fit * (q[:, None] - torch.relu(grid[None])) ** 2
    best = grid[cost.argmin(dim=1)]
    assert torch.allclose(relu_z_step(z0, q, fit), best, atol=2e-4)


def _target_change_by_passes(z0, request, pull, fit):
    return relu_z_step(z0, torch.relu(z0) + pull * request, fit) - z0


def test_the_fused_cpu_loop_is_available():
    assert _cpu_loop() is not None  # numba is a dependency: the solver's CPU path uses it


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_hidden_target_change_matches_the_torch_passes(layout):
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(3, 5, 7, 9, generator=g).contiguous(memory_format=layout)
    request = (2 * torch.randn(3, 5, 7, 9, generator=g)).contiguous(memory_format=layout)
    change = hidden_target_change(z0, request, 0.8, 9.0)
    expected = _target_change_by_passes(z0, request, 0.8, 9.0)
    assert change.dz.stride() == z0.stride()
    assert torch.allclose(change.dz, expected, atol=1e-6)
    assert change.dz_rms == pytest.approx(float(expected.pow(2).mean().sqrt()), rel=1e-5)
    assert change.request_rms == pytest.approx(float(request.pow(2).mean().sqrt()), rel=1e-5)
    switched_on = (z0 < 0) & (change.dz > 0)
    assert switched_on.any()  # the case the z-step exists for is covered


def test_fused_loop_switches_a_unit_on_exactly_where_the_z_step_does():
    """The compiled loop's on/off threshold, swept densely over off units (z0 in [-3, 0]) and
    requests in [0, 1], against the float64 closed form (checked by grid search above)."""
    fit, pull = 9.0, 0.8
    z0, request = torch.meshgrid(
        torch.linspace(-3.0, 0.0, 301), torch.linspace(0.0, 1.0, 201), indexing="ij"
    )
    z0, request = z0.reshape(1, 1, 301, 201).contiguous(), request.reshape(1, 1, 301, 201)
    change = hidden_target_change(z0, request.contiguous(), pull, fit)
    z0d, rd = z0.double(), request.double()
    expected = _target_change_by_passes(z0d, rd, pull, fit)
    # the branch test s > sqrt(1 + fit) relu(-z0); float32 rounding may flip exact ties only
    s = z0d + fit * (torch.relu(z0d) + pull * rd)
    margin = s + (1.0 + fit) ** 0.5 * z0d.clamp(max=0.0)
    clear = margin.abs() > 1e-3
    assert torch.allclose(change.dz[clear].double(), expected[clear], atol=1e-5)
    near_threshold = (s > fit**0.5 * -z0d) & (margin < 0)  # off, but on by sqrt(fit)
    assert int((near_threshold & clear).sum()) > 100  # the sweep covers the narrow band
    # one such unit: s = -1 + 9 x 0.45 = 3.05 lies between 3 and sqrt(10), so it stays off
    one = hidden_target_change(torch.tensor([-1.0]), torch.tensor([0.45]), 1.0, fit)
    assert one.dz.item() == 0.0


def test_hidden_target_change_with_mixed_layouts_and_nan():
    g = torch.Generator().manual_seed(4)
    z0 = torch.randn(2, 4, 6, 6, generator=g)
    request = torch.randn(2, 4, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
    change = hidden_target_change(z0, request, 0.5, 4.0)  # no shared layout: the torch passes
    assert torch.allclose(change.dz, _target_change_by_passes(z0, request, 0.5, 4.0), atol=1e-6)
    z0[0, 0, 0, 0] = float("nan")  # a diverged input stays visible to the divergence check
    assert not torch.isfinite(hidden_target_change(z0, z0.clone(), 0.5, 4.0).dz).all()


def test_relu_z_step_switches_an_off_unit_on_only_when_worth_it():
    z0 = torch.tensor([-0.1, -3.0])
    z = relu_z_step(z0, torch.tensor([2.0, 0.1]), fit=9.0)
    assert z[0] > 0  # a strong request revives a unit that is barely off
    assert z[1] == -3.0  # a weak one leaves a far-off unit alone


def _patches(p, k, dilation, padding):
    cols = F.unfold(p, k, dilation=dilation, padding=padding)
    x = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


@pytest.mark.parametrize("dilation, stride", [(1, 1), (2, 3), (4, 2), (3, 5), (5, 6)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("extra_padding", [0, -1, 2])  # "same" padding, less, more
def test_patch_gram_equals_the_gram_of_unfolded_patches(
    dilation, stride, channels_last, extra_padding
):
    g = torch.Generator().manual_seed(3)
    p = torch.randn(2, 3, 11, 13, generator=g, dtype=torch.float64)
    padding = dilation + extra_padding
    cols = F.unfold(p, 3, dilation=dilation, padding=padding, stride=stride)
    x = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    if channels_last:
        p = p.contiguous(memory_format=torch.channels_last)
    gram = patch_gram(p, 3, dilation, padding, stride)
    assert torch.allclose(gram, x.T @ x / x.shape[0], atol=1e-12)


def test_ridge_step_equals_lstsq_on_unfolded_patches():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(2, 3, 9, 9, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    dz = torch.randn(2, 4, 9, 9, generator=g, dtype=torch.float64)
    lam = 0.3
    gram = patch_gram(p, 3, 2, 2, stride=1)
    cross = patch_cross(p, dz, weight.shape, 2, 2)
    ridge, _ = ridge_step(weight, bias, gram, cross, lam, max_rel_step=0)
    new_w, new_b = add_step(weight, bias, ridge)
    # brute force: min (1/n) ||X dW^T - dZ||^2 + lam ||dW||^2 as an augmented least squares
    x = _patches(p, 3, 2, 2)
    n = x.shape[0]
    target = dz.permute(0, 2, 3, 1).reshape(-1, 4)
    a = torch.cat([x / n**0.5, lam**0.5 * torch.eye(x.shape[1], dtype=x.dtype)])
    b = torch.cat([target / n**0.5, torch.zeros(x.shape[1], 4, dtype=x.dtype)])
    step = torch.linalg.lstsq(a, b).solution.T
    assert torch.allclose(new_w - weight, step[:, :-1].reshape(weight.shape), atol=1e-9)
    assert torch.allclose(new_b - bias, step[:, -1], atol=1e-9)


def test_ridge_step_trust_region_caps_the_step():
    weight, bias = torch.ones(2, 1, 1, 1), torch.zeros(2)
    gram = torch.eye(2)
    cross = torch.full((2, 2), 100.0)
    ridge, rel = ridge_step(weight, bias, gram, cross, 0.0, max_rel_step=0.1)
    new_w, new_b = add_step(weight, bias, ridge)
    old, new = weight_matrix(weight, bias), weight_matrix(new_w, new_b)
    assert rel > 0.1
    assert torch.isclose((new - old).norm(), 0.1 * old.norm())


def test_cg_p_step_converges_to_the_direct_solve():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    r = torch.randn(1, 3, 6, 6, generator=g, dtype=torch.float64)
    rho, dilation, padding = 0.5, 2, 2
    x = cg_p_step(r, weight, dilation, padding, rho, steps=72)
    # the operator as an explicit matrix, column by column
    n = 2 * 6 * 6
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 2, 6, 6)
    a = F.conv2d(basis, weight, padding=padding, dilation=dilation).reshape(n, -1).T
    direct = torch.linalg.solve(a.T @ a + rho * torch.eye(n, dtype=a.dtype), a.T @ r.reshape(-1))
    assert torch.allclose(x.reshape(-1), direct, atol=1e-8)

    # and a few steps already reduce the objective from dp = 0
    def objective(v):
        return ((a @ v.reshape(-1) - r.reshape(-1)) ** 2).sum() + rho * (v**2).sum()

    few = cg_p_step(r, weight, dilation, padding, rho, steps=2)
    assert objective(few) < objective(torch.zeros_like(few))


def test_cg_p_step_one_step_is_the_exact_line_search_along_the_gradient():
    # one CG step from 0: dp = a g with g = W^T r and a = |g|^2 / (|W g|^2 + rho |g|^2)
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(2, 4, 1, 1, generator=g, dtype=torch.float64)
    r = torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64)
    rho = 0.3
    grad = F.conv_transpose2d(r, weight)
    a = grad.pow(2).sum() / (F.conv2d(grad, weight).pow(2).sum() + rho * grad.pow(2).sum())
    assert torch.allclose(cg_p_step(r, weight, 1, 0, rho, steps=1), a * grad, atol=1e-12)
    assert torch.equal(cg_p_step(torch.zeros_like(r), weight, 1, 0, rho, 1), torch.zeros_like(grad))


@pytest.mark.parametrize("classes", [2, 3])
def test_head_prox_matches_autograd_minimizer(classes):
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(2, classes, 4, 4, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, classes, (2, 4, 4), generator=g)
    labels[0, 0, :2] = IGNORE_INDEX
    weights = torch.linspace(0.5, 2.0, classes, dtype=torch.float64)
    nu = 0.7
    got = head_prox(z0, labels, weights, nu, newton_steps=12)
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [z],
        max_iter=400,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )
    w_pix = torch.where(labels == IGNORE_INDEX, 0.0, weights[labels.clamp(max=classes - 1)])

    def closure():
        opt.zero_grad()
        ce = F.cross_entropy(z, labels, reduction="none", ignore_index=IGNORE_INDEX)
        f = (w_pix * ce).sum() + nu / 2 * ((z - z0) ** 2).sum()
        f.backward()
        return f

    opt.step(closure)
    assert torch.allclose(got, z.detach(), atol=1e-6)
    assert torch.equal(got[0, :, 0, :2], z0[0, :, 0, :2])  # ignored pixels do not move


def test_weighted_cross_entropy_of_an_all_ignored_batch_is_zero():
    logits = torch.randn(1, 2, 3, 3)
    labels = torch.full((1, 3, 3), IGNORE_INDEX)
    assert float(weighted_cross_entropy(logits, labels, torch.tensor([1.0, 2.0]))) == 0.0


@pytest.mark.parametrize("classes", [2, 3])
def test_head_prox_returns_the_layout_of_its_input(classes):
    """The prox output meets z0 in element-wise passes: it keeps z0's layout (NCHW or
    channels_last) and its values do not depend on it."""
    g = torch.Generator().manual_seed(4)
    z0 = torch.randn(2, classes, 6, 7, generator=g)
    labels = torch.randint(0, classes, (2, 6, 7), generator=g)
    plain = head_prox(z0, labels, None, nu=1.0)
    last = head_prox(z0.contiguous(memory_format=torch.channels_last), labels, None, nu=1.0)
    assert plain.is_contiguous() and not plain.is_contiguous(memory_format=torch.channels_last)
    assert last.is_contiguous(memory_format=torch.channels_last) and not last.is_contiguous()
    assert torch.allclose(plain, last, atol=1e-6)
