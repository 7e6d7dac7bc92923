"""The layer-parallel ADMM solver on real crops of the Vegas scene and on tiny fakes."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import rasterio
import torch
from torch.nn import functional as F

from geodnn.data import TensorBatches, class_weights
from geodnn.errors import DivergenceError, GeodnnError
from geodnn.metrics import scores
from geodnn.model import build_model
from geodnn.solvers import (
    AdmmSettings,
    AdmmSolver,
    CropPool,
    init_layer_states,
    layer_step,
    make_solver,
)
from geodnn.solvers.adam import AdamSettings
from geodnn.solvers.admm import (
    LayerState,
    Message,
    _hidden_change,
    layer_memory_for,
    layer_memory_formula,
    layer_state_bytes,
    make_pool,
)
from geodnn.solvers.subproblems import (
    cg_p_step,
    head_prox,
    patch_gram,
    relu_z_step,
    weight_matrix,
    weighted_cross_entropy,
)


@pytest.fixture(scope="module")
def vegas(data_dir):
    """16 crops of 32x32 from the 128x128 block of the Vegas scene with the most road pixels."""
    with rasterio.open(data_dir / "vegas-roads" / "roads.tif") as src:
        roads = src.read(1) > 0
    block = 128
    sums = [
        (roads[r : r + block, c : c + block].sum(), r, c)
        for r in range(0, 1300 - block, 64)
        for c in range(0, 1300 - block, 64)
    ]
    _, r, c = max(sums)
    with rasterio.open(data_dir / "vegas-roads" / "image.tif") as src:
        image = src.read(window=((r, r + block), (c, c + block))).astype(np.float32)
    labels = roads[r : r + block, c : c + block].astype(np.int64)
    x = torch.from_numpy(image).unfold(1, 32, 32).unfold(2, 32, 32)  # (1, 4, 4, 32, 32)
    x = x.permute(1, 2, 0, 3, 4).reshape(16, 1, 32, 32)
    y = torch.from_numpy(labels).unfold(0, 32, 32).unfold(1, 32, 32).reshape(16, 32, 32)
    return TensorBatches(x.contiguous(), y.contiguous())


def _model(data, depth=4, width=8, seed=0):
    model = build_model(1, 2, depth=depth, width=width, seed=seed)
    model.set_normalization(data.images.mean(), data.images.std())
    return model


def _settings(data, **overrides):
    w = class_weights(data.labels, 2).tolist()
    return AdmmSettings.from_dict({"batch_size": 4, "slots": 4, "class_weights": w, **overrides})


@pytest.mark.slow
def test_admm_trains_the_real_network_on_real_crops(vegas):
    torch.manual_seed(0)
    model = _model(vegas)
    settings = _settings(vegas)
    solver = AdmmSolver(model, vegas, settings, seed=0)
    w = torch.tensor(settings.class_weights)
    x, y = vegas.get(range(16))
    with torch.no_grad():
        before = float(weighted_cross_entropy(model(x), y, w))
    for _ in range(120):
        solver.step()
    with torch.no_grad():
        logits = model(x)  # the plain forward of the REAL network
    after = float(weighted_cross_entropy(logits, y, w))
    iou = scores(logits.argmax(1), y, 2).iou[1]
    assert after < 0.5 * before
    assert iou > 0.3  # the all-background predictor scores 0 (measured: 0.75)


def test_no_autograd_graph_and_layer_step_is_pure(vegas):
    model = _model(vegas)
    for p in model.parameters():
        p.requires_grad_(True)
    settings = _settings(vegas)
    solver = AdmmSolver(model, vegas, settings, seed=0)
    with torch.enable_grad():
        for _ in range(12):
            solver.step()
    tensors = [m.tensor for m in solver.ups + solver.downs if m is not None]
    for s in solver.states:
        tensors += [s.weight, s.bias, s.gram, *[t for t in s.inputs + s.duals if t is not None]]
    assert tensors and all(not t.requires_grad and t.grad_fn is None for t in tensors)
    # one layer step touches only its own state and returns a new one
    state = solver.states[2]
    snapshot = [t.clone() for t in (state.weight, state.bias, state.gram)]
    inputs = list(state.inputs)
    result = layer_step(
        state, solver.ups[1], solver.downs[3], solver.pool, vegas, solver.iteration, settings
    )
    assert result.state is not state
    assert all(torch.equal(a, b) for a, b in zip(snapshot, (state.weight, state.bias, state.gram)))
    assert state.inputs == inputs
    assert not torch.equal(result.state.weight, state.weight)


@pytest.mark.parametrize("momentum", [0.0, 0.6])
def test_resume_continues_exactly(vegas, momentum):
    settings = _settings(vegas, momentum=momentum)
    straight = AdmmSolver(_model(vegas), vegas, settings, seed=3)
    for _ in range(14):
        straight.step()
    first = AdmmSolver(_model(vegas), vegas, settings, seed=3)
    for _ in range(9):
        first.step()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = AdmmSolver(_model(vegas, seed=7), vegas, settings, seed=3)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(5):
        resumed.step()
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    # the loss watch (first loss, best, its iteration) goes on too: divergence and patience
    assert resumed.watch.state_dict() == straight.watch.state_dict()
    assert resumed.watch.best_iteration >= 0


def test_same_seed_same_weights_other_seed_other_weights(vegas):
    runs = []
    for seed in (1, 1, 2):
        solver = AdmmSolver(_model(vegas), vegas, _settings(vegas), seed=seed)
        for _ in range(10):
            solver.step()
        runs.append(torch.cat([p.reshape(-1) for p in solver.model.parameters()]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_absurd_settings_raise_divergence(vegas):
    settings = _settings(vegas, head_nu=1e-12, lam=0.0, max_rel_step=0.0, p_damping=1e6)
    solver = AdmmSolver(_model(vegas), vegas, settings, seed=0)
    with pytest.raises(DivergenceError, match="diverged"):
        for _ in range(60):
            solver.step()


@pytest.mark.parametrize(
    ("retired", "decay", "momentum"),
    [(False, 0.99, 0.6), (True, 0.99, 0.0), (False, 0.0, 0.6), (False, 0.0, 0.0)],
)
def test_memory_formula_matches_measured_state(vegas, retired, decay, momentum):
    settings = _settings(vegas, keep_retired=retired, average_decay=decay, momentum=momentum)
    solver = AdmmSolver(_model(vegas), vegas, settings, seed=0)
    pool = solver.pool
    # every layer has seen its slots change generation once (current and retired both held)
    for _ in range(pool.slots * pool.refresh_every + len(solver.states) + pool.slots):
        solver.step()
    crops = pool.crops
    for state, layer in zip(solver.states, solver.model.layers):
        spec = layer.spec
        expected = layer_memory_formula(
            spec.in_channels,
            spec.out_channels,
            spec.kernel_size,
            crops,
            32,
            32,
            dual=False,
            head=state.is_head,
            retired=retired,
            averaged=decay > 0,
            momentum=momentum > 0,
        )
        assert layer_state_bytes(state) == expected
        shape = (spec.in_channels, spec.out_channels, spec.kernel_size, crops, 32, 32)
        assert layer_memory_for(settings, *shape, head=state.is_head) == expected


def test_crop_pool_is_a_pure_function_of_its_key():
    pool = CropPool(size=100, slots=3, batch_size=8, refresh_every=2, seed=5)
    again = CropPool(size=100, slots=3, batch_size=8, refresh_every=2, seed=5)
    assert pool.indices(1, 4) == again.indices(1, 4)
    assert len(set(pool.indices(1, 4))) == 8 and max(pool.indices(1, 4)) < 100
    assert pool.indices(1, 4) != pool.indices(2, 4) != pool.indices(1, 5)
    assert [pool.slot_at(t, 2) for t in range(2, 6)] == [0, 1, 2, 0]
    assert pool.generation(1, 2) == -1 and pool.generation(2 + 6, 2) == 1


def test_staggered_pool_spreads_the_crop_changes_over_the_cycle():
    together = CropPool(size=100, slots=4, batch_size=2, refresh_every=5, seed=0)
    spread = replace(together, stagger=True)

    def changes(pool: CropPool) -> list[int]:  # stem iterations where a slot gets new crops
        return [t for t in range(4, 60) if pool.generation(t) != pool.generation(t - 4)]

    assert changes(together) == [20, 21, 22, 23, 40, 41, 42, 43]
    assert changes(spread) == [7, 10, 17, 20, 27, 30, 37, 40, 47, 50, 57]
    for pool in (together, spread):  # every slot starts at generation 0 and keeps R visits
        assert [pool.generation(t) for t in range(4)] == [0, 0, 0, 0]
        for slot in range(4):
            gens = [pool.generation(t) for t in range(slot, 200, 4)]
            assert gens == sorted(gens) and max(gens.count(g) for g in set(gens)) == 5
    assert spread.generation(9, layer=2) == spread.generation(7) == 1  # the wavefront


def test_auto_refresh_keeps_crops_until_requests_reach_the_stem(vegas):
    pool = make_pool(_settings(vegas), len(vegas), num_layers=6, seed=0)
    assert (pool.slots, pool.refresh_every) == (4, 3)  # S R = 12 >= 2 x 6 layers
    pool = make_pool(_settings(vegas, refresh_margin=2.0), len(vegas), num_layers=6, seed=0)
    assert pool.refresh_every == 6
    adam = make_pool(AdamSettings(), len(vegas), num_layers=6, seed=0)
    assert adam.refresh_every == 3


def test_a_checkpoint_keeps_its_crop_pool(vegas):
    """A state resumes on the pool it was saved with, whatever the config's refresh_margin and
    stagger_refresh; one saved before those existed resumes with margin 1, unstaggered."""
    model = _model(vegas)
    saved_with = _settings(vegas, refresh_margin=2.0, stagger_refresh=False, monitor=False)
    first = AdmmSolver(model, vegas, saved_with, seed=3)
    for _ in range(14):
        first.step()
    resumed = AdmmSolver(_model(vegas), vegas, _settings(vegas, monitor=False), seed=3)
    assert resumed.pool.refresh_every == 3 and resumed.pool.stagger
    resumed.load_state_dict(first.state_dict())
    assert resumed.pool.refresh_every == 6 and not resumed.pool.stagger
    for _ in range(6):  # the forward halves check every message's slot and generation
        first.step(), resumed.step()
    for a, b in zip(first.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    old = first.state_dict()
    del old["settings"]["refresh_margin"], old["settings"]["stagger_refresh"]
    resumed = AdmmSolver(_model(vegas), vegas, _settings(vegas, monitor=False), seed=3)
    resumed.load_state_dict(old)
    assert resumed.pool.refresh_every == 3 and not resumed.pool.stagger


def test_bad_settings_and_names_are_one_line_errors(vegas):
    with pytest.raises(GeodnnError, match="unknown \\[admm\\] setting"):
        AdmmSettings.from_dict({"nuu": 1.0})
    with pytest.raises(GeodnnError, match="gram_decay"):
        AdmmSettings.from_dict({"gram_decay": 1.5})
    with pytest.raises(GeodnnError, match="momentum"):
        AdmmSettings.from_dict({"momentum": 1.0})
    bad = {"step_scale": 0.0, "cg_steps": 0, "request_gain": -0.7, "patience": -1}
    with pytest.raises(GeodnnError, match="cg_steps, patience, step_scale, request_gain: counts"):
        AdmmSettings.from_dict(bad)
    with pytest.raises(GeodnnError, match="unknown solver"):
        make_solver("sgd", _model(vegas), vegas, {}, 0)
    with pytest.raises(GeodnnError, match="class_weights has 3 values"):
        AdmmSolver(_model(vegas), vegas, AdmmSettings(class_weights=[1.0, 1.0, 1.0]), 0)
    saved = AdmmSolver(_model(vegas), vegas, AdmmSettings(slots=4), 0).state_dict()
    with pytest.raises(GeodnnError, match="other slots"):
        AdmmSolver(_model(vegas), vegas, AdmmSettings(slots=3), 0).load_state_dict(saved)
    with pytest.raises(GeodnnError, match="other seed"):
        AdmmSolver(_model(vegas), vegas, AdmmSettings(slots=4), 1).load_state_dict(saved)


def test_make_solver_builds_admm_from_a_config_table(vegas):
    solver = make_solver("admm", _model(vegas), vegas, {"batch_size": 4, "slots": 2}, seed=0)
    stats = solver.step()
    assert isinstance(solver, AdmmSolver) and "loss" in stats and solver.iteration == 1


def test_states_mirror_the_model(vegas):
    model = _model(vegas)
    states = init_layer_states(model, _settings(vegas))
    assert [s.index for s in states] == list(range(len(model.layers)))
    assert states[0].is_stem and states[-1].is_head and states[0].band_mean is not None
    changed = replace(states[1], weight=states[1].weight + 1)
    assert not torch.equal(changed.weight, states[1].weight)


def test_keep_retired_gives_every_layer_every_update_once_the_pipeline_is_full(vegas):
    """With keep_retired, requests about a slot's previous generation still find its input, so
    no layer loses updates when a slot's crops change; without it the low layers lose most."""
    updates = {}
    for retired in (False, True):
        settings = _settings(vegas, monitor=False, keep_retired=retired)
        solver = AdmmSolver(_model(vegas, depth=6), vegas, settings, seed=0)
        layers, cycle = len(solver.states), solver.pool.slots * solver.pool.refresh_every
        for _ in range(2 * layers):  # fill: the first request reaches the stem
            solver.step()
        before = [s.updates for s in solver.states]
        for _ in range(2 * cycle):  # two generation changes of every slot
            solver.step()
        updates[retired] = [s.updates - b for s, b in zip(solver.states, before)]
    assert updates[True] == [2 * cycle] * layers
    assert updates[False][0] < cycle and updates[False][-1] == 2 * cycle


def test_step_scale_shrinks_hidden_steps_and_leaves_the_head_alone(vegas):
    """The first update of the layer below the head fits step_scale of its target change; the
    head's own step (same labels, same input) is untouched."""
    rel = {}
    for scale in (1.0, 0.5):
        settings = _settings(vegas, monitor=False, step_scale=scale, max_rel_step=0.0)
        solver = AdmmSolver(_model(vegas), vegas, settings, seed=0)
        below_head = len(solver.states) - 2
        while solver.states[below_head].updates == 0:
            solver.step()
        rel[scale] = (
            solver.layer_stats[below_head]["rel_step"],
            solver.layer_stats[-1]["rel_step"],
        )
    assert rel[0.5][0] == pytest.approx(0.5 * rel[1.0][0], rel=1e-4)
    assert rel[0.5][1] == pytest.approx(rel[1.0][1], rel=1e-6)


def _matrix(state: LayerState) -> torch.Tensor:
    return weight_matrix(state.weight, state.bias)


@pytest.mark.parametrize("momentum", [0.0, 0.6])
def test_momentum_adds_the_previous_step_to_the_ridge_step(vegas, momentum):
    """Heavy ball: from the same state and messages, a layer that carries a velocity V takes
    the ridge step plus momentum x V and keeps that total as its new velocity; without one (or
    with momentum 0) it takes the ridge step alone. Checked for the head and the layer below."""
    settings = _settings(vegas, monitor=False, momentum=momentum)
    solver = AdmmSolver(_model(vegas), vegas, settings, seed=0)
    for _ in range(2 * len(solver.states) + 3):
        solver.step()
    t, n = solver.iteration, len(solver.states)
    checked = 0
    for layer in (n - 1, n - 2):
        state = replace(solver.states[layer], velocity=None)
        below, above = solver.ups[layer - 1], solver.downs[layer + 1] if layer + 1 < n else None
        plain = layer_step(state, below, above, solver.pool, vegas, t, settings).state
        if plain.updates == state.updates:  # the request was dropped (its slot changed)
            continue
        ridge = _matrix(plain) - _matrix(state)
        assert (plain.velocity is None) == (momentum == 0)
        if momentum:
            assert torch.allclose(plain.velocity, ridge, atol=1e-7)
        velocity = torch.randn_like(ridge) * 0.01
        carried = replace(state, velocity=velocity)
        moved = layer_step(carried, below, above, solver.pool, vegas, t, settings).state
        expected = ridge + momentum * velocity
        assert torch.allclose(_matrix(moved) - _matrix(state), expected, atol=1e-6)
        if momentum:
            assert torch.allclose(moved.velocity, expected, atol=1e-6)
        checked += 1
    assert checked == 2


def test_layer_state_of_the_previous_format_loads(vegas):
    """A LayerState saved before pre-activations and retired inputs existed loads, and its
    stored inputs serve the requests that arrive next (z0 is recomputed for them)."""
    solver = AdmmSolver(_model(vegas), vegas, _settings(vegas, monitor=False), seed=0)
    twin = AdmmSolver(_model(vegas), vegas, _settings(vegas, monitor=False), seed=0)
    for _ in range(2 * len(solver.states) + solver.settings.slots):
        solver.step()
        twin.step()
    new = ("pre_activations", "retired_inputs", "retired_pre_activations", "retired_generation")
    slots = solver.settings.slots
    before = [s.updates for s in solver.states]
    solver.states = [
        LayerState.from_state_dict({k: v for k, v in s.state_dict().items() if k not in new})
        for s in solver.states
    ]
    assert solver.states[1].pre_activations == [None] * slots
    assert solver.states[1].retired_generation == [-1] * slots
    solver.step()  # every request that arrives is about an input stored before the swap
    twin.step()
    updated = [s.updates - b for s, b in zip(solver.states, before)]
    assert updated == [s.updates - b for s, b in zip(twin.states, before)] and sum(updated) >= 3


def test_the_network_users_get_is_the_bias_corrected_average_of_the_iterates(vegas):
    """With average_decay d every layer holds sum_i d^(n-i) w_i / sum_i d^(n-i) of its raw
    weights after each step, and the model (what is evaluated, saved and predicted) holds that
    average; the iteration itself goes on from the raw weights."""
    decay = 0.8
    settings = _settings(vegas, monitor=False, average_decay=decay)
    solver = AdmmSolver(_model(vegas), vegas, settings, seed=0)
    raw = []
    for _ in range(12):
        solver.step()
        raw.append([(s.weight, s.bias) for s in solver.states])
    coef = [decay ** (len(raw) - 1 - i) for i in range(len(raw))]
    for layer, state in enumerate(solver.states):
        weight = sum(c * r[layer][0] for c, r in zip(coef, raw)) / sum(coef)
        bias = sum(c * r[layer][1] for c, r in zip(coef, raw)) / sum(coef)
        assert torch.allclose(state.average_weight, weight, atol=1e-6)
        assert torch.allclose(state.average_bias, bias, atol=1e-6)
        conv = solver.model.layers[layer].conv
        assert torch.equal(conv.weight, state.average_weight)
        assert torch.equal(conv.bias, state.average_bias)
    head = solver.states[-1]
    assert head.averaged == 12 and not torch.equal(head.average_weight, head.weight)


def test_without_averaging_the_model_holds_the_raw_iterate(vegas):
    settings = _settings(vegas, monitor=False, average_decay=0.0)
    solver = AdmmSolver(_model(vegas), vegas, settings, seed=0)
    for _ in range(4):
        solver.step()
    for state, layer in zip(solver.states, solver.model.layers):
        assert state.average_weight is None and state.averaged == 0
        assert torch.equal(layer.conv.weight, state.weight)


@pytest.mark.parametrize("first_visit", [True, False])
def test_hidden_change_with_the_dual_is_the_written_out_q_and_dual_steps(first_visit):
    g = torch.Generator().manual_seed(5)
    z0, request, u = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    settings = AdmmSettings(dual=True, nu=1.5, rho=3.0, relu_fit=9.0)
    dual = None if first_visit else u
    dz, new_dual, dz_rms, request_rms = _hidden_change(z0, request, dual, settings)
    u = torch.zeros_like(z0) if first_visit else u
    # q = (nu act + u + rho want) / (nu + rho) with want = act + request; u += rho (want - q)
    act = torch.relu(z0)
    q = (1.5 * act + u + 3.0 * (act + request)) / 4.5
    assert torch.allclose(dz, relu_z_step(z0, q, 9.0) - z0, atol=1e-5)
    assert torch.allclose(new_dual, u + 3.0 * (act + request - q), atol=1e-5)
    assert dz_rms == pytest.approx(float(dz.pow(2).mean().sqrt()), rel=1e-5)
    assert request_rms == pytest.approx(float(request.pow(2).mean().sqrt()), rel=1e-5)


def test_head_nu_continuation_grows_from_head_nu_at_iteration_0_up_to_its_cap():
    settings = AdmmSettings(head_nu=2.0, head_nu_growth=1.5, head_nu_max=5.0)
    got = [settings.head_nu_at(t) for t in range(5)]
    assert got == pytest.approx([2.0, 3.0, 4.5, 5.0, 5.0], rel=1e-12)
    assert AdmmSettings(head_nu=2.0).head_nu_at(100) == 2.0  # growth 1: no continuation


def _filled(vegas, settings) -> AdmmSolver:
    """A solver past the pipeline fill: every layer has had inputs and requests."""
    solver = AdmmSolver(_model(vegas), vegas, settings, seed=0)
    for _ in range(2 * len(solver.states) + 3):
        solver.step()
    return solver


def test_the_head_target_is_the_class_weighted_prox_step_on_the_slot_labels(vegas):
    """The head's request down is the p-step of its prox target with the settings' class
    weights (and its head_loss their weighted loss); unweighted, both differ."""
    settings = _settings(vegas, monitor=False)
    solver = _filled(vegas, settings)
    head, below, t = solver.states[-1], solver.ups[-2], solver.iteration
    _, labels = vegas.get(solver.pool.indices(below.slot, below.generation))
    assert 0 < int(labels.sum()) < labels.numel()  # road and background pixels
    z0 = F.conv2d(
        below.tensor, head.weight, head.bias, padding=head.padding, dilation=head.dilation
    )
    downs = []
    for weights in (settings.class_weights, None):
        s = replace(settings, class_weights=weights)
        result = layer_step(head, below, None, solver.pool, vegas, t, s)
        w = None if weights is None else torch.tensor(weights)
        target = head_prox(z0, labels, w, s.head_nu_at(t), s.head_newton_steps)
        dz = target - z0
        expected = cg_p_step(dz, head.weight, head.dilation, head.padding, s.p_rho, s.cg_steps)
        scale = float(expected.abs().max())
        assert torch.allclose(result.down.tensor, expected, rtol=1e-4, atol=1e-5 * scale)
        loss = float(weighted_cross_entropy(z0, labels, w))
        assert result.stats["head_loss"] == pytest.approx(loss, rel=1e-5)
        downs.append(result.down.tensor)
    assert not torch.allclose(downs[0], downs[1], rtol=1e-2, atol=1e-2 * scale)


def test_the_running_gram_keeps_gram_decay_of_the_previous_one(vegas):
    """G <- decay G + (1 - decay) G_batch, with G_batch the patch Gram of this step's input;
    a layer's first step takes G_batch alone."""
    settings = _settings(vegas, monitor=False, gram_decay=0.8)
    solver = _filled(vegas, settings)
    head, below, t = solver.states[-1], solver.ups[-2], solver.iteration
    stride = settings.gram_stride
    batch = patch_gram(below.tensor, head.kernel_size, head.dilation, head.padding, stride)
    previous = torch.eye(batch.shape[0])  # far from any batch Gram of these inputs
    result = layer_step(replace(head, gram=previous), below, None, solver.pool, vegas, t, settings)
    assert torch.allclose(result.state.gram, 0.8 * previous + 0.2 * batch, atol=1e-6)
    first = layer_step(replace(head, gram=None), below, None, solver.pool, vegas, t, settings)
    assert torch.allclose(first.state.gram, batch, atol=1e-7)


def test_the_jacobi_request_is_w_transpose_of_the_target_change_with_the_old_weights(vegas):
    """p_after_w off, one CG step and a gain: a hidden layer's request down is W^T dz with the
    weights it had BEFORE this step's W-step, rescaled to gain x the incoming request's rms."""
    settings = _settings(vegas, monitor=False)
    assert not settings.p_after_w and settings.cg_steps == 1 and settings.request_gain > 0
    solver = _filled(vegas, settings)
    n, t = len(solver.states), solver.iteration
    checked = 0
    for layer in range(1, n - 1):
        state, above = solver.states[layer], solver.downs[layer + 1]
        if above is None or state.input_generation[above.slot] != above.generation:
            continue  # no request, or one about a slot whose crops changed (dropped)
        result = layer_step(state, solver.ups[layer - 1], above, solver.pool, vegas, t, settings)
        z0 = state.pre_activations[above.slot]
        dz, _, _, request_rms = _hidden_change(z0, above.tensor, None, settings)

        def request(weight, dz=dz, request_rms=request_rms, state=state):
            dp = F.conv_transpose2d(dz, weight, padding=state.padding, dilation=state.dilation)
            return dp * (settings.request_gain * request_rms / float(dp.pow(2).mean().sqrt()))

        expected = request(state.weight)
        scale = float(expected.abs().max())
        assert torch.allclose(result.down.tensor, expected, rtol=1e-4, atol=1e-5 * scale)
        newer = request(result.state.weight)  # what the new weights would have asked
        assert not torch.allclose(newer, expected, rtol=1e-3, atol=1e-3 * scale)
        checked += 1
    assert checked >= 2


def test_a_slot_s_dual_is_dropped_when_its_crops_change_and_kept_otherwise(vegas):
    """The dual u of a slot belongs to its crops: a forward half that brings the slot's next
    generation clears it; a revisit of the same generation keeps it."""
    settings = _settings(vegas, monitor=False, dual=True)
    solver = _filled(vegas, settings)
    layer, t = 2, solver.iteration
    below = solver.ups[layer - 1]
    k, gen = below.slot, below.generation
    state = solver.states[layer]
    dual = torch.ones_like(state.pre_activations[k])
    for stored, kept in [(gen - 1, False), (gen, True)]:
        gens, duals = list(state.input_generation), list(state.duals)
        gens[k], duals[k] = stored, dual
        before = replace(state, input_generation=gens, duals=duals)
        after = layer_step(before, below, None, solver.pool, vegas, t, settings).state
        assert after.input_generation[k] == gen
        assert (after.duals[k] is dual) == kept


def test_a_request_about_the_retired_generation_uses_no_dual(vegas):
    """With keep_retired, a request about a slot's previous crops is served from the retired
    input without the current crops' dual (as if the slot had none)."""
    settings = _settings(vegas, monitor=False, dual=True, keep_retired=True)
    solver = _filled(vegas, settings)
    t, layer = solver.iteration, 2
    state = solver.states[layer]
    k = next(i for i, p in enumerate(state.retired_inputs) if p is not None)
    g = torch.Generator().manual_seed(0)
    shape = state.retired_pre_activations[k].shape
    above = Message(k, state.retired_generation[k], 0.1 * torch.randn(shape, generator=g))
    steps = []
    for dual in (torch.randn(shape, generator=g), None):
        duals = list(state.duals)
        duals[k] = dual
        before = replace(state, duals=duals)
        steps.append(layer_step(before, None, above, solver.pool, vegas, t, settings))
    with_dual, without = steps
    assert with_dual.state.updates == state.updates + 1  # the request was served
    assert torch.equal(with_dual.down.tensor, without.down.tensor)
    assert torch.equal(with_dual.state.weight, without.state.weight)
