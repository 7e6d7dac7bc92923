"""Shared fixtures: paths to the sample scenes shipped in data/, and small synthetic GeoTIFFs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

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
