"""`geodnn tile`: the command on the sample scenes, and every bad input as a one-line error."""

from __future__ import annotations

import json
import warnings

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely

from pipelines import tile as tile_job
from pipelines.cli import main
from tiles.raster import GDAL_CACHE_BYTES
from tiles.store import TileStore

X0, Y0 = 733601.0, 3725139.0


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(["tile", *map(str, argv)])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.startswith("geodnn: error:")]
    assert code == 2 and len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def scene(make_geotiff):
    return make_geotiff(np.ones((1, 64, 64), dtype=np.uint16), name="scene.tif")


def write_vector(path, geometries, crs="EPSG:32616", **columns):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyogrio warns when writing without a CRS
        gpd.GeoDataFrame(columns, geometry=list(geometries), crs=crs).to_file(path)
    return path


def inside() -> shapely.Polygon:
    return shapely.box(X0 + 2, Y0 - 10, X0 + 10, Y0 - 2)


def test_vegas_roads(tmp_path, data_dir, capsys):
    out = tmp_path / "vegas.zarr"
    code, _ = run_cli(
        capsys,
        data_dir / "vegas-roads" / "image.tif",
        "--labels",
        data_dir / "vegas-roads" / "roads.tif",
        "--out",
        out,
        "--tile",
        "128",
        "--gap",
        "40",
        "-q",
    )
    store = TileStore.open(out)
    assert code == 0 and store.class_names == ["background", "roads"]
    assert store.attrs["split"]["gap"] == 40
    windows = store.windows()
    train, val = store.indices("train"), store.indices("validation")
    assert (windows[train, 1] + windows[train, 3]).max() + 40 <= windows[val, 1].min()


def test_progress_in_a_log_file_is_whole_lines(tmp_path, data_dir, capsys):
    """Redirected to a file (not a terminal), the tiles bar writes lines, not '\\r' redraws."""
    scene = data_dir / "vegas-roads" / "image.tif"
    labels = data_dir / "vegas-roads" / "roads.tif"
    code, err = run_cli(capsys, scene, "--labels", labels, "--out", tmp_path / "v.zarr")
    assert code == 0, err
    assert "\r" not in err
    assert any(line.startswith("tiles: 100%") for line in err.splitlines()), err


def test_atlanta_buildings_by_attribute_and_rows(tmp_path, data_dir, capsys, caplog):
    out = tmp_path / "atlanta.zarr"
    code, _ = run_cli(
        capsys,
        data_dir / "atlanta-buildings" / "image.tif",
        "--labels",
        data_dir / "atlanta-buildings" / "buildings.geojson",
        "--out",
        out,
        "--split",
        "rows:0.7",
        "--class-attribute",
        "building",
        "-q",
    )
    store = TileStore.open(out)
    assert code == 0 and store.class_names == ["background", "yes"]
    assert store.attrs["split"]["axis"] == "rows"
    assert store.attrs["class_attribute"] == "building"  # evaluate scores labels by it
    # rasterio's "no geotransform" warning for each in-memory window burned is not shown
    assert "geotransform" not in caplog.text  # (the CLI logs warnings)


def test_python_entry_point(tmp_path, data_dir, monkeypatch):
    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    seen, real = [], tile_job._build_store

    def spy(*args, **kwargs):  # the build reads the scene with GDAL's block cache bounded
        seen.append(rasterio.env.getenv().get("GDAL_CACHEMAX"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tile_job, "_build_store", spy)
    out = tile_job.build_store(
        data_dir / "vegas-roads" / "image.tif",
        data_dir / "vegas-roads" / "roads.tif",
        tmp_path / "v.zarr",
        tile=256,
        split="columns:0.5",
        gap=0,
        class_names=["ground", "road"],
    )
    store = TileStore.open(out)
    assert store.tile_size == 256 and store.class_names == ["ground", "road"]
    assert seen == [GDAL_CACHE_BYTES]


def test_missing_scene(tmp_path, capsys):
    labels = write_vector(tmp_path / "l.geojson", [inside()])
    out = tmp_path / "s.zarr"
    code, err = run_cli(capsys, tmp_path / "nope.tif", "--labels", labels, "--out", out)
    assert_one_line_error(code, err, "nope.tif", "not found")
    assert not out.exists()


def test_scene_that_is_not_a_raster(tmp_path, capsys):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff")
    labels = write_vector(tmp_path / "l.geojson", [inside()])
    code, err = run_cli(capsys, bad, "--labels", labels, "--out", tmp_path / "s.zarr")
    assert_one_line_error(code, err, "bad.tif", "GeoTIFF")


def test_missing_labels(tmp_path, scene, capsys):
    code, err = run_cli(capsys, scene, "--labels", tmp_path / "l.gpkg", "--out", tmp_path / "s")
    assert_one_line_error(code, err, "l.gpkg", "not found")


def test_labels_that_do_not_overlap(tmp_path, scene, capsys):
    far = shapely.box(X0 + 9000, Y0, X0 + 9010, Y0 + 10)
    labels = write_vector(tmp_path / "far.geojson", [far])
    code, err = run_cli(capsys, scene, "--labels", labels, "--out", tmp_path / "s.zarr")
    assert_one_line_error(code, err, "far.geojson", "do not overlap")
    assert not list(tmp_path.glob("*.zarr")) and not list(tmp_path.glob(".s.zarr*"))


def test_labels_without_crs(tmp_path, scene, capsys):
    labels = write_vector(tmp_path / "nocrs.shp", [inside()], crs=None)
    code, err = run_cli(capsys, scene, "--labels", labels, "--out", tmp_path / "s.zarr")
    assert_one_line_error(code, err, "nocrs.shp", "no CRS")


def test_empty_label_file(tmp_path, scene, capsys):
    labels = tmp_path / "empty.geojson"
    labels.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    code, err = run_cli(capsys, scene, "--labels", labels, "--out", tmp_path / "s.zarr")
    assert_one_line_error(code, err, "empty.geojson", "no features")


def test_unknown_class_attribute(tmp_path, scene, capsys):
    labels = write_vector(tmp_path / "l.geojson", [inside()], kind=["roof"])
    argv = [scene, "--labels", labels, "--out", tmp_path / "s.zarr", "--class-attribute", "cls"]
    code, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "l.geojson", "'cls'", "one of: kind")


def test_class_names_name_a_mask_s_classes(tmp_path, scene, make_geotiff, capsys):
    mask = make_geotiff(np.tile(np.arange(64, dtype=np.uint8) % 3, (64, 1)), name="mask.tif")
    argv = [scene, "--labels", mask, "--out", tmp_path / "s.zarr", "--tile", "32", "-q"]
    argv += ["--gap", "8"]  # a 64 px scene
    code, err = run_cli(capsys, *argv, "--class-names", "bare", "road", "roof")
    assert code == 0, err
    assert TileStore.open(tmp_path / "s.zarr").class_names == ["bare", "road", "roof"]
    argv[4] = tmp_path / "t.zarr"
    code, err = run_cli(capsys, *argv, "--class-names", "bare", "road")
    assert_one_line_error(code, err, "mask.tif", "2 class names given for 3 classes")
    code, err = run_cli(capsys, *argv, "--class-names", "bare", " ", "roof")
    assert_one_line_error(code, err, "mask.tif", "a class name is empty", "--class-names")


def test_existing_store_without_overwrite(tmp_path, scene, capsys):
    labels = write_vector(tmp_path / "l.geojson", [inside()])
    out = tmp_path / "s.zarr"
    small = ("--gap", "8")  # a 64 px scene
    assert run_cli(capsys, scene, "--labels", labels, "--out", out, "--tile", "32", *small)[0] == 0
    code, err = run_cli(capsys, scene, "--labels", labels, "--out", out, "--tile", "16", *small)
    assert_one_line_error(code, err, "s.zarr", "--overwrite")
    assert TileStore.open(out).tile_size == 32
    argv = [scene, "--labels", labels, "--out", out, "--tile", "16", "--overwrite", "-q", *small]
    assert run_cli(capsys, *argv)[0] == 0 and TileStore.open(out).tile_size == 16


def test_bad_split_and_output_folder(tmp_path, scene, capsys):
    labels = write_vector(tmp_path / "l.geojson", [inside()])
    code, err = run_cli(
        capsys, scene, "--labels", labels, "--out", tmp_path / "s.zarr", "--split", "cols:2"
    )
    assert_one_line_error(code, err, "cols:2", "columns:F")
    code, err = run_cli(capsys, scene, "--labels", labels, "--out", tmp_path / "x" / "s.zarr")
    assert_one_line_error(code, err, "does not exist")


@pytest.mark.parametrize("option", [["--gap", "-3"], ["--tile", "0"], ["--tile", "abc"]])
def test_a_bad_option_value_is_a_one_line_usage_error(tmp_path, scene, capsys, option):
    with pytest.raises(SystemExit) as exit_info:
        main(["tile", str(scene), "--labels", "l", "--out", "o", *option])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1  # not argparse's usage block
    assert err.startswith(f"geodnn tile: error: argument {option[0]}: '{option[1]}' is not a")
    assert err.endswith("see `geodnn tile --help`\n")


def test_overwrite_keeps_a_file_or_folder_that_is_not_a_store(tmp_path, scene, capsys):
    labels = write_vector(tmp_path / "l.geojson", [inside()])
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "notes.txt").write_text("important")
    plain = tmp_path / "notes.txt"
    plain.write_text("important")
    for out in (folder, plain):
        code, err = run_cli(capsys, scene, "--labels", labels, "--out", out, "--overwrite", "-q")
        assert_one_line_error(code, err, str(out), "not a geodnn tile store", "pick another --out")
    assert (folder / "notes.txt").read_text() == "important" and len(list(folder.iterdir())) == 1
    assert plain.read_text() == "important"


def test_out_that_is_an_input_is_refused(tmp_path, scene, make_geotiff, capsys):
    (tmp_path / "copy").mkdir()
    mask = make_geotiff(np.ones((64, 64), dtype=np.uint8), name="copy/roads.tif")
    before = mask.read_bytes(), scene.read_bytes()
    argv = [scene, "--labels", mask, "--overwrite", "-q", "--out"]
    code, err = run_cli(capsys, *argv, mask)
    assert_one_line_error(code, err, str(mask), "is the labels file; pick another output name")
    code, err = run_cli(capsys, *argv, tmp_path / "copy" / ".." / "scene.tif")
    assert_one_line_error(code, err, "scene.tif", "is the input scene; pick another output name")
    assert (mask.read_bytes(), scene.read_bytes()) == before
