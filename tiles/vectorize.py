"""Class map to GeoPackage polygons, streamed window by window, merged across window borders.

Each window of the class map is polygonized on its own (4-connected regions). Pieces inside a
window are final and written at once. Pieces that reach an inner window border are kept per
class; after each row of windows they are unioned and split into connected parts, and the parts
that do not reach the next row are written (the rest wait for it). So a region spanning several
windows becomes exactly one polygon, and memory holds about one window row of pieces. Geometry
is built in pixel coordinates (exact integer vertices, so touching edges coincide) and mapped to
the scene's CRS only when written.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
from affine import Affine
from rasterio.features import shapes
from shapely.geometry import shape

from .grid import ChunkGrid
from .progress import progress_bar
from .stitch import CLASS_NODATA, AtomicOutputs, check_output
from .style import class_style_qml, embed_layer_style

LAYER = "classes"
FLUSH_EVERY = 5000
# pyogrio logs every appended batch at INFO; that is noise next to the progress bar.
logging.getLogger("pyogrio").setLevel(logging.WARNING)


@dataclass(frozen=True)
class VectorOptions:
    """What to keep: regions of at least `min_area` (CRS units squared), simplified with
    `simplify` tolerance (CRS units, 0 = exact pixel edges); `background` is not polygonized.
    The `area` attribute is the region's exact pixel area, measured before simplifying."""

    min_area: float = 0.0
    simplify: float = 0.0
    background: int | None = 0
    window: int = 1024


@dataclass
class _Layer:
    """Buffered, appending writer of the polygon layer."""

    path: Path
    crs: object
    names: Sequence[str]
    transform: Affine
    options: VectorOptions
    rows: list[tuple[int, shapely.Geometry]]
    written: int = 0
    flushes: int = 0

    def add(self, class_id: int, pixel_polygon: shapely.Geometry) -> None:
        t = self.transform
        pixel_area = abs(t.a * t.e - t.b * t.d)
        if pixel_polygon.area * pixel_area < self.options.min_area:
            return
        self.rows.append((class_id, pixel_polygon))
        if len(self.rows) >= FLUSH_EVERY:
            self.flush()

    def flush(self, force: bool = False) -> None:
        if not self.rows and not (force and self.flushes == 0):
            return
        t = self.transform
        pixel_area = abs(t.a * t.e - t.b * t.d)
        ids = np.array([cid for cid, _ in self.rows], dtype=np.int32)
        pixel_geoms = np.array([g for _, g in self.rows], dtype=object)
        geoms = shapely.transform(pixel_geoms, lambda xy: _apply(t, xy))
        if self.options.simplify > 0:
            geoms = shapely.simplify(geoms, self.options.simplify, preserve_topology=True)
        frame = _frame(
            ids,
            [self.names[c] for c in ids],
            shapely.area(pixel_geoms) * pixel_area,
            gpd.GeoSeries(geoms, crs=self.crs),
        )
        import pyogrio  # here, not at import: predicting without --vectors never needs it

        pyogrio.write_dataframe(
            frame,
            self.path,
            layer=LAYER,
            driver="GPKG",
            geometry_type="Polygon",
            append=self.flushes > 0,
        )
        self.written += len(self.rows)
        self.flushes += 1
        self.rows = []


def _frame(
    ids: np.ndarray, names: list[str], areas: np.ndarray, geoms: gpd.GeoSeries
) -> gpd.GeoDataFrame:
    """The layer's rows with explicit column types, so an empty layer (no polygons) gets the
    same schema as a full one (otherwise pandas would type an empty `class_name` as Real)."""
    return gpd.GeoDataFrame(
        {
            "class_id": np.asarray(ids, dtype=np.int32),
            "class_name": pd.Series(names, dtype=str),
            "area": np.asarray(areas, dtype=np.float64),
        },
        geometry=geoms,
    )


def _apply(t: Affine, xy: np.ndarray) -> np.ndarray:
    x, y = xy[:, 0], xy[:, 1]
    return np.column_stack([t.a * x + t.b * y + t.c, t.d * x + t.e * y + t.f])


def _pieces(
    classes: np.ndarray, col0: int, row0: int, background: int | None
) -> Iterator[tuple[int, shapely.Geometry]]:
    valid = classes != CLASS_NODATA
    if background is not None:
        valid &= classes != background
    if not valid.any():
        return
    pixel = Affine(1, 0, col0, 0, 1, row0)
    for geom, value in shapes(classes, mask=valid, connectivity=4, transform=pixel):
        yield int(value), shape(geom)


def _on_inner_border(bounds, window, height: int, width: int) -> bool:
    col0, row0 = window.col_off, window.row_off
    col1, row1 = col0 + window.width, row0 + window.height
    minx, miny, maxx, maxy = bounds
    return (
        (minx <= col0 and col0 > 0)
        or (miny <= row0 and row0 > 0)
        or (maxx >= col1 and col1 < width)
        or (maxy >= row1 and row1 < height)
    )


def _settle(border: dict, row_end: int | None, layer: _Layer) -> None:
    """Merge the border pieces seen so far; write the merged regions that cannot grow any more
    (those not reaching `row_end`, the top of the next window row; all when it is None), so
    only one window row of pieces is ever held."""
    for class_id in sorted(border):
        keep = []
        for part in shapely.get_parts(shapely.unary_union(border[class_id])):
            if row_end is not None and part.bounds[3] >= row_end:
                keep.append(part)
            else:
                layer.add(class_id, part)
        border[class_id] = keep


def write_class_polygons(
    class_map: str | os.PathLike,
    gpkg: str | os.PathLike,
    class_names: Sequence[str],
    class_colors: Sequence[tuple[int, int, int]],
    options: VectorOptions = VectorOptions(),
    progress: bool = False,
) -> int:
    """Polygonize `class_map` into layer `classes` of `gpkg` (written in place); returns the
    number of polygons. Adds the QGIS style to the GeoPackage and a sidecar `.qml` next to it.
    `progress`: a bar over the rows of windows (this can take minutes on a large, busy map)."""
    gpkg = Path(gpkg)
    with rasterio.open(class_map) as src:
        layer = _Layer(gpkg, src.crs, class_names, src.transform, options, [])
        border: dict[int, list[shapely.Geometry]] = defaultdict(list)
        grid = ChunkGrid(src.height, src.width, options.window, 0)
        with progress_bar(grid.rows, "polygons", "row", progress) as bar:
            for i in range(grid.rows):
                window = _polygonize_row(src, grid, i, options.background, layer, border)
                last = i == grid.rows - 1
                _settle(border, None if last else window.row_off + window.height, layer)
                bar.update(1)
        layer.flush(force=True)
    ids = [i for i in range(len(class_names)) if i != options.background]
    qml = class_style_qml(ids, class_names, class_colors)
    embed_layer_style(gpkg, LAYER, qml, geometry_column=_geometry_column(gpkg))
    return layer.written


def _polygonize_row(src, grid: ChunkGrid, i: int, background, layer: _Layer, border: dict):
    """Polygonize row `i` of windows: regions inside a window are written, those touching an
    inner window border are kept in `border` for merging; returns the row's last window."""
    for j in range(grid.cols):
        window = grid.chunk_at(i, j).window
        classes = src.read(1, window=window)
        for class_id, piece in _pieces(classes, window.col_off, window.row_off, background):
            if _on_inner_border(piece.bounds, window, src.height, src.width):
                border[class_id].append(piece)
            else:
                layer.add(class_id, piece)
    return window


def _geometry_column(gpkg: Path) -> str:
    with sqlite3.connect(gpkg) as db:
        row = db.execute(
            "SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?", (LAYER,)
        ).fetchone()
    db.close()
    return row[0] if row else "geom"


def qml_path(gpkg: str | os.PathLike) -> Path:
    """The sidecar style QGIS looks for next to a GeoPackage: same name, `.qml`."""
    return Path(gpkg).with_suffix(".qml")


def warn_if_geographic(class_map: str | os.PathLike, out: Path) -> None:
    """Areas (and min_area) are in the CRS's units: squared degrees for a geographic CRS."""
    with rasterio.open(class_map) as src:
        crs = src.crs
    if crs is not None and crs.is_geographic:
        warnings.warn(
            f"{out}: CRS {crs.to_string()} is geographic, so 'area' and min_area are in squared "
            "degrees; reproject the scene to a projected CRS for areas in m2",
            stacklevel=3,
        )


def vectorize_classes(
    class_map: str | os.PathLike,
    out: str | os.PathLike,
    class_names: Sequence[str],
    class_colors: Sequence[tuple[int, int, int]],
    options: VectorOptions = VectorOptions(),
    overwrite: bool = False,
    outputs: AtomicOutputs | None = None,
    progress: bool = False,
) -> int:
    """Write class polygons to GeoPackage `out` and its `.qml` style, atomically.

    With `outputs`, the files are only reserved there and appear when the caller commits (so a
    whole prediction run succeeds or leaves nothing); otherwise they are committed here.
    """
    out = check_output(out, overwrite)
    own = outputs is None
    outputs = outputs or AtomicOutputs()
    try:
        warn_if_geographic(class_map, out)
        tmp = outputs.reserve(out)
        count = write_class_polygons(class_map, tmp, class_names, class_colors, options, progress)
        ids = [i for i in range(len(class_names)) if i != options.background]
        qml = class_style_qml(ids, class_names, class_colors)
        outputs.reserve(qml_path(out)).write_text(qml)
        if own:
            outputs.commit()
        return count
    finally:
        if own:
            outputs.abort()
