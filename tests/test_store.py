"""The Zarr tile store: layout, padding, statistics of the training region, nodata, versions,
atomic writes."""

from __future__ import annotations

import json
import shutil
import warnings

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import zarr
from affine import Affine

import tiles.store as store_module
from tiles.errors import OutputError, RasterInputError, StoreError, TilesError
from tiles.labels import IGNORE_INDEX
from tiles.split import TRAIN, VALIDATION, SplitSpec
from tiles.store import FORMAT, VERSION, BandStats, TileStore, build_store

X0, Y0, PIXEL = 733601.0, 3725139.0, 0.5


@pytest.fixture
def scene_and_mask(make_geotiff):
    """A 2-band 70 x 100 float scene and a 0/1 mask on its grid, with values varying by column."""
    rng = np.random.default_rng(0)
    image = rng.normal(10.0, 2.0, size=(2, 70, 100)).astype(np.float32)
    image[1] += 100.0
    image[:, :, 60:] += 1000.0  # the validation side looks very different
    mask = np.zeros((70, 100), dtype=np.uint8)
    mask[10:30, 5:40] = 1
    mask[40:60, 70:90] = 1
    return make_geotiff(image, name="scene.tif"), make_geotiff(mask, name="mask.tif"), image, mask


def build(scene, labels, out, **kwargs):
    kwargs.setdefault("tile", 32)
    kwargs.setdefault("split", SplitSpec("columns", 0.6, 8))
    return TileStore.open(build_store(scene, labels, out, **kwargs))


def test_layout_windows_transforms_and_padding(tmp_path, scene_and_mask):
    scene, mask, image, labels = scene_and_mask
    store = build(scene, mask, tmp_path / "s.zarr")
    n = len(store)
    # train cols [0, 56) -> 2 tile columns, validation [64, 100) -> 2; 3 tile rows each
    assert n == 12 and store.attrs["tiles_per_split"] == {"train": 6, "validation": 6}
    assert store.images(range(n)).shape == (n, 2, 32, 32)
    assert store.images([0]).dtype == np.float32 and store.labels([0]).dtype == np.uint8
    windows = store.windows()
    for i, (row, col, h, w) in enumerate(windows):
        tile_image, tile_labels = store.images([i])[0], store.labels([i])[0]
        np.testing.assert_array_equal(tile_image[:, :h, :w], image[:, row : row + h, col : col + w])
        np.testing.assert_array_equal(tile_labels[:h, :w], labels[row : row + h, col : col + w])
        assert np.isnan(tile_image[:, h:, :]).all() and np.isnan(tile_image[:, :, w:]).all()
        assert (tile_labels[h:, :] == IGNORE_INDEX).all() and (tile_labels[:, w:] == 255).all()
        expected = Affine(PIXEL, 0, X0 + col * PIXEL, 0, -PIXEL, Y0 - row * PIXEL)
        assert store.tile_transform(i).almost_equals(expected)
    train, val = store.indices("train"), store.indices("validation")
    assert (windows[train, 1] + windows[train, 3]).max() <= 56
    assert windows[val, 1].min() >= 64
    np.testing.assert_array_equal(store.indices("val"), val)


def test_metadata(tmp_path, scene_and_mask):
    scene, mask, _, _ = scene_and_mask
    store = build(scene, mask, tmp_path / "s.zarr")
    attrs = store.attrs
    assert attrs["format"] == FORMAT and attrs["version"] == VERSION
    assert store.crs == rasterio.crs.CRS.from_epsg(32616)
    assert store.scene_transform == Affine(PIXEL, 0, X0, 0, -PIXEL, Y0)
    assert store.scene_shape == (70, 100) and store.tile_size == 32 and store.bands == 2
    assert store.class_names == ["background", "mask"] and len(store.class_colors) == 2
    assert store.class_values == [None, 1]
    assert attrs["split"]["gap"] == 8 and "guard band" in attrs["split"]["description"]


def test_statistics_come_from_the_training_region_only(tmp_path, scene_and_mask):
    scene, mask, image, labels = scene_and_mask
    store = build(scene, mask, tmp_path / "s.zarr")
    train = image[:, :, :56].reshape(2, -1).astype(np.float64)
    np.testing.assert_allclose(store.band_mean, train.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(store.band_std, train.std(axis=1), rtol=1e-5)
    expected = np.bincount(labels[:, :56].ravel(), minlength=2)
    np.testing.assert_array_equal(store.class_pixel_counts, expected)


def test_band_stats_merge_matches_numpy_with_nan():
    rng = np.random.default_rng(1)
    data = rng.normal(5e4, 3.0, size=(3, 40, 40))  # large mean, small spread
    data[0, :5] = np.nan
    stats = BandStats(3)
    for part in np.array_split(data, 7, axis=2):
        stats.add(part)
    np.testing.assert_allclose(stats.mean, np.nanmean(data.reshape(3, -1), axis=1), rtol=1e-12)
    np.testing.assert_allclose(stats.std, np.nanstd(data.reshape(3, -1), axis=1), rtol=1e-9)


def test_nan_and_inf_are_masked_and_all_nodata_tiles_skipped(tmp_path, make_geotiff):
    image = np.full((1, 64, 100), 7.0, dtype=np.float32)
    image[0, 3, 4] = np.nan
    image[0, 5, 6] = np.inf
    image[0, 7, 8] = -np.inf
    image[0, 32:, :32] = -9999.0  # a whole tile of the file's nodata value
    scene = make_geotiff(image, nodata=-9999.0)
    mask = make_geotiff(np.ones((64, 100), dtype=np.uint8))
    store = build(scene, mask, tmp_path / "s.zarr", split=SplitSpec("columns", 0.6, 4))
    windows = store.windows()
    assert not ((windows[:, 0] == 32) & (windows[:, 1] == 0)).any()  # the nodata tile is gone
    assert len(store) == 2 * 4 - 1
    first = int(np.flatnonzero((windows[:, 0] == 0) & (windows[:, 1] == 0))[0])
    tile, labels = store.images([first])[0, 0], store.labels([first])[0]
    for row, col in [(3, 4), (5, 6), (7, 8)]:
        assert np.isnan(tile[row, col]) and labels[row, col] == IGNORE_INDEX
    assert np.isfinite(store.band_mean).all() and store.band_mean[0] == pytest.approx(7.0)
    assert store.band_std[0] == pytest.approx(0.0, abs=1e-6)


def test_scene_without_crs_keeps_none(tmp_path, make_geotiff):
    scene = make_geotiff(np.ones((1, 40, 40), dtype=np.uint8), crs=None)
    mask = make_geotiff(np.eye(40, dtype=np.uint8), crs=None)
    with pytest.warns(UserWarning, match="raster has no CRS; outputs are written without one"):
        store = build(scene, mask, tmp_path / "s.zarr", split=SplitSpec("columns", 1.0, 0))
    assert store.crs is None and store.attrs["crs"] is None and len(store) == 4


def test_alpha_band_is_not_stored_as_a_band(tmp_path, make_geotiff):
    image = np.stack([np.full((40, 64), v, dtype=np.uint8) for v in (10, 20, 30, 255)])
    image[3, :, :32] = 0  # left half transparent
    scene = make_geotiff(image, name="rgba.tif", photometric="RGB", alpha="YES")
    mask = make_geotiff(np.ones((40, 64), dtype=np.uint8), name="mask.tif")
    store = build(scene, mask, tmp_path / "s.zarr", split=SplitSpec("columns", 1.0, 0))
    assert store.bands == 3 and store.images(range(len(store))).shape[1] == 3
    np.testing.assert_allclose(store.band_mean, [10.0, 20.0, 30.0])
    assert store.attrs["band_valid_pixels"] == [40 * 32] * 3
    windows = store.windows()
    assert (windows[:, 1] >= 32).all()  # the transparent tiles are skipped as all-nodata


def test_duplicate_class_names_are_refused(tmp_path, scene_and_mask):
    scene, mask, _, _ = scene_and_mask
    out = tmp_path / "s.zarr"
    with pytest.raises(TilesError, match="'x' occurs more than once") as info:
        build(scene, mask, out, class_names=["x", "x"])
    assert str(mask) in str(info.value) and "distinct" in str(info.value)
    assert not out.exists() and list(tmp_path.glob(".s.zarr*")) == []


def test_store_with_duplicate_class_names_is_refused_on_open(tmp_path, scene_and_mask):
    scene, mask, _, _ = scene_and_mask
    path = build(scene, mask, tmp_path / "s.zarr").path
    zarr.open_group(str(path), mode="r+").attrs["class_names"] = ["x", "x"]
    with pytest.raises(StoreError, match="class_names repeats 'x'"):
        TileStore.open(path)


def test_a_store_of_one_class_is_refused_on_open(tmp_path, scene_and_mask):
    """`build_store` refuses one now; a store an earlier version built crashed `geodnn train`."""
    scene, mask, _, _ = scene_and_mask
    path = build(scene, mask, tmp_path / "s.zarr").path
    attrs = zarr.open_group(str(path), mode="r+").attrs
    for key in ("class_names", "class_colors", "class_pixel_counts", "class_values"):
        attrs[key] = attrs[key][:1]
    with pytest.raises(StoreError, match=r"s.zarr: tile store has one class \(background\)"):
        TileStore.open(path)


def test_sample_scenes(tmp_path, data_dir):
    vegas = build(
        data_dir / "vegas-roads" / "image.tif",
        data_dir / "vegas-roads" / "roads.tif",
        tmp_path / "vegas.zarr",
        tile=128,
        split=SplitSpec(),
    )
    assert vegas.crs.to_epsg() == 4326 and vegas.class_names == ["background", "roads"]
    counts = vegas.class_pixel_counts
    gap = SplitSpec().gap  # the default guard band: half of it on the training side
    assert counts.sum() == 1300 * (910 - gap // 2) and 0.01 < counts[1] / counts.sum() < 0.2
    atlanta = build(
        data_dir / "atlanta-buildings" / "image.tif",
        data_dir / "atlanta-buildings" / "buildings.geojson",
        tmp_path / "atlanta.zarr",
        tile=128,
        split=SplitSpec(),
    )
    assert atlanta.crs.to_epsg() == 32616 and atlanta.class_names == ["background", "buildings"]
    assert atlanta.class_pixel_counts[1] > 0
    assert all(n > 0 for n in atlanta.attrs["tiles_per_split"].values())


def test_other_version_is_refused(tmp_path, scene_and_mask):
    scene, mask, _, _ = scene_and_mask
    path = build(scene, mask, tmp_path / "s.zarr").path
    zarr.open_group(str(path), mode="r+").attrs["version"] = 2
    with pytest.raises(StoreError, match="version 2.*rebuild it"):
        TileStore.open(path)


def test_not_a_store_and_missing_store(tmp_path):
    with pytest.raises(StoreError, match="not found"):
        TileStore.open(tmp_path / "nope.zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["format"] = "something"
    with pytest.raises(StoreError, match="not a geodnn tile store"):
        TileStore.open(tmp_path / "other.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not a Zarr tile store"):
        TileStore.open(tmp_path / "plain")


def test_existing_store_needs_overwrite(tmp_path, scene_and_mask):
    scene, mask, _, _ = scene_and_mask
    out = tmp_path / "s.zarr"
    build(scene, mask, out)
    with pytest.raises(OutputError, match="overwrite=True"):
        build(scene, mask, out, tile=16)
    assert TileStore.open(out).tile_size == 32
    assert build(scene, mask, out, tile=16, overwrite=True).tile_size == 16
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith("zarr")) == ["s.zarr"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".s.zarr")]


def test_failed_build_leaves_the_old_store_and_no_temp(tmp_path, scene_and_mask, monkeypatch):
    scene, mask, _, _ = scene_and_mask
    out = tmp_path / "s.zarr"
    build(scene, mask, out)
    calls = {"n": 0}
    real = store_module.read_tile

    def failing(*args):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError("disk on fire")
        return real(*args)

    monkeypatch.setattr(store_module, "read_tile", failing)
    with pytest.raises(OSError):
        build(scene, mask, out, tile=16, overwrite=True, batch=2)
    assert TileStore.open(out).tile_size == 32
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_interrupted_build_raises_the_interrupt_though_its_writer_still_writes(
    tmp_path, scene_and_mask, monkeypatch
):
    """Ctrl-C stops the main thread, not zarr's writer: removing the temporary store then
    failed ("Directory not empty") and that OSError replaced the interrupt (a traceback and a
    hidden temporary store left behind)."""
    import shutil
    from types import SimpleNamespace

    scene, mask, _, _ = scene_and_mask
    real_rmtree, failures = shutil.rmtree, []

    def refilled(path, *args, **kwargs):  # the writer adds a chunk twice while it is removed
        if len(failures) < 2 and not kwargs.get("ignore_errors"):
            failures.append(path)
            raise OSError(39, "Directory not empty")
        return real_rmtree(path, *args, **kwargs)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "shutil", SimpleNamespace(rmtree=refilled))
    monkeypatch.setattr(store_module, "read_tile", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(scene, mask, tmp_path / "s.zarr")
    assert len(failures) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_killed_build_s_temporary_store_is_removed_by_the_next(
    tmp_path, scene_and_mask, monkeypatch
):
    monkeypatch.setattr("tiles.scratch.LOCK_GRACE_S", 0.0)  # (aged lock files)
    import fcntl
    import os
    import socket
    import subprocess
    import sys

    scene, mask, _, _ = scene_and_mask
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        **{"capture_output": True, "text": True, "check": True},
    ).stdout.strip()
    host = socket.gethostname()
    killed = tmp_path / f".s.zarr.tmp-{host}-{gone}-0badc0de"  # SIGKILL: no cleanup ran
    running = tmp_path / f".s.zarr.tmp-{host}-{os.getpid()}-0000beef"  # a build in progress
    elsewhere = tmp_path / f".s.zarr.tmp-other-host-{gone}-12345678"  # a shared disk's
    older = tmp_path / f".s.zarr.tmp-{gone}-abcdef01"  # named as before the host was in it
    for folder in (killed, running, elsewhere, older):
        (folder / "c").mkdir(parents=True)
    # with a lock beside it, the lock decides, whatever the name says (other PID namespaces)
    unheld = tmp_path / f".s.zarr.tmp-{host}-{os.getpid()}-1ocked00"
    held = tmp_path / f".s.zarr.tmp-{host}-{gone}-1ocked01"
    for folder in (unheld, held):
        (folder / "c").mkdir(parents=True)
        folder.with_name(folder.name + ".lock").touch()
    with open(held.with_name(held.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a build in progress, say in another container
        build(scene, mask, tmp_path / "s.zarr")
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert left == sorted([running.name, elsewhere.name, held.name, held.name + ".lock"])


def test_a_replaced_store_whose_removal_was_interrupted_goes_with_the_next_build(
    tmp_path, scene_and_mask, monkeypatch
):
    """Jupyter's interrupt while --overwrite removes the old store left a hidden, half-removed
    copy that no later build removed (GBs on a real scene)."""
    monkeypatch.setattr("tiles.scratch.LOCK_GRACE_S", 0.0)  # (aged lock files)
    scene, mask, _, _ = scene_and_mask
    out = tmp_path / "s.zarr"
    build(scene, mask, out)
    real = store_module.remove_tree

    def interrupted(path, *args, **kwargs):
        if ".old-" in path.name:
            (path / "zarr.json").unlink()  # part of it removed
            raise KeyboardInterrupt
        real(path, *args, **kwargs)

    monkeypatch.setattr(store_module, "remove_tree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(scene, mask, out, overwrite=True)
    assert TileStore.open(out).attrs["tiles"] > 0  # the new store is in place
    assert len(list(tmp_path.glob(".s.zarr.old-*"))) == 2  # the folder and its unheld lock
    monkeypatch.setattr(store_module, "remove_tree", real)
    (tmp_path / ".s.zarr.old-0badc0de" / "c").mkdir(parents=True)  # named as before the PID
    build(scene, mask, out, overwrite=True)
    assert not list(tmp_path.glob(".s.zarr.*"))


def test_a_block_damaged_inside_the_scene_is_a_raster_input_error(tmp_path, damaged_scene):
    """It was rasterio's RasterioIOError from a Dask thread: a traceback from `geodnn tile`."""
    scene, mask = damaged_scene
    with pytest.raises(RasterInputError, match=r"damaged or unreadable at rows .*IReadBlock"):
        build(scene, mask, tmp_path / "s.zarr")
    assert not list(tmp_path.glob("*.zarr")) and not list(tmp_path.glob(".s.zarr*"))


def test_missing_output_folder(tmp_path, scene_and_mask):
    scene, mask, _, _ = scene_and_mask
    with pytest.raises(OutputError, match="does not exist"):
        build(scene, mask, tmp_path / "no" / "s.zarr")


def test_training_region_without_data_is_an_error(tmp_path, make_geotiff):
    image = np.full((1, 40, 80), 5.0, dtype=np.float32)
    image[:, :, :50] = np.nan
    scene = make_geotiff(image)
    mask = make_geotiff(np.ones((40, 80), dtype=np.uint8))
    with pytest.raises(TilesError, match="training region"):
        build(scene, mask, tmp_path / "s.zarr", split=SplitSpec("columns", 0.5, 4))
    assert not list(tmp_path.glob("*.zarr")) and not list(tmp_path.glob(".*"))


def test_indices_in_any_order_and_with_repeats(tmp_path, scene_and_mask):
    scene, mask, _, _ = scene_and_mask
    store = build(scene, mask, tmp_path / "s.zarr")
    picked = store.labels([5, 1, 5])
    np.testing.assert_array_equal(picked[0], picked[2])
    np.testing.assert_array_equal(picked[1], store.labels([1])[0])
    with pytest.raises(IndexError):
        store.images([len(store)])


def test_labels_follow_vector_polygons(tmp_path, make_geotiff):
    scene = make_geotiff(np.ones((1, 40, 40), dtype=np.uint8))
    square = shapely.box(X0 + 2 * PIXEL, Y0 - 12 * PIXEL, X0 + 12 * PIXEL, Y0 - 2 * PIXEL)
    path = tmp_path / "square.geojson"
    gpd.GeoDataFrame(geometry=[square], crs="EPSG:32616").to_file(path)
    store = build(scene, path, tmp_path / "s.zarr", tile=16, split=SplitSpec("columns", 0.75, 4))
    first = int(np.flatnonzero((store.windows()[:, :2] == 0).all(axis=1))[0])
    labels = store.labels([first])[0]
    assert labels[2:12, 2:12].all() and labels.sum() == 100
    assert store.attrs["split"]["codes"] == {"train": TRAIN, "validation": VALIDATION}


def test_a_class_without_training_pixels_is_warned_of_when_the_store_is_made(
    tmp_path, make_geotiff, scene_and_mask
):
    scene, _, _, mask = scene_and_mask
    late = mask.copy()
    late[40:60, 70:90] = 2  # the second class only right of the split (columns:0.6)
    path = make_geotiff(late, name="late.tif")
    with pytest.warns(UserWarning, match=r"class\(es\) 2 have no labeled pixels in the training"):
        store = build(scene, path, tmp_path / "s.zarr")
    assert store.class_pixel_counts.tolist()[2] == 0


def test_ids_between_sparse_codes_are_not_blamed_on_the_split(tmp_path, scene_and_mask):
    """Codes 2 and 4 leave ids 1 and 3 classes no feature has (said when the labels are read):
    the store's warning of untrained classes names only a class that has labels (4, right of
    the split)."""
    import warnings

    scene, _, _, _ = scene_and_mask
    left = shapely.box(X0 + 5 * PIXEL, Y0 - 30 * PIXEL, X0 + 40 * PIXEL, Y0 - 10 * PIXEL)
    right = shapely.box(X0 + 70 * PIXEL, Y0 - 60 * PIXEL, X0 + 90 * PIXEL, Y0 - 40 * PIXEL)
    labels = tmp_path / "codes.geojson"
    gpd.GeoDataFrame({"code": [2, 4]}, geometry=[left, right], crs="EPSG:32616").to_file(labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build(scene, labels, tmp_path / "s.zarr", class_attribute="code")
    untrained = [str(w.message) for w in caught if "no labeled pixels in the training" in str(w)]
    assert len(untrained) == 1 and "class(es) 4 have" in untrained[0]
    assert any("no feature has 2 of them (1, 3)" in str(w.message) for w in caught)


def test_building_a_store_leaves_the_process_s_warning_filters_as_they_were(tmp_path, make_geotiff):
    """rasterio's rasterize sets and restores warning filters process-wide; run on two Dask
    threads at once they left an "ignore everything" filter behind, and the warnings of the
    rest of the process (a class without training pixels, `geodnn run`'s later steps) were
    never shown."""
    import warnings

    scene = make_geotiff(np.ones((1, 96, 160), dtype=np.uint8))
    squares = [
        shapely.box(
            X0 + c * PIXEL, Y0 - (c % 80 + 9) * PIXEL, X0 + (c + 6) * PIXEL, Y0 - (c % 80) * PIXEL
        )
        for c in range(0, 150, 7)
    ]
    path = tmp_path / "squares.geojson"
    gpd.GeoDataFrame(geometry=squares, crs="EPSG:32616").to_file(path)
    silence_all = ("ignore", None, Warning, None, 0)
    for attempt in range(3):  # the race was hit on every build here; three to be sure
        with warnings.catch_warnings():
            build(scene, path, tmp_path / f"s{attempt}.zarr", tile=8, batch=4)
            assert silence_all not in warnings.filters


def test_a_tile_larger_than_the_scene_is_fitted_to_it(tmp_path, scene_and_mask):
    scene, mask, _, _ = scene_and_mask  # 70 x 100
    with pytest.warns(UserWarning, match="tile=3000 is larger than the scene"):
        store = build(scene, mask, tmp_path / "s.zarr", tile=3000)
    assert store.tile_size == 100 and store.images([0]).shape == (1, 2, 100, 100)


def test_a_tile_of_the_scene_s_longer_side_is_used_without_a_warning(tmp_path, scene_and_mask):
    scene, mask, _, _ = scene_and_mask  # 70 x 100
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing to fit: no "larger than" warning
        store = build(scene, mask, tmp_path / "s.zarr", tile=100)
    assert store.tile_size == 100


def edit_metadata(store_path, edit) -> None:
    """Apply `edit` to the attributes in the store's zarr.json, as a user editing it would."""
    meta = store_path / "zarr.json"
    data = json.loads(meta.read_text())
    edit(data["attributes"])
    meta.write_text(json.dumps(data))


def test_overwrite_refuses_a_file_that_is_not_a_store(tmp_path, scene_and_mask):
    scene, mask, _, _ = scene_and_mask
    out = tmp_path / "s.zarr"
    out.write_text("important")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="is a file, not a geodnn tile store") as info:
            build(scene, mask, out, overwrite=overwrite)
        assert str(out) in str(info.value) and "pick another `out`" in str(info.value)
    assert out.read_text() == "important"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwrite_refuses_a_folder_that_is_not_a_store(tmp_path, scene_and_mask):
    scene, mask, _, _ = scene_and_mask
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("important")
    with pytest.raises(OutputError, match="folder that is not a geodnn tile store") as info:
        build(scene, mask, out, overwrite=True)
    assert "remove it yourself" in str(info.value)
    assert (out / "notes.txt").read_text() == "important" and len(list(out.iterdir())) == 1


def test_overwrite_refuses_a_zarr_group_of_another_program(tmp_path, scene_and_mask):
    scene, mask, _, _ = scene_and_mask
    out = tmp_path / "other.zarr"
    zarr.open_group(str(out), mode="w").attrs["format"] = "something"
    with pytest.raises(OutputError, match="not a geodnn tile store"):
        build(scene, mask, out, overwrite=True)
    assert zarr.open_group(str(out), mode="r").attrs["format"] == "something"


def test_overwrite_refuses_a_symbolic_link(tmp_path, scene_and_mask):
    scene, mask, _, _ = scene_and_mask
    target = build(scene, mask, tmp_path / "s.zarr").path
    link = tmp_path / "link.zarr"
    link.symlink_to(target)
    with pytest.raises(OutputError, match="symbolic link"):
        build(scene, mask, link, tile=16, overwrite=True)
    assert link.is_symlink() and TileStore.open(target).tile_size == 32


def test_overwrite_reuses_an_empty_folder(tmp_path, scene_and_mask):
    scene, mask, _, _ = scene_and_mask
    out = tmp_path / "s.zarr"
    out.mkdir()
    with pytest.raises(OutputError, match="already exists; pass overwrite=True"):
        build(scene, mask, out)
    assert build(scene, mask, out, overwrite=True).tile_size == 32


def test_overwrite_replaces_a_store_of_another_version_or_with_broken_metadata(
    tmp_path, scene_and_mask
):
    scene, mask, _, _ = scene_and_mask
    out = build(scene, mask, tmp_path / "s.zarr").path
    edit_metadata(out, lambda attrs: attrs.update(version=VERSION + 1))
    assert build(scene, mask, out, tile=16, overwrite=True).tile_size == 16
    edit_metadata(out, lambda attrs: attrs.pop("band_mean"))
    assert build(scene, mask, out, tile=32, overwrite=True).tile_size == 32
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_store_path_taken_over_during_the_build_is_left_alone(tmp_path, scene_and_mask):
    scene, mask, _, _ = scene_and_mask
    out = build(scene, mask, tmp_path / "s.zarr").path

    def replace_by_a_user_folder(_: int) -> None:
        if (out / "zarr.json").exists():
            shutil.rmtree(out)
            out.mkdir()
            (out / "notes.txt").write_text("important")

    with pytest.raises(OutputError, match="folder that is not a geodnn tile store"):
        build(scene, mask, out, tile=16, overwrite=True, progress=replace_by_a_user_folder)
    assert (out / "notes.txt").read_text() == "important" and len(list(out.iterdir())) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_store_made_at_the_path_during_a_build_without_overwrite_is_kept(
    tmp_path, scene_and_mask
):
    scene, mask, _, _ = scene_and_mask
    out, other = tmp_path / "s.zarr", build(scene, mask, tmp_path / "other.zarr").path

    def another_build_finishes_first(_: int) -> None:
        if not out.exists():
            shutil.copytree(other, out)

    with pytest.raises(OutputError, match="already exists; pass overwrite=True"):
        build(scene, mask, out, tile=16, progress=another_build_finishes_first)
    assert TileStore.open(out).attrs["tile_size"] != 16  # the other build's store, intact


def test_an_output_that_is_an_input_is_refused(tmp_path, scene_and_mask):
    scene, mask, _, _ = scene_and_mask
    before = mask.read_bytes(), scene.read_bytes()
    (tmp_path / "sub").mkdir()
    with pytest.raises(OutputError, match="is the labels file; pick another output name"):
        build(scene, mask, tmp_path / "sub" / ".." / mask.name, overwrite=True)
    with pytest.raises(OutputError, match="is the input scene; pick another output name"):
        build(scene, mask, scene, overwrite=True)
    assert (mask.read_bytes(), scene.read_bytes()) == before


def test_overwrite_refuses_a_store_that_holds_the_input_scene(tmp_path, scene_and_mask):
    """Replacing the store would delete the scene inside it."""
    scene, mask, _, _ = scene_and_mask
    out = tmp_path / "s.zarr"
    build(scene, mask, out)
    inside = out / "scene.tif"
    shutil.copyfile(scene, inside)
    with pytest.raises(OutputError, match=r"s.zarr: holds the input scene .*scene.tif; pick"):
        build(inside, mask, out, overwrite=True)
    assert inside.read_bytes() == scene.read_bytes() and TileStore.open(out).tile_size == 32


def test_an_output_that_is_a_vector_label_file_with_a_layer_is_refused(tmp_path, make_geotiff):
    scene = make_geotiff(np.ones((1, 40, 40), dtype=np.uint8))
    square = shapely.box(X0 + 2 * PIXEL, Y0 - 12 * PIXEL, X0 + 12 * PIXEL, Y0 - 2 * PIXEL)
    path = tmp_path / "labels.gpkg"
    gpd.GeoDataFrame(geometry=[square], crs="EPSG:32616").to_file(path, layer="roofs")
    with pytest.raises(OutputError, match="is the labels file"):
        build(scene, f"{path}|layername=roofs", path, overwrite=True)
    assert gpd.read_file(path, layer="roofs").shape[0] == 1


NEEDED_METADATA = [
    "bands",
    "tile_size",
    "class_names",
    "class_colors",
    "class_pixel_counts",
    "band_mean",
    "band_std",
    "scene_path",
    "scene_transform",
    "scene_shape",
    "tiles_per_split",
    "version",
]


@pytest.mark.parametrize("key", NEEDED_METADATA)
def test_store_missing_a_metadata_key_is_refused_on_open(tmp_path, scene_and_mask, key):
    scene, mask, _, _ = scene_and_mask
    path = build(scene, mask, tmp_path / "s.zarr").path
    edit_metadata(path, lambda attrs: attrs.pop(key))
    with pytest.raises(StoreError, match=f"metadata '{key}' is missing") as info:
        TileStore.open(path)
    assert str(path) in str(info.value) and "geodnn tile" in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("tile_size", "32", "'32' (text)"),
        ("bands", 2.5, "2.5"),
        ("bands", True, "True"),
        ("class_names", "mask", "'mask' (text)"),
        ("class_colors", [[0, 0], [1, 2, 3]], "[[0, 0], [1, 2, 3]]"),
        ("band_mean", [1.0, "x"], "[1.0, 'x']"),
        ("class_pixel_counts", None, "None"),
        ("scene_transform", [1, 2, 3], "[1, 2, 3]"),
        ("tiles_per_split", {"train": 6}, "{'train': 6}"),
        ("crs", 4326, "4326"),
        ("split", [], "[]"),
    ],
)
def test_store_with_a_wrong_metadata_value_is_refused_on_open(
    tmp_path, scene_and_mask, key, value, shown
):
    scene, mask, _, _ = scene_and_mask
    path = build(scene, mask, tmp_path / "s.zarr").path
    edit_metadata(path, lambda attrs: attrs.update({key: value}))
    with pytest.raises(StoreError, match=f"metadata '{key}' is ") as info:
        TileStore.open(path)
    message = str(info.value)
    assert str(path) in message and shown in message and "geodnn tile" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("band_mean", [1.0], "'band_mean' has 1 values for 2 bands"),
        ("band_std", [1.0, 2.0, 3.0], "'band_std' has 3 values for 2 bands"),
        ("class_colors", [[0, 0, 0]], "'class_colors' has 1 values for 2 classes"),
        ("class_pixel_counts", [1, 2, 3], "'class_pixel_counts' has 3 values for 2 classes"),
    ],
)
def test_store_with_metadata_of_the_wrong_length_is_refused_on_open(
    tmp_path, scene_and_mask, key, value, fragment
):
    scene, mask, _, _ = scene_and_mask
    path = build(scene, mask, tmp_path / "s.zarr").path
    edit_metadata(path, lambda attrs: attrs.update({key: value}))
    with pytest.raises(StoreError, match=fragment):
        TileStore.open(path)


def test_store_with_a_text_version_says_so(tmp_path, scene_and_mask):
    scene, mask, _, _ = scene_and_mask
    path = build(scene, mask, tmp_path / "s.zarr").path
    edit_metadata(path, lambda attrs: attrs.update(version=str(VERSION)))
    with pytest.raises(StoreError, match=rf"version '{VERSION}' \(text\), this geodnn reads"):
        TileStore.open(path)


def test_store_without_optional_metadata_opens(tmp_path, scene_and_mask):
    scene, mask, _, _ = scene_and_mask
    path = build(scene, mask, tmp_path / "s.zarr").path
    edit_metadata(path, lambda attrs: [attrs.pop(k) for k in ("class_values", "crs", "split")])
    store = TileStore.open(path)
    assert store.class_values is None and store.crs is None and store.band_mean.shape == (2,)


def test_the_store_path_returned_is_absolute(tmp_path, scene_and_mask, monkeypatch):
    """Notebooks paste it into a config, whose relative paths are read from the config's folder."""
    scene, mask, *_ = scene_and_mask
    monkeypatch.chdir(tmp_path)
    path = build_store(scene, mask, "rel.zarr", tile=32, split=SplitSpec("columns", 0.6, 8))
    assert path == tmp_path / "rel.zarr" and path.is_absolute()
