import json
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyproj
import pytest
import rasterio
from affine import Affine
from click.testing import CliRunner
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.errors import NodataShadowWarning
from rasterio.rio.main import main_group as rio_main
from rasterio.windows import Window

from tiles.errors import RasterInputError, TilesError
from tiles.raster import (
    GDAL_CACHE_BYTES,
    bounded_block_cache,
    open_lazy,
    open_scene,
    read_window,
    warn_if_no_crs,
)


def rgba_scene(make_geotiff, height: int = 8, width: int = 8):
    """An RGB + alpha uint8 GeoTIFF whose left half is transparent (alpha 0)."""
    array = np.stack([np.full((height, width), v, dtype=np.uint8) for v in (10, 20, 30, 255)])
    array[3, :, : width // 2] = 0
    return make_geotiff(array, name="rgba.tif", photometric="RGB", alpha="YES")


def test_open_sample_scenes(data_dir):
    vegas = open_scene(data_dir / "vegas-roads" / "image.tif")
    assert vegas.shape == (1300, 1300) and vegas.crs.to_epsg() == 4326 and vegas.nodata is None
    naip = open_scene(data_dir / "naip-4band" / "image.tif")
    assert naip.count == 4 and naip.nodata == 0 and naip.pixel_area == 25.0


def test_read_window_maps_nodata_and_inf_to_nan(make_geotiff):
    array = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    array[0, 0, 0] = -9999
    array[0, 1, 1] = np.inf
    path = make_geotiff(array, nodata=-9999)
    with rasterio.open(path) as src:
        out = read_window(src, Window(0, 0, 4, 3))
    assert out.dtype == np.float32
    assert np.isnan(out[0, 0, 0]) and np.isnan(out[0, 1, 1])
    assert out[0, 2, 3] == 11


def test_lazy_scene_maps_nodata_and_inf_to_nan(make_geotiff):
    """open_lazy keeps the read_window contract: NaN is nodata, so no inf reaches statistics."""
    array = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    array[0, 0, 0] = -9999
    array[0, 1, 1], array[0, 2, 2] = np.inf, -np.inf
    lazy = open_lazy(make_geotiff(array, nodata=-9999), chunks=2).compute().values
    assert lazy.dtype == np.float32
    assert np.isnan(lazy[0, 0, 0]) and np.isnan(lazy[0, 1, 1]) and np.isnan(lazy[0, 2, 2])
    assert lazy[0, 2, 3] == 11 and np.isfinite(lazy).sum() == 9


@pytest.mark.parametrize("chunks", [256, np.int64(256), (256, 256), [256, 256]])
def test_lazy_scene_is_dask_backed_and_masked(data_dir, chunks):
    lazy = open_lazy(data_dir / "atlanta-buildings" / "image.tif", chunks=chunks)
    assert lazy.chunks is not None and lazy.shape == (1, 900, 900)
    block = lazy[:, :256, :256].compute().values
    assert block.dtype == np.float32


@pytest.mark.parametrize("chunks", ["auto", 0, (256,), 256.0])
def test_lazy_scene_names_bad_chunks(data_dir, chunks):
    """'auto' was a Dask ValueError 15 frames deep, 0 a ZeroDivisionError."""
    with pytest.raises(TilesError, match=r"^chunks=.*: pass a whole number of pixels >= 1"):
        open_lazy(data_dir / "atlanta-buildings" / "image.tif", chunks=chunks)


def test_lazy_scene_opened_by_a_relative_path_reads_after_a_chdir(data_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(data_dir)
    lazy = open_lazy(Path("atlanta-buildings") / "image.tif", chunks=256)
    monkeypatch.chdir(tmp_path)  # e.g. a notebook changing folder, or a Dask worker elsewhere
    assert float(lazy[:, :64, :64].mean().compute()) > 0


@pytest.mark.parametrize(
    "content, match",
    [(None, "file not found"), (b"hello, not a tiff", "not a readable raster")],
)
def test_bad_files_raise_one_line_errors(tmp_path, content, match):
    path = tmp_path / "scene.tif"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RasterInputError, match=match) as info:
        open_scene(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_truncated_tiff_is_rejected(make_geotiff, tmp_path):
    path = make_geotiff(np.random.default_rng(0).random((1, 256, 256), dtype=np.float32))
    data = path.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(RasterInputError, match="not a readable raster") as info:
        open_scene(cut)
    message = str(info.value)
    # the GDAL reason (rasterio's __cause__), not rasterio's "See previous exception" wrapper
    assert "See previous exception" not in message and "\n" not in message
    assert "IReadBlock failed" in message or "TIFFRead" in message


def test_alpha_band_is_a_mask_not_a_data_band(make_geotiff):
    path = rgba_scene(make_geotiff)
    assert open_scene(path).count == 3
    with rasterio.open(path) as src:
        out = read_window(src, Window(0, 0, 8, 8))
    assert out.shape == (3, 8, 8)
    assert np.isnan(out[:, :, :4]).all()  # transparent: nodata in every band
    np.testing.assert_array_equal(out[:, 0, 4:], [[10] * 4, [20] * 4, [30] * 4])
    lazy = open_lazy(path, chunks=4).compute().values
    assert lazy.shape == (3, 8, 8) and np.isnan(lazy[:, :, :4]).all()
    np.testing.assert_array_equal(lazy[:, :, 4:], out[:, :, 4:])


def test_alpha_band_masks_a_scene_that_also_has_a_nodata_value(make_geotiff):
    """GDAL's masks follow the nodata value alone when a file has both (NodataShadowWarning):
    a transparent collar of a value other than nodata must still be missing."""
    array = np.stack([np.full((8, 8), v, dtype=np.uint8) for v in (10, 20, 30, 255)])
    array[:3, :, :4], array[3, :, :4] = 255, 0  # white, transparent collar
    array[0, 0, 7] = 9  # nodata in band 1 only, opaque
    path = make_geotiff(array, name="rgba.tif", photometric="RGB", alpha="YES", nodata=9)
    with warnings.catch_warnings(), rasterio.open(path) as src:
        warnings.simplefilter("error", NodataShadowWarning)
        out = read_window(src, Window(0, 0, 8, 8))
    assert np.isnan(out[:, :, :4]).all() and not np.isnan(out[:, 1:, 4:]).any()
    assert np.isnan(out[0, 0, 7]) and out[1, 0, 7] == 20
    lazy = open_lazy(path, chunks=4).compute().values
    np.testing.assert_array_equal(lazy, out)


def test_an_alpha_band_that_looks_like_data_is_warned_of(make_geotiff):
    """GDAL tags band 4 of a 4-band 8-bit GeoTIFF written without PHOTOMETRIC as alpha: an
    R,G,B,NIR stack would lose its NIR band silently."""
    rng = np.random.default_rng(0)
    array = rng.integers(1, 250, (4, 8, 8)).astype(np.uint8)
    path = make_geotiff(array, name="rgbn.tif")
    with rasterio.open(path) as src:
        assert src.colorinterp[3] == rasterio.enums.ColorInterp.alpha
    with pytest.warns(UserWarning, match=r"rgbn.tif: band 4 is tagged as alpha") as caught:
        assert open_scene(path).count == 3
    command = re.search(r"\(`(rio edit-info [^`]+)`\)", str(caught[0].message))[1]
    assert command.endswith(f",undefined {path}")  # the path as given: it pastes anywhere
    ran = CliRunner().invoke(rio_main, shlex.split(command)[1:])  # the fix, as `rio` runs it
    assert ran.exit_code == 0, ran.output
    assert open_scene(path).count == 4  # band 4 is data now
    with warnings.catch_warnings():  # a real alpha (0 / 255) is not warned of
        warnings.simplefilter("error", UserWarning)
        open_scene(rgba_scene(make_geotiff))


def _alpha_scene(make_geotiff, dtype, opaque, name, bands=3, **profile):
    """Data bands and an alpha band: a transparent left quarter, a feathered edge."""
    data = np.random.default_rng(1).integers(1, 200, (bands, 64, 64)).astype(dtype)
    alpha = np.full((1, 64, 64), opaque, dtype=dtype)
    alpha[0, :, :16] = 0
    alpha[0, :, 16:20] = np.array([0.25, 0.5, 0.75, 0.9]) * opaque
    return make_geotiff(np.concatenate([data, alpha]), name=name, alpha="YES", **profile)


@pytest.mark.parametrize(
    ("dtype", "opaque", "profile"),
    [
        ("uint8", 255, {"photometric": "RGB"}),
        ("uint8", 255, {"photometric": "RGB", "compress": "JPEG", "tiled": True}),
        ("uint16", 255, {"photometric": "RGB"}),  # 0/255 alpha on 16-bit data
        ("float32", 255.0, {"bands": 1}),  # `gdalwarp -dstalpha` on a float scene
    ],
)
def test_real_alpha_bands_are_not_warned_of(make_geotiff, dtype, opaque, profile):
    """Feathered edges, lossy JPEG alpha, 0/255 on other types: still transparency."""
    path = _alpha_scene(make_geotiff, dtype, opaque, f"a_{dtype}.tif", **profile)
    with rasterio.open(path) as src:
        assert src.colorinterp[-1] == rasterio.enums.ColorInterp.alpha
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert open_scene(path).count == profile.get("bands", 3)


def test_scene_georeferenced_only_by_gcps_is_refused(tmp_path):
    path = tmp_path / "gcps.tif"
    gcps = [
        GroundControlPoint(row, col, 733601.0 + col / 2, 3725139.0 - row / 2)
        for row in (0, 10)
        for col in (0, 10)
    ]
    profile = dict(driver="GTiff", width=10, height=10, count=1, dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rasterio: no geotransform yet, on purpose
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(np.ones((1, 10, 10), dtype=np.float32))
            dst.gcps = (gcps, CRS.from_epsg(32616))
    with pytest.raises(RasterInputError, match="ground control points") as info:
        open_scene(path)
    message = str(info.value)
    assert str(path) in message and "gdalwarp" in message and "\n" not in message


def test_scene_without_crs_but_with_a_transform_is_accepted(make_geotiff):
    info = open_scene(make_geotiff(np.ones((1, 4, 4), dtype=np.float32), crs=None))
    assert info.crs is None and info.transform.a == 0.5
    with pytest.warns(UserWarning, match="no CRS.*`rio edit-info --crs EPSG:CODE "):
        warn_if_no_crs(info)  # the fix with a tool installed beside geodnn (rasterio's)


def test_bounds_are_min_max_for_a_south_up_scene(make_geotiff):
    south_up = Affine(1.0, 0.0, 1000.0, 0.0, 1.0, 1960.0)  # rows run north
    info = open_scene(make_geotiff(np.ones((1, 40, 30), dtype=np.float32), transform=south_up))
    assert info.bounds == (1000.0, 1960.0, 1030.0, 2000.0)


def test_ground_pixel_size_is_in_metres_whatever_the_crs_units():
    from rasterio.transform import from_origin

    from tiles.raster import ground_pixel_size

    utm = ground_pixel_size(CRS.from_epsg(32616), from_origin(7e5, 4e6, 0.5, 0.5), 100, 100)
    feet = ground_pixel_size(CRS.from_epsg(2229), from_origin(6e6, 2e6, 1.0, 1.0), 100, 100)
    # 1e-5 degrees at the equator: 1.11 m east-west and 1.11 m north-south
    degrees = ground_pixel_size(CRS.from_epsg(4326), from_origin(0, 0.0005, 1e-5, 1e-5), 100, 100)
    # Web Mercator's nominal 0.6 m at 60 N are 0.6 x cos(60) = 0.3 m on the ground
    x, y = pyproj.Transformer.from_crs(4326, 3857, always_xy=True).transform(10.0, 60.0)
    mercator = ground_pixel_size(CRS.from_epsg(3857), from_origin(x, y, 0.6, 0.6), 100, 100)
    assert utm == pytest.approx(0.5, rel=1e-3) and feet == pytest.approx(0.3048, rel=1e-3)
    assert degrees == pytest.approx(1.11, abs=0.01) and mercator == pytest.approx(0.3, rel=0.01)
    assert ground_pixel_size(None, from_origin(0, 0, 1, 1), 10, 10) is None


def test_a_complex_scene_is_refused(make_geotiff):
    """Read as float, a SAR scene's imaginary part was dropped without a word."""
    scene = make_geotiff((np.ones((1, 8, 8)) * (1 + 2j)).astype("complex64"))
    with pytest.raises(RasterInputError, match=r"complex64 \(complex\) bands, whose imaginary"):
        open_scene(scene)


def test_a_float64_nodata_beyond_float32_reads_without_numpy_noise(make_geotiff):
    """A valid GDAL nodata of -1e300 printed numpy's 'overflow encountered in cast'."""
    image = np.ones((1, 6, 6))
    image[0, :, :2] = -1e300
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with rasterio.open(make_geotiff(image, nodata=-1e300)) as src:
            out = read_window(src, Window(0, 0, 6, 6))
    assert np.isnan(out[0, :, :2]).all() and (out[0, :, 2:] == 1).all()


def test_bounded_block_cache_holds_gdal_s_cache_unless_the_user_set_it(monkeypatch):
    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    with bounded_block_cache():
        assert rasterio.env.getenv()["GDAL_CACHEMAX"] == GDAL_CACHE_BYTES
    with rasterio.Env(GDAL_CACHEMAX=2**27), bounded_block_cache():  # a notebook's own, or a
        assert rasterio.env.getenv()["GDAL_CACHEMAX"] == 2**27  # job's: not set again inside
    monkeypatch.setenv("GDAL_CACHEMAX", "512")  # the user's own setting wins
    with bounded_block_cache(), rasterio.Env():
        assert "GDAL_CACHEMAX" not in rasterio.env.getenv()


def test_importing_the_packages_changes_no_process_setting():
    """Importing geodnn for a notebook must not set GDAL's cache or silence a library's log."""
    script = """
import logging, os, pkgutil, importlib, json
def state():
    levels = {n: logging.getLogger(n).level for n in ("pyogrio", "rasterio", "distributed", "")}
    return dict(os.environ), levels
import torch, torch._inductor.config, rasterio, pyogrio, geopandas, distributed, numba
before = state()  # after the libraries' own imports, which may set some (torch does)
import geodnn, tiles, pipelines
for package in (geodnn, tiles, pipelines):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
after = state()
print(json.dumps([sorted(set(after[0].items()) ^ set(before[0].items())), before[1], after[1]]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    changed_env, levels_before, levels_after = json.loads(done.stdout.strip().splitlines()[-1])
    assert changed_env == [] and levels_after == levels_before


def test_a_scene_that_goes_away_while_read_is_not_called_damaged(make_geotiff, monkeypatch):
    """A scene folder moved (or a share unmounted) mid-run was 'damaged ... re-download it'."""
    from rasterio.errors import RasterioIOError

    from tiles.raster import read_window

    path = make_geotiff(np.ones((1, 64, 64), dtype=np.float32))

    def unreadable(src, window):
        raise RasterioIOError(f"{path}: No such file or directory")

    monkeypatch.setattr("tiles.raster._read_window", unreadable)
    with rasterio.open(path) as src:
        with pytest.raises(RasterInputError, match="damaged or unreadable"):  # still there
            read_window(src, Window(0, 0, 32, 32))
        path.unlink()
        with pytest.raises(RasterInputError, match=f"^{path}: the file went away while being"):
            read_window(src, Window(0, 0, 32, 32))
