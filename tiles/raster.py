"""Opening GeoTIFF scenes: validation with one-line errors, lazy Dask arrays and windowed reads.

Every read returns float32 with NaN where the file says there is no data (nodata value, mask band
or alpha), so downstream code has a single convention for missing pixels.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import rioxarray
import xarray as xr
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import MaskFlags
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from .errors import RasterInputError


@dataclass(frozen=True)
class SceneInfo:
    """Georeferencing and layout of a scene, read once from the file's header."""

    path: Path
    width: int
    height: int
    count: int
    dtype: str
    crs: CRS | None
    transform: Affine
    nodata: float | None
    has_mask: bool
    block_shape: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return rasterio.transform.array_bounds(self.height, self.width, self.transform)

    @property
    def pixel_area(self) -> float:
        """Area of one pixel in squared CRS units."""
        return abs(self.transform.a * self.transform.e - self.transform.b * self.transform.d)


def _needs_mask(src: rasterio.DatasetReader) -> bool:
    flags = src.mask_flag_enums[0] if src.count else []
    return any(f in flags for f in (MaskFlags.per_dataset, MaskFlags.alpha))


def open_scene(path: str | os.PathLike, check_data: bool = True) -> SceneInfo:
    """Validate `path` as a readable raster and describe it; raise RasterInputError otherwise.

    With `check_data`, the last block is read too, which catches truncated files early.
    """
    path = Path(path)
    if not path.exists():
        raise RasterInputError(f"{path}: file not found; check the path")
    if path.is_dir():
        raise RasterInputError(f"{path}: is a folder; pass a GeoTIFF file")
    try:
        with rasterio.open(path) as src:
            info = SceneInfo(
                path=path,
                width=src.width,
                height=src.height,
                count=src.count,
                dtype=src.dtypes[0],
                crs=src.crs,
                transform=src.transform,
                nodata=src.nodata,
                has_mask=_needs_mask(src),
                block_shape=tuple(src.block_shapes[0]),
            )
            if check_data:
                src.read(1, window=Window(src.width - 1, src.height - 1, 1, 1))
    except RasterioIOError as exc:
        reason = str(exc).split(":")[-1].strip() or "unreadable"
        raise RasterInputError(
            f"{path}: not a readable raster ({reason}); pass a valid GeoTIFF"
        ) from None
    if info.count == 0:
        raise RasterInputError(f"{path}: raster has no bands; pass an image with data bands")
    return info


def warn_if_no_crs(info: SceneInfo) -> None:
    if info.crs is None:
        warnings.warn(
            f"{info.path}: raster has no CRS; outputs are written without one "
            "(assign one with `gdal_edit.py -a_srs` for a map that lines up)",
            stacklevel=2,
        )


def read_window(src: rasterio.DatasetReader, window: Window) -> np.ndarray:
    """Read a window as float32 (bands, h, w), NaN where nodata/mask say so or values are inf."""
    data = src.read(window=window, masked=True, out_dtype="float32")
    array = np.ma.filled(data, np.nan).astype(np.float32, copy=False)
    array[~np.isfinite(array)] = np.nan
    return array


def open_lazy(path: str | os.PathLike, chunks: int | tuple[int, int] = 1024) -> xr.DataArray:
    """The scene as a lazy, Dask-backed (band, y, x) float32 DataArray with NaN for nodata."""
    info = open_scene(path, check_data=False)
    if isinstance(chunks, int):
        chunks = (chunks, chunks)
    array = rioxarray.open_rasterio(
        info.path, chunks={"band": -1, "y": chunks[0], "x": chunks[1]}, masked=True, lock=False
    )
    return array.astype(np.float32).where(np.isfinite(array))
