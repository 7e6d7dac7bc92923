"""Pipeline baseline: GPipe and 1F1B on 2 ranks train exactly like single-process Adam."""

from __future__ import annotations

import re

import pytest
import torch

from geodnn.errors import GeodnnError
from geodnn.model import build_model
from geodnn.parallel.group import RankContext, init_ranks, shutdown
from geodnn.parallel.launch import spawn
from geodnn.parallel.pipeline import PipelineSolver, StageModule
from geodnn.solvers.adam import AdamSettings, AdamSolver

try:  # tests/ may or may not be a package
    from .test_parallel_admm import vegas_batches
except ImportError:
    from test_parallel_admm import vegas_batches

SETTINGS = {"batch_size": 4, "slots": 2, "refresh_every": 2, "lr": 1e-3}
STEPS = 4


def _model():
    model = build_model(1, 2, depth=3, width=8, seed=5)
    model.set_normalization([300.0], [150.0])
    return model


def _gathered(solver) -> list[torch.Tensor] | None:
    model = solver.gather_model()
    return [p.detach().clone() for p in model.parameters()] if model else None


def _pipeline_runs(data, schedules: list[str]) -> dict:
    ctx = init_ranks(timeout_s=30, backend="gloo")
    try:
        out = {}
        for schedule in schedules:
            settings = AdamSettings.from_dict(SETTINGS)
            solver = PipelineSolver(ctx, _model(), data, settings, 11, schedule, microbatches=2)
            losses = [solver.step()["loss"] for _ in range(STEPS)]
            weights = _gathered(solver)
            out[schedule] = {"losses": losses, "weights": weights, "blocks": solver.blocks}
        # resume: continue 2 steps, and 2 steps from the saved per-rank state in new solvers
        state = solver.state_dict()
        continued = [solver.step()["loss"] for _ in range(2)], _gathered(solver)
        fresh = PipelineSolver(
            ctx, _model(), data, AdamSettings.from_dict(SETTINGS), 11, schedule, microbatches=2
        )
        fresh.load_state_dict(state)
        resumed = [fresh.step()["loss"] for _ in range(2)], _gathered(fresh)
        out["resume"] = {"continued": continued, "resumed": resumed}
        return out
    finally:
        shutdown()


@pytest.fixture(scope="module")
def data(data_dir):
    return vegas_batches(data_dir)


@pytest.fixture(scope="module")
def two_ranks(data):
    return spawn(_pipeline_runs, 2, args=(data, ["gpipe", "1f1b"]), timeout_s=120)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_two_rank_pipeline_equals_single_process_adam(data, two_ranks, schedule):
    reference = AdamSolver(_model(), data, AdamSettings.from_dict(SETTINGS), 11)
    ref_losses = [reference.step()["loss"] for _ in range(STEPS)]
    ranks = [r[schedule] for r in two_ranks]
    assert ranks[0]["blocks"] == [(0, 2), (2, 5)]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # every rank reports the same loss
    assert ranks[0]["losses"] == pytest.approx(ref_losses, rel=1e-4, abs=1e-5)
    for got, want in zip(ranks[0]["weights"], reference.model.parameters()):
        assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(ranks[0]["weights"][0], _model().layers[0].conv.weight)


def test_resume_from_rank_state_continues_exactly(two_ranks):
    continued, resumed = two_ranks[0]["resume"]["continued"], two_ranks[0]["resume"]["resumed"]
    assert continued[0] == resumed[0]
    for a, b in zip(continued[1], resumed[1]):
        assert torch.equal(a, b)


def test_stage_module_shares_layers_and_normalizes():
    model = _model()
    stage = StageModule(model, 0, 2)
    assert stage.layers[0] is model.layers[0]
    x = torch.full((1, 1, 6, 6), float("nan"))
    assert torch.isfinite(stage(x)).all()


def test_settings_errors_come_before_any_communication(data):
    ctx = RankContext(0, 2, 0, "gloo", torch.device("cpu"), 5.0)
    settings = AdamSettings.from_dict(SETTINGS)
    with pytest.raises(GeodnnError, match="not a multiple of microbatches"):
        PipelineSolver(ctx, _model(), data, settings, 0, microbatches=3)
    with pytest.raises(GeodnnError, match="unknown pipeline schedule"):
        PipelineSolver(ctx, _model(), data, settings, 0, schedule="zb")


def _pipeline_with_a_dead_stage(data) -> None:
    import os

    ctx = init_ranks(timeout_s=4, backend="gloo")
    try:
        settings = AdamSettings.from_dict(SETTINGS)
        solver = PipelineSolver(ctx, _model(), data, settings, 11, "1f1b", microbatches=2)
        for _ in range(4):
            if ctx.rank == 1 and solver.iteration == 2:
                os._exit(3)  # a stage dies mid-run
            solver.step()
    finally:
        shutdown()


def test_a_dead_stage_is_named_by_its_neighbour_in_one_line(data):
    from geodnn.parallel.group import RankFailureError

    with pytest.raises(RankFailureError) as info:
        spawn(_pipeline_with_a_dead_stage, 2, args=(data,), timeout_s=60)
    message = str(info.value)
    named = "rank 0 failed: RankFailureError: rank 0: rank 1 did not complete the pipeline"
    assert named in message
    # a reset link says so; a silent one, the wait it missed
    assert re.search(r"of iteration 2 (before the connection closed|within 4 s)", message)
    assert "pair.cc" not in message.splitlines()[0]
