import json
import logging
import os
import shutil

import pytest
import rasterio
from rasterio.windows import Window

import pipelines.cli
import pipelines.run
import pipelines.train
from geodnn.errors import DivergenceError
from pipelines.cli import main
from pipelines.config import load_config
from pipelines.errors import PipelineError
from pipelines.run import Pipeline, RunFolder, run_pipeline


@pytest.fixture(scope="module")
def atlanta_crop(data_dir, tmp_path_factory):
    """A 320x320 crop of the Atlanta buildings scene (one band)."""
    root = tmp_path_factory.mktemp("atlanta")
    with rasterio.open(data_dir / "atlanta-buildings" / "image.tif") as src:
        window = Window(300, 300, 320, 320)
        profile = src.profile | {
            "width": 320,
            "height": 320,
            "transform": src.window_transform(window),
        }
        with rasterio.open(root / "image.tif", "w", **profile) as dst:
            dst.write(src.read(window=window))
    return root / "image.tif"


@pytest.fixture(scope="module")
def pipeline_config(data_dir, atlanta_crop):
    """A pipeline config on a 320x320 crop of the Atlanta buildings scene, Adam, few iterations."""
    root = atlanta_crop.parent
    labels = data_dir / "atlanta-buildings" / "buildings.geojson"
    config = root / "atlanta.toml"
    config.write_text(
        f'[scene]\nimage = "image.tif"\nlabels = "{labels}"\n'
        "[tile]\ntile = 64\ngap = 16\n[data]\ncrop = 32\nval_tiles = 4\n"
        "[model]\ndepth = 2\nwidth = 4\ndilations = [1, 2]\n"
        '[train]\nsolver = "adam"\niterations = 4\nepoch = 2\nbatch_size = 4\n'
        "[predict]\nchunk = 128\n"
    )
    return config


def steps(run_dir):
    return json.loads((run_dir / "steps.json").read_text())


@pytest.mark.slow
def test_pipeline_runs_end_to_end_and_reruns_are_idempotent(pipeline_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out, as users type it
    run_dir = tmp_path / "run"
    assert main(["run", str(pipeline_config), "--out", "run"]) == 0
    expected = [
        "tiles.zarr",
        "train-adam/model.pt",
        "train-adam/metrics.csv",
        "train-adam/curves.png",
        "evaluation.json",
        "map/classes.tif",
        "map/probabilities.tif",
        "map/polygons.gpkg",
        "map/polygons.qml",
        "overlay.png",
        "comparison.png",
        "report.md",
        "report.html",
    ]
    for name in expected:
        assert (run_dir / name).exists(), name
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["adam"]["region"] == "validation"
    report = (run_dir / "report.md").read_text()
    assert "IoU buildings" in report and "map/polygons.gpkg" in report
    first = steps(run_dir)

    assert main(["run", str(pipeline_config), "--out", str(run_dir)]) == 0
    assert steps(run_dir) == first  # nothing redone

    text = pipeline_config.read_text().replace("chunk = 128", "chunk = 96")
    pipeline_config.write_text(text)
    assert main(["run", str(pipeline_config), "--out", str(run_dir)]) == 0
    again = steps(run_dir)
    assert again["train"] == first["train"] and again["tile"] == first["tile"]
    assert again["predict"]["fingerprint"] != first["predict"]["fingerprint"]

    sentinel = run_dir / "map" / "classes.tif"
    sentinel.write_bytes(b"stale")
    keep = run_dir / "notes.txt"
    keep.write_text("the user's own file")
    assert main(["run", str(pipeline_config), "--out", str(run_dir), "--force"]) == 0
    with rasterio.open(sentinel) as src:  # redone, not the stale bytes
        assert src.count == 1
    assert keep.read_text() == "the user's own file"


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_a_folder_that_holds_files_but_no_run_is_refused(pipeline_config, tmp_path, capsys, force):
    """A run would overwrite a user's report.md or map/classes.tif; --force would remove them."""
    (tmp_path / "report.md").write_text("precious")
    assert main(["run", str(pipeline_config), "--out", str(tmp_path), *force]) == 2
    assert "holds files but no geodnn run" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_missing_labels_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('[scene]\nimage = "nope.tif"\n')
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "labels is not set" in capsys.readouterr().err


def tiny_config(folder, image, labels, compare='["admm"]', predict="", extra=""):
    """A config file in `folder`: adam and admm (compare), 4 iterations in epochs of 2."""
    path = folder / "tiny.toml"
    path.write_text(
        f'[scene]\nimage = "{image}"\nlabels = "{labels}"\n'
        "[tile]\ntile = 64\ngap = 16\n[data]\ncrop = 32\nval_tiles = 2\n"
        "[model]\ndepth = 2\nwidth = 4\ndilations = [1, 2]\n"
        f'[train]\nsolver = "adam"\ncompare = {compare}\niterations = 4\nepoch = 2\n'
        f"batch_size = 4\n[predict]\nchunk = 128\ncog = false\n{predict}{extra}"
    )
    return path


@pytest.fixture
def tiny(data_dir, atlanta_crop, tmp_path):
    """Factory: tiny_config on the Atlanta crop, written to the test's folder."""
    labels = data_dir / "atlanta-buildings" / "buildings.geojson"
    return lambda **kwargs: tiny_config(tmp_path, atlanta_crop, labels, **kwargs)


def spy_on_training(monkeypatch) -> list[tuple[str, bool, bool]]:
    """Record (solver, resume, overwrite) of every pipelines.train.train call."""
    calls, real = [], pipelines.train.train

    def spy(config, run_dir, resume=False, overwrite=False, progress=True):
        calls.append((config.solver, resume, overwrite))
        return real(config, run_dir, resume=resume, overwrite=overwrite, progress=progress)

    monkeypatch.setattr(pipelines.train, "train", spy)
    return calls


def metrics_iterations(run_dir):
    lines = (run_dir / "metrics.csv").read_text().splitlines()[1:]
    return [int(float(line.split(",")[0])) for line in lines]


def test_rerun_keeps_a_finished_solver_and_resumes_the_interrupted_one(tiny, tmp_path, monkeypatch):
    config, run_dir = load_config(tiny()), tmp_path / "run"
    real_end_epoch = pipelines.train.end_epoch

    def interrupted(setup, solver, *args, **kwargs):
        if setup.solver_name == "admm" and solver.iteration >= 4:
            raise KeyboardInterrupt  # as Ctrl-C in admm's second epoch
        return real_end_epoch(setup, solver, *args, **kwargs)

    monkeypatch.setattr(pipelines.train, "end_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config, run_dir)
    monkeypatch.setattr(pipelines.train, "end_epoch", real_end_epoch)
    adam_model = run_dir / "train-adam" / "model.pt"
    finished = (adam_model.read_bytes(), adam_model.stat().st_mtime_ns)
    assert not (run_dir / "train-admm" / "model.pt").exists()

    calls = spy_on_training(monkeypatch)
    run_pipeline(load_config(tiny()), run_dir)
    assert calls == [("admm", True, False)]  # adam kept, admm resumed
    assert (adam_model.read_bytes(), adam_model.stat().st_mtime_ns) == finished
    assert metrics_iterations(run_dir / "train-admm") == [2, 4]
    assert steps(run_dir)["train"]["outputs"] == ["train-adam/model.pt", "train-admm/model.pt"]

    calls.clear()  # a changed adam table retrains adam alone
    run_pipeline(load_config(tiny(extra="[adam]\nslots = 2\n")), run_dir)
    assert calls == [("adam", False, True)]


def test_a_rebuilt_tile_store_retrains_the_solvers(data_dir, atlanta_crop, tmp_path, monkeypatch):
    image = shutil.copy(atlanta_crop, tmp_path / "image.tif")
    labels = data_dir / "atlanta-buildings" / "buildings.geojson"
    config = tiny_config(tmp_path, image, labels, compare="[]", predict="vectors = false\n")
    run_pipeline(load_config(config), tmp_path / "run")
    stat = os.stat(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the scene was replaced
    calls = spy_on_training(monkeypatch)
    run_pipeline(load_config(config), tmp_path / "run")
    assert calls == [("adam", False, True)]  # not kept: it learnt from the old scene


@pytest.mark.parametrize(
    "old, new, message",
    [
        ('compare = ["admm"]', 'compare = ["pipeline"]', "'pipeline' needs several workers"),
        ('solver = "adam"', 'solver = "pipeline"', "--solver pipeline --workers N"),
        ('compare = ["admm"]', 'compare = ["sgd"]', "must list solver names from"),
        ('compare = ["admm"]', 'compare = "adam"', "compare must be a list"),
        ("[predict]", "[parallel]\nworkers = 2\n[predict]", "set workers = 1, or train on"),
    ],
    ids=["compare-pipeline", "solver-pipeline", "compare-unknown", "compare-string", "workers"],
)
def test_run_refuses_solvers_it_cannot_train_before_any_work(
    tiny, tmp_path, capsys, old, new, message
):
    config = tmp_path / "bad.toml"
    config.write_text(tiny().read_text().replace(old, new))
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and str(config) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing tiled, nothing trained


def test_rerun_removes_outputs_the_config_turned_off(tiny, tmp_path):
    run_dir = tmp_path / "run"
    run_pipeline(load_config(tiny(compare="[]")), run_dir)
    assert (run_dir / "map" / "probabilities.tif").exists()
    assert (run_dir / "map" / "polygons.qml").exists()

    off = tiny(compare="[]", predict="probabilities = false\nvectors = false\n")
    run_pipeline(load_config(off), run_dir)
    names = [p.name for p in (run_dir / "map").iterdir()]
    assert [n for n in names if not n.startswith("classes.tif.")] == ["classes.tif"]  # + sidecars
    assert steps(run_dir)["predict"]["outputs"] == ["map/classes.tif"]
    report = (run_dir / "report.md").read_text() + (run_dir / "report.html").read_text()
    assert "probabilities.tif" not in report and "polygons" not in report


def test_a_deleted_output_is_made_again_by_its_step_alone(tiny, tmp_path):
    """A step whose recorded output is gone is not up to date: a rerun redoes it (and the
    steps after it), not reports it skipped and links a missing map."""
    run_dir = tmp_path / "run"
    run_pipeline(load_config(tiny(compare="[]")), run_dir)
    (run_dir / "map" / "classes.tif").unlink()
    again = run_pipeline(load_config(tiny(compare="[]")), run_dir)
    assert (run_dir / "map" / "classes.tif").exists()
    assert "predict" in again.ran and "train" not in again.ran and "tile" not in again.ran


def test_a_divergence_exits_3_with_the_fix_that_works_in_run(tiny, tmp_path, capsys):
    config, run_dir = tiny(compare="[]", extra="[adam]\nlr = 1e6\n"), tmp_path / "run"
    assert main(["run", str(config), "--out", str(run_dir), "--iterations", "4"]) == 3
    [err] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    err = err[err.index("geodnn: error:") :]  # after the progress bar's last redraw
    assert err.startswith(f"geodnn: error: {run_dir / 'train-adam'}: training diverged")
    assert f"lower [adam] lr in {config}" in err and "--resume" not in err
    assert f"`geodnn run {config} --out {run_dir} --iterations 4`" in err  # the override too
    assert err.endswith("which starts it again")  # diverged before its first checkpoint


def diverge_after_first_epoch(monkeypatch, solver: str) -> None:
    """`solver` diverges in its second epoch, as `geodnn train` reports it."""
    real_end_epoch = pipelines.train.end_epoch

    def diverging(setup, solver_, *args, **kwargs):
        if setup.solver_name == solver and solver_.iteration >= 4:
            raise DivergenceError(
                f"training diverged at iteration {solver_.iteration} (loss 1e9; best 0.5)",
                "the last good checkpoint is kept: lower the step size and rerun with --resume",
            )
        return real_end_epoch(setup, solver_, *args, **kwargs)

    monkeypatch.setattr(pipelines.train, "end_epoch", diverging)


def test_lowering_the_step_size_after_a_divergence_resumes_from_the_checkpoint(
    tiny, tmp_path, monkeypatch, capsys, caplog
):
    run_dir = tmp_path / "run"
    diverge_after_first_epoch(monkeypatch, "adam")
    assert main(["run", str(tiny()), "--out", str(run_dir)]) == 3
    err = capsys.readouterr().err
    assert "diverged at iteration 4 (loss 1e9; best 0.5); lower [adam] lr in" in err
    assert "--resume" not in err  # `geodnn train`'s fix, which does not work here
    assert "which continues it from its last good checkpoint" in err
    monkeypatch.undo()

    calls = spy_on_training(monkeypatch)  # a lower lr: adam resumes, admm trains
    run_pipeline(load_config(tiny(extra="[adam]\nlr = 0.001\n")), run_dir)
    assert calls == [("adam", True, False), ("admm", False, True)]
    assert metrics_iterations(run_dir / "train-adam") == [2, 4]
    assert "lr = 0.001" in (run_dir / "train-adam" / "config.toml").read_text()

    calls.clear()  # finished: another lr keeps it, with a warning (a tuning knob, not a new run)
    model = run_dir / "train-adam" / "model.pt"
    finished = model.stat().st_mtime_ns
    run_pipeline(load_config(tiny(extra="[adam]\nlr = 0.0005\n")), run_dir)
    assert calls == [] and model.stat().st_mtime_ns == finished
    assert "holds a finished run, kept; changed settings ([adam] lr)" in caplog.text

    calls.clear()  # a shared tuning knob keeps both finished solvers
    text = tiny(extra="[adam]\nlr = 0.0005\n").read_text()
    tuned = tmp_path / "tuned.toml"
    tuned.write_text(text.replace("batch_size = 4", "batch_size = 4\ndivergence_factor = 50.0"))
    run_pipeline(load_config(tuned), run_dir)
    assert calls == []


def test_a_damaged_training_folder_gets_run_s_own_fix(tiny, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    diverge_after_first_epoch(monkeypatch, "adam")  # leaves adam's state of iteration 2
    assert main(["run", str(tiny()), "--out", str(run_dir)]) == 3
    monkeypatch.undo()
    (run_dir / "train-adam" / "metrics.csv").unlink()
    capsys.readouterr()
    assert main(["run", str(tiny()), "--out", str(run_dir)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"geodnn: error: {run_dir / 'train-adam' / 'metrics.csv'}: missing")
    assert error.endswith(f"remove {run_dir / 'train-adam'} to train adam again")
    assert "--overwrite" not in error  # `geodnn train`'s fix; `geodnn run` has none


def test_dropping_a_solver_from_compare_removes_its_training_folder(tiny, tmp_path):
    run_dir = tmp_path / "run"
    run_pipeline(load_config(tiny()), run_dir)
    assert (run_dir / "train-admm" / "model.pt").exists()

    run_pipeline(load_config(tiny(compare="[]")), run_dir)
    assert not (run_dir / "train-admm").exists()
    assert steps(run_dir)["train"]["outputs"] == ["train-adam/model.pt"]
    assert list(json.loads((run_dir / "evaluation.json").read_text())) == ["adam"]
    assert "train-admm" not in (run_dir / "report.md").read_text()

    run_pipeline(load_config(tiny()), run_dir)  # back, with a file of the user's in its folder
    (run_dir / "train-admm" / "notes.txt").write_text("mine")
    run_pipeline(load_config(tiny(compare="[]")), run_dir)
    assert [p.name for p in (run_dir / "train-admm").iterdir()] == ["notes.txt"]


def test_force_removes_the_run_s_files_and_keeps_the_user_s(tiny, tmp_path):
    run_dir = tmp_path / "run"
    run_pipeline(load_config(tiny(compare="[]")), run_dir)
    (run_dir / "train-adam" / "NOTES.txt").write_text("mine")
    (run_dir / "map" / "my_style.qml").write_text("mine")
    run_pipeline(load_config(tiny(compare="[]")), run_dir, force=True)
    assert (run_dir / "train-adam" / "NOTES.txt").read_text() == "mine"
    assert (run_dir / "map" / "my_style.qml").read_text() == "mine"
    assert (run_dir / "train-adam" / "model.pt").exists() and (
        run_dir / "map" / "classes.tif"
    ).exists()


def test_a_rerun_interrupted_before_its_report_redoes_the_report_next_time(
    tiny, tmp_path, monkeypatch
):
    """The report depends on the steps before it: their new records make its own stale."""
    run_dir = tmp_path / "run"
    run_pipeline(load_config(tiny(compare="[]")), run_dir)
    assert "polygons" in (run_dir / "report.md").read_text()

    def interrupted(p):
        raise KeyboardInterrupt

    monkeypatch.setitem(pipelines.run.ACTIONS, "report", interrupted)
    off = load_config(tiny(compare="[]", predict="vectors = false\n"))
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(off, run_dir)
    monkeypatch.undo()
    run_pipeline(off, run_dir)
    assert "polygons" not in (run_dir / "report.md").read_text()


def test_editing_a_shapefile_s_attributes_alone_redoes_the_tiles(data_dir, atlanta_crop, tmp_path):
    """QGIS saves an attribute edit to the .dbf only; the .shp keeps its size and time."""
    import geopandas as gpd

    labels = tmp_path / "roofs.shp"
    gpd.read_file(data_dir / "atlanta-buildings" / "buildings.geojson").to_file(labels)
    pipeline = Pipeline(
        load_config(tiny_config(tmp_path, atlanta_crop, labels)), RunFolder(tmp_path)
    )
    before = pipeline.fingerprint("tile")
    dbf = labels.with_suffix(".dbf")
    os.utime(dbf, ns=(dbf.stat().st_atime_ns, dbf.stat().st_mtime_ns + 10**9))
    assert pipeline.fingerprint("tile") != before


@pytest.mark.parametrize(
    ("split", "said"),
    [("columns:1.0", "leaves no validation region"), ("cols:0.7", "split 'cols:0.7' is not")],
)
def test_a_bad_split_is_refused_before_any_work_naming_the_config(tiny, tmp_path, split, said):
    path = tiny()
    path.write_text(path.read_text().replace("[tile]\n", f'[tile]\nsplit = "{split}"\n'))
    config = load_config(path)
    with pytest.raises(PipelineError, match=rf"tiny.toml: \[tile\] .*{said}"):
        run_pipeline(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_chunk_too_small_for_the_model_is_refused_before_any_work(tiny, tmp_path):
    """At depth 256 the shipped chunk of 512 failed at evaluation, after tiling and training."""
    path = tiny()
    path.write_text(path.read_text().replace("depth = 2\n", "depth = 100\n"))  # radius 151
    with pytest.raises(PipelineError, match=r"tiny.toml: \[predict\] chunk = 128 cannot .* 151 "):
        run_pipeline(load_config(path), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_run_folder_last_run_with_another_config_is_warned_of(tiny, tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_pipeline(load_config(tiny(compare="[]")), run_dir)
    other = tmp_path / "other.toml"
    other.write_text(tiny(compare="[]").read_text())
    with caplog.at_level(logging.WARNING, logger="pipelines.run"):
        run_pipeline(load_config(other), run_dir)
    assert f"last run with {tmp_path / 'tiny.toml'}; this run with" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines.run"):
        run_pipeline(load_config(other), run_dir)  # its own folder now: nothing to say
    assert "last run with" not in caplog.text


def test_a_class_without_training_pixels_is_warned_of_once(
    data_dir, atlanta_crop, tmp_path, caplog
):
    """The tile step says so where the fix (another split) is; training the store it just
    built said it again in other words."""
    import warnings

    import geopandas as gpd

    with rasterio.open(atlanta_crop) as src:
        crs, bounds = src.crs, src.bounds
    frame = gpd.read_file(data_dir / "atlanta-buildings" / "buildings.geojson").to_crs(crs)
    right = bounds.left + 0.8 * (bounds.right - bounds.left)  # beyond the training columns
    frame[frame.bounds.minx > right].to_file(tmp_path / "right.gpkg")
    config = tiny_config(tmp_path, atlanta_crop, tmp_path / "right.gpkg")

    def run_and_collect(*extra: str) -> list[str]:
        """What the run warned: through logging (main's captureWarnings), or to the warnings
        module where an earlier main() of this process left logging's capture unhooked."""
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["run", str(config), "--out", str(tmp_path / "run"), *extra]) == 0
        return [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]

    said = run_and_collect()
    assert len([m for m in said if "no labeled pixels in the training" in m]) == 1
    assert not [m for m in said if "have no training pixels" in m]
    said = run_and_collect("--iterations", "6")  # a store kept: training says it
    assert [m for m in said if "have no training pixels" in m]


def test_a_store_in_a_run_config_is_warned_of_as_unused(tmp_path):
    """`geodnn run` tiles [scene] image itself; a [data] store there is never read."""
    path = tmp_path / "job.toml"
    path.write_text('[data]\nstore = ["a.zarr", "b.zarr"]\n')  # and no [scene] image
    unused = r"job.toml: \[data\] store is not used by `geodnn run`"
    no_image = r"\[scene\] image is not set"
    with pytest.warns(UserWarning, match=unused), pytest.raises(PipelineError, match=no_image):
        run_pipeline(load_config(path), tmp_path / "run")


def test_a_second_run_in_a_run_folder_in_use_is_refused(tiny, tmp_path):
    """Two `geodnn run` at once in one folder: the second removed the first's temporary file
    mid-write (a traceback); now it is refused before it touches anything."""
    from tiles.scratch import using

    run_dir = tmp_path / "run"
    with using(run_dir, exclusive=True), pytest.raises(PipelineError, match="another geodnn"):
        run_pipeline(load_config(tiny(compare="[]")), run_dir)
    assert not run_dir.exists()


def test_a_run_folder_holding_only_a_store_s_lock_file_is_no_one_s_data(tmp_path):
    """A training's lock file beside the run's store outlived the run's files: every rerun,
    --force too, was refused for 'holds files but no geodnn run'."""
    from pipelines.run import RunFolder, check_run_folder

    root = tmp_path / "run"
    root.mkdir()
    (root / ".tiles.zarr.in-use.lock").touch()
    check_run_folder(RunFolder(root))
    (root / "notes.txt").touch()
    with pytest.raises(PipelineError, match="holds files but no geodnn run"):
        check_run_folder(RunFolder(root))


def test_a_missing_scene_or_store_is_refused_before_a_run_folder_is_made(tmp_path, capsys):
    path = tmp_path / "job.toml"
    path.write_text('[scene]\nimage = "gone.tif"\nlabels = "gone.geojson"\n')
    with pytest.raises(PipelineError, match=r"gone.tif: scene not found; check \[scene\] image"):
        run_pipeline(load_config(path), tmp_path / "a" / "b" / "run")
    path.write_text('[data]\nstore = "gone.zarr"\n')
    assert pipelines.cli.main(["train", str(path), "--out", str(tmp_path / "a" / "run")]) == 2
    assert "gone.zarr: tile store not found" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
