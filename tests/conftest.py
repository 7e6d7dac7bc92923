"""Shared fixtures: paths to the sample scenes shipped in data/, and small synthetic GeoTIFFs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

os.environ.setdefault("MPLBACKEND", "Agg")

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The sample scenes shipped with the project (see data/NOTICE.md)."""
    return DATA


def write_geotiff(
    path: Path, array: np.ndarray, *, crs="EPSG:32616", nodata=None, transform=None, **profile
) -> Path:
    """Write a (bands, H, W) or (H, W) array as a GeoTIFF with a 0.5 m UTM grid by default."""
    if array.ndim == 2:
        array = array[None]
    count, height, width = array.shape
    transform = transform or from_origin(733601.0, 3725139.0, 0.5, 0.5)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=width,
        height=height,
        count=count,
        dtype=array.dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
        **profile,
    ) as dst:
        dst.write(array)
    return path


@pytest.fixture
def make_geotiff(tmp_path):
    """Factory writing a synthetic GeoTIFF into the test's temporary folder."""
    counter = iter(range(10**6))

    def make(array: np.ndarray, name: str | None = None, **kwargs) -> Path:
        path = tmp_path / (name or f"scene_{next(counter)}.tif")
        return write_geotiff(path, array, **kwargs)

    return make


def vegas_crop_store(data_dir: Path, root: Path, window: Window) -> Path:
    """A tile store (64 px tiles, gap 16) of a crop of the Vegas roads scene and its mask."""
    from pipelines.tile import build_store

    paths = {}
    for name in ("image", "roads"):
        with rasterio.open(data_dir / "vegas-roads" / f"{name}.tif") as src:
            profile = src.profile | {
                "width": window.width,
                "height": window.height,
                "transform": src.window_transform(window),
            }
            paths[name] = root / f"{name}.tif"
            with rasterio.open(paths[name], "w", **profile) as dst:
                dst.write(src.read(window=window))
    return build_store(paths["image"], paths["roads"], root / "tiles.zarr", tile=64, gap=16)


@pytest.fixture(scope="session")
def store(data_dir, tmp_path_factory):
    """A small tile store from a 320x320 crop of the Vegas roads scene (keeps tests fast)."""
    return vegas_crop_store(data_dir, tmp_path_factory.mktemp("vegas"), Window(500, 600, 320, 320))


@pytest.fixture(scope="session")
def overlapping_store(data_dir, tmp_path_factory):
    """The `store` crop moved 100 px west: its validation columns are `store`'s training ones."""
    root = tmp_path_factory.mktemp("vegas-west")
    return vegas_crop_store(data_dir, root, Window(400, 600, 320, 320))


@pytest.fixture(scope="session")
def other_store(data_dir, tmp_path_factory):
    """A second scene's store: another, smaller crop of the Vegas scene (256 x 320)."""
    root = tmp_path_factory.mktemp("vegas-north")
    return vegas_crop_store(data_dir, root, Window(100, 100, 320, 256))


@pytest.fixture
def train_config(tmp_path):
    """Factory: a tiny training config (depth 2, width 4, epochs of 3 iterations) for a store."""

    def make(store, solver="adam", iterations=6, extra=""):
        from pipelines.config import load_config

        path = tmp_path / f"job-{solver}.toml"
        path.write_text(
            f'[data]\nstore = "{store}"\ncrop = 32\nval_tiles = 4\n'
            "[model]\ndepth = 2\nwidth = 4\ndilations = [1, 2]\n"
            f'[train]\nsolver = "{solver}"\niterations = {iterations}\nepoch = 3\n'
            "batch_size = 4\n" + extra
        )
        return load_config(path)

    return make


@pytest.fixture
def damaged_scene(tmp_path):
    """A deflate-tiled 256 x 256 GeoTIFF (blocks of 64) and its mask, with one block in the
    middle overwritten: opening it (which reads the last block) passes, reading that block fails."""
    rng = np.random.default_rng(0)
    path = write_geotiff(
        tmp_path / "damaged.tif",
        rng.integers(1, 4000, (1, 256, 256)).astype("uint16"),
        tiled=True,
        blockxsize=64,
        blockysize=64,
        compress="deflate",
    )
    mask = write_geotiff(
        tmp_path / "damaged-mask.tif", (rng.random((256, 256)) > 0.8).astype("uint8")
    )
    with rasterio.open(path) as src:
        offset = int(src.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
        size = int(src.get_tag_item("BLOCK_SIZE_1_1", "TIFF", bidx=1))
    with open(path, "r+b") as f:
        f.seek(offset + 10)
        f.write(b"\xff" * (size - 20))
    return path, mask


@pytest.fixture
def another_thread_leaves_first():
    """Factory: a context manager that enters `scope()` while another thread is inside a scope
    of its own, which that thread leaves first (for process-wide settings held by scopes)."""
    import threading
    from contextlib import contextmanager

    @contextmanager
    def inside(scope):
        entered, leave = threading.Barrier(2), threading.Event()

        def other():
            with scope():
                entered.wait()
                leave.wait()

        worker = threading.Thread(target=other)
        worker.start()
        with scope():
            entered.wait()
            leave.set()
            worker.join()
            yield

    return inside
