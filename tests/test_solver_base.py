"""LossWatch: when a loss counts as diverged, and the stopping rule's state across a resume."""

from __future__ import annotations

import math

import pytest

from geodnn.errors import DivergenceError
from geodnn.solvers.base import LossWatch
from pipelines.train import check_divergence


def _watch() -> LossWatch:
    return LossWatch(factor=20.0, warmup=2, smoothing=1.0)  # smoothing 1: the raw loss


def test_a_swing_of_a_well_fit_run_is_not_a_divergence():
    """Seen on a GPU: Adam's best smoothed loss reached 0.018 after ~3900 steps, then swung to
    0.37 (20x), still below the untrained network's 0.7: training went on as it should."""
    watch = _watch()
    for i, loss in enumerate([0.7, 0.3, 0.05, 0.018, 0.37, 0.2]):
        watch.update(loss, i, "Adam")
    assert watch.best == pytest.approx(0.018)
    with pytest.raises(DivergenceError, match="above its first 0.7"):
        watch.update(5.0, 6, "Adam")


def test_non_finite_loss_is_a_divergence_at_once():
    with pytest.raises(DivergenceError, match="the loss is nan at iteration 0"):
        _watch().update(math.nan, 0, "ADMM")


def test_the_first_loss_survives_a_resume():
    watch = _watch()
    for i, loss in enumerate([0.7, 0.01]):
        watch.update(loss, i, "Adam")
    resumed = _watch()
    resumed.load_state_dict(watch.state_dict())
    resumed.update(0.4, 2, "Adam")  # 40x best, below the first: goes on
    with pytest.raises(DivergenceError, match="above its first 0.7"):
        resumed.update(0.9, 3, "Adam")
    old = _watch()  # a state saved before the first loss was kept: the first after the resume
    old.load_state_dict({k: v for k, v in watch.state_dict().items() if k != "start"})
    old.update(0.3, 2, "Adam")
    with pytest.raises(DivergenceError, match="above its first 0.3"):
        old.update(0.4, 3, "Adam")


def test_patience_stops_after_that_many_iterations_without_a_new_best():
    """The solver asks `finished(t + 1)` after the loss of iteration t: with patience 3 and the
    best at iteration 1, it goes on after 2 and 3 and stops after iteration 4."""
    watch = LossWatch(factor=20.0, warmup=0, patience=3, smoothing=1.0)
    for i, loss in enumerate([1.0, 0.5, 0.6, 0.6]):
        watch.update(loss, i, "ADMM")
        assert watch.finished(i + 1) is None
    watch.update(0.6, 4, "ADMM")
    assert watch.best_iteration == 1
    assert watch.finished(5) == "no new best loss for 3 iterations"
    endless = LossWatch(factor=20.0, warmup=0, patience=0, smoothing=1.0)  # 0: no such rule
    for i, loss in enumerate([1.0, 0.5, *[0.6] * 50]):
        endless.update(loss, i, "ADMM")
    assert endless.finished(1000) is None


def test_divergence_is_checked_from_the_warmup_iteration_on():
    """An explosion inside the warm-up passes; the same one at iteration `warmup` is caught."""
    early = _watch()  # warmup 2
    early.update(1.0, 0, "ADMM")
    early.update(50.0, 1, "ADMM")  # 50x the best and above the first, but still warming up
    late = _watch()
    late.update(1.0, 0, "ADMM")
    late.update(1.0, 1, "ADMM")
    with pytest.raises(DivergenceError, match="at iteration 2"):
        late.update(50.0, 2, "ADMM")


def test_epoch_check_uses_the_first_epoch_as_the_floor():
    check_divergence(0.4, 0.01, 20.0, 700, first=0.7)
    with pytest.raises(DivergenceError, match="diverged at iteration 700"):
        check_divergence(0.8, 0.01, 20.0, 700, first=0.7)
    with pytest.raises(DivergenceError):
        check_divergence(0.4, 0.01, 20.0, 700)  # no first epoch known: factor x best alone
    with pytest.raises(DivergenceError):
        check_divergence(math.inf, 0.01, 20.0, 700, first=0.7)


def test_a_lucky_small_epoch_is_no_best_to_diverge_from():
    """Epochs of 10 batches of 4 crops: one epoch's 0.03 made the next ordinary 0.68 a
    'divergence' (over 20x the best and over the first epoch's 0.5)."""
    from pipelines.train import EpochLosses

    with pytest.raises(DivergenceError):
        check_divergence(0.68, 0.03, 20.0, 30, first=0.5)  # what the epoch check did
    watch = EpochLosses.from_records([], epoch=10)
    assert watch.span == 5
    for i, loss in enumerate([0.5, 0.03, 0.68, 0.4, 0.35, 0.6, 0.7, 0.02, 0.66]):
        watch.check(loss, 10 * (i + 1), 20.0, untrained=0.69)
    lucky_first = EpochLosses.from_records([], epoch=10)
    for i, loss in enumerate([0.02, 0.68, 0.68]):  # a lucky first epoch is no reference either
        lucky_first.check(loss, 10 * (i + 1), 20.0, untrained=0.69)


def test_the_untrained_loss_is_the_solver_s_kept_first_loss():
    from types import SimpleNamespace

    from pipelines.train import untrained

    kept = SimpleNamespace(watch=SimpleNamespace(start=0.69))  # restored with the solver state
    assert untrained(kept, [0.2, 0.1]) == 0.69
    old_state = SimpleNamespace(watch=SimpleNamespace(start=math.nan))
    assert untrained(old_state, [0.2, 0.1]) == 0.2  # a state from before it was kept


@pytest.mark.parametrize("epoch", [10, 100])
def test_a_real_explosion_still_stops_small_and_large_epochs(epoch):
    from pipelines.train import EpochLosses

    watch = EpochLosses.from_records([], epoch=epoch)
    for i in range(10):
        watch.check(0.1, epoch * (i + 1), 20.0, untrained=0.69)
    with pytest.raises(DivergenceError, match="diverged at iteration"):
        for i in range(10, 10 + watch.span + 1):
            watch.check(8.0, epoch * (i + 1), 20.0, untrained=0.69)


@pytest.mark.parametrize(
    "losses, last, diverges",
    [
        ([0.6, 0.2, 0.1, 0.08, 0.09, 0.07, 0.3], 3.3, True),  # (0.3 + 3.3) / 2 > 20 x 0.08
        ([0.6, 0.2, 0.1, 0.08, 0.09, 0.07, 0.3], 2.8, False),  # (0.3 + 2.8) / 2 < 20 x 0.08
        ([0.30, 0.25], 45.0, True),  # no full window yet: (0.55 + 45) / 3 > 20 x 0.69
        ([0.30, 0.25], 20.0, False),  # (0.55 + 20) / 3 < 20 x 0.69, the untrained loss
    ],
)
def test_a_resumed_run_checks_divergence_as_the_uninterrupted_one(losses, last, diverges):
    from types import SimpleNamespace

    from pipelines.train import EpochLosses

    epoch = 25 if len(losses) > 2 else 10  # windows of 2 epochs, or of 5
    straight = EpochLosses.from_records([], epoch=epoch)
    for loss in losses:
        straight.check(loss, 0, 20.0, untrained=0.69)
    records = [SimpleNamespace(train_loss=x) for x in [math.nan, *losses]]  # no loss yet: NaN
    resumed = EpochLosses.from_records(records, epoch=epoch)
    assert resumed == straight
    for watch in (straight, resumed):
        if diverges:
            with pytest.raises(DivergenceError):
                watch.check(last, 200, 20.0, untrained=0.69)  # the solver's, kept
        else:
            watch.check(last, 200, 20.0, untrained=0.69)


def test_key_value_overrides_read_json_values_and_name_a_malformed_item():
    from geodnn.errors import GeodnnError
    from geodnn.solvers.base import settings_overrides

    items = ["lam=0.02", "keep_retired=true", "dilations=[1, 2]", "schedule=1f1b"]
    assert settings_overrides(items, "admm") == {
        "lam": 0.02,
        "keep_retired": True,
        "dilations": [1, 2],
        "schedule": "1f1b",
    }
    with pytest.raises(GeodnnError, match=r"\[admm\] override 'lam' is not KEY=VALUE"):
        settings_overrides(["lam"], "admm")
