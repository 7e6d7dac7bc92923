import sqlite3
import subprocess
import sys
import warnings

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import torch
from rasterio.crs import CRS
from rasterio.windows import Window

from geodnn import Checkpoint, build_model, save_checkpoint
from pipelines.cli import main
from pipelines.predict import ModelPredictor, iter_predictions, predict_scene
from tiles.raster import read_window

CLASSES = ["background", "road", "roof"]


def small_model(bands: int = 1):
    """Three classes, receptive radius 8 (dilations 1, 2, 4): fast, with a real halo."""
    torch.manual_seed(0)
    return build_model(bands, 3, depth=3, width=4, dilations=(1, 2, 4), init="kaiming", seed=1)


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(small_model(), path, class_names=CLASSES)
    return path


def read_scene(path) -> np.ndarray:
    with rasterio.open(path) as src:
        return read_window(src, Window(0, 0, src.width, src.height))


def whole_image(model, scene: np.ndarray) -> np.ndarray:
    """The reference: the model on the whole reflect-padded scene, no chunks."""
    r = model.receptive_radius
    padded = np.pad(scene, ((0, 0), (r, r), (r, r)), mode="reflect")
    return ModelPredictor(model)(padded[None])[0]


def chunked(model, path, chunk, batch=1):
    """Stitch the streamed chunk predictions in memory (test only)."""
    with rasterio.open(path) as src:
        h, w = src.height, src.width
    classes = np.full((h, w), 254, dtype=np.uint8)
    probs = np.full((3, h, w), -1.0, dtype=np.float32)
    ckpt = Checkpoint(model, {"class_names": CLASSES})
    for p in iter_predictions(ckpt, path, chunk=chunk, batch=batch):
        rs = slice(p.window.row_off, p.window.row_off + p.window.height)
        cs = slice(p.window.col_off, p.window.col_off + p.window.width)
        classes[rs, cs] = p.classes
        probs[:, rs, cs] = np.nan if p.probabilities is None else p.probabilities
    return classes, probs


def assert_seam_free(model, path, chunk, batch=1):
    scene = read_scene(path)
    model.set_normalization(np.nanmean(scene, axis=(1, 2)), np.nanstd(scene, axis=(1, 2)))
    expected = whole_image(model, scene)
    classes, probs = chunked(model, path, chunk, batch)
    valid = ~np.isnan(scene).all(axis=0)
    assert np.abs(probs[:, valid] - expected[:, valid]).max() <= 1e-5
    assert np.array_equal(classes[valid], expected.argmax(0)[valid])
    assert (classes[~valid] == 255).all() and np.isnan(probs[:, ~valid]).all()


@pytest.mark.parametrize(
    "scene, bands, chunk",
    [
        ("vegas-roads", 1, 512),
        ("vegas-roads", 1, 333),
        ("atlanta-buildings", 1, 256),
        ("atlanta-buildings", 1, 97),
        ("naip-4band", 4, 200),
        ("naip-4band", 4, 1000),
    ],
)
def test_chunked_equals_whole_image_on_real_scenes(data_dir, scene, bands, chunk):
    assert_seam_free(small_model(bands), data_dir / scene / "image.tif", chunk, batch=2)


@pytest.mark.parametrize(
    "shape, chunk", [((1, 1), 8), ((1, 1), 512), ((7, 1000), 8), ((7, 1000), 100),
                     ((1001, 999), 128), ((1001, 999), 512)]
)  # fmt: skip
def test_chunked_equals_whole_image_on_odd_scenes(make_geotiff, shape, chunk):
    rng = np.random.default_rng(3)
    scene = (rng.random((1, *shape)) * 1000).astype(np.uint16)
    assert_seam_free(small_model(), make_geotiff(scene), chunk, batch=3)


def test_nodata_is_honoured_and_empty_chunks_are_skipped(make_geotiff):
    scene = np.random.default_rng(1).integers(1, 500, (1, 64, 64)).astype(np.uint16)
    scene[:, :32, :32] = 0  # one whole chunk of nodata
    scene[:, 40:45, 50:52] = 0
    path = make_geotiff(scene, nodata=0)
    ckpt = Checkpoint(small_model(), {"class_names": CLASSES})
    predictions = list(iter_predictions(ckpt, path, chunk=32))
    assert sum(p.skipped for p in predictions) == 1
    assert_seam_free(small_model(), path, 32)


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def test_cli_writes_georeferenced_outputs(checkpoint, data_dir, tmp_path, capsys):
    scene = data_dir / "atlanta-buildings" / "image.tif"
    out, probs, gpkg = tmp_path / "classes.tif", tmp_path / "probs.tif", tmp_path / "polys.gpkg"
    argv = ["predict", checkpoint, scene, "--out", out, "--probabilities", probs]
    code, err = run_cli([*argv, "--vectors", gpkg, "--chunk", "256", "--min-area", "2"], capsys)
    assert code == 0, err
    with rasterio.open(scene) as src, rasterio.open(out) as c, rasterio.open(probs) as p:
        assert c.crs == src.crs == p.crs and c.transform == src.transform == p.transform
        assert c.bounds == src.bounds == p.bounds
        assert c.dtypes[0] == "uint8" and c.nodata == 255 and p.descriptions == tuple(CLASSES)
        assert (c.read(1)[src.read(1) == 0] == 255).all()
    info = pyogrio.read_info(gpkg, layer="classes")
    assert CRS.from_user_input(info["crs"]) == CRS.from_epsg(32616) and info["features"] > 0
    with sqlite3.connect(gpkg) as db:
        assert db.execute("SELECT count(*) FROM layer_styles").fetchone()[0] == 1
    assert gpkg.with_suffix(".qml").exists()
    # Rerun without --overwrite is refused and leaves the outputs untouched.
    before = out.read_bytes()
    code, err = run_cli([*argv, "--chunk", "256"], capsys)
    assert code == 2 and "--overwrite" in err and out.read_bytes() == before
    assert run_cli([*argv, "--overwrite", "--cog"], capsys)[0] == 0


def threshold_model():
    """Class 1 exactly where the input is 1 (and 0 where it is 0): a model with a known map."""
    model = build_model(1, 2, depth=0, width=1, seed=0)
    with torch.no_grad():
        stem, head = model.layers[0].conv, model.layers[1].conv
        stem.weight.zero_()
        stem.weight[0, 0, 1, 1] = 1.0
        stem.bias.zero_()
        head.weight.copy_(torch.tensor([0.0, 10.0]).view(2, 1, 1, 1))
        head.bias.copy_(torch.tensor([0.0, -5.0]))
    return model


def test_region_spanning_chunks_is_one_polygon_end_to_end(make_geotiff, tmp_path, capsys):
    scene = np.zeros((1, 48, 48), dtype=np.uint8)
    scene[0, 10:38, 6:40] = 1  # spans 3 x 3 chunks of 16 pixels
    scene[0, 44:46, 44:46] = 1  # a 1 m2 speck, below --min-area
    ckpt = tmp_path / "threshold.pt"
    save_checkpoint(threshold_model(), ckpt, class_names=["background", "roof"])
    gpkg = tmp_path / "v.gpkg"
    argv = ["predict", ckpt, make_geotiff(scene), "--out", tmp_path / "c.tif", "--chunk", "16"]
    code, err = run_cli([*argv, "--vectors", gpkg, "--min-area", "2"], capsys)
    assert code == 0, err
    with rasterio.open(tmp_path / "c.tif") as dst:
        assert np.array_equal(dst.read(1), scene[0])
    frame = gpd.read_file(gpkg, layer="classes")
    assert len(frame) == 1 and frame.class_name.tolist() == ["roof"]
    assert frame["area"].iloc[0] == pytest.approx(28 * 34 * 0.25)
    assert frame.geometry.iloc[0].equals(shapely.box(733604.0, 3725120.0, 733621.0, 3725134.0))


@pytest.mark.parametrize(
    "crs", ["EPSG:4326", 'LOCAL_CS["custom grid",UNIT["metre",1]]', CRS.from_proj4(
        "+proj=lcc +lat_1=45 +lat_2=50 +lat_0=47 +lon_0=10 +x_0=0 +y_0=0 +ellps=GRS80 +units=m"
    ).to_wkt()],
)  # fmt: skip
def test_crs_and_transform_are_kept_exactly(checkpoint, make_geotiff, tmp_path, crs):
    scene = np.random.default_rng(0).integers(0, 900, (1, 40, 50)).astype(np.uint16)
    path = make_geotiff(scene, crs=crs)
    predict_scene(checkpoint, path, tmp_path / "out.tif", chunk=16)
    with rasterio.open(path) as src, rasterio.open(tmp_path / "out.tif") as dst:
        assert dst.crs == src.crs and dst.crs.to_wkt() == src.crs.to_wkt()
        assert dst.transform == src.transform


def test_scene_without_crs_is_predicted_with_a_warning(checkpoint, make_geotiff, tmp_path):
    path = make_geotiff(np.ones((1, 20, 30), dtype=np.float32), crs=None)
    with pytest.warns(UserWarning, match="no CRS"):
        summary = predict_scene(checkpoint, path, tmp_path / "out.tif")
    with rasterio.open(tmp_path / "out.tif") as dst:
        assert dst.crs is None and (dst.read(1) != 255).all()
    assert len(summary.warnings) == 1 and "no CRS" in summary.warnings[0]  # shown, and listed


def test_the_summary_lists_squared_degree_areas(checkpoint, make_geotiff, tmp_path):
    path = make_geotiff(np.ones((1, 20, 30), dtype=np.float32), crs="EPSG:4326")
    with pytest.warns(UserWarning, match="squared degrees"):
        summary = predict_scene(checkpoint, path, tmp_path / "c.tif", vectors=tmp_path / "p.gpkg")
    assert len(summary.warnings) == 1 and "squared degrees" in summary.warnings[0]


def test_all_nodata_scene_gives_all_nodata_output(checkpoint, make_geotiff, tmp_path):
    path = make_geotiff(np.zeros((1, 70, 40), dtype=np.uint8), nodata=0)
    probs = tmp_path / "probs.tif"
    with pytest.warns(UserWarning, match="every pixel is nodata"):
        summary = predict_scene(
            checkpoint, path, tmp_path / "out.tif", probabilities=probs, chunk=32
        )
    assert summary.skipped == summary.chunks == 6
    assert any("every pixel is nodata" in w for w in summary.warnings)
    with rasterio.open(tmp_path / "out.tif") as dst, rasterio.open(probs) as p:
        assert (dst.read(1) == 255).all() and np.isnan(p.read()).all()


def _bad_inputs(tmp_path, make_geotiff):
    good = make_geotiff(np.ones((1, 30, 30), dtype=np.uint8), name="good.tif")
    text = tmp_path / "text.tif"
    text.write_text("not a raster at all")
    big = make_geotiff(np.random.default_rng(0).random((1, 300, 300), dtype=np.float32))
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    two_bands = make_geotiff(np.ones((2, 30, 30), dtype=np.uint8), name="two.tif")
    exists = tmp_path / "exists.tif"
    exists.write_bytes(b"old")
    out = tmp_path / "out" / "classes.tif"
    out.parent.mkdir()
    project = tmp_path / "project.gpkg"  # a user's GeoPackage with a layer of their own
    fields = gpd.GeoDataFrame({"name": ["a"]}, geometry=[shapely.box(0, 0, 1, 1)], crs=32611)
    fields.to_file(project, layer="my_fields")
    return {
        "missing": ([tmp_path / "nope.tif", "--out", out], "file not found"),
        "not a raster": ([text, "--out", out], "not a readable raster"),
        "truncated": ([truncated, "--out", out], "not a readable raster"),
        "bands": ([two_bands, "--out", out], "expects 1"),
        "no folder": ([good, "--out", tmp_path / "missing" / "c.tif"], "does not exist"),
        "exists": ([good, "--out", exists], "--overwrite"),
        "chunk": ([good, "--out", out, "--chunk", "4"], "--chunk 8"),
        "probs exist": ([good, "--out", out, "--probabilities", exists], "--overwrite"),
        "shapefile": ([good, "--out", out, "--vectors", out.with_suffix(".shp")], ".gpkg name"),
        # a GeoTIFF under another format's name would not open as that format
        "png": ([good, "--out", out.with_suffix(".png")], "give it a .tif name"),
        "no suffix": ([good, "--out", out, "--probabilities", out.parent / "p"], ".tif name"),
        "user gpkg": (
            [good, "--out", out, "--vectors", project],  # not "pass --overwrite" first
            "holds other layers (my_fields)",
        ),
        # outputs are committed by rename: the class map would replace the user's imagery
        "input": ([good, "--out", good, "--overwrite"], "is the input scene"),
        # one rename would silently win: the class map or the probabilities lost
        "same file": ([good, "--out", out, "--probabilities", out], "outputs must be different"),
    }


@pytest.mark.parametrize(
    "case",
    ["missing", "not a raster", "truncated", "bands", "no folder", "exists", "chunk",
     "probs exist", "shapefile", "png", "no suffix", "user gpkg", "input", "same file"],
)  # fmt: skip
def test_bad_input_gives_one_line_error_and_no_output(
    case, checkpoint, tmp_path, make_geotiff, capsys
):
    args, message = _bad_inputs(tmp_path, make_geotiff)[case]
    code, err = run_cli(["predict", checkpoint, *args], capsys)
    assert code == 2
    assert err.startswith("geodnn: error:") and "\n" not in err and message in err
    assert list((tmp_path / "out").iterdir()) == []
    assert sorted(p.name for p in tmp_path.glob(".*")) == []
    assert (tmp_path / "exists.tif").read_bytes() == b"old"
    with rasterio.open(tmp_path / "good.tif") as src:  # the scene is left as it was
        assert (src.read() == 1).all()


def test_a_block_damaged_inside_the_scene_is_one_line_through_dask(
    checkpoint, damaged_scene, tmp_path, capsys, caplog
):
    """Opening checks only the last block; a bad one inside came back from Dask as a bare
    Exception (rasterio's error, its context, cannot be pickled): a traceback and a 'Compute
    Failed' report per task in flight, exit 1."""
    scene, _ = damaged_scene
    out = tmp_path / "out"
    out.mkdir()
    code, err = run_cli(
        ["predict", checkpoint, scene, "--out", out / "c.tif", "--chunk", 64], capsys
    )
    said = [line for line in err.splitlines() if "chunk/s" not in line]  # not the progress bar
    assert code == 2 and len(said) == 1 and said[0].startswith("geodnn: error:")
    assert "damaged or unreadable at rows" in err and "IReadBlock failed" in err
    assert not [r for r in caplog.records if "Compute Failed" in r.getMessage()]
    assert list(out.iterdir()) == []


def test_a_scene_far_outside_the_training_values_is_warned_of(make_geotiff, tmp_path):
    """A model trained on 8-bit imagery mapped the same imagery stored as 16-bit (x256) to one
    class, silently."""
    import warnings

    image = np.random.default_rng(0).integers(20, 200, (1, 96, 96)).astype("uint8")
    model = small_model()
    model.set_normalization([float(image.mean())], [float(image.std())])
    ckpt = tmp_path / "m.pt"
    save_checkpoint(model, ckpt, class_names=CLASSES)
    same = make_geotiff(image)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        predict_scene(ckpt, same, tmp_path / "a.tif")
    wider = make_geotiff(image.astype("uint16") * 256)
    with pytest.warns(UserWarning, match=r"band 1's values \(median .*\) lie \d+ standard dev"):
        summary = predict_scene(ckpt, wider, tmp_path / "b.tif")
    assert any("standard deviations" in n for n in summary.warnings)
    flat = small_model()  # a band constant in training: its clamped std says nothing
    flat.set_normalization([100.0], [0.0])
    save_checkpoint(flat, ckpt, class_names=CLASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        predict_scene(ckpt, wider, tmp_path / "c.tif")


def test_failure_mid_run_leaves_no_partial_output(checkpoint, data_dir, tmp_path, monkeypatch):
    calls = []

    def failing(self, batch):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("model failed")
        return np.zeros((len(batch), 3, batch.shape[2] - 16, batch.shape[3] - 16), np.float32)

    monkeypatch.setattr(ModelPredictor, "__call__", failing)
    scene = data_dir / "atlanta-buildings" / "image.tif"
    with pytest.raises(RuntimeError, match="model failed"):
        predict_scene(
            checkpoint, scene, tmp_path / "c.tif", probabilities=tmp_path / "p.tif", chunk=128
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def in_process_cluster(threads: int):
    """A one-worker Dask cluster in this process, reached by address like a remote one."""
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=1, threads_per_worker=threads, processes=False, dashboard_address=None
    )


@pytest.mark.timeout(120)
def test_scheduler_option_uses_an_existing_cluster(checkpoint, make_geotiff, tmp_path, capsys):
    scene = np.random.default_rng(2).integers(0, 900, (1, 70, 90)).astype(np.uint16)
    path = make_geotiff(scene)
    with in_process_cluster(threads=2) as cluster:
        argv = ["predict", checkpoint, path, "--out", tmp_path / "c.tif", "--chunk", "32"]
        code, err = run_cli([*argv, "--scheduler", cluster.scheduler_address], capsys)
    assert code == 0, err
    expected = whole_image(small_model(), read_scene(path)).argmax(0)
    with rasterio.open(tmp_path / "c.tif") as dst:
        assert np.array_equal(dst.read(1), expected)


@pytest.mark.timeout(120)
def test_with_a_scheduler_the_workers_resolve_the_device(
    checkpoint, make_geotiff, tmp_path, capsys, monkeypatch
):
    """The model runs on the cluster's workers, so 'auto' and 'cuda' are resolved there, not
    by the client (which may have no GPU where the workers have one, or the reverse)."""
    path = make_geotiff(np.random.default_rng(4).integers(0, 900, (1, 40, 50)).astype(np.uint16))
    resolved = []
    monkeypatch.setattr(
        "pipelines.predict.resolve_device",
        lambda device, source: resolved.append((device, source)) or "cpu",
    )
    with in_process_cluster(threads=1) as cluster:
        argv = ["predict", checkpoint, path, "--out", tmp_path / "c.tif", "--chunk", "32"]
        code, err = run_cli([*argv, "--scheduler", cluster.scheduler_address], capsys)
    assert code == 0, err
    assert resolved and set(resolved) == {("auto", "the device (on a Dask worker)")}
    with rasterio.open(tmp_path / "c.tif") as dst:
        assert np.array_equal(dst.read(1), whole_image(small_model(), read_scene(path)).argmax(0))


@pytest.mark.timeout(120)
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_on_workers_without_a_gpu_is_a_one_line_error(
    checkpoint, make_geotiff, tmp_path, capsys
):
    path = make_geotiff(np.ones((1, 40, 50), dtype=np.uint16))
    with in_process_cluster(threads=1) as cluster:
        argv = ["predict", checkpoint, path, "--out", tmp_path / "c.tif", "--device", "cuda"]
        code, err = run_cli([*argv, "--scheduler", cluster.scheduler_address], capsys)
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert code == 2 and "on a Dask worker" in last and "sees no GPU" in last, err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("c.*"))  # no output, no temporary file


@pytest.mark.timeout(120)
def test_a_fresh_command_prints_no_dask_chatter(checkpoint, make_geotiff, tmp_path):
    """Importing `distributed` sets its loggers' levels: geodnn quiets them after that, or a
    first prediction in a new process logged some 40 lines of scheduler and worker news."""
    path = make_geotiff(np.ones((1, 20, 30), dtype=np.float32))
    argv = ["predict", str(checkpoint), str(path), "--out", str(tmp_path / "c.tif")]
    done = subprocess.run(
        [sys.executable, "-m", "pipelines", *argv], capture_output=True, text=True, timeout=100
    )
    lines = [line for line in done.stderr.splitlines() if not line.startswith("predict:")]
    assert done.returncode == 0 and len(lines) == 1 and "wrote" in lines[0], done.stderr


def test_unreachable_scheduler_is_a_one_line_error(
    checkpoint, make_geotiff, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("tiles.stitch.SCHEDULER_TIMEOUT", "1s")
    path = make_geotiff(np.ones((1, 20, 20), dtype=np.uint8))
    argv = ["predict", checkpoint, path, "--out", tmp_path / "c.tif"]
    code, err = run_cli([*argv, "--scheduler", "tcp://127.0.0.1:9"], capsys)
    assert code == 2 and "Dask scheduler" in err and "\n" not in err
    assert not (tmp_path / "c.tif").exists()


@pytest.mark.timeout(60)
def test_a_scheduler_without_workers_is_a_one_line_error(
    checkpoint, make_geotiff, tmp_path, capsys, monkeypatch
):
    from distributed import LocalCluster

    monkeypatch.setattr("tiles.stitch.SCHEDULER_TIMEOUT", "2s")
    path = make_geotiff(np.ones((1, 20, 20), dtype=np.uint8))
    argv = ["predict", checkpoint, path, "--out", tmp_path / "c.tif"]
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        code, err = run_cli([*argv, "--scheduler", cluster.scheduler_address], capsys)
    assert code == 2 and "has no workers" in err and "dask worker" in err and "\n" not in err
    assert not (tmp_path / "c.tif").exists()


def test_device_option(checkpoint, make_geotiff, tmp_path, capsys):
    scene = make_geotiff(np.random.default_rng(3).random((1, 40, 50), dtype=np.float32))
    cpu, auto = tmp_path / "cpu.tif", tmp_path / "auto.tif"
    assert (
        run_cli(
            ["predict", str(checkpoint), str(scene), "--out", str(cpu), "--device", "cpu"], capsys
        )[0]
        == 0
    )
    assert run_cli(["predict", str(checkpoint), str(scene), "--out", str(auto)], capsys)[0] == 0
    with rasterio.open(cpu) as a, rasterio.open(auto) as b:
        assert np.array_equal(a.read(), b.read())
    if not torch.cuda.is_available():
        out = tmp_path / "gpu.tif"
        code, err = run_cli(
            ["predict", str(checkpoint), str(scene), "--out", str(out), "--device", "cuda"], capsys
        )
        assert code == 2 and "no GPU" in err and not out.exists()


def test_cli_class_map_follows_the_checkpoint_scale_unless_argmax(data_dir, tmp_path, capsys):
    scene = data_dir / "atlanta-buildings" / "image.tif"
    scaled = tmp_path / "scaled.pt"
    save_checkpoint(small_model(), scaled, class_names=CLASSES, class_scale=[1.0, 0.0, 1.0])
    maps = {}
    for name, extra in (("scaled", []), ("argmax", ["--argmax"])):
        out, probs = tmp_path / f"{name}.tif", tmp_path / f"{name}-p.tif"
        argv = ["predict", scaled, scene, "--out", out, "--probabilities", probs, *extra]
        assert run_cli([*argv, "--chunk", "256"], capsys)[0] == 0
        with rasterio.open(out) as c, rasterio.open(probs) as p:
            maps[name] = (c.read(1), p.read())
    (scaled_map, scaled_probs), (plain_map, plain_probs) = maps["scaled"], maps["argmax"]
    np.testing.assert_array_equal(scaled_probs, plain_probs)  # probabilities are the model's
    data = plain_map != 255
    np.testing.assert_array_equal(plain_map[data], plain_probs[:, data].argmax(0))
    # a zero factor never calls "road": those pixels take the better of the other two
    assert (plain_map[data] == 1).any() and not (scaled_map[data] == 1).any()
    other = np.where(plain_probs[0] >= plain_probs[2], 0, 2)
    np.testing.assert_array_equal(scaled_map[data], other[data])


def test_a_class_scale_of_the_wrong_length_is_a_clear_error(data_dir, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    save_checkpoint(small_model(), bad, class_names=CLASSES, class_scale=[0.5, 0.5])
    scene = data_dir / "atlanta-buildings" / "image.tif"
    code, err = run_cli(["predict", bad, scene, "--out", tmp_path / "c.tif"], capsys)
    assert code != 0 and "class_scale" in err and "--argmax" in err and str(bad) in err
    assert not (tmp_path / "c.tif").exists()
    code, err = run_cli(["predict", bad, scene, "--out", tmp_path / "c.tif", "--argmax"], capsys)
    assert code == 0, err


def test_rgba_scene_transparent_pixels_are_nodata_in_the_class_map(tmp_path, make_geotiff):
    """A drone orthomosaic's alpha band is a mask: a 3-band model reads the colour bands, and
    the transparent half is written as nodata, not predicted."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(1, 255, (4, 40, 48), dtype=np.uint8)
    rgba[3] = 255
    rgba[3, :, :24] = 0  # left half transparent
    scene = make_geotiff(rgba, photometric="RGB", alpha="YES")
    with rasterio.open(scene) as src:
        assert src.colorinterp[3] == rasterio.enums.ColorInterp.alpha
    ckpt = tmp_path / "rgb.pt"
    save_checkpoint(small_model(bands=3), ckpt, class_names=CLASSES)
    out = tmp_path / "classes.tif"
    predict_scene(ckpt, scene, out, chunk=16)
    with rasterio.open(out) as src:
        classes = src.read(1)
        assert src.nodata == 255
    assert (classes[:, :24] == 255).all()
    assert (classes[:, 24:] < len(CLASSES)).all()
    save_checkpoint(small_model(bands=4), ckpt, class_names=CLASSES)
    # band 4 may be data tagged as alpha or transparency: the error gives both fixes
    fixes = r"and an alpha band.*`rio edit-info --colorinterp red,green,blue,undefined .*retrain"
    with pytest.raises(Exception, match=fixes):
        predict_scene(ckpt, scene, tmp_path / "four.tif", chunk=16)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])
def test_a_stopped_predict_leaves_no_temporary_file(tmp_path, make_geotiff, stop):
    """SIGTERM (a scheduler, `kill`) or SIGHUP (a closed terminal) unwind like Ctrl-C: the
    temporary outputs are removed and an earlier output stays as it was."""
    import signal
    import subprocess
    import sys
    import time

    ckpt = tmp_path / "deep.pt"
    save_checkpoint(build_model(1, 3, depth=12, width=16, seed=0), ckpt, class_names=CLASSES)
    scene = make_geotiff(np.random.default_rng(0).random((1, 1536, 1536), dtype=np.float32))
    out = tmp_path / "out"
    out.mkdir()
    (out / "c.tif").write_bytes(b"the earlier map")
    args = [sys.executable, "-m", "pipelines.cli", "predict", str(ckpt), str(scene), "--out",
            str(out / "c.tif"), "--probabilities", str(out / "p.tif"), "--overwrite"]  # fmt: skip
    job = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob(".*tmp*")) and time.monotonic() < deadline:
            time.sleep(0.1)  # the temporary outputs exist: the job is writing
        assert list(out.glob(".*tmp*"))
        job.send_signal(getattr(signal, stop))
        assert job.wait(timeout=60) == 128 + getattr(signal, stop)
        assert f"stopped by {stop}" in job.stderr.read()
    finally:
        job.kill()
    assert sorted(p.name for p in out.iterdir()) == ["c.tif"]
    assert (out / "c.tif").read_bytes() == b"the earlier map"


def test_progress_reaches_a_log_file_too(checkpoint, make_geotiff, tmp_path, capsys):
    scene = make_geotiff(np.ones((1, 40, 40), dtype=np.uint8))
    predict_scene(checkpoint, scene, tmp_path / "c.tif", chunk=16, progress=True)
    err = capsys.readouterr().err  # not a terminal: before, tqdm's auto mode drew nothing
    assert "predict" in err and "9/9" in err


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_stop_swallowed_while_predicting_keeps_the_earlier_output(
    checkpoint, make_geotiff, tmp_path, monkeypatch, capsys
):
    """A SIGTERM whose exception Python ignored (it landed in a finalizer) must not let the run
    go on to replace the earlier class map: it stops before the outputs are committed."""
    import gc
    import os
    import signal

    import pipelines.predict as predict_module

    real = predict_module.iter_predictions

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)

    def swallowing(*args, **kwargs):
        for i, prediction in enumerate(real(*args, **kwargs)):
            if i == 0:
                Finalized()
                gc.collect()
            yield prediction

    monkeypatch.setattr(predict_module, "iter_predictions", swallowing)
    scene = make_geotiff(np.ones((1, 40, 40), dtype=np.uint8))
    (tmp_path / "c.tif").write_bytes(b"the earlier map")
    args = ["predict", str(checkpoint), str(scene), "--out", str(tmp_path / "c.tif")]
    assert main([*args, "--chunk", "16", "--overwrite"]) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert (tmp_path / "c.tif").read_bytes() == b"the earlier map"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_a_scene_at_another_resolution_than_the_training_one_is_warned_of(tmp_path, make_geotiff):
    """A convolution's filters are tied to a ground size: a model trained on 0.27 m pixels
    maps 0.5 m ones poorly. Geographic and projected scenes compare in metres."""
    import warnings

    from rasterio.transform import from_origin

    ckpt = tmp_path / "vegas.pt"
    save_checkpoint(small_model(), ckpt, class_names=CLASSES, pixel_size_m=0.27)
    array = np.ones((1, 40, 40), dtype=np.float32)
    utm = make_geotiff(array, name="utm.tif")  # 0.5 m
    with pytest.warns(UserWarning, match=r"utm.tif: its pixels are 0.5 m .* trained on 0.27 m"):
        summary = predict_scene(ckpt, utm, tmp_path / "a.tif", chunk=32)
    assert any("0.27 m pixels" in w for w in summary.warnings)
    # the fix in the scene's own units (metres here; degrees for a geographic scene)
    assert any(f"`rio warp {utm} resampled.tif --res 0.27`" in w for w in summary.warnings)
    # 0.27 m in degrees at 36 N (Las Vegas): close enough, no warning
    degrees = from_origin(-115.2, 36.1, 2.4e-6 / np.cos(np.radians(36.1)), 2.4e-6)
    geographic = make_geotiff(array, name="geo.tif", crs="EPSG:4326", transform=degrees)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        predict_scene(ckpt, geographic, tmp_path / "b.tif", chunk=32)
        save_checkpoint(small_model(), ckpt, class_names=CLASSES)  # a model of unknown size
        predict_scene(ckpt, utm, tmp_path / "c.tif", chunk=32)
        # a model of several stores: a scene at any of their sizes is at home
        save_checkpoint(small_model(), ckpt, class_names=CLASSES, pixel_size_m=[0.27, 0.54])
        predict_scene(ckpt, utm, tmp_path / "d.tif", chunk=32)
    save_checkpoint(small_model(), ckpt, class_names=CLASSES, pixel_size_m=[0.1, 1.2])
    with pytest.warns(UserWarning, match=r"its pixels are 0.5 m .* trained on 1.2 m"):  # nearest
        predict_scene(ckpt, utm, tmp_path / "e.tif", chunk=32)


def cache_in_effect(monkeypatch, module, name: str) -> list:
    """Wrap module.name to record the GDAL block cache limit in effect when it runs."""
    seen, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(rasterio.env.getenv().get("GDAL_CACHEMAX") if rasterio.env.hasenv() else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


def test_whole_scene_reads_and_writes_keep_gdal_s_block_cache_bounded(
    checkpoint, make_geotiff, tmp_path, monkeypatch
):
    """Set per run, not at import: the map's writes and the polygons' reads of it."""
    import tiles.stitch
    import tiles.vectorize
    from tiles.raster import GDAL_CACHE_BYTES

    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    writes = cache_in_effect(monkeypatch, tiles.stitch.PredictionWriter, "write")
    polygons = cache_in_effect(monkeypatch, tiles.vectorize, "write_class_polygons")
    scene = make_geotiff(np.random.default_rng(0).random((1, 40, 40)).astype(np.float32))
    predict_scene(checkpoint, scene, tmp_path / "c.tif", vectors=tmp_path / "v.gpkg", chunk=32)
    assert writes and set(writes) == {GDAL_CACHE_BYTES} and polygons == [GDAL_CACHE_BYTES]


def test_probabilities_that_may_not_fit_their_disk_are_warned_of_before_the_work(
    checkpoint, make_geotiff, tmp_path, monkeypatch
):
    """A 16k scene's probabilities took 4.9 GB of temporary space with --cog, unannounced."""
    import shutil

    scene = make_geotiff(np.random.default_rng(0).random((1, 100, 100)).astype(np.float32))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=100_000))
    out, probs = tmp_path / "c.tif", tmp_path / "p.tif"
    with pytest.warns(UserWarning, match=r"p.tif: the probabilities may need up to 0.24 MB"):
        summary = predict_scene(checkpoint, scene, out, probabilities=probs, cog=True)
    assert "3 float32 bands, twice with cog=True) and 0.1 MB are free" in summary.warnings[-1]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=240_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # 100 x 100 x 3 x 4 bytes, once: it fits
        predict_scene(checkpoint, scene, out, probabilities=probs, overwrite=True)
    # a chunk no GeoTIFF tile size divides: written uncompressed, then copied compressed
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=200_000))
    with pytest.warns(UserWarning, match=r"0.24 MB .*3 float32 bands, twice with chunk=100\)"):
        predict_scene(checkpoint, scene, out, probabilities=probs, overwrite=True, chunk=100)


def test_quiet_predicts_without_progress_bars(checkpoint, make_geotiff, tmp_path, capsys):
    scene = make_geotiff(np.random.default_rng(0).random((1, 64, 64)).astype(np.float32))
    argv = ["predict", checkpoint, scene, "--out", tmp_path / "c.tif", "--chunk", "32"]
    code, err = run_cli([*argv, "--vectors", tmp_path / "v.gpkg", "-q"], capsys)
    assert code == 0 and "predict:" not in err and "polygons:" not in err
    code, err = run_cli([*argv, "--overwrite"], capsys)
    assert code == 0 and "predict:" in err


def test_an_empty_scheduler_or_a_client_object_is_refused(checkpoint, make_geotiff, tmp_path):
    """'' (an unset $DASK_ADDR) ran locally without a word; a notebook's Client gave Dask's
    TypeError."""
    from types import SimpleNamespace

    from pipelines.errors import PipelineError

    scene = make_geotiff(np.ones((1, 20, 20), dtype=np.float32))
    with pytest.raises(PipelineError, match=r"`scheduler` is empty; pass the scheduler's"):
        predict_scene(checkpoint, scene, tmp_path / "c.tif", scheduler=" ")
    client = SimpleNamespace(scheduler_info=lambda: {})
    with pytest.raises(PipelineError, match="pass client.scheduler.address, not the Client"):
        predict_scene(checkpoint, scene, tmp_path / "c.tif", scheduler=client)
    assert not list(tmp_path.glob("c.tif*"))
