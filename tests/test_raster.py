import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from tiles.errors import RasterInputError
from tiles.raster import open_lazy, open_scene, read_window


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


def test_lazy_scene_is_dask_backed_and_masked(data_dir):
    lazy = open_lazy(data_dir / "atlanta-buildings" / "image.tif", chunks=256)
    assert lazy.chunks is not None and lazy.shape == (1, 900, 900)
    block = lazy[:, :256, :256].compute().values
    assert block.dtype == np.float32


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
    with pytest.raises(RasterInputError, match="not a readable raster"):
        open_scene(cut)
