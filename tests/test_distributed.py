"""`geodnn train --workers N`: torchrun ranks driven through the ordinary training loop."""

import csv

import pytest
import torch

import geodnn
from pipelines.cli import main
from pipelines.config import load_config
from pipelines.train import build_setup, fit_decision, validate


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("solver", ["admm", "pipeline"])
def test_two_workers_resume_equals_an_uninterrupted_run(tmp_path, store, train_config, solver):
    extra = '[pipeline]\nschedule = "1f1b"\nmicrobatches = 2\n' if solver == "pipeline" else ""
    path = train_config(store, solver=solver, iterations=6, extra=extra).path
    path.write_text(path.read_text().replace("val_tiles = 4", "val_tiles = 5\ncalibrate_tiles = 3"))
    config = str(path)
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert main(["train", config, "--out", str(straight), "--workers", "2"]) == 0
    check_scored_as_one_process(load_config(path), straight)
    assert main(["train", config, "--out", str(run), "--workers", "2", "--iterations", "3"]) == 0
    names = {p.name for p in run.iterdir()}
    assert {"rank0-of-2-it3.pt", "rank1-of-2-it3.pt", "ranks-latest.txt", "model.pt"} <= names
    assert main(["train", config, "--out", str(run), "--workers", "2", "--resume"]) == 0
    assert [int(r["iteration"]) for r in read_rows(run / "metrics.csv")] == [3, 6]
    resumed = geodnn.load_checkpoint(run / "model.pt")
    assert resumed.metadata["iteration"] == 6
    reference = geodnn.load_checkpoint(straight / "model.pt").model.state_dict()
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6)


def check_scored_as_one_process(config, run_dir):
    """The ranks' shared validation and calibration of the final model (the last metrics row)
    are what one process computes from model.pt."""
    setup = build_setup(config, run_dir)
    model = geodnn.load_checkpoint(run_dir / "model.pt").model
    scale = fit_decision(model, setup.calibration_data, 3)
    loss, scores = validate(model, setup.val_data, setup.class_weights, 5, scale)
    last = read_rows(run_dir / "metrics.csv")[-1]
    assert float(last["decision_threshold"]) == pytest.approx(scale[0], abs=1e-6)
    assert float(last["val_loss"]) == pytest.approx(loss, rel=1e-5)
    assert float(last["val_iou_roads"]) == pytest.approx(float(scores.iou[1]), abs=1e-6)


def test_adam_refuses_several_workers(tmp_path, store, train_config, capsys):
    config = train_config(store, solver="adam")
    code = main(["train", str(config.path), "--out", str(tmp_path / "r"), "--workers", "2"])
    assert code != 0


def test_resume_needs_as_many_workers_as_the_run_had(tmp_path, store, train_config, capsys):
    config = str(train_config(store, solver="admm").path)
    ranked, single = tmp_path / "ranked", tmp_path / "single"
    ranked.mkdir()
    (ranked / "ranks-latest.txt").write_text("iteration=3\nworld_size=2\n")
    assert main(["train", config, "--out", str(ranked), "--resume"]) == 2
    assert "2-rank run; resume it with --workers 2" in capsys.readouterr().err
    assert main(["train", config, "--out", str(single), "--iterations", "3"]) == 0
    assert main(["train", config, "--out", str(single), "--resume", "--workers", "2"]) == 2
    assert "single-process run; resume it without --workers" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pipeline_on_one_worker_trains_and_a_ranked_divergence_exits_3(
    tmp_path, store, train_config
):
    """One pipeline rank must not start torchrun again (it has WORLD_SIZE 1 too), and a
    divergence on the ranks exits 3 as in one process (torchrun itself exits 1)."""
    extra = '[pipeline]\nschedule = "1f1b"\nmicrobatches = 2\n'
    config = str(train_config(store, solver="pipeline", iterations=3, extra=extra).path)
    assert main(["train", config, "--out", str(tmp_path / "one")]) == 0
    assert geodnn.load_checkpoint(tmp_path / "one" / "model.pt").metadata["iteration"] == 3
    wild = extra.replace("[pipeline]\n", "[pipeline]\nlr = 1e12\n")
    diverging = train_config(store, solver="pipeline", iterations=30, extra=wild).path
    assert main(["train", str(diverging), "--out", str(tmp_path / "two"), "--workers", "2"]) == 3


def test_a_rank_exits_1_when_a_peer_failed_and_2_for_a_user_error(monkeypatch, tmp_path):
    """`launch` prefers a rank's 2 over torchrun's 1: a rank that only saw a peer die must not
    report the crash as the user's error."""
    import pipelines.train as training
    from geodnn.errors import GeodnnError
    from geodnn.parallel import RankFailureError

    for error, code in ((RankFailureError("rank 1 did not answer"), 1), (GeodnnError("bad"), 2)):

        def failing(args, error=error):
            raise error

        monkeypatch.setattr(training, "run_command", failing)
        assert training.main([str(tmp_path / "any.toml")]) == code


@pytest.mark.parametrize("signum", [15, 1])
def test_a_stopped_multi_worker_launch_says_so(tmp_path, store, train_config, capsys, signum):
    """SIGTERM or SIGHUP to `geodnn train --workers N` (its ranks already stopped by `launch`)
    ends like the single-process path: one line naming the signal, exit 128 + signal."""
    import signal

    import pipelines.distributed as distributed
    from geodnn.runtime import StopSignal

    def stopped(*args, **kwargs):
        raise StopSignal(signum)

    config = train_config(store, solver="admm")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distributed, "launch", stopped)
        code = main(["train", str(config.path), "--workers", "2", "--out", str(tmp_path / "r")])
    assert code == 128 + signum
    assert f"geodnn: stopped by {signal.Signals(signum).name}" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_workers_on_several_stores_equal_one_process(
    tmp_path, store, other_store, train_config
):
    """Every rank opens the same stores and draws the same crops of them: the ranks' model is
    the single process's."""
    config = train_config(store, solver="admm", iterations=4)
    listed = f'store = ["{store}", "{other_store}"]'
    config.path.write_text(config.path.read_text().replace(f'store = "{store}"', listed))
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", str(config.path), "--out", str(one)]) == 0
    assert main(["train", str(config.path), "--out", str(two), "--workers", "2"]) == 0
    ranked = geodnn.load_checkpoint(two / "model.pt")
    assert len(ranked.metadata["training_split"]) == 2
    reference = geodnn.load_checkpoint(one / "model.pt").model.state_dict()
    for key, value in ranked.model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6)
