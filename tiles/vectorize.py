"""Class map to GeoPackage polygons, streamed window by window, merged across window borders.

Each window of the class map is polygonized on its own (4-connected regions). Pieces inside a
window are final and written at once. Pieces that reach an inner window border join an open
region: after each row of windows, a piece is linked to the pieces of its class it shares a
border edge with (in its row, and the previous row's pieces on its top edge), and a region none
of whose pieces reaches the next row is closed: its pieces are unioned once and written. So a
region spanning several windows becomes exactly one polygon; memory holds one window row of
pieces plus the regions still open, and each piece is unioned once (re-unioning an open region
every row made a scene-spanning one quadratic: 82 s at 4k^2). Geometry is built in pixel
coordinates (exact integer vertices, so touching edges coincide) and mapped to the scene's CRS
only when written.
"""

from __future__ import annotations

import logging
import os
import sqlite3
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

from .errors import OutputError
from .grid import ChunkGrid
from .progress import progress_bar
from .raster import bounded_block_cache
from .stitch import CLASS_NODATA, AtomicOutputs, check_output, writing
from .style import STYLES_TABLE, class_style_qml, embed_layer_style
from .warn import HeldLevel, warn_user

LAYER = "classes"
FLUSH_EVERY = 5000


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
            geoms = _simplified(geoms, self.options.simplify)
        frame = _frame(
            ids,
            [self.names[c] for c in ids],
            shapely.area(pixel_geoms) * pixel_area,
            gpd.GeoSeries(geoms, crs=self.crs),
        )
        import pyogrio  # here, not at import: predicting without --vectors never needs it

        with _quiet_appends():
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


# pyogrio logs every appended batch at INFO, noise beside the progress bar: held at WARNING
# while any layer is written, unless the user set its level (then theirs applies)
_quiet_appends = HeldLevel("pyogrio", logging.WARNING, unless_set=True).held


def _simplified(geoms: np.ndarray, tolerance: float) -> np.ndarray:
    """Each polygon simplified on its own; one that GEOS's topology-preserving simplification
    still leaves invalid (it can push a hole outside its shell) is kept exact."""
    simple = shapely.simplify(geoms, tolerance, preserve_topology=True)
    return np.where(shapely.is_valid(simple), simple, geoms)


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


@dataclass
class _Region:
    """Border pieces of one class connected across window borders, not yet written: `edge`
    holds those on the bottom edge of the latest row of windows, where the next row joins."""

    class_id: int
    pieces: list[shapely.Geometry]
    edge: list[shapely.Geometry]


def _edge_pairs(geoms: list[shapely.Geometry]) -> np.ndarray:
    """Index pairs (i < j) of pieces 4-connected across a window border: they share a border
    segment, not only a corner (interiors apart, boundaries meeting in a line). Holes never
    reach a window's edge, so the outlines decide alone (a region with thousands of holes is
    then tested as fast as a square); candidates come from an STRtree, tested all at once."""
    outlines = shapely.polygons(shapely.get_exterior_ring(np.asarray(geoms, dtype=object)))
    i, j = shapely.STRtree(outlines).query(outlines, predicate="touches")
    i, j = i[i < j], j[i < j]
    keep = shapely.relate_pattern(outlines[i], outlines[j], "F***1****")
    return np.column_stack([i[keep], j[keep]])


def _link(items: list[tuple[_Region | None, shapely.Geometry]]) -> list[int]:
    """Union-find over (owner, piece) items: each item's root after joining every pair of
    pieces that share an edge, and the edge pieces of one open region (they may be joined only
    through its pieces above the edge: the two legs of an inverted U)."""
    parent = list(range(len(items)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[int, int] = {}  # an open region's first item
    pairs = [(first.setdefault(id(o), k), k) for k, (o, _) in enumerate(items) if o is not None]
    for i, j in [*pairs, *_edge_pairs([g for _, g in items])]:
        parent[root(int(j))] = root(int(i))
    return [root(i) for i in range(len(items))]


def _settle(
    regions: list[_Region],
    pieces: list[tuple[int, shapely.Geometry]],
    row_end: int | None,
    layer: _Layer,
) -> list[_Region]:
    """Join this row's border `pieces` to each other and to the open `regions` they touch;
    write the regions that cannot grow any more (none of their pieces reaches `row_end`, the
    top of the next window row; all when it is None) and return the others."""
    by_class: dict[int, list] = defaultdict(list)
    for region in regions:
        by_class[region.class_id] += [(region, g) for g in region.edge]
    for class_id, piece in pieces:
        by_class[class_id].append((None, piece))
    still_open = []
    for class_id in sorted(by_class):
        items = by_class[class_id]
        groups: dict[int, _Region] = {}
        for (owner, piece), r in zip(items, _link(items), strict=True):
            group = groups.setdefault(r, _Region(class_id, [], []))
            if owner is None:
                group.pieces.append(piece)
                if row_end is not None and piece.bounds[3] >= row_end:
                    group.edge.append(piece)
            elif owner.pieces:  # an old region joins once, with all its pieces
                group.pieces += owner.pieces
                owner.pieces = []
        for group in groups.values():
            if group.edge:
                still_open.append(group)
            elif group.pieces:
                for part in shapely.get_parts(_merge(group.pieces)):
                    layer.add(class_id, part)
    return still_open


def _merge(pieces: list[shapely.Geometry]) -> shapely.Geometry:
    """A closed region's pieces as one polygon. The pieces' holes lie inside their own piece,
    away from every window border, so only the outlines are unioned and the holes are put back
    (a scene-spanning region with 168k holes: 12 s of overlay otherwise); a result GEOS finds
    invalid falls back to the plain union."""
    holes = [ring for piece in pieces for ring in piece.interiors]
    if len(pieces) == 1 or not holes:
        return shapely.union_all(pieces)
    outline = shapely.union_all(shapely.polygons(shapely.get_exterior_ring(pieces)))
    if outline.geom_type == "Polygon":
        merged = shapely.Polygon(outline.exterior, [*outline.interiors, *holes])
        if merged.is_valid:
            return merged
    return shapely.union_all(pieces)


def write_class_polygons(
    class_map: str | os.PathLike,
    gpkg: str | os.PathLike,
    class_names: Sequence[str],
    class_colors: Sequence[tuple[int, int, int]],
    options: VectorOptions = VectorOptions(),
    progress: bool = False,
) -> int:
    """Polygonize `class_map` into layer `classes` of `gpkg` (written in place); returns the
    number of polygons. Embeds the QGIS style (`layer_style`) in the GeoPackage; the sidecar
    `.qml` is `vectorize_classes`'s. `progress`: a bar over the rows of windows (this can take
    minutes on a large, busy map)."""
    gpkg = Path(gpkg)
    with rasterio.open(class_map) as src:
        layer = _Layer(gpkg, src.crs, class_names, src.transform, options, [])
        regions: list[_Region] = []
        grid = ChunkGrid(src.height, src.width, options.window, 0)
        with progress_bar(grid.rows, "polygons", "row", progress) as bar:
            for i in range(grid.rows):
                pieces = _polygonize_row(src, grid, i, options.background, layer)
                regions = _settle(regions, pieces, _row_end(grid, i), layer)
                bar.update(1)
        layer.flush(force=True)
    qml = layer_style(class_names, class_colors, options.background)
    embed_layer_style(gpkg, LAYER, qml, geometry_column=_geometry_column(gpkg))
    return layer.written


def layer_style(
    class_names: Sequence[str], class_colors: Sequence[tuple[int, int, int]], background
) -> str:
    """The polygon layer's QGIS style: one color per class, the background left out."""
    ids = [i for i in range(len(class_names)) if i != background]
    return class_style_qml(ids, class_names, class_colors)


def _row_end(grid: ChunkGrid, i: int) -> int | None:
    """The first pixel row below row `i` of windows (None for the last row)."""
    if i == grid.rows - 1:
        return None
    window = grid.chunk_at(i, 0).window
    return window.row_off + window.height


def _polygonize_row(
    src, grid: ChunkGrid, i: int, background, layer: _Layer
) -> list[tuple[int, shapely.Geometry]]:
    """Polygonize row `i` of windows: regions inside a window are written; those touching an
    inner window border are returned, for merging."""
    border = []
    for j in range(grid.cols):
        window = grid.chunk_at(i, j).window
        classes = src.read(1, window=window)
        for class_id, piece in _pieces(classes, window.col_off, window.row_off, background):
            if _on_inner_border(piece.bounds, window, src.height, src.width):
                border.append((class_id, piece))
            else:
                layer.add(class_id, piece)
    return border


def _geometry_column(gpkg: Path) -> str:
    with sqlite3.connect(gpkg) as db:
        row = db.execute(
            "SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?", (LAYER,)
        ).fetchone()
    db.close()
    return row[0] if row else "geom"


def check_replaceable(gpkg: str | os.PathLike) -> None:
    """Refuse to replace a GeoPackage that holds layers of its own beside geodnn's polygons and
    their style: the whole file is replaced (atomically), and a GIS user keeps project layers
    in one GeoPackage. A file GDAL cannot read as one holds no such layers."""
    import pyogrio

    path = Path(gpkg)
    if not path.is_file():
        return
    try:
        layers = [str(name) for name in pyogrio.list_layers(path)[:, 0]]
    except Exception:  # not a GeoPackage (pyogrio raises its own and GDAL's error types)
        return
    others = [name for name in layers if name not in (LAYER, STYLES_TABLE)]
    if others:
        raise OutputError(
            f"{path}: holds other layers ({', '.join(others)}) that replacing the file would "
            "delete; write the polygons to another .gpkg, or move those layers out first"
        )


def qml_path(gpkg: str | os.PathLike) -> Path:
    """The sidecar style QGIS looks for next to a GeoPackage: same name, `.qml`."""
    return Path(gpkg).with_suffix(".qml")


def warn_if_geographic(class_map: str | os.PathLike, out: Path) -> None:
    """Areas (and min_area) are in the CRS's units: squared degrees for a geographic CRS."""
    with rasterio.open(class_map) as src:
        note = geographic_area_note(src.crs, out)
    if note is not None:
        warn_user(note)


def geographic_area_note(crs, out: str | os.PathLike) -> str | None:
    """The warning polygons in a geographic CRS get, or None."""
    if crs is None or not crs.is_geographic:
        return None
    return (
        f"{out}: CRS {crs.to_string()} is geographic, so 'area' and min_area are in squared "
        "degrees; reproject the scene to a projected CRS for areas in m2"
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
    check_replaceable(out)  # before "pass --overwrite", which would not do here
    out = check_output(out, overwrite)
    own = outputs is None
    outputs = outputs or AtomicOutputs()
    try:
        warn_if_geographic(class_map, out)
        tmp = outputs.reserve(out)
        from pyogrio.errors import DataLayerError, DataSourceError  # (pyogrio loads on use)

        # refusals to write (pyogrio's GDAL, sqlite3 embedding the style: a full disk is
        # "database or disk is full"; the .qml's OSError) name the output in one line
        refused = (DataSourceError, DataLayerError, sqlite3.OperationalError)
        with bounded_block_cache(), writing(out, refused):
            count = write_class_polygons(
                class_map, tmp, class_names, class_colors, options, progress
            )
            qml = layer_style(class_names, class_colors, options.background)
            outputs.reserve(qml_path(out)).write_text(qml)
        if own:
            outputs.commit()
        return count
    finally:
        if own:
            outputs.abort()
