"""ADMM on N ranks (gloo, CPU, spawned processes) reproduces the single-process solver."""

from __future__ import annotations

import io
import time
from dataclasses import replace
from math import nan

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from geodnn.data import TensorBatches
from geodnn.errors import DivergenceError, GeodnnError
from geodnn.model import build_model
from geodnn.parallel.admm_rank import (
    RankAdmmSolver,
    _proxy_model,
    plan_blocks,
    profile_admm_layers,
    reference_weights,
    single_process_state,
)
from geodnn.parallel.compress import CompressionSettings
from geodnn.parallel.group import init_ranks, shutdown
from geodnn.parallel.launch import spawn
from geodnn.parallel.partition import balance
from geodnn.solvers.admm import AdmmSettings, AdmmSolver, layer_memory_formula

DEPTH, WIDTH, CROP, SEED = 4, 8, 24, 7
ITERATIONS = 9  # past the pipeline fill (depth + 2 layers) and a generation change
SETTINGS = {"batch_size": 4, "slots": 2, "refresh_every": 2, "monitor": False}
# crops that live long enough for the head's requests to reach the stem: rank 0's weights
# then change by requests from rank 1 (with SETTINGS, rank 0's lowest layers never update)
THROUGH = {"refresh_every": 0}  # auto: S R >= the head-stem trip
THROUGH_ITERATIONS = 12
# 12 iterations of least-squares W-steps amplify float rounding: one process on 1 and on 2
# threads differs by up to 6e-6; a lost or late request moves a weight by 1e-2 or more
THROUGH_ATOL = 1e-4


def vegas_batches(data_dir, count: int = 12) -> TensorBatches:
    """`count` CROP x CROP crops of the Vegas scene with their road labels (0/1)."""
    with rasterio.open(data_dir / "vegas-roads" / "image.tif") as src:
        image = src.read(1, window=Window(0, 0, 600, 600)).astype(np.float32)
    with rasterio.open(data_dir / "vegas-roads" / "roads.tif") as src:
        roads = src.read(1, window=Window(0, 0, 600, 600)) > 0
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for _ in range(count):
        r, c = rng.integers(0, 600 - CROP, size=2)
        xs.append(image[None, r : r + CROP, c : c + CROP])
        ys.append(roads[r : r + CROP, c : c + CROP].astype(np.int64))
    return TensorBatches(torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)))


def _model():
    model = build_model(1, 2, depth=DEPTH, width=WIDTH, seed=3)
    model.set_normalization([300.0], [150.0])
    return model


def _weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _rank_runs(data, runs: list[dict]) -> list[dict]:
    """Each run: {"balanced", "bits", "start" (a state or None), optional "lagged",
    "settings" (overrides), "iterations" (ITERATIONS) and "resume_at" (save each rank's state
    after that many iterations and go on in a new solver loaded from it)}; all in one process
    group. "losses": each step's
    loss, then the one settle() returns."""
    ctx = init_ranks(timeout_s=30, backend="gloo")
    try:
        out = []
        for run in runs:
            model = _model()
            settings = AdmmSettings.from_dict({**SETTINGS, **run.get("settings", {})})
            plan = plan_blocks(ctx, model, data, settings, SEED) if run["balanced"] else None
            compression = CompressionSettings(bits=run["bits"]) if run["bits"] else None
            lagged = run.get("lagged", True)
            solver = RankAdmmSolver(
                ctx, model, data, settings, SEED, plan, compression, lagged_stats=lagged
            )
            if run["start"] is not None:
                solver.load_state_dict(run["start"])
            if "resume_at" in run:
                for _ in range(run["resume_at"]):
                    solver.step()
                solver.settle()  # as before a checkpoint
                buffer = io.BytesIO()
                torch.save(solver.state_dict(), buffer)
                buffer.seek(0)
                solver = RankAdmmSolver(
                    ctx, _model(), data, settings, SEED, plan, compression, lagged_stats=lagged
                )
                solver.load_state_dict(torch.load(buffer, weights_only=True))
            iterations = run.get("iterations", ITERATIONS)
            stats = [solver.step() for _ in range(iterations - solver.iteration)]
            stats.append(solver.settle() or {})
            losses = [s.get("loss") for s in stats]
            gathered = solver.gather_model()
            out.append(
                {
                    "weights": _weights(gathered) if gathered else None,
                    "owned": list(solver.states),
                    "losses": losses,
                    "bytes": solver.exchange.stats.bytes_sent,
                    "step_bytes": [s.get("bytes_sent") for s in stats],
                    "updated": [s.get("layers_updated") for s in stats],
                }
            )
        return out
    finally:
        shutdown()


@pytest.fixture(scope="module")
def data(data_dir) -> TensorBatches:
    return vegas_batches(data_dir)


@pytest.fixture(scope="module")
def single(data) -> AdmmSolver:
    """The single-process reference, stopped after 7 iterations (continued by the tests): the
    head's first requests are on their way down, so the N-rank resume must deliver them."""
    solver = AdmmSolver(_model(), data, AdmmSettings.from_dict(SETTINGS), SEED)
    for _ in range(7):
        solver.step()
    return solver


@pytest.fixture(scope="module")
def expected(data) -> list[torch.Tensor]:
    return reference_weights(_model(), data, AdmmSettings.from_dict(SETTINGS), SEED, ITERATIONS)


@pytest.fixture(scope="module")
def two_ranks(data, single) -> list[list[dict]]:
    runs = [
        {"balanced": False, "bits": None, "start": None},
        {"balanced": False, "bits": 8, "start": None},
        {"balanced": False, "bits": None, "start": single_process_state(single.state_dict())},
        {"balanced": False, "bits": None, "start": None, "lagged": False},
        {"balanced": False, "bits": None, "start": None, "settings": {"average_decay": 0.8}},
        {"balanced": False, "bits": 8, "start": None, "resume_at": 4},
        {"balanced": False, "bits": None, "start": None, "settings": THROUGH,
         "iterations": THROUGH_ITERATIONS},
    ]  # fmt: skip
    return spawn(_rank_runs, 2, args=(data, runs), timeout_s=120)


def _check_equal(got: list[torch.Tensor], expected: list[torch.Tensor], atol=1e-6) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=atol, rtol=1e-5)
    assert not all(torch.equal(a, b) for a, b in zip(got, _weights(_model())))  # it trained


def test_two_ranks_match_single_process_solver(two_ranks, expected):
    _check_equal(two_ranks[0][0]["weights"], expected)
    owned = [rank[0]["owned"] for rank in two_ranks]
    assert owned == [[0, 1, 2], [3, 4, 5]]  # each rank holds only its own layers' states
    losses = [rank[0]["losses"] for rank in two_ranks]
    assert losses[0] == losses[1] and losses[0][-1] is not None  # same head loss everywhere


def test_every_rank_reports_the_whole_chains_layer_stats(two_ranks, data):
    """layers_updated (and max_rel_step) cover every rank's layers, as in one process."""
    solver = AdmmSolver(_model(), data, AdmmSettings.from_dict(SETTINGS), SEED)
    single = [solver.step()["layers_updated"] for _ in range(ITERATIONS)]
    blocking = [rank[3]["updated"][:-1] for rank in two_ranks]  # the non-lagged runs
    assert blocking[0] == blocking[1] == single and max(single) > 0


def test_lagged_stats_are_the_blocking_ones_one_step_late(two_ranks, expected):
    lagged, blocking = two_ranks[0][0], two_ranks[0][3]
    _check_equal(blocking["weights"], expected)  # the reduce's timing leaves the math alone
    # lagged: the first step has no shared stats yet and settle() gives the last iteration's
    assert lagged["losses"][0] is None and blocking["losses"][-1] is None
    assert lagged["losses"][1:] == blocking["losses"][:-1]
    assert sum(loss is not None for loss in blocking["losses"]) >= 3


def test_bytes_sent_stat_is_per_iteration(two_ranks):
    for rank in two_ranks:
        lagged, blocking = rank[0], rank[3]
        # blocking: one figure per iteration; lagged: the first step's own, then one step late
        assert sum(blocking["step_bytes"][:-1]) == blocking["bytes"] > 0
        assert sum(lagged["step_bytes"][1:]) == lagged["bytes"]
        assert lagged["step_bytes"][1:] == blocking["step_bytes"][:-1]
        assert 0 < max(blocking["step_bytes"][:-1]) < blocking["bytes"]


@pytest.fixture(scope="module")
def through(data) -> list[torch.Tensor]:
    """The one-process weights after the head's requests reached the stem; every layer moved."""
    settings = AdmmSettings.from_dict({**SETTINGS, **THROUGH})
    weights = reference_weights(_model(), data, settings, SEED, THROUGH_ITERATIONS)
    moved = [float((a - b).abs().max()) for a, b in zip(weights, _weights(_model()))]
    assert min(moved) > 50 * THROUGH_ATOL, moved
    return weights


def test_two_ranks_match_one_process_where_requests_cross_to_rank_0(two_ranks, through):
    """Rank 0's layers update from requests rank 1 sent down: the boundary exchange of
    requests, not only of activations, reproduces one process."""
    _check_equal(two_ranks[0][6]["weights"], through, atol=THROUGH_ATOL)


def test_two_ranks_gather_the_same_averaged_network(two_ranks, data, expected):
    settings = AdmmSettings.from_dict({**SETTINGS, "average_decay": 0.8})
    averaged = reference_weights(_model(), data, settings, SEED, ITERATIONS)
    _check_equal(two_ranks[0][4]["weights"], averaged)
    assert not all(torch.allclose(a, b) for a, b in zip(averaged, expected))


def test_three_ranks_balanced_match_single_process_solver(data, through):
    runs = [{"balanced": True, "bits": None, "start": None, "settings": THROUGH,
             "iterations": THROUGH_ITERATIONS}]  # fmt: skip
    results = spawn(_rank_runs, 3, args=(data, runs), timeout_s=120)
    _check_equal(results[0][0]["weights"], through, THROUGH_ATOL)  # every rank's layers moved
    owned = [r[0]["owned"] for r in results]
    assert sorted(sum(owned, [])) == list(range(DEPTH + 2)) and all(owned)


def test_single_process_state_continues_on_two_ranks(two_ranks, single):
    assert any(m is not None for m in single.downs)  # requests were pending at the snapshot
    for _ in range(ITERATIONS - single.iteration):
        single.step()
    _check_equal(two_ranks[0][2]["weights"], _weights(single.model))


def test_single_process_state_hands_each_layer_the_messages_sent_to_it(data):
    """Layer i waits for the activation layer i - 1 sent up and the request layer i + 1 sent
    down (AdmmSolver keeps each message under its sender)."""
    solver = AdmmSolver(_model(), data, AdmmSettings.from_dict(SETTINGS), SEED)
    for _ in range(ITERATIONS):
        solver.step()
    state = solver.state_dict()
    ups, downs, n = state["ups"], state["downs"], len(state["layers"])
    ranked = single_process_state(state)
    for i in range(n):
        assert ranked["below"][str(i)] is (ups[i - 1] if i > 0 else None)
        assert ranked["above"][str(i)] is (downs[i + 1] if i + 1 < n else None)
    assert sum(m is not None for m in downs[1:]) >= 2 and ranked["watch"] == state["watch"]


def test_a_compressed_run_resumed_from_its_rank_states_continues_exactly(two_ranks):
    """The error-feedback residuals travel in the rank state: the resumed run sends the same
    bytes as the straight one and ends with the same weights. (Saved after iteration 3, the
    residual of slot 0's up message of iteration 2 is carried into iteration 4, whose input
    reaches the head, and its weights, by iteration 7.)"""
    straight, resumed = two_ranks[0][1], two_ranks[0][5]
    assert resumed["bytes"] > 0
    for a, b in zip(straight["weights"], resumed["weights"], strict=True):
        assert torch.equal(a, b)


def test_compressed_exchange_stays_close_and_sends_less(two_ranks):
    plain, packed = two_ranks[0][0], two_ranks[0][1]
    assert packed["bytes"] < 0.35 * plain["bytes"]
    init = _weights(_model())

    def distance(xs, ys) -> float:
        return float(sum((x - y).pow(2).sum() for x, y in zip(xs, ys)).sqrt())

    # 8-bit messages move the weights by far less than training moved them
    gap = distance(packed["weights"], plain["weights"])
    assert 0 < gap < 0.1 * distance(plain["weights"], init)
    assert packed["losses"][-1] == pytest.approx(plain["losses"][-1], rel=0.05)


def test_proxy_chain_has_one_layer_per_kind():
    model = build_model(1, 2, depth=10, width=8, seed=0)  # dilations 1, 2, 4, 8 cycled
    proxy, mapping = _proxy_model(model)
    assert len(proxy.layers) == 6
    assert mapping == [0, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 5]
    for layer, rep in zip(model.layers, mapping):
        assert layer.spec == proxy.layers[rep].spec


def test_profile_reports_formula_memory_and_balances(data):
    torch.set_num_threads(1)
    settings = AdmmSettings.from_dict(SETTINGS)
    costs = profile_admm_layers(_model(), data, settings, seed=SEED, repeats=1)
    assert len(costs) == DEPTH + 2 and all(c.seconds > 0 for c in costs)
    crops = settings.slots * settings.batch_size
    kept = {"averaged": settings.average_decay > 0, "momentum": settings.momentum > 0}
    stem = layer_memory_formula(1, WIDTH, 3, crops, CROP, CROP, False, False, False, **kept)
    head = layer_memory_formula(WIDTH, 2, 1, crops, CROP, CROP, False, True, False, **kept)
    assert costs[0].memory_bytes == stem and costs[-1].memory_bytes == head
    plan = balance(costs, 3)
    assert len(plan.blocks) == 3 and plan.blocks[-1][1] == DEPTH + 2


def _diverging_rank(data, poisoned_layer: int, lagged: bool) -> dict:
    """Two ranks; the rank that owns `poisoned_layer` has NaN weights there, so that layer's
    first update diverges (a boundary layer: before its messages are sent)."""
    ctx = init_ranks(timeout_s=20, backend="gloo")
    try:
        settings = AdmmSettings.from_dict(SETTINGS)
        solver = RankAdmmSolver(ctx, _model(), data, settings, SEED, lagged_stats=lagged)
        if poisoned_layer in solver.states:
            state = solver.states[poisoned_layer]
            nans = torch.full_like(state.weight, nan)
            solver.states[poisoned_layer] = replace(state, weight=nans)
        tic = time.perf_counter()
        error, message = None, ""
        try:
            for _ in range(3 * ITERATIONS):
                solver.step()
        except DivergenceError as exc:
            error, message = "divergence", str(exc)
        except Exception as exc:  # noqa: BLE001 - the test reports what else happened
            error, message = type(exc).__name__, str(exc)
        return {"error": error, "message": message, "s": time.perf_counter() - tic}
    finally:
        shutdown()


@pytest.mark.parametrize(
    "poisoned_layer, lagged", [(2, True), (3, True), (3, False)]
)  # rank 0's top layer; rank 1's bottom one; stats waited for at once or one iteration late
def test_divergence_on_one_rank_stops_every_rank_promptly(data_dir, poisoned_layer, lagged):
    data = vegas_batches(data_dir)
    results = spawn(_diverging_rank, 2, args=(data, poisoned_layer, lagged), timeout_s=90)
    for rank, result in enumerate(results):
        assert result["error"] == "divergence", (rank, result)
        assert "resume from the last checkpoint" in result["message"]
        assert result["s"] < 15, result  # well inside the 20 s rank timeout: nobody waited on it


def _resume_with_other_seed(data) -> str:
    ctx = init_ranks(timeout_s=30, backend="gloo")
    try:
        settings = AdmmSettings.from_dict(SETTINGS)
        saved = RankAdmmSolver(ctx, _model(), data, settings, SEED).state_dict()
        other = RankAdmmSolver(ctx, _model(), data, settings, SEED + 1)
        try:
            other.load_state_dict(saved)
        except GeodnnError as exc:
            return str(exc)
        return "accepted"
    finally:
        shutdown()


def test_a_rank_refuses_a_state_of_another_crop_stream(data):
    """Another seed draws other crops for the saved slots and pending messages: refused, as by
    the single-process solver."""
    [message] = spawn(_resume_with_other_seed, 1, args=(data,), timeout_s=60)
    assert "other seed" in message


def _plan_beyond_memory(data) -> str:
    ctx = init_ranks(timeout_s=60, backend="gloo")
    try:
        settings = AdmmSettings.from_dict(SETTINGS)
        try:
            plan_blocks(ctx, _model(), data, settings, SEED, memory_limit=1.0)
        except GeodnnError as exc:
            return str(exc)
        return "planned"
    finally:
        shutdown()


@pytest.mark.timeout(60)
def test_a_plan_rank_0_cannot_make_fails_every_rank_at_once(data):
    """The other ranks learn rank 0's planning error at once instead of waiting timeout_s."""
    messages = spawn(_plan_beyond_memory, 2, args=(data,), timeout_s=45)
    assert messages[0] == messages[1] and "limit" in messages[0]
