"""The backprop + Adam baseline: same model, crop stream and loss as ADMM."""

from __future__ import annotations

import io

import torch

from geodnn.data import TensorBatches
from geodnn.model import build_model
from geodnn.solvers import AdamSettings, AdamSolver, AdmmSettings, make_solver
from geodnn.solvers.admm import make_pool


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 2, 16, 16, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0.8).long()
    y[:, 0, :3] = 255
    return TensorBatches(x, y)


def test_adam_lowers_the_loss():
    data = _data()
    solver = make_solver(
        "adam", build_model(2, 2, depth=2, width=8), data, {"batch_size": 8, "lr": 0.01}, seed=0
    )
    losses = [solver.step()["loss"] for _ in range(40)]
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


def test_adam_resume_continues_exactly():
    data = _data()
    settings = AdamSettings(batch_size=8, lr=0.01)
    straight = AdamSolver(build_model(2, 2, depth=2, width=8), data, settings, seed=1)
    for _ in range(8):
        straight.step()
    first = AdamSolver(build_model(2, 2, depth=2, width=8), data, settings, seed=1)
    for _ in range(5):
        first.step()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = AdamSolver(build_model(2, 2, depth=2, width=8, seed=9), data, settings, seed=1)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(3):
        resumed.step()
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_adam_sees_the_admm_stem_stream():
    data = _data()
    model = build_model(2, 2, depth=2, width=8)
    adam = AdamSolver(model, data, AdamSettings(batch_size=8, slots=8), seed=4)
    admm = AdmmSettings(batch_size=8, slots=8)
    stem = make_pool(admm, len(data), len(model.layers), seed=4)
    assert [adam.pool.batch_at(t) for t in range(12)] == [stem.batch_at(t) for t in range(12)]
    admm = AdmmSettings(batch_size=8, slots=4, refresh_every=5, stagger_refresh=False)
    adam = AdamSolver(
        model, data, AdamSettings(batch_size=8, refresh_every=5, stagger_refresh=False), seed=4
    )
    stem = make_pool(admm, len(data), len(model.layers), seed=4)
    assert [adam.pool.batch_at(t) for t in range(40)] == [stem.batch_at(t) for t in range(40)]


def test_a_state_taken_in_memory_is_a_snapshot():
    """The optimizer's moments change in place: a state_dict kept in memory (a notebook's
    snapshot) must not follow them."""
    data = _data()
    settings = AdamSettings(batch_size=8, lr=0.01)
    solver = AdamSolver(build_model(2, 2, depth=2, width=8), data, settings, seed=1)
    for _ in range(3):
        solver.step()
    snapshot = solver.state_dict()
    moments = [s["exp_avg"].clone() for s in snapshot["optimizer"]["state"].values()]
    solver.step()
    kept = [s["exp_avg"] for s in snapshot["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(moments, kept))


def test_settings_out_of_range_and_mismatched_states_are_clear_errors():
    import pytest

    from geodnn.errors import GeodnnError

    for bad in ({"beta1": 1.5}, {"patience": -1}, {"lr": "0.01"}, {"divergence_factor": 0}):
        with pytest.raises(
            GeodnnError, match=f"invalid \\[adam\\] setting\\(s\\) {next(iter(bad))}"
        ):
            AdamSettings.from_dict(bad)
    data = _data()
    with pytest.raises(GeodnnError, match="class_weights has 3 values for a model of 2"):
        AdamSolver(build_model(2, 2, depth=1), data, AdamSettings(class_weights=[1, 1, 1]), 0)
    saved = AdamSolver(build_model(2, 2, depth=1), data, AdamSettings(batch_size=8), 0).state_dict()
    other = AdamSolver(build_model(2, 2, depth=1), data, AdamSettings(batch_size=4), 0)
    with pytest.raises(GeodnnError, match="other batch_size"):
        other.load_state_dict(saved)
