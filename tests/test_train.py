import csv
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
import torch

import geodnn
from geodnn.metrics import IGNORE_INDEX, confusion_matrix
from geodnn.parallel import rank_group, share_module, spawn
from pipelines.cli import main
from pipelines.config import load_config
from pipelines.datasets import StoreBatches, ValidationWindows
from pipelines.errors import PipelineError
from pipelines.train import build_setup, fit_decision, solver_settings, train, validate


def weights(path):
    return geodnn.load_checkpoint(path).model.state_dict()


def test_run_folder_holds_checkpoints_metrics_and_curves(tmp_path, store, train_config):
    result = train(train_config(store), tmp_path / "run", progress=False)
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.toml", "metrics.csv", "curves.png", "last.pt", "state.pt", "model.pt"} <= names
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == [3, 6]
    assert {"train_loss", "val_loss", "val_iou_roads", "val_f1_roads"} <= set(rows[0])
    ckpt = geodnn.load_checkpoint(result.checkpoint)
    assert ckpt.class_names == ["background", "roads"]
    assert ckpt.metadata["iteration"] == 6
    assert ckpt.metadata["class_values"] == [None, 255]  # the road mask's value
    assert "class_attribute" not in ckpt.metadata  # a mask's classes: no attribute to score by
    # the Vegas crop's pixels on the ground (EPSG:4326, ~0.27 m): predict warns of others
    assert ckpt.metadata["pixel_size_m"] == pytest.approx(0.27, abs=0.01)
    split = ckpt.metadata["training_split"]  # where its training pixels lie, for evaluate
    assert split["scene_shape"] == [320, 320] and ":" in split["split"] and split["gap"] >= 0


@pytest.mark.parametrize("solver", ["adam", "admm"])
def test_resume_continues_exactly(tmp_path, store, train_config, solver):
    straight = train(train_config(store, solver), tmp_path / "a", progress=False)
    train(train_config(store, solver, iterations=3), tmp_path / "b", progress=False)
    resumed = train(train_config(store, solver), tmp_path / "b", resume=True, progress=False)
    for key, value in weights(straight.checkpoint).items():
        torch.testing.assert_close(weights(resumed.checkpoint)[key], value, rtol=0, atol=0)
    assert [r.iteration for r in resumed.records] == [3, 6]
    assert np.isclose(resumed.records[-1].train_loss, straight.records[-1].train_loss)


def test_existing_run_needs_resume_or_overwrite(tmp_path, store, train_config, capsys):
    config = train_config(store)
    train(config, tmp_path / "run", progress=False)
    code = main(["train", str(config.path), "--out", str(tmp_path / "run")])
    assert code == 2 and "--resume" in capsys.readouterr().err
    (tmp_path / "run" / "notes.txt").write_text("kept")
    assert main(["train", str(config.path), "--out", str(tmp_path / "run"), "--overwrite"]) == 0
    assert (tmp_path / "run" / "notes.txt").read_text() == "kept"


@pytest.mark.parametrize("iterations, epochs", [(5, [3, 5]), (2, [2])])
def test_a_last_partial_epoch_is_validated_and_checkpointed(
    tmp_path, store, train_config, iterations, epochs
):
    """Iterations that are not a multiple of the epoch (or fewer than one epoch) end with a
    validated, checkpointed model of the last iteration, not the last whole epoch's (or none)."""
    result = train(train_config(store, iterations=iterations), tmp_path / "run", progress=False)
    assert [r.iteration for r in result.records] == epochs
    assert geodnn.load_checkpoint(result.checkpoint).metadata["iteration"] == iterations
    with open(tmp_path / "run" / "metrics.csv") as f:
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == epochs


def test_train_takes_a_config_path_and_refuses_a_file_as_run_folder(tmp_path, store, train_config):
    config = train_config(store, iterations=3)
    result = train(str(config.path), tmp_path / "run", progress=False)
    assert result.checkpoint.exists()
    (tmp_path / "afile").write_text("")
    with pytest.raises(PipelineError, match=r"afile: is a file, not a run folder"):
        train(config, tmp_path / "afile", progress=False)


def test_divergence_stops_and_keeps_last_good_checkpoint(
    tmp_path, store, train_config, monkeypatch, capsys
):
    from geodnn.solvers import adam

    real_step = adam.AdamSolver.step

    def failing_step(self):
        stats = real_step(self)
        return stats if self.iteration <= 3 else {**stats, "loss": float("nan")}

    monkeypatch.setattr(adam.AdamSolver, "step", failing_step)
    config = train_config(store)
    code = main(["train", str(config.path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 3 and "diverged at iteration 4" in err
    assert f"lower [adam] lr in {config.path}; rerun with --resume" in err  # its solver's fix
    assert "[admm]" not in err
    assert geodnn.load_checkpoint(tmp_path / "run" / "last.pt").metadata["iteration"] == 3
    assert not (tmp_path / "run" / "model.pt").exists()


def test_a_job_stopped_while_validating_redoes_that_epoch(
    tmp_path, store, train_config, monkeypatch
):
    """The solver state is saved after the epoch's checkpoint and metrics row: a job killed in
    between resumes from the older state, so no row is lost and model.pt is the final model."""
    import pipelines.train as training

    straight = train(train_config(store), tmp_path / "a", progress=False)
    real, calls = training.epoch_record, []

    def killed_on_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while validating")
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "epoch_record", killed_on_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(train_config(store), tmp_path / "b", progress=False)
    monkeypatch.setattr(training, "epoch_record", real)
    resumed = train(train_config(store), tmp_path / "b", resume=True, progress=False)
    assert [r.iteration for r in resumed.records] == [3, 6]
    for key, value in weights(straight.checkpoint).items():
        torch.testing.assert_close(weights(resumed.checkpoint)[key], value, rtol=0, atol=0)


def test_elapsed_time_counts_training_not_validation(tmp_path, store, train_config, monkeypatch):
    import time

    import pipelines.train as training

    real = training.validate

    def slow(*args, **kwargs):
        time.sleep(1.0)  # a long validation (a deep model, many tiles)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "validate", slow)
    straight = train(train_config(store, iterations=9), tmp_path / "a", progress=False)
    train(train_config(store, iterations=3), tmp_path / "b", progress=False)
    resumed = train(train_config(store, iterations=9), tmp_path / "b", resume=True, progress=False)
    for records in (straight.records, resumed.records):
        steps = np.diff([r.elapsed_s for r in records])
        assert len(steps) == 2 and (steps < 0.9).all()  # 3 tiny steps each, no sleep counted


def test_first_epoch_divergence_is_not_checkpointed(tmp_path, store, train_config, capsys):
    config = train_config(store, extra="[adam]\nlr = 50.0\n")
    code = main(["train", str(config.path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 3 and "diverged at iteration 3" in err
    assert not (tmp_path / "run" / "last.pt").exists()
    # nothing to resume from: the advice is a plain rerun, which the run folder accepts
    assert "rerun the same command (no epoch finished" in err and "--resume" not in err
    config.path.write_text(config.path.read_text().replace("lr = 50.0", "lr = 0.003"))
    assert main(["train", str(config.path), "--out", str(tmp_path / "run")]) == 0


def test_a_config_without_a_store_is_refused_before_a_run_folder_is_made(tmp_path, capsys):
    path = tmp_path / "job.toml"
    path.write_text("[train]\niterations = 3\n")
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    assert f"{path}: [data] store is not set" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_contradicting_or_shrinking_resumes_are_refused(tmp_path, store, train_config, capsys):
    config = train_config(store)
    run = tmp_path / "run"
    train(config, run, progress=False)
    assert main(["train", str(config.path), "--out", str(run), "--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite contradict" in capsys.readouterr().err
    code = main(["train", str(config.path), "--out", str(run), "--resume", "--iterations", "3"])
    assert code == 2
    said = "the run is at iteration 6, past the 3 asked for ([train] iterations"
    assert f"{said} or --iterations); ask for 6 or more" in capsys.readouterr().err
    code = main(["train", str(config.path), "--out", str(run), "--resume", "--iterations", "5"])
    assert code == 2  # one short of the run is past it too
    assert "at iteration 6, past the 5 asked for" in capsys.readouterr().err
    assert "iterations = 6" in (run / "config.toml").read_text()  # the record stays true
    config["train"]["iterations"] = 3  # from Python: no flag to name
    with pytest.raises(PipelineError, match=rf"{re.escape(said)}\); ask for 6 or more"):
        train(config, run, resume=True, progress=False)


@pytest.mark.parametrize("flags", [["--resume"], ["--resume", "--overwrite"]])
def test_a_refused_resume_makes_no_run_folder(flags, tmp_path, store, train_config, capsys):
    config = train_config(store)
    out = tmp_path / "new" / "deeper" / "run"
    assert main(["train", str(config.path), "--out", str(out), *flags]) == 2
    assert not (tmp_path / "new").exists()


def test_a_finished_run_resumes_without_its_last_checkpoint_copy(tmp_path, store, train_config):
    config = train_config(store)
    run = tmp_path / "run"
    first = train(config, run, progress=False)
    (run / "last.pt").unlink()  # the same bytes as model.pt: a user may tidy it away
    again = train(config, run, resume=True, progress=False)
    assert again.checkpoint == first.checkpoint and again.checkpoint.is_file()


def test_non_finite_weights_are_never_checkpointed(
    tmp_path, store, train_config, monkeypatch, capsys
):
    from geodnn.solvers import adam

    real_step = adam.AdamSolver.step

    def poisoned_at_6(self):
        stats = real_step(self)  # the loss is computed before the update: it looks fine
        if self.iteration == 6:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return stats

    monkeypatch.setattr(adam.AdamSolver, "step", poisoned_at_6)
    config = train_config(store, iterations=9)
    code = main(["train", str(config.path), "--out", str(tmp_path / "run")])
    assert code == 3 and "non-finite weights" in capsys.readouterr().err
    assert geodnn.load_checkpoint(tmp_path / "run" / "last.pt").metadata["iteration"] == 3
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["iteration"] == 3


def test_a_run_begun_before_a_setting_existed_resumes(tmp_path, store, train_config, caplog):
    run = tmp_path / "run"
    train(train_config(store, iterations=3), run, progress=False)
    saved = (run / "config.toml").read_text()
    assert "class_weight_max_ratio = 10.0\n" in saved
    (run / "config.toml").write_text(saved.replace("class_weight_max_ratio = 10.0\n", ""))
    with caplog.at_level("WARNING"):
        resumed = train(train_config(store), run, resume=True, progress=False)
    assert [r.iteration for r in resumed.records] == [3, 6]
    said = "began before geodnn had [train] class_weight_max_ratio = 10.0"  # it may differ now
    assert said in caplog.text and caplog.text.count("began before") == 1


def test_resume_after_divergence_may_lower_the_step_size(tmp_path, store, train_config, caplog):
    run = tmp_path / "run"
    train(train_config(store, iterations=3), run, progress=False)
    lower = train_config(store, extra="[adam]\nlr = 0.0001\n")
    with caplog.at_level("WARNING"):
        resumed = train(lower, run, resume=True, progress=False)
    assert "[adam] lr" in caplog.text and "no longer repeats" in caplog.text
    assert [r.iteration for r in resumed.records] == [3, 6]


def test_adam_resumed_with_other_settings_steps_with_them(store):
    from geodnn.solvers.adam import AdamSettings, AdamSolver

    data = StoreBatches(store, "train", crop=32)
    model = geodnn.build_model(data.bands, 2, depth=2, width=4, seed=1)
    saved = AdamSolver(model, data, AdamSettings(batch_size=4, lr=3e-3), seed=0)
    saved.step()
    lower = AdamSettings(batch_size=4, lr=1e-4, beta1=0.8, weight_decay=0.1)
    resumed = AdamSolver(model, data, lower, seed=0)
    resumed.load_state_dict(saved.state_dict())  # the optimizer state carries lr 3e-3 ...
    group = resumed.optimizer.param_groups[0]  # ... but the new settings apply
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-4, (0.8, 0.999), 0.1)


def test_checkpoint_waits_for_stats_in_flight(tmp_path, store, train_config, monkeypatch, capsys):
    """A solver that reports an iteration late (N-rank ADMM) is settled before each checkpoint:
    its late loss counts in the epoch, and a divergence found then keeps the last checkpoint."""
    from geodnn.errors import DivergenceError
    from geodnn.solvers.admm import AdmmSolver

    def settle(self):
        if self.iteration >= 6:
            raise DivergenceError(f"ADMM diverged on another rank at iteration {self.iteration}")
        return {"loss": 0.5}

    monkeypatch.setattr(AdmmSolver, "settle", settle, raising=False)
    config = train_config(store, solver="admm", iterations=9)
    code = main(["train", str(config.path), "--out", str(tmp_path / "run")])
    assert code == 3 and "diverged on another rank at iteration 6" in capsys.readouterr().err
    assert geodnn.load_checkpoint(tmp_path / "run" / "last.pt").metadata["iteration"] == 3
    with open(tmp_path / "run" / "metrics.csv") as f:
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == [3]


def test_cli_train_then_predict(tmp_path, store, train_config, capsys):
    config = train_config(store)
    assert main(["train", str(config.path), "--out", str(tmp_path / "run")]) == 0
    scene = store.parent / "image.tif"
    out = tmp_path / "classes.tif"
    assert main(["predict", str(tmp_path / "run" / "model.pt"), str(scene), "--out", str(out)]) == 0
    with rasterio.open(out) as src:
        assert src.shape == (320, 320) and src.dtypes[0] == "uint8"


def test_train_takes_a_text_path_and_gives_back_the_callers_threads(tmp_path, store, train_config):
    torch.set_num_threads(2)
    try:
        result = train(train_config(store, iterations=3), str(tmp_path / "run"), progress=False)
        assert result.checkpoint == tmp_path / "run" / "model.pt"
        assert torch.get_num_threads() == 2  # the config's 1 thread was for training only
    finally:
        torch.set_num_threads(1)


def test_solver_stopping_rule_ends_training_with_a_checkpoint(tmp_path, store, train_config):
    config = train_config(store, iterations=30, extra="[adam]\nmax_iterations = 4\n")
    result = train(config, tmp_path / "run", progress=False)
    assert [r.iteration for r in result.records] == [3, 4]
    assert geodnn.load_checkpoint(result.checkpoint).metadata["iteration"] == 4
    again = train(config, tmp_path / "run", resume=True, progress=False)  # nothing left to do
    assert [r.iteration for r in again.records] == [3, 4]  # before: one more step each resume
    assert geodnn.load_checkpoint(again.checkpoint).metadata["iteration"] == 4


def test_guard_band_narrower_than_the_halo_warns(tmp_path):
    from pipelines.train import warn_if_halo_crosses_split

    with pytest.warns(UserWarning, match="re-tile with gap=40 or more"):
        warn_if_halo_crosses_split(tmp_path / "s.zarr", {"split": {"gap": 16}}, radius=40)


def test_run_folder_keeps_the_config_as_run_and_resume_refuses_other_settings(
    tmp_path, store, train_config, capsys
):
    import tomllib

    config = train_config(store, iterations=3)
    run = tmp_path / "run"
    assert main(["train", str(config.path), "--out", str(run), "--solver", "admm"]) == 0
    saved = tomllib.loads((run / "config.toml").read_text())
    assert saved["train"]["solver"] == "admm"  # the override, not the file's "adam"
    assert saved["data"]["store"] == str(store.resolve())
    # the store was tiled by `geodnn tile`: [tile]'s defaults would misstate how
    assert "tile" not in saved and "scene" not in saved
    changed = train_config(store, iterations=6, extra="[adam]\nlr = 0.1\n")
    code = main(["train", str(changed.path), "--out", str(run), "--resume", "--solver", "admm"])
    assert code == 0  # more iterations (and another solver's table) may change
    wider = str(changed.path).replace(".toml", "-wide.toml")
    Path(wider).write_text(Path(changed.path).read_text().replace("width = 4", "width = 8"))
    code = main(["train", wider, "--out", str(run), "--resume", "--solver", "admm"])
    assert code == 2 and "[model] width 4 -> 8" in capsys.readouterr().err
    code = main(["train", str(changed.path), "--out", str(run), "--resume", "--solver", "adam"])
    assert code == 2 and "[train] solver 'admm' -> 'adam' (--solver)" in capsys.readouterr().err
    smaller = str(changed.path).replace(".toml", "-crop.toml")  # [data] is the run's too
    Path(smaller).write_text(Path(changed.path).read_text().replace("crop = 32", "crop = 16"))
    code = main(["train", smaller, "--out", str(run), "--resume", "--solver", "admm"])
    assert code == 2 and "[data] crop 32 -> 16" in capsys.readouterr().err
    # settings train does not use, or that change nothing here, were refused too
    same = "compare = ['adam']\ndevice = 'cpu'\nthreads = 2\n[parallel]\ncompress_bits = 8\n"
    if torch.cuda.is_available():
        same = same.replace("'cpu'", "'cuda'")
    unused = train_config(store, iterations=9, extra=same)
    code = main(["train", str(unused.path), "--out", str(run), "--resume", "--solver", "admm"])
    assert code == 0, capsys.readouterr().err


def test_resume_refuses_a_store_rebuilt_from_other_data(tmp_path, store, train_config, capsys):
    import shutil

    import zarr

    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    config = train_config(copy, iterations=3)
    run = tmp_path / "run"
    assert main(["train", str(config.path), "--out", str(run)]) == 0
    more = train_config(copy, iterations=6)
    assert main(["train", str(more.path), "--out", str(run), "--resume"]) == 0  # same store
    group = zarr.open_group(str(copy), mode="r+")  # as if re-tiled from another scene
    group.attrs["scene_path"] = "/elsewhere/atlanta.tif"
    longer = train_config(copy, iterations=9)
    code = main(["train", str(longer.path), "--out", str(run), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "tile store changed since this run started" in err and str(copy) in err


def test_a_solver_table_may_set_its_own_batch():
    config_file = Path(__file__).resolve().parent.parent / "pipelines/configs/vegas-roads.toml"
    config = load_config(config_file, {"admm": {"batch_size": 8}})
    setup = SimpleNamespace(config=config, solver_name="admm", class_weights=torch.ones(2))
    assert solver_settings(setup)["batch_size"] == 8
    setup.solver_name = "adam"  # the others take [train] batch_size
    assert solver_settings(setup)["batch_size"] == config["train"]["batch_size"] == 16


def test_validation_scores_tiles_with_their_validation_neighbours(store):
    val = StoreBatches(store, "validation")
    model = geodnn.build_model(val.bands, 2, depth=2, width=4, seed=1)
    model.set_normalization(val.band_mean, val.band_std)
    halo = model.receptive_radius
    _, scores = validate(model, ValidationWindows(val, halo), torch.ones(2), limit=len(val))
    # independently: the whole validation region at once, every pixel with all its context
    rows, cols = (n + 2 * halo + val.tile_size for n in val.store.scene_shape)
    canvas = torch.full((1, val.bands, rows, cols), float("nan"))
    labels = torch.full((rows, cols), IGNORE_INDEX, dtype=torch.long)
    images, tile_labels = val.get(range(len(val)))
    for image, label, (row, col, h, w) in zip(images, tile_labels, val.store.windows(val.tiles)):
        canvas[0, :, row + halo : row + halo + h, col + halo : col + halo + w] = image[:, :h, :w]
        labels[row + halo : row + halo + h, col + halo : col + halo + w] = label[:h, :w]
    with torch.no_grad():
        region = model(canvas)
    expected = confusion_matrix(region.argmax(1), labels[None], 2)
    assert torch.equal(scores.confusion, expected)
    # with a decision threshold: the class map `geodnn predict` writes with it
    windows, threshold = ValidationWindows(val, halo), 0.3
    scale = [threshold, 1 - threshold]
    _, scaled = validate(model, windows, torch.ones(2), len(val), class_scale=scale)
    called = (torch.softmax(region, 1)[:, 1] > threshold).long()
    assert torch.equal(scaled.confusion, confusion_matrix(called, labels[None], 2))
    # the loss is the class-weighted mean, on the training loss's scale
    weights = torch.tensor([1.0, 3.0])
    loss, _ = validate(model, windows, weights, len(val))
    expected_loss = torch.nn.functional.cross_entropy(
        region, labels[None], weight=weights, ignore_index=IGNORE_INDEX
    )
    assert loss == pytest.approx(float(expected_loss), rel=1e-5)


def _training_pixels(model, store, limit):
    """Class-1 probability and truth of the training tiles `fit_decision` samples."""
    windows = ValidationWindows(StoreBatches(store, "train"), model.receptive_radius)
    picks = np.unique(np.linspace(0, len(windows) - 1, min(len(windows), limit)).astype(int))
    x, y = windows.get(picks.tolist())
    h = windows.halo
    with torch.no_grad():
        p1 = torch.softmax(model(x), 1)[:, 1, h : h + y.shape[1], h : h + y.shape[2]]
    keep = y != IGNORE_INDEX
    return p1[keep], y[keep] == 1


def _iou(score, positive, threshold):
    called = score > threshold
    return int((called & positive).sum()) / max(int((called | positive).sum()), 1)


def test_checkpoint_carries_the_iou_best_threshold_of_training_tiles(tmp_path, store, train_config):
    config = train_config(store, iterations=12)
    config.tables["data"]["calibrate_tiles"] = 64
    result = train(config, tmp_path / "run", progress=False)
    ckpt = geodnn.load_checkpoint(result.checkpoint)
    threshold, rest = ckpt.metadata["class_scale"]
    assert 0 < threshold < 1 and threshold + rest == pytest.approx(1)
    score, positive = _training_pixels(ckpt.model, store, config["data"]["calibrate_tiles"])
    best = _iou(score, positive, threshold)
    for other in (0.5, threshold - 0.05, threshold + 0.05, 0.2, 0.8):
        assert best >= _iou(score, positive, other)
    with open(tmp_path / "run" / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]  # validation scored with the same decision rule
    assert float(last["decision_threshold"]) == pytest.approx(threshold)


def test_no_threshold_when_calibration_is_off(tmp_path, store, train_config):
    config = train_config(store)  # off by default
    result = train(config, tmp_path / "run", progress=False)
    assert "class_scale" not in geodnn.load_checkpoint(result.checkpoint).metadata


def _windows(model, store):
    """Validation and calibration windows of the store's tiles for `model`."""
    val = ValidationWindows(StoreBatches(store, "validation"), model.receptive_radius)
    return val, ValidationWindows(StoreBatches(store, "train"), model.receptive_radius)


def _small_model(store, seed):
    val = StoreBatches(store, "validation")
    model = geodnn.build_model(val.bands, 2, depth=2, width=4, seed=seed)
    model.set_normalization(val.band_mean, val.band_std)
    return model


def _rank_scores(store):
    """On every rank: a model of its own seed, replaced by rank 0's, then scored in shares."""
    with rank_group(timeout_s=60, backend="gloo") as ranks:
        model = share_module(ranks, _small_model(store, seed=1 + 98 * ranks.rank), "model")
        val, train_tiles = _windows(model, store)
        scale = fit_decision(model, train_tiles, limit=7, ranks=ranks)
        loss, scores = validate(model, val, torch.tensor([1.0, 3.0]), 5, scale, ranks=ranks)
        return loss, scores.confusion, scale


@pytest.mark.timeout(120)
def test_ranks_validate_and_calibrate_in_shares_as_one_process_would(store):
    model = _small_model(store, seed=1)
    val, train_tiles = _windows(model, store)
    scale = fit_decision(model, train_tiles, limit=7)
    loss, scores = validate(model, val, torch.tensor([1.0, 3.0]), 5, scale)
    for rank_loss, confusion, rank_scale in spawn(_rank_scores, 2, (store,), timeout_s=100):
        assert rank_scale == pytest.approx(scale, abs=1e-7)
        assert torch.equal(confusion, scores.confusion)
        assert rank_loss == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "2", "--solver", "adam"], "solver 'adam' runs in one process"),
        (["--workers", "5", "--solver", "admm"], "5 workers for a chain of 4 layers"),
        (["--compress-bits", "33"], "compress_bits 33 (--compress-bits, else "),
        (["--workers", "2", "--solver", "admm", "--compress-bits", "9"], "compress_bits 9"),
        (["--workers", "2", "--solver", "admm"], "already holds a run; pass --resume"),
    ],
)
def test_multi_rank_user_errors_are_refused_before_any_rank_starts(
    args, message, tmp_path, store, train_config, capsys, monkeypatch
):
    import pipelines.distributed

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"an earlier run")
    (run / "config.toml").write_text("")  # written first by every run
    monkeypatch.setattr(pipelines.distributed, "launch_training", lambda *a: pytest.fail("ran"))
    config = train_config(store, iterations=3)
    code = main(["train", str(config.path), "--out", str(run), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_run_folder_that_cannot_be_made_is_refused_in_one_line(
    workers, tmp_path, store, train_config, capsys, monkeypatch
):
    """A file on the --out path (or a read-only disk): one line before any rank starts; the
    ranks printed a traceback each."""
    import pipelines.distributed

    monkeypatch.setattr(pipelines.distributed, "launch_training", lambda *a: pytest.fail("ran"))
    (tmp_path / "notes.txt").write_text("")
    config = train_config(store, iterations=3)
    out = tmp_path / "notes.txt" / "run"
    code = main(
        ["train", str(config.path), "--out", str(out), "--workers", workers, "--solver", "admm"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"{out}: cannot write the run folder here (Not a directory)" in err


def test_a_class_of_a_few_pixels_is_warned_of_and_its_weight_capped(tmp_path, store, train_config):
    import shutil
    import warnings

    import zarr

    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    group = zarr.open_group(str(copy), mode="r+")
    counts = list(group.attrs["class_pixel_counts"])
    group.attrs["class_pixel_counts"] = [counts[0], 16]  # 16 road pixels: less than a crop
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setup = build_setup(train_config(copy), tmp_path / "run")
    said = " | ".join(str(w.message) for w in caught)
    assert "roads (16 px) have fewer labeled training pixels than one 32x32 crop" in said
    assert "capped at [train] class_weight_max_ratio = 10" in said
    weights = setup.class_weights
    assert float(weights[1] / weights[0]) == pytest.approx(10.0)
    uncapped = train_config(copy, extra="class_weight_max_ratio = 1e9\n")
    with warnings.catch_warnings(record=True):
        weights = build_setup(uncapped, tmp_path / "run2").class_weights
    assert float(weights[1] / weights[0]) > 30  # sqrt of the pixel ratio


def test_the_checkpoint_records_the_class_attribute_of_its_store(tmp_path, store, train_config):
    import shutil

    import zarr

    from pipelines.train import store_metadata

    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    zarr.open_group(str(copy), mode="r+").attrs["class_attribute"] = "kind"
    setup = build_setup(train_config(copy), tmp_path / "run")
    assert store_metadata(setup.stores)["class_attribute"] == "kind"  # evaluate's default


@pytest.mark.parametrize(
    "iterations, said",
    [(3, "so no layer will be updated"), (6, "so the layers far from the head will"), (8, None)],
)
def test_an_admm_run_too_short_for_its_depth_is_warned_of(
    tmp_path, store, train_config, iterations, said
):
    """A depth-256 run of 20 iterations said 'trained' with no layer updated (4 layers here:
    the head updates at about iteration 4, the stem at about 8)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_setup(train_config(store, "admm", iterations=iterations), tmp_path / "run")
    short = [str(w.message) for w in caught if "too few for ADMM" in str(w.message)]
    assert (short and said in short[0] and "to 8 or more" in short[0]) if said else not short
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_setup(train_config(store, "adam", iterations=3), tmp_path / "adam")
    assert not [w for w in caught if "too few for ADMM" in str(w.message)]  # backprop: no trip


def test_calibrate_tiles_on_a_model_of_three_classes_is_warned_of(
    tmp_path, make_geotiff, train_config
):
    import warnings

    from pipelines.tile import build_store

    rng = np.random.default_rng(0)
    scene = make_geotiff(rng.integers(1, 4000, (3, 192, 192)).astype("uint16"), name="s.tif")
    mask = make_geotiff(rng.integers(0, 3, (192, 192)).astype("uint8"), name="m.tif")
    store = build_store(scene, mask, tmp_path / "three.zarr", tile=64, gap=16)
    config = train_config(store, iterations=3)
    config.tables["data"]["calibrate_tiles"] = 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setup = build_setup(config, tmp_path / "run")
    said = " | ".join(str(w.message) for w in caught)
    assert "calibrate_tiles has no effect on a model of 3 classes" in said
    assert setup.calibration_data is None


def test_stores_without_labeled_pixels_to_learn_or_score_are_refused(
    tmp_path, store, train_config, capsys
):
    import shutil
    import warnings

    import zarr

    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    assert (
        main(["train", str(train_config(copy, iterations=3).path), "--out", str(tmp_path / "a")])
        == 0
    )
    no_val = train_config(copy).path.read_text().replace("val_tiles = 4", "val_tiles = 0")
    (tmp_path / "noval.toml").write_text(no_val)
    assert main(["train", str(tmp_path / "noval.toml"), "--out", str(tmp_path / "b")]) == 2
    assert "hold no labeled pixels; raise val_tiles" in capsys.readouterr().err
    group = zarr.open_group(str(copy), mode="r+")
    counts = list(group.attrs["class_pixel_counts"])
    group.attrs["class_pixel_counts"] = [counts[0], 0]  # roads only in validation
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(train_config(copy, iterations=3), tmp_path / "c", progress=False)
    assert any("roads have no training pixels" in str(w.message) for w in caught)
    group.attrs["class_pixel_counts"] = [0, 0]  # nothing labeled where training happens
    assert main(["train", str(train_config(copy).path), "--out", str(tmp_path / "d")]) == 2
    assert "training region has no labeled pixels" in capsys.readouterr().err


def _zip_without_torch_data(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "a zip, but no torch.save archive")


DAMAGE = {
    "state-truncated": (
        "state.pt",
        lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    ),
    "state-empty": ("state.pt", lambda p: p.write_bytes(b"")),
    "state-foreign-zip": ("state.pt", _zip_without_torch_data),
    "config-not-toml": ("config.toml", lambda p: p.write_text("x = = 1\n")),
    "config-missing": ("config.toml", lambda p: p.unlink()),
    "metrics-missing": ("metrics.csv", lambda p: p.unlink()),
    "metrics-empty": ("metrics.csv", lambda p: p.write_bytes(b"")),
    "metrics-garbage": ("metrics.csv", lambda p: p.write_text("iteration,val_loss\n3,oops\n")),
    # rows before the state's iteration only: the last epoch's row would vanish
    "metrics-cut-short": (
        "metrics.csv",
        lambda p: p.write_text("\n".join(p.read_text().splitlines()[:2]) + "\n"),
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_refuses_a_damaged_or_missing_run_file_in_one_line(
    damage, tmp_path, store, train_config, capsys
):
    name, spoil = DAMAGE[damage]
    run = tmp_path / "run"
    train(train_config(store, iterations=6), run, progress=False)
    spoil(run / name)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    config = train_config(store, iterations=9)
    code = main(["train", str(config.path), "--out", str(run), "--resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert str(run / name) in err and "restore the file" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing touched


def test_progress_bar_keeps_the_validation_iou_beside_the_running_loss(
    tmp_path, store, train_config, monkeypatch
):
    import pipelines.train as training

    postfixes = []

    class Bar:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            pass

        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
            postfixes.append({**(ordered_dict or {}), **kwargs})

    monkeypatch.setattr(training, "progress_bar", Bar)
    train(train_config(store, iterations=9), tmp_path / "run", progress=True)
    first_iou = next(i for i, p in enumerate(postfixes) if "iou" in p)
    later = postfixes[first_iou:]
    assert len(later) > 3 and all("iou" in p and "loss" in p for p in later), postfixes


def test_progress_bar_iou_is_the_mean_over_the_mapped_classes():
    from pipelines.train import foreground_iou

    assert foreground_iou([0.96, 0.2]) == 0.2  # two classes: the mapped one's
    assert foreground_iou([0.9, 0.3, 0.0]) == pytest.approx(0.15)  # not the last class's 0.0
    # a class absent from validation truth and prediction (NaN) is left out, not counted as 0
    assert foreground_iou([0.9, 0.3, math.nan]) == pytest.approx(0.3)
    assert math.isnan(foreground_iou([1.0, math.nan]))


def test_a_class_validation_never_saw_is_absent_in_metrics_not_zero(tmp_path):
    from geodnn.metrics import scores
    from pipelines.train import iou_summary, read_metrics, seen_only, write_metrics

    truth = torch.tensor([0, 0, 1, 1])
    s = scores(torch.tensor([0, 0, 1, 0]), truth, 3)  # class 2 neither in truth nor called
    iou = seen_only(s.iou, s.seen)
    assert iou[:2] == pytest.approx([2 / 3, 0.5]) and math.isnan(iou[2])
    names = ["background", "roads", "water"]
    write_metrics(tmp_path / "metrics.csv", [_record(5, 0.5, iou)], names)
    (back,) = read_metrics(tmp_path / "metrics.csv", names, 5)
    assert back.val_iou[:2] == pytest.approx(iou[:2]) and math.isnan(back.val_iou[2])
    assert iou_summary(names, back.val_iou) == "background 0.667, roads 0.500, water absent"


def _record(iteration, loss, ious):
    from pipelines.train import EpochRecord

    return EpochRecord(iteration, 1.0, loss, loss, ious, ious, 0.9)


def _curves(monkeypatch, records):
    """The figure `plot_curves` would save for `records`."""
    import pipelines.train as training

    saved = []
    monkeypatch.setattr(training, "save_figure", lambda fig, path: saved.append(fig))
    training.plot_curves(Path("curves.png"), records, ["background", "roads"], "adam")
    return saved[0]


def test_curves_of_one_epoch_show_their_points(monkeypatch):
    fig = _curves(monkeypatch, [_record(3, 0.7, [0.94, 0.04])])
    ax_loss, ax_iou = fig.axes[:2]
    for ax in (ax_loss, ax_iou):
        assert ax.lines and all(line.get_marker() not in ("None", "", None) for line in ax.lines)
        low, high = ax.get_xlim()
        assert low <= 0 and 3 < high <= 4  # from the start of training, not 2.88 to 3.12
    fig.draw_without_rendering()  # the legend beside the IoU panel, not over its curves
    legend = ax_iou.get_legend().get_window_extent()
    assert not legend.overlaps(ax_iou.get_window_extent())


def test_the_curve_of_admm_ranks_says_what_their_training_loss_is(monkeypatch):
    """It was labelled 'train (real network)' where --workers ranks log the head's loss on its
    pipelined input (README)."""
    from types import SimpleNamespace

    from pipelines.train import RANK_TRAIN_LOSS, train_loss_label

    rank = SimpleNamespace(ctx=object())
    assert train_loss_label(rank, "admm") == RANK_TRAIN_LOSS
    assert train_loss_label(rank, "pipeline") is None  # backprop: the real network's loss
    assert train_loss_label(SimpleNamespace(), "admm") is None  # one process
    import pipelines.train as training

    saved = []
    monkeypatch.setattr(training, "save_figure", lambda fig, path: saved.append(fig))
    records = [_record(3, 0.7, [0.94, 0.04])]
    training.plot_curves(Path("c.png"), records, ["bg", "roads"], "admm", RANK_TRAIN_LOSS)
    assert saved[0].axes[0].get_legend_handles_labels()[1][0] == RANK_TRAIN_LOSS


def test_a_logged_progress_bar_prints_its_last_line_once(tmp_path, store, train_config, capsys):
    """Each epoch's line, then the last epoch's again from the bar's close (a log file)."""
    config = train_config(store, iterations=6)
    assert main(["train", str(config.path), "--out", str(tmp_path / "run")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "it/s" in line]
    assert len([line for line in lines if "6/6" in line]) == 1, lines
    assert "loss=" in lines[-1] and "iou=" in lines[-1]


def test_quiet_training_shows_no_progress_bar_on_any_rank(tmp_path, store, train_config, capsys):
    from argparse import Namespace

    from pipelines.distributed import forwarded_args

    config = train_config(store, iterations=6)
    assert main(["train", str(config.path), "--out", str(tmp_path / "run"), "-q"]) == 0
    out, err = capsys.readouterr()
    assert "it/s" not in err and out.startswith("trained adam:")
    given = dict(solver=None, iterations=None, workers=2, compress_bits=None, resume=False)
    args = Namespace(config=config.path, overwrite=False, quiet=True, **given)
    assert "--quiet" in forwarded_args(args, tmp_path / "run")  # what each rank is started with


def test_cli_names_each_class_s_validation_iou(tmp_path, store, train_config, capsys):
    import re

    config = train_config(store, iterations=3)
    assert main(["train", str(config.path), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.search(r"validation IoU background \d\.\d{3}, roads \d\.\d{3}$", out), out


def test_a_new_resumed_or_overwritten_run_removes_stale_temporary_files(
    tmp_path, store, train_config, caplog
):
    import os
    import tempfile

    run = tmp_path / "run"
    run.mkdir()
    kept = [".notes.txt.abcdefgh.tmp.txt", "my.tmp.pt", ".state.pt.abc.tmp.pt", "curves.png.tmp"]
    kept += [".curves.png.abcdefgh.tmp.png.bak", ".rank1-of-2-it20.pt.abcdefgh.tmp.txt"]

    def leave_temps():
        """What writers killed mid-write leave (geodnn.atomic.atomic_path's names)."""
        for target in ("state.pt", "curves.png", "rank1-of-2-it20.pt", "ranks-latest.txt"):
            fd, _ = tempfile.mkstemp(
                prefix=f".{target}.", suffix=f".tmp{Path(target).suffix}", dir=run
            )
            os.close(fd)

    for resume, overwrite, iterations in [(False, False, 3), (True, False, 6), (False, True, 3)]:
        leave_temps()
        caplog.clear()
        with caplog.at_level("INFO"):
            train(train_config(store, iterations=iterations), run, resume, overwrite, False)
        assert "removed 4 temporary file(s)" in caplog.text
        assert not [p.name for p in run.iterdir() if ".tmp." in p.name and p.name not in kept]
        if not resume and not overwrite:  # a user's files beside a run (a new run refuses them)
            for name in kept:
                (run / name).write_text("the user's")
        assert all((run / name).read_text() == "the user's" for name in kept)


def test_a_rank_stopped_by_sigterm_unwinds_and_reports_128_plus_the_signal(
    tmp_path, monkeypatch, capsys
):
    import os
    import signal

    import pipelines.train as training
    from geodnn.atomic import atomic_path

    codes = []

    def checkpointing(args):
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "SIGTERM would kill"
        with atomic_path(tmp_path / "rank1-of-2-it20.pt") as tmp:
            tmp.write_bytes(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGTERM)  # as torchrun forwards it
            pytest.fail("SIGTERM did not unwind")
        return 0

    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    monkeypatch.setattr(training, "run_command", checkpointing)
    monkeypatch.setattr(training, "report_exit_code", codes.append)
    monkeypatch.setenv("RANK", "1")
    assert training.main(["job.toml"]) == 128 + signal.SIGTERM
    assert codes == [128 + signal.SIGTERM]
    assert capsys.readouterr().err.strip() == "geodnn: rank 1 stopped by SIGTERM"
    assert list(tmp_path.iterdir()) == []  # the temporary file was removed on the way out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_interrupted_rank_says_so_in_one_line(monkeypatch, capsys):
    import pipelines.train as training

    def interrupted(args):
        raise KeyboardInterrupt  # Ctrl-C to a torchrun started by hand

    codes = []
    monkeypatch.setattr(training, "run_command", interrupted)
    monkeypatch.setattr(training, "report_exit_code", codes.append)
    monkeypatch.setenv("RANK", "2")
    assert training.main(["job.toml"]) == 130 and codes == [130]
    assert capsys.readouterr().err.strip() == "geodnn: rank 2 interrupted"


@pytest.mark.parametrize(
    "rank, local, printed", [(0, False, True), (1, False, False), (1, True, True)]
)
def test_a_divergence_is_said_by_rank_0_and_by_the_rank_whose_layer_it_was(
    rank, local, printed, tmp_path, store, train_config, monkeypatch, capsys
):
    import pipelines.train as training
    from geodnn.errors import DivergenceError

    def diverged(*args, **kwargs):
        raise DivergenceError("layer 5 diverged at iteration 7", "lower the step", local=local)

    monkeypatch.setattr(training, "train", diverged)
    monkeypatch.setattr(training, "report_exit_code", lambda code: None)
    monkeypatch.setenv("RANK", str(rank))
    config = train_config(store)
    assert training.main([str(config.path), "--out", str(tmp_path / "run")]) == 3
    said = capsys.readouterr().err
    assert ("layer 5 diverged at iteration 7; lower [adam] lr" in said) is printed


def test_a_rank_names_itself_once_in_its_error(monkeypatch, capsys):
    import pipelines.train as training
    from geodnn.parallel.group import RankFailureError

    def peer_gone(args):
        raise RankFailureError("rank 2: rank 1 did not complete the checkpoint")

    monkeypatch.setattr(training, "run_command", peer_gone)
    monkeypatch.setattr(training, "report_exit_code", lambda code: None)
    monkeypatch.setenv("RANK", "2")
    assert training.main(["job.toml"]) == 1
    assert capsys.readouterr().err == (
        "geodnn: error (rank 2): rank 1 did not complete the checkpoint\n"
    )


@pytest.mark.parametrize(
    "solver, workers, warned",
    [("admm", 1, True), ("adam", 1, True), ("pipeline", 2, True), ("admm", 2, False)],
)
def test_compress_bits_without_effect_is_warned_of(solver, workers, warned, store, train_config):
    import warnings

    from pipelines.train import check_parallel

    path = train_config(store, extra="[pipeline]\nmicrobatches = 2\n").path
    overrides = {"train": {"solver": solver}, "parallel": {"workers": workers, "compress_bits": 8}}
    config = load_config(path, overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_parallel(config)
    notes = [str(w.message) for w in caught if "compress_bits" in str(w.message)]
    assert len(notes) == (1 if warned else 0), notes
    assert not warned or ("no effect" in notes[0] and str(path) in notes[0])


def test_pipeline_microbatches_that_do_not_divide_the_batch_are_refused_before_launch(
    tmp_path, store, train_config, monkeypatch, capsys
):
    import pipelines.distributed

    monkeypatch.setattr(pipelines.distributed, "launch_training", lambda *a: pytest.fail("ran"))
    config = train_config(store, iterations=3, extra="[pipeline]\nmicrobatches = 3\n")
    code = main(["train", str(config.path), "--out", str(tmp_path / "run"), "--solver", "pipeline"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and str(config.path) in err
    assert "[pipeline] microbatches = 3 does not divide the batch of 4" in err


def test_a_rank_run_whose_metrics_lack_its_checkpoint_row_is_refused_before_launch(tmp_path):
    from pipelines.errors import DamagedRunError
    from pipelines.train import check_resume_files

    (tmp_path / "ranks-latest.txt").write_text("iteration=138\nworld_size=2\n")
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("iteration,train_loss\n50,0.4\n100,0.3\n")
    with pytest.raises(DamagedRunError, match="lack the row of iteration 138, where its state"):
        check_resume_files(tmp_path)
    metrics.write_text("iteration,train_loss\n50,0.4\n100,0.3\n138,0.2\n")
    check_resume_files(tmp_path)


def test_a_rank_run_past_the_iterations_asked_for_is_refused_before_launch(
    tmp_path, store, train_config
):
    from pipelines.train import check_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "ranks-latest.txt").write_text("iteration=138\nworld_size=2\n")
    (run / "metrics.csv").write_text("iteration,train_loss\n100,0.3\n138,0.2\n")
    with pytest.raises(PipelineError, match="the run is at iteration 138, past the 100 asked"):
        check_run_dir(train_config(store, iterations=100), run, resume=True, overwrite=False)


def test_a_refused_command_leaves_a_live_run_s_temporary_file_alone(
    tmp_path, store, train_config, capsys
):
    """A second `geodnn train` on a folder whose run is writing its checkpoint is refused; it
    must not delete that run's temporary file (its write would fail when it renames it)."""
    from geodnn.atomic import atomic_path

    config = train_config(store, iterations=3)
    train(config, tmp_path / "run", progress=False)
    with atomic_path(tmp_path / "run" / "last.pt") as live:
        live.write_bytes(b"being written")
        assert main(["train", str(config.path), "--out", str(tmp_path / "run")]) == 2
        assert "already holds a run" in capsys.readouterr().err
        assert live.exists()
    assert (tmp_path / "run" / "last.pt").read_bytes() == b"being written"


def test_overwrite_clears_a_run_whose_checkpoint_marker_is_damaged(tmp_path, store, train_config):
    run = tmp_path / "run"
    run.mkdir()
    (run / "ranks-latest.txt").write_text("")  # its error advises --overwrite
    train(train_config(store, iterations=3), run, overwrite=True, progress=False)
    assert not (run / "ranks-latest.txt").exists() and (run / "model.pt").exists()


def test_an_empty_or_lost_run_record_on_resume(tmp_path, store, train_config, caplog, capsys):
    config = train_config(store, iterations=3)
    train(config, tmp_path / "run", progress=False)
    (tmp_path / "run" / "store.json").unlink()  # lost: recorded again, with a warning
    with caplog.at_level("WARNING"):
        train(train_config(store), tmp_path / "run", resume=True, progress=False)
    assert "no record of the run's tile store; recording this one" in caplog.text
    assert json.loads((tmp_path / "run" / "store.json").read_text())["sha256"]
    (tmp_path / "run" / "config.toml").write_text("")
    code = main(["train", str(config.path), "--out", str(tmp_path / "run"), "--resume"])
    assert (
        code == 2 and "config.toml: the run's config is empty; restore" in capsys.readouterr().err
    )


def test_a_refused_resume_writes_no_store_record(tmp_path, store, train_config, capsys):
    config = train_config(store)
    train(config, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    (run / "store.json").unlink()
    rows = (run / "metrics.csv").read_text().splitlines()
    (run / "metrics.csv").write_text("\n".join(rows[:-1]) + "\n")  # lost its last row
    code = main(["train", str(config.path), "--out", str(run), "--resume", "--iterations", "9"])
    assert code == 2 and "lack the row of iteration 6" in capsys.readouterr().err
    assert not (run / "store.json").exists()


def test_the_rank_entry_points_usage_is_the_command_to_type(capsys):
    """`python -m pipelines.train --help` (what torchrun runs) shows a usage that works when
    copied: no 'train' word, which the entry point adds itself."""
    from pipelines.train import main as rank_main

    with pytest.raises(SystemExit):
        rank_main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m pipelines.train [-h]")


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_a_folder_of_a_user_s_files_is_no_run_folder(tmp_path, store, train_config, capsys, resume):
    """A folder holding only the user's model.pt was 'a run' (pass --resume or --overwrite)
    and, with --resume, 'nothing to resume', which left --overwrite, replacing their file. A
    folder of notes got a run's files mixed in. `geodnn run` refuses both alike; --overwrite
    (asked for, not advised) replaces what is there, beside the user's other files."""
    run = tmp_path / "mine"
    run.mkdir()
    (run / "model.pt").write_bytes(b"the user's own model")
    (run / "notes.txt").write_text("notes")
    (run / ".ipynb_checkpoints").mkdir()  # hidden: no one's files
    config = train_config(store, iterations=3)
    code = main(["train", str(config.path), "--out", str(run), *resume])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "holds files but no geodnn training run (model.pt, notes.txt)" in err
    assert "--overwrite to write the run beside them" in err
    assert sorted(p.name for p in run.iterdir()) == [".ipynb_checkpoints", "model.pt", "notes.txt"]
    assert (run / "model.pt").read_bytes() == b"the user's own model"


def test_validation_reads_only_the_scored_tiles_and_their_neighbours(
    tmp_path, store, train_config, monkeypatch
):
    """The whole validation split was loaded into memory though val_tiles are scored: a 16k
    scene's 4,900 validation tiles took +0.4 GB of training memory."""
    from pipelines.train import build_setup

    setup = build_setup(train_config(store), tmp_path / "run")
    val = setup.val_data
    assert not val.tiles.in_memory and len(val) > 4
    reads: list[int] = []
    original = val.tiles.store.images
    monkeypatch.setattr(val.tiles.store, "images", lambda i: reads.extend(i) or original(i))
    for _ in range(2):  # two epochs: the tiles read are kept
        validate(setup.model, val, setup.class_weights, 4)
    scored = [(int(r), int(c)) for r, c, _, _ in val.windows[:4]]
    near = {
        int(val.tiles.tiles[p])
        for p, (r, c, _, _) in enumerate(val.windows)
        if any(abs(int(r) - r0) <= 64 and abs(int(c) - c0) <= 64 for r0, c0 in scored)
    }
    assert len(reads) == len(set(reads)) and set(reads) <= near


def several_stores_config(train_config, stores, solver="adam", iterations=6):
    """A tiny training config whose [data] store lists `stores`."""
    config = train_config(stores[0], solver=solver, iterations=iterations)
    listed = ", ".join(f'"{s}"' for s in stores)
    text = config.path.read_text().replace(f'store = "{stores[0]}"', f"store = [{listed}]")
    config.path.write_text(text)
    return load_config(config.path)


def test_a_run_trains_on_several_stores_as_one_set(tmp_path, store, other_store, train_config):
    from pipelines.datasets import pooled_band_stats
    from pipelines.train import build_setup

    config = several_stores_config(train_config, [store, other_store])
    run = tmp_path / "run"
    assert main(["train", str(config.path), "--out", str(run)]) == 0
    ckpt = geodnn.load_checkpoint(run / "model.pt")
    shapes = [r["scene_shape"] for r in ckpt.metadata["training_split"]]
    assert shapes == [[320, 320], [256, 320]]  # evaluate finds each scene's held-out region
    parts = [StoreBatches(p, split="train") for p in (store, other_store)]
    mean, std = pooled_band_stats(parts)
    torch.testing.assert_close(ckpt.model.band_mean.double().flatten(), torch.from_numpy(mean))
    torch.testing.assert_close(ckpt.model.band_std.double().flatten(), torch.from_numpy(std))
    assert not np.allclose(mean, parts[0].band_mean)  # not the first store's alone
    saved = (run / "config.toml").read_text()
    assert str(store) in saved and str(other_store) in saved
    record = json.loads((run / "store.json").read_text())  # each store's hash, in order
    assert list(record["stores"]) == [str(store), str(other_store)]
    setup = build_setup(config, run)
    cropped = [StoreBatches(p, split="train", crop=32) for p in (store, other_store)]
    assert len(setup.train_data) == sum(map(len, cropped))
    assert len(setup.val_data) == sum(len(StoreBatches(p, "val")) for p in (store, other_store))
    assert [len(s) for s in setup.stores.scored_labels(4)] == [2, 2]  # val_tiles span both
    swapped = several_stores_config(train_config, [other_store, store], iterations=9)
    assert main(["train", str(swapped.path), "--out", str(run), "--resume"]) == 2  # other data


def test_several_stores_resume_and_refuse_a_changed_one(
    tmp_path, store, other_store, train_config, capsys
):
    import shutil

    import zarr

    copy = tmp_path / "north.zarr"
    shutil.copytree(other_store, copy)
    run = tmp_path / "run"
    config = several_stores_config(train_config, [store, copy], iterations=3)
    assert main(["train", str(config.path), "--out", str(run)]) == 0
    more = several_stores_config(train_config, [store, copy], iterations=6)
    assert main(["train", str(more.path), "--out", str(run), "--resume"]) == 0
    zarr.open_group(str(copy), mode="r+").attrs["scene_path"] = "/elsewhere/north.tif"
    longer = several_stores_config(train_config, [store, copy], iterations=9)
    code = main(["train", str(longer.path), "--out", str(run), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith(f"geodnn: error: {copy}: the tile store changed since")


def test_a_one_store_list_is_that_store_and_val_tiles_should_reach_every_store(
    tmp_path, store, other_store, train_config, capsys
):
    run = tmp_path / "run"
    assert main(["train", str(train_config(store, iterations=3).path), "--out", str(run)]) == 0
    listed = several_stores_config(train_config, [store], iterations=6)  # store = ["..."]
    assert main(["train", str(listed.path), "--out", str(run), "--resume"]) == 0
    few = several_stores_config(train_config, [store, other_store], iterations=3)
    few.path.write_text(few.path.read_text().replace("val_tiles = 4", "val_tiles = 1"))
    with pytest.warns(UserWarning, match=r"val_tiles = 1 scores the validation tiles of 1 of"):
        assert main(["train", str(few.path), "--out", str(tmp_path / "few")]) == 0


@pytest.mark.parametrize(
    ("listed", "refusal"),
    [
        ("[]", "store must be a path or a list of paths"),
        ('["{a}", 3]', "store must be a path or a list of paths"),
        ('["{a}", "{a}"]', "lists {a} more than once"),
        ('["{a}", " "]', "store must be a path or a list of paths"),
    ],
)
def test_a_bad_list_of_stores_is_refused_in_one_line(tmp_path, store, listed, refusal, capsys):
    path = tmp_path / "job.toml"
    path.write_text(f"[data]\nstore = {listed.format(a=store)}\n")
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and refusal.format(a=store) in err[0]
    assert not (tmp_path / "run").exists()


def test_a_run_folder_another_command_writes_is_refused_and_its_stores_kept(
    tmp_path, store, train_config, capsys, monkeypatch
):
    """Two trainings into one folder mixed their files; `geodnn tile --overwrite` of a store
    a training read swapped its scene under it. Each is held now (flock: a second open file
    of this process conflicts as another process's would)."""
    from pipelines.tile import build_store
    from pipelines.train import HELD_RUN_ENV
    from tiles.errors import TilesError
    from tiles.scratch import using
    from tiles.store import TileStore

    config = train_config(store, iterations=3)
    run = tmp_path / "run"
    with using(run.resolve(), exclusive=True):  # another command writing the run folder
        assert main(["train", str(config.path), "--out", str(run)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"geodnn: error: {run}: another geodnn command is writing this run folder; wait "
            "for it to end, or pick another --out"
        )
        assert not run.exists()
        monkeypatch.setenv(HELD_RUN_ENV, str(run.resolve()))  # a launcher's rank: held for it
        assert main(["train", str(config.path), "--out", str(run)]) == 0
    monkeypatch.delenv(HELD_RUN_ENV)
    with using(store):  # a training reading the store: a rebuild over it is refused
        scene = TileStore.open(store).scene_path
        with pytest.raises(
            TilesError, match=f"^{store}: another geodnn command is using this store"
        ):
            build_store(scene, scene.with_name("roads.tif"), store, tile=64, gap=16, overwrite=True)
    with using(store, exclusive=True):  # a rebuild replacing it: training waits for it
        assert main(["train", str(config.path), "--out", str(run), "--overwrite"]) == 2
        assert f"{store}: `geodnn tile` is replacing this store" in capsys.readouterr().err


def test_a_training_started_during_a_rebuild_is_refused_and_the_rebuild_lands(
    tmp_path, store, train_config, capsys, monkeypatch
):
    """The rebuild held the store only for its final swap: a training that started mid-build
    made the swap fail and the finished build was thrown away."""
    import shutil

    import pipelines.tile
    import tiles.store
    from tiles.store import TileStore

    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    config = train_config(copy, iterations=3)
    codes, real = [], tiles.store._write_tiles

    def write_then_train(*args, **kwargs):
        written = real(*args, **kwargs)
        codes.append(main(["train", str(config.path), "--out", str(tmp_path / "run")]))
        return written

    monkeypatch.setattr(tiles.store, "_write_tiles", write_then_train)
    scene = TileStore.open(copy).scene_path
    pipelines.tile.build_store(
        scene, scene.with_name("roads.tif"), copy, tile=32, gap=16, overwrite=True
    )
    assert codes == [2] and "`geodnn tile` is replacing this store" in capsys.readouterr().err
    assert TileStore.open(copy).tile_size == 32  # the rebuild landed


def test_evaluate_warns_where_another_of_the_model_s_stores_trained(
    tmp_path, store, overlapping_store, train_config
):
    """Overlapping scenes: the west crop's validation columns are the other crop's training
    ones, so its 'held-out' score counts pixels the model learned through the other store."""
    import warnings

    from pipelines.evaluate import evaluate_scene
    from tiles.store import TileStore

    config = several_stores_config(train_config, [store, overlapping_store], iterations=3)
    with pytest.warns(UserWarning, match="validation region lies partly on ground"):
        train(config, tmp_path / "run", progress=False)
    model = tmp_path / "run" / "model.pt"
    west = TileStore.open(overlapping_store).scene_path
    with pytest.warns(UserWarning, match=r"through another of its stores \(image.tif\)"):
        evaluate_scene(model, west, west.with_name("roads.tif"), region="validation")
    east = TileStore.open(store).scene_path
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # its validation columns: no store's
        evaluate_scene(model, east, east.with_name("roads.tif"), region="validation")
