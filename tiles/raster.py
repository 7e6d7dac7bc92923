"""Opening GeoTIFF scenes: validation with one-line errors, lazy Dask arrays and windowed reads.

Every read returns float32 with NaN where the file says there is no data (nodata value, mask band
or alpha), so downstream code has a single convention for missing pixels. An alpha band is such a
mask, not data: it is left out of the band count and of every read.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import re
import shlex
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

import numpy as np
import pyproj
import rasterio
import rioxarray
import shapely
import xarray as xr
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import CRSError, RasterioIOError
from rasterio.warp import transform_geom
from rasterio.windows import Window

from .errors import RasterInputError, TilesError
from .warn import warn_user

P = ParamSpec("P")
R = TypeVar("R")

# GDAL's block cache while a whole scene is read or written: bounded, so memory does not grow with
# the scene (GDAL's default is 5 % of RAM). In bytes: rasterio hands an integer GDAL_CACHEMAX to
# GDAL as bytes (64 was once a 64-byte cache, below one swath of a compressed copy).
GDAL_CACHE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class SceneInfo:
    """Georeferencing and layout of a scene, read once from the file's header.

    `count` is the number of data bands: an alpha band is a mask, not data, so it is left out.
    """

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
    alpha_bands: int = 0  # alpha bands in the file, left out of `count`
    band_indexes: tuple[int, ...] = ()  # 1-based indexes of the data bands (`data_bands`)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(min x, min y, max x, max y) of the scene, whichever way its rows and columns run."""
        return grid_bounds(self.height, self.width, self.transform)

    @property
    def pixel_area(self) -> float:
        """Area of one pixel in squared CRS units."""
        return abs(self.transform.a * self.transform.e - self.transform.b * self.transform.d)


def grid_bounds(height: int, width: int, transform: Affine) -> tuple[float, float, float, float]:
    """(min x, min y, max x, max y) of a grid's four corners.

    Unlike `array_bounds`, this holds for south-up (positive pixel height) and rotated grids, so
    overlap tests can compare intervals directly.
    """
    rows, cols = [0, 0, height, height], [0, width, 0, width]
    xs, ys = rasterio.transform.xy(transform, rows, cols, offset="ul")
    return float(min(xs)), float(min(ys)), float(max(xs)), float(max(ys))


def bounded_block_cache() -> rasterio.Env | nullcontext:
    """GDAL's block cache held to GDAL_CACHE_BYTES while entered, then restored. The limit is
    process-wide, so a job enters this once in its own thread and Dask's reading threads keep
    to it (threads entering and leaving it on their own would lift it under each other). A
    GDAL_CACHEMAX set already wins: the user's (environment, or a `rasterio.Env` of theirs)
    or an enclosing job's. Scoped, not set at import: importing geodnn changes no setting."""
    if "GDAL_CACHEMAX" in os.environ:
        return nullcontext()
    if rasterio.env.hasenv() and "GDAL_CACHEMAX" in rasterio.env.getenv():
        return nullcontext()
    return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES)


def holding_block_cache(func: Callable[P, R]) -> Callable[P, R]:
    """`func` run inside `bounded_block_cache()`: for a job that reads or writes whole scenes
    (a mask's first scan too: a 16k one filled 270 MB of GDAL's default cache)."""

    @functools.wraps(func)
    def bounded(*args: P.args, **kwargs: P.kwargs) -> R:
        with bounded_block_cache():
            return func(*args, **kwargs)

    return bounded


def data_bands(src: rasterio.DatasetReader) -> list[int]:
    """1-based indexes of the bands that hold data, i.e. all but alpha bands.

    GDAL already applies an alpha band to the other bands' masks, so reading it as data would
    only add a band that is never NaN (and keep transparent pixels from being nodata).
    """
    return [i for i, ci in enumerate(src.colorinterp, start=1) if ci != ColorInterp.alpha]


def io_error_reason(exc: Exception) -> str:
    """The first line of the GDAL message behind a rasterio I/O error.

    Rasterio often raises a generic "Read failed. See previous exception" error whose real reason
    is in `__cause__`.
    """
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    lines = str(cause).strip().splitlines()
    return lines[0].strip() if lines else type(cause).__name__


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
            bands = tuple(data_bands(src))
            info = SceneInfo(
                path=path,
                width=src.width,
                height=src.height,
                count=len(bands),
                dtype=src.dtypes[0],
                crs=src.crs,
                transform=src.transform,
                nodata=src.nodata,
                has_mask=_needs_mask(src),
                block_shape=tuple(src.block_shapes[0]),
                alpha_bands=src.count - len(bands),
                band_indexes=bands,
            )
            if check_data:
                src.read(1, window=Window(src.width - 1, src.height - 1, 1, 1))
                _warn_if_alpha_holds_data(src, path, bands)
            gcps_only = _georeferenced_by_gcps_only(src)
    except RasterioIOError as exc:
        raise RasterInputError(
            f"{path}: not a readable raster ({io_error_reason(exc)}); pass a valid GeoTIFF"
        ) from None
    if info.count == 0:
        raise RasterInputError(f"{path}: raster has no data bands; pass an image with data bands")
    if str(info.dtype).startswith("complex"):  # read as float, the imaginary part is dropped
        raise RasterInputError(
            f"{path}: {info.dtype} (complex) bands, whose imaginary part would be dropped; "
            "convert them to real bands first (amplitude or intensity, e.g. a VRT with GDAL's "
            "'mod' pixel function)"
        )
    if gcps_only:
        raise RasterInputError(
            f"{path}: georeferenced only by ground control points (no geotransform); warp it "
            f"onto a grid first (`gdalwarp -r near {path.name} warped.tif`) and pass that"
        )
    return info


def _warn_if_alpha_holds_data(src: rasterio.DatasetReader, path: Path, bands: tuple) -> None:
    """An alpha band is read as a mask (0 = missing), not as data. GDAL tags the 4th band of a
    4-band 8-bit GeoTIFF written without PHOTOMETRIC as alpha, so an R,G,B,NIR stack loses its
    NIR that way: warn (once per file and process) when the band's name looks like data, or when
    most of its sampled pixels are neither about transparent nor about opaque."""
    for index in sorted(set(range(1, src.count + 1)) - set(bands)):
        key = (path.resolve(), index)
        if key in _ALPHA_WARNED:
            continue
        name = src.descriptions[index - 1] or ""
        named_as_data = bool(name) and not re.search("alpha|mask|transp|opacity", name, re.I)
        if named_as_data or _mask_like_share(src, index) < 0.5:
            _ALPHA_WARNED.add(key)
            label = f" ({name!r})" if name else ""
            warn_user(
                f"{path}: band {index}{label} is tagged as alpha, so it is read as a mask "
                "(0 = missing) and not as data, yet it looks like data; if it holds data rather "
                "than transparency, reset its colour interpretation "
                f"(`{untag_alpha_command(src, path, index)}`)"
            )


def untag_alpha(path: str | os.PathLike) -> str:
    """The command that makes a scene's alpha band(s) read as data (`untag_alpha_command`)."""
    with rasterio.open(path) as src:
        return untag_alpha_command(src, Path(path))


def untag_alpha_command(src: rasterio.DatasetReader, path: Path, index: int | None = None) -> str:
    """The shell command that re-tags band `index` (None: every alpha band) of a file from alpha
    to undefined (rio, installed with rasterio; GDAL's own utilities often are not)."""
    names = [
        "undefined" if (i == index if index else ci == ColorInterp.alpha) else ci.name
        for i, ci in enumerate(src.colorinterp, start=1)
    ]
    return rio_edit(path, "--colorinterp", ",".join(names))


def rio_edit(path: str | os.PathLike, *options: str) -> str:
    """The `rio edit-info` command (installed with rasterio; GDAL's own utilities often are
    not) that applies `options` to a file, its path as the user gave it, quoted for a shell."""
    return shlex.join(["rio", "edit-info", *options, str(path)])


_ALPHA_WARNED: set[tuple[Path, int]] = set()
ALPHA_SAMPLE_BLOCKS = 5


def _mask_like_share(src: rasterio.DatasetReader, index: int) -> float:
    """Share of pixels, in a few blocks spread over the band, within 10 % of transparent (0) or
    of opaque (255, the type's maximum, or 1.0 for floats): ~1 for an alpha band (lossy JPEG and
    feathered edges included), well below for a data band such as NIR."""
    windows = [window for _, window in src.block_windows(index)]
    picks = np.unique(np.linspace(0, len(windows) - 1, ALPHA_SAMPLE_BLOCKS).round().astype(int))
    values = np.concatenate([src.read(index, window=windows[i]).ravel() for i in picks])
    dtype = np.dtype(src.dtypes[index - 1])
    tops = {1.0, 255.0} if dtype.kind == "f" else {255.0, float(np.iinfo(dtype).max)}
    values = values.astype(np.float64)
    near = np.zeros(values.shape, dtype=bool)
    for top in tops:
        near |= (np.abs(values) <= 0.1 * top) | (np.abs(values - top) <= 0.1 * top)
    return float(near.mean())


def _georeferenced_by_gcps_only(src: rasterio.DatasetReader) -> bool:
    """True when the file has GCPs but no geotransform (rasterio then reports the identity)."""
    return bool(src.gcps[0]) and src.transform.is_identity


def warn_if_no_crs(info: SceneInfo) -> str | None:
    """Warn that a scene has no CRS; returns the message (None when it has one)."""
    if info.crs is None:
        message = (
            f"{info.path}: raster has no CRS; outputs are written without one "
            f"(assign one with `{rio_edit(info.path, '--crs', 'EPSG:CODE')}` for a map that "
            "lines up)"
        )
        warn_user(message)
        return message
    return None


def ground_pixel_size(crs: CRS | None, transform: Affine, width: int, height: int) -> float | None:
    """The side of a pixel on the ground, in metres, at the scene's centre (the geometric
    mean of its two sides, measured on the ellipsoid: a projection's nominal size can be half
    of it, as Web Mercator's at 60 N): what a model trained at one resolution needs to see
    again. None without a CRS, or when neither the ellipsoid nor linear units give a size."""
    if crs is None:
        return None
    col, row = width / 2, height / 2
    points = [transform @ xy for xy in ((col, row), (col + 1, row), (col, row + 1))]
    try:
        source = pyproj.CRS.from_user_input(crs.to_wkt())
    except pyproj.exceptions.CRSError:  # a CRS PROJ cannot read: no size rather than an error
        return None
    geodetic = source.geodetic_crs
    if geodetic is None:  # an engineering (site) CRS: its own linear units
        try:
            factor = float(crs.linear_units_factor[1])
        except CRSError:
            return None
        sides = [math.dist(points[0], other) * factor for other in points[1:]]
    else:
        to_geodetic = pyproj.Transformer.from_crs(source, geodetic, always_xy=True)
        lonlat = [to_geodetic.transform(*xy) for xy in points]
        geod = geodetic.get_geod()
        sides = [geod.inv(*lonlat[0], *other)[2] for other in lonlat[1:]]
    size = math.sqrt(sides[0] * sides[1])
    return size if math.isfinite(size) and size > 0 else None


def grid_footprint(
    transform: Affine,
    rows: tuple[int, int],
    cols: tuple[int, int],
    crs: CRS | None = None,
    to_crs: CRS | str | None = None,
) -> shapely.Polygon:
    """The ground of rows [r0, r1) x cols [c0, c1) of a grid as a polygon in the grid's CRS
    or, given both CRSs, reprojected to `to_crs` (its edges densified every 64 px, as they
    bend): lets regions of different scenes be compared."""
    (r0, r1), (c0, c1) = rows, cols
    corners = [(c0, r0), (c1, r0), (c1, r1), (c0, r1)]
    ring = shapely.Polygon([transform * (float(c), float(r)) for c, r in corners])
    if crs is None or to_crs is None or CRS.from_user_input(to_crs) == crs:
        return ring
    edges = shapely.segmentize(ring, 64 * max(abs(transform.a), abs(transform.e)))
    return shapely.geometry.shape(transform_geom(crs, to_crs, edges.__geo_interface__))


def shares_ground(region: shapely.Polygon, other: shapely.Polygon) -> bool:
    """Whether `other` covers more than 0.1 % of `region` (footprints in one CRS): a real
    overlap of regions, not the sliver two reprojected edges leave."""
    return region.intersection(other).area > 1e-3 * region.area


def read_window(src: rasterio.DatasetReader, window: Window) -> np.ndarray:
    """Read a window of the data bands (no alpha) as float32 (bands, h, w), NaN where
    nodata/mask/alpha say so or values are inf. A block GDAL cannot decode (a file damaged
    inside, which opening it does not show) is one RasterInputError naming the window."""
    try:
        return _read_window(src, window)
    except RasterioIOError as exc:
        failure = unreadable_window(src.name, window, exc)
    # raised outside the handler: Dask sends a task's error to the caller by pickling it, and
    # rasterio's error as its context cannot be, which turned it into a bare Exception
    raise failure


def sample_band_medians(path: str | os.PathLike, grid: int = 4, size: int = 64) -> np.ndarray:
    """Per-band medians of the valid pixels in grid x grid small windows spread over the scene:
    a look at its value range that costs a few block reads whatever the scene's size (NaN for
    a band whose sampled pixels are all nodata)."""
    with rasterio.open(path) as src:
        h, w = min(size, src.height), min(size, src.width)
        rows = np.linspace(0, src.height - h, grid).astype(int)
        cols = np.linspace(0, src.width - w, grid).astype(int)
        windows = {(int(r), int(c)) for r in rows for c in cols}
        samples = [read_window(src, Window(c, r, w, h)) for r, c in sorted(windows)]
    pixels = np.concatenate([s.reshape(s.shape[0], -1) for s in samples], axis=1)
    valid = [band[~np.isnan(band)] for band in pixels]
    return np.array([np.median(v) if v.size else np.nan for v in valid])


def unreadable_window(path: str, window: Window, exc: Exception) -> RasterInputError:
    """The error for a window of `path` that could not be read (GDAL's reason kept)."""
    rows, cols = window.toslices()
    where = f"rows {rows.start}-{rows.stop}, columns {cols.start}-{cols.stop}"
    local = "://" not in path and not path.startswith("/vsi")  # not a URL or GDAL's own
    if local and not os.path.exists(path):  # moved, deleted or unmounted while read
        return RasterInputError(
            f"{path}: the file went away while being read (at {where}); put it back, or "
            "copy the scene to a local disk, and run again"
        )
    return RasterInputError(
        f"{path}: damaged or unreadable at {where} ({io_error_reason(exc)}); re-download or "
        "re-export it"
    )


def _read_window(src: rasterio.DatasetReader, window: Window) -> np.ndarray:
    bands = data_bands(src)
    if src.count > len(bands) and src.nodata is not None:
        array = _read_nodata_and_alpha(src, bands, window)
    else:
        with np.errstate(over="ignore"):  # a float64 nodata (-1e300) as float32 fill: -inf
            data = src.read(bands, window=window, masked=True, out_dtype="float32")
        array = np.ma.filled(data, np.nan).astype(np.float32, copy=False)
    array[~np.isfinite(array)] = np.nan
    return array


def _read_nodata_and_alpha(src: rasterio.DatasetReader, bands: list[int], window: Window):
    """A scene with both a nodata value and an alpha band: GDAL's masks then follow the nodata
    value alone (its NodataShadowWarning, once per read), which would keep a transparent collar
    as data. Missing here is where either says so: a band equal to nodata, or alpha 0."""
    array = src.read(bands, window=window, out_dtype="float32")
    array[array == np.float32(src.nodata)] = np.nan
    array[:, src.read(first_alpha(src.count, bands), window=window) == 0] = np.nan
    return array


def first_alpha(count: int, data_bands: Sequence[int]) -> int:
    """The 1-based index of a file's first alpha band: the first that is not a data band."""
    return next(i for i in range(1, count + 1) if i not in data_bands)


def open_lazy(path: str | os.PathLike, chunks: int | tuple[int, int] = 1024) -> xr.DataArray:
    """The scene's data bands (no alpha) as a lazy, Dask-backed (band, y, x) float32 DataArray
    with NaN for nodata."""
    given = chunks
    if isinstance(chunks, numbers.Integral):
        chunks = (chunks, chunks)
    if not (
        isinstance(chunks, tuple | list)
        and len(chunks) == 2
        and all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in chunks)
        and min(chunks) >= 1
    ):
        raise TilesError(f"chunks={given!r}: pass a whole number of pixels >= 1, or (rows, cols)")
    chunks = (int(chunks[0]), int(chunks[1]))
    info = open_scene(path, check_data=False)
    source = Path(info.path).resolve()  # the lazy reads happen later, maybe in another folder
    shadowed = info.alpha_bands > 0 and info.nodata is not None  # see _read_nodata_and_alpha
    bands = rioxarray.open_rasterio(
        source,
        chunks={"band": -1, "y": chunks[0], "x": chunks[1]},
        masked=not shadowed,
        lock=False,
    )
    array = bands.sel(band=list(info.band_indexes)).astype(np.float32)
    if shadowed:
        alpha = bands.sel(band=first_alpha(len(bands.band), info.band_indexes))
        array = array.where((array != np.float32(info.nodata)) & (alpha != 0))
    return array.where(np.isfinite(array))
