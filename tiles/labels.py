"""Labels on the scene grid: vector features rasterized, or raster masks read, window by window.

Conventions (shared with `geodnn`): 0 = background, 1..K = classes, `IGNORE_INDEX` (255) =
unlabeled or nodata. Vector labels are reprojected to the scene's CRS (never the scene to theirs)
and each window burns only the features its bounds touch, so large scenes stream.

Class ids:
- vector, no `class_attribute`: every feature is class 1 (named after the file), the rest 0;
- vector with `class_attribute`: integer values are the class ids themselves (0..254; a tile
  store needs one that is not 0; sparse codes such as 10, 20, ... leave the ids between them
  empty classes, which is warned of); true/false values are the class named after the attribute
  and background; any other values (text) map to 1..K in sorted order (numbers in them by
  value: "2" before "10"). Features without a
  value are burned as ignore. Lines and points are burned one pixel wide (with a warning:
  buffer road centre lines first);
- raster mask: 0 = background, each distinct non-zero value maps to 1..K in sorted order (a 0/255
  mask gives classes 0/1; a 0/1/2 mask keeps its ids). The mask's nodata value, if it declares one,
  marks unlabeled pixels (ignore), as do pixels outside the mask's extent. A mask is read by
  GDAL whatever its suffix; of several bands, band 1.
Where features overlap, later features in the file win.
"""

from __future__ import annotations

import os
import re
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pyproj
import rasterio
import rasterio.features
import rasterio.windows
import shapely
from affine import Affine
from pyproj.exceptions import ProjError
from rasterio._err import CPLE_BaseError
from rasterio.enums import Resampling
from rasterio.errors import CRSError, RasterioIOError, WindowError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from .errors import LabelError
from .raster import SceneInfo, grid_bounds, io_error_reason, rio_edit
from .warn import warn_user
from .wording import option

IGNORE_INDEX = 255  # also what many masks of others mark their unlabeled pixels with
MAX_CLASSES = 254  # ids 0..254; 255 is the ignore index
RASTER_SUFFIXES = {".tif", ".tiff", ".vrt", ".img", ".jp2"}
LAYER_SEPARATOR = "|layername="  # FILE|layername=LAYER: one layer of a multi-layer file

# Background black, then strong distinct colors (the same palette as geodnn's checkpoints).
PALETTE = [
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
]


def default_class_colors(classes: int) -> list[tuple[int, int, int]]:
    """RGB colors for class ids 0..classes-1, cycling the palette."""
    return [PALETTE[i % len(PALETTE)] for i in range(classes)]


def ignore_nodata(labels: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Set labels to IGNORE_INDEX where any band of the (bands, h, w) image is NaN (in place)."""
    labels[np.isnan(image).any(axis=0)] = IGNORE_INDEX
    return labels


@dataclass
class LabelSource(ABC):
    """Labels for one scene: class names, and `rasterize(window)` giving uint8 ids on its grid."""

    path: Path
    scene: SceneInfo
    class_names: list[str]
    class_values: list = field(default_factory=list)  # source value of each class id (None: bg)
    # the vector attribute the classes come from (None: one class per file, or a mask)
    class_attribute: str | None = field(default=None, kw_only=True)

    @property
    def classes(self) -> int:
        return len(self.class_names)

    @property
    def class_colors(self) -> list[tuple[int, int, int]]:
        return default_class_colors(self.classes)

    @property
    def unused_ids(self) -> set[int]:
        """Class ids no label has (the ids between sparse integer codes): warned of when read."""
        return set()

    # source id -> the id asked for by `match_classes` (256 entries, 255 kept), or None
    id_map: np.ndarray | None = field(default=None, kw_only=True)

    def rasterize(self, window: Window, image: np.ndarray | None = None) -> np.ndarray:
        """Class ids (h, w) uint8 for `window` of the scene grid; with `image` (bands, h, w),
        pixels that are NaN in any band become IGNORE_INDEX too."""
        labels = self._burn(window)
        if self.id_map is not None:
            labels = self.id_map[labels]
        return labels if image is None else ignore_nodata(labels, image)

    def match_classes(self, values: list, names: list[str]) -> None:
        """Renumber this source's classes as another class list numbers them: `values` are that
        list's source values (None for background), `names` its class names (e.g. a model's,
        recorded when it was trained). A file with one positive class matches a list with one
        whatever the values; otherwise classes match by value, and a value the list lacks is a
        LabelError naming it."""
        ours = [plain_class_value(v) for v in self.class_values]
        theirs = [plain_class_value(v) for v in values]
        single = len(ours) == 2 and len(theirs) == 2
        missing = [] if single else [v for v in ours[1:] if v not in theirs[1:]]
        if missing:
            raise LabelError(
                f"{self.path}: class value(s) {', '.join(map(str, missing))} are not among "
                f"the model's classes ({', '.join(map(str, theirs[1:]))}); pass labels with "
                f"the classes the model was trained on (or another {option('class-attribute')})"
            )
        # class_values stay this file's: they are what `_burn` numbers the pixels by
        self.id_map = id_map_by_value(ours, ours if single else theirs)
        self.class_names = list(names)

    @abstractmethod
    def _burn(self, window: Window) -> np.ndarray:
        """Class ids of `window`, before the image's nodata is applied."""


@dataclass
class VectorLabels(LabelSource):
    """Features in the scene's CRS with their class ids, and a spatial index over them."""

    geometries: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))
    ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint8))
    tree: shapely.STRtree | None = None

    @property
    def unused_ids(self) -> set[int]:
        return set(range(1, self.classes)) - {int(i) for i in np.unique(self.ids)}

    def _burn(self, window: Window) -> np.ndarray:
        height, width = int(window.height), int(window.width)
        transform = rasterio.windows.transform(window, self.scene.transform)
        bounds = grid_bounds(height, width, transform)  # all four corners: rotated grids too
        hits = np.sort(self.tree.query(shapely.box(*bounds), predicate="intersects"))
        if hits.size == 0:
            return np.zeros((height, width), dtype=np.uint8)
        shapes = zip(self.geometries[hits], self.ids[hits].tolist())
        with _RASTERIZE_LOCK:
            return rasterio.features.rasterize(
                shapes, out_shape=(height, width), transform=transform, fill=0, dtype="uint8"
            )


# rasterio's rasterize silences warnings with `warnings.catch_warnings()`, which is process-wide:
# two of them interleaved on Dask's threads restore each other's "ignore" filter, which then
# stays for the rest of the process (every later warning of geodnn tile, or of a notebook or
# `geodnn run` after it, was lost). One rasterize at a time keeps the filters as they were.
_RASTERIZE_LOCK = threading.Lock()


@dataclass
class RasterLabels(LabelSource):
    """A class mask read on the scene grid, directly or resampled (nearest) through a WarpedVRT."""

    same_grid: bool = True

    def _burn(self, window: Window) -> np.ndarray:
        with rasterio.open(self.path) as src:
            if self.same_grid:
                return self._classify_inside(src, window)
            with WarpedVRT(
                src,
                crs=self.scene.crs,
                transform=self.scene.transform,
                width=self.scene.width,
                height=self.scene.height,
                resampling=Resampling.nearest,
                dtype="float64",
                nodata=np.nan,
            ) as vrt:
                return self._classify(vrt, window)

    def _classify_inside(self, src, window: Window) -> np.ndarray:
        """A window of a mask on the scene's grid, read plainly (a boundless read ignores a
        rotated grid's rotation terms); any part outside the mask is ignore."""
        labels = np.full((int(window.height), int(window.width)), IGNORE_INDEX, dtype=np.uint8)
        try:
            inside = window.intersection(Window(0, 0, src.width, src.height))
        except WindowError:  # no pixel of the mask in it
            return labels
        row, col = int(inside.row_off - window.row_off), int(inside.col_off - window.col_off)
        height, width = int(inside.height), int(inside.width)
        labels[row : row + height, col : col + width] = self._classify(src, inside)
        return labels

    def _classify(self, src, window: Window) -> np.ndarray:
        """Map mask values to class ids; nodata, NaN and outside-the-mask pixels to ignore."""
        values = src.read(1, window=window, masked=True, out_dtype="float64")
        missing = np.ma.getmaskarray(values) | ~np.isfinite(values.data)
        known = np.asarray([0.0] + [float(v) for v in self.class_values[1:]])
        ids = np.searchsorted(known, np.where(missing, 0.0, values.data))
        labels = np.minimum(ids, IGNORE_INDEX).astype(np.uint8)
        labels[missing] = IGNORE_INDEX
        return labels


def plain_class_value(value):
    """A class value comparable across sources and storable as JSON: numbers as int, text (and
    None, the background's) as is."""
    if value is None or isinstance(value, str):
        return value
    return int(value)


def split_layer(path: str | os.PathLike) -> tuple[Path, str | None]:
    """(file, layer) of a label path; a layer of a multi-layer file is named as QGIS writes it
    in a layer's source: `buildings.gpkg|layername=roofs`."""
    text = os.fspath(path)
    if LAYER_SEPARATOR in text:
        file, layer = text.split(LAYER_SEPARATOR, 1)
        return Path(file), layer
    return Path(text), None


def load_labels(
    path: str | os.PathLike, scene: SceneInfo, class_attribute: str | None = None
) -> LabelSource:
    """Open labels for `scene`: a raster mask (by suffix) or a vector file (one layer of it with
    `FILE|layername=LAYER`); raise LabelError (one line, naming the file and the fix) for
    missing, empty, unprojected or disjoint labels. `LabelSource.match_classes` renumbers them
    to a trained model's classes."""
    path, layer = split_layer(path)
    if not path.exists():
        raise LabelError(f"{path}: label file not found; check the path")
    if path.suffix.lower() not in RASTER_SUFFIXES:
        try:
            return _load_vector(path, scene, class_attribute, layer)
        except UnreadableVectorError:
            if not _opens_as_raster(path):  # e.g. a GeoTIFF named .geotiff: a mask after all
                raise
    if class_attribute is not None or layer is not None:
        raise LabelError(
            f"{path}: {option('class-attribute')} and |layername= apply to vector labels; a raster "
            "mask's values are its classes, so drop them"
        )
    return _load_raster(path, scene)


def id_map_by_value(values: list, theirs: list) -> np.ndarray:
    """Class id lookup (256 entries) numbering the classes of label `values` (background first,
    each one of `theirs`) as `theirs` number the same values; 0 stays background, and ids
    outside `values` (255 among them) become ignore."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[0] = 0
    for source_id, value in enumerate(values[1:], start=1):
        lut[source_id] = theirs.index(value, 1)
    return lut


def has_attribute(path: str | os.PathLike, attribute: str) -> bool:
    """Whether `path` (FILE or FILE|layername=LAYER) is a vector file whose layer has the field
    `attribute`: a mask, an unreadable file or another layout has not."""
    path, layer = split_layer(path)
    if path.suffix.lower() in RASTER_SUFFIXES or not path.exists():
        return False
    try:
        fields = pyogrio.read_info(path, layer=_pick_layer(path, layer))["fields"]
    except Exception:  # unreadable or ambiguous: load_labels says why, in its own words
        return False
    return attribute in [str(f) for f in fields]


class UnreadableVectorError(LabelError):
    """A label file OGR cannot read as vectors (it may still be a raster mask)."""


def _opens_as_raster(path: Path) -> bool:
    try:
        with rasterio.open(path):
            return True
    except RasterioIOError:
        return False


# --- vector labels -------------------------------------------------------------------------


def _pick_layer(path: Path, layer: str | None) -> str | None:
    """The layer to read: the one named, else the file's only one; several unnamed (only the
    first would be read) or a name the file lacks are a LabelError listing the layers."""
    # feature layers only: a style table (`layer_styles`, which QGIS and geodnn's polygons add)
    # or another attribute-only table is no candidate
    names = [str(name) for name, kind in pyogrio.list_layers(path) if kind is not None]
    if layer is None and len(names) <= 1:  # named, so GDAL does not warn of a style table
        return names[0] if names else None
    if layer in names:
        return layer
    problem = f"has no layer '{layer}'" if layer is not None else f"has {len(names)} layers"
    raise LabelError(
        f"{path}: {problem} ({', '.join(names)}); name one as '{path}{LAYER_SEPARATOR}LAYER'"
    )


def _read_vector(path: Path, layer: str | None = None) -> gpd.GeoDataFrame:
    try:
        layer = _pick_layer(path, layer)
        frame = gpd.read_file(path, layer=layer, engine="pyogrio")
    except LabelError:
        raise
    except Exception as exc:  # pyogrio raises several unrelated types for unreadable files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnreadableVectorError(
            f"{path}: not a readable vector or raster label file ({reason}); pass GeoJSON, "
            "GeoPackage, Shapefile or a GeoTIFF mask"
        ) from None
    if not isinstance(frame, gpd.GeoDataFrame) or frame.geometry.name not in frame.columns:
        raise LabelError(
            f"{path}: has no geometries (a table, not vector labels); pass GeoJSON, GeoPackage "
            "or Shapefile features, or a GeoTIFF mask"
        )
    _restore_booleans(frame, path, layer)
    shapes = np.asarray(frame.geometry.array)
    features = len(frame)
    frame = frame[~shapely.is_missing(shapes) & ~shapely.is_empty(shapes)]
    if len(frame) == 0:
        what = f"{features} features, all with empty geometries" if features else "no features"
        raise LabelError(f"{path}: label file has {what}; pass a file with labeled geometries")
    if frame.crs is None:
        raise LabelError(
            f"{path}: vector labels have no CRS; set it (e.g. `ogr2ogr -a_srs EPSG:XXXX`) "
            "so they can be placed on the scene"
        )
    return frame


def _restore_booleans(frame: gpd.GeoDataFrame, path: Path, layer: str | None) -> None:
    """pyogrio reads a boolean field with NULLs as float (1.0 / 0.0 / NaN): make it boolean
    again. The field types are read (a second open of the file) only when a column could be
    one: float, with NaN, otherwise only 0 and 1."""
    maybe = [
        name
        for name in frame.columns
        if frame[name].dtype.kind == "f"
        and frame[name].isna().any()
        and frame[name].dropna().isin([0.0, 1.0]).all()
    ]
    if not maybe:
        return
    info = pyogrio.read_info(path, layer=layer)
    for name, kind in zip(info["fields"], info["dtypes"]):
        if kind == "bool" and name in maybe:
            frame[name] = frame[name].astype("boolean")


def _class_ids(frame: gpd.GeoDataFrame, path: Path, attribute: str | None):
    """(ids per feature, class names, source value per class id)."""
    if attribute is None:
        return np.ones(len(frame), dtype=np.uint8), ["background", path.stem], [None, 1]
    if attribute not in frame.columns or attribute == frame.geometry.name:
        names = ", ".join(c for c in frame.columns if c != frame.geometry.name)
        raise LabelError(
            f"{path}: no attribute '{attribute}'; pass {option('class-attribute')} with one "
            f"of: {names}"
        )
    column = frame[attribute]
    present = column.notna().to_numpy()
    if not present.any():
        raise LabelError(f"{path}: attribute '{attribute}' is empty; pick an attribute with values")
    values = column[present]
    if pd.api.types.is_bool_dtype(values):  # True = the class (named after it), False = background
        ids, names, values = _integer_classes(values.to_numpy(np.int64), present, path, attribute)
        return ids, ["background", attribute], values
    if _is_integral(values):
        return _integer_classes(values.astype(np.int64).to_numpy(), present, path, attribute)
    return _text_classes(values.astype(str).to_numpy(), present, path, attribute)


def _is_integral(values: pd.Series) -> bool:
    if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
        return False
    numbers = values.to_numpy(dtype=np.float64)
    return bool(np.all(np.isfinite(numbers)) and np.all(numbers == np.round(numbers)))


def _integer_classes(values: np.ndarray, present: np.ndarray, path: Path, attribute: str):
    if values.min() < 0 or values.max() > MAX_CLASSES:
        raise LabelError(
            f"{path}: attribute '{attribute}' has class ids outside 0..{MAX_CLASSES}; "
            "renumber the classes or use a text attribute"
        )
    ids = np.full(len(present), IGNORE_INDEX, dtype=np.uint8)
    ids[present] = values
    top = int(values.max())
    _warn_of_ids_without_features(values, top, path, attribute)
    names = ["background"] + [str(i) for i in range(1, top + 1)]
    return ids, names, [None] + list(range(1, top + 1))


def _warn_of_ids_without_features(values: np.ndarray, top: int, path: Path, attribute: str) -> None:
    """Integer codes are class ids, so codes that skip ids (sparse ones, 10, 20, ...) leave
    each skipped id a class no feature has: said where it happens, not later as classes
    'without training pixels' of the split."""
    unused = sorted(set(range(1, top + 1)) - set(values.tolist()))
    if unused:
        listed = ", ".join(map(str, unused[:5])) + (", ..." if len(unused) > 5 else "")
        warn_user(
            f"{path}: attribute '{attribute}' holds class ids up to {top}, but no feature has "
            f"{len(unused)} of them ({listed}): each is an empty class of the model (fine if "
            "other scenes have them; else renumber the codes 1..K or use a text attribute)"
        )


def natural_order(name: str) -> tuple[list, str]:
    """Sort key that orders the numbers in names by value: "2" before "10", "zone 9" before
    "zone 10" (plain text order put "10" first, so code "2" became class 3); names equal by
    value ("01", "1") in text order."""
    parts = [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in _DIGITS.split(name)]
    return parts, name


_DIGITS = re.compile(r"(\d+)")


def _text_classes(values: np.ndarray, present: np.ndarray, path: Path, attribute: str):
    uniques = sorted(set(values.tolist()), key=natural_order)
    if len(uniques) > MAX_CLASSES:
        raise LabelError(
            f"{path}: attribute '{attribute}' has {len(uniques)} distinct values "
            f"(at most {MAX_CLASSES} classes); pick a class attribute"
        )
    index = {v: i + 1 for i, v in enumerate(uniques)}
    ids = np.full(len(present), IGNORE_INDEX, dtype=np.uint8)
    ids[present] = [index[v] for v in values]
    return ids, ["background"] + uniques, [None] + uniques


def _load_vector(
    path: Path, scene: SceneInfo, attribute: str | None, layer: str | None = None
) -> VectorLabels:
    frame = _read_vector(path, layer)
    if scene.crs is None:
        raise LabelError(
            f"{path}: the scene {scene.path} has no CRS, so vector labels cannot be placed; "
            f"assign the scene a CRS (`{rio_edit(scene.path, '--crs', 'EPSG:CODE')}`)"
        )
    ids, names, values = _class_ids(frame, path, attribute)
    if attribute is None and layer is not None:
        names[1] = layer  # one positive class, named after its layer rather than its file
    _check_geographic_coordinates(frame, path)
    _warn_of_lines_and_points(frame, path)
    if same_local_grid(frame.crs, scene.crs):
        frame = frame.set_crs(scene.crs, allow_override=True)
    try:
        geometries = frame.to_crs(scene.crs).geometry.to_numpy()
    except (ProjError, CRSError):
        raise _no_transformation(path, frame.crs, scene) from None
    tree = shapely.STRtree(geometries)
    if tree.query(shapely.box(*scene.bounds), predicate="intersects").size == 0:
        raise LabelError(
            f"{path}: labels do not overlap the scene {scene.path.name} (in its CRS); "
            "pass the labels made for this scene"
        )
    return VectorLabels(
        path=path,
        scene=scene,
        class_names=names,
        class_values=values,
        class_attribute=attribute,
        geometries=geometries,
        ids=ids,
        tree=tree,
    )


def _check_geographic_coordinates(frame: gpd.GeoDataFrame, path: Path) -> None:
    """Projected coordinates under a geographic CRS (GeoJSON without a 'crs' member is read as
    EPSG:4326) would only fail the overlap test, blaming the labels instead of their CRS."""
    if not frame.crs.is_geographic:
        return
    x0, y0, x1, y1 = frame.total_bounds
    if min(x0, y0) < -360 or max(x1, y1) > 360:
        raise LabelError(
            f"{path}: coordinates reach ({x1:.6g}, {y1:.6g}), not longitude/latitude, but the "
            f"labels' CRS is geographic ({frame.crs.to_string()}; GeoJSON without a 'crs' "
            "member is read as EPSG:4326); set their real CRS (`ogr2ogr -a_srs EPSG:XXXX`)"
        )


def _warn_of_lines_and_points(frame: gpd.GeoDataFrame, path: Path) -> None:
    """Lines and points are burned one pixel wide (the pixels they touch); a road centre line
    labels a thin trace of the road, not its width."""
    kinds = frame.geometry.geom_type.str.replace("Multi", "")
    lines, points = int((kinds == "LineString").sum()), int((kinds == "Point").sum())
    if lines or points:
        warn_user(
            f"{path}: {lines} line and {points} point feature(s) are burned one pixel wide, "
            "not the objects' extent; buffer them to the objects' width first (GeoPandas "
            "`.buffer()` in a metric CRS) if they stand for areas"
        )


def _no_transformation(path: Path, crs, scene: SceneInfo) -> LabelError:
    """PROJ knows no operation between the two CRSs (e.g. a local site grid and UTM)."""
    return LabelError(
        f"{path}: PROJ has no transformation from the labels' CRS ('{_crs_name(crs)}') to the "
        f"scene's ('{_crs_name(scene.crs)}'); reproject the labels to the scene's CRS first "
        "(`ogr2ogr -t_srs` or `gdalwarp -t_srs`)"
    )


def same_local_grid(a, b) -> bool:
    """Two local (engineering) CRSs of the same name and axes, e.g. a site grid as GDAL writes it
    in a GeoTIFF (LOCAL_CS) and in a GeoPackage (with a datum): PROJ cannot relate local CRSs,
    so their coordinates are taken as the same."""
    if a is None or b is None:
        return False
    a, b = pyproj.CRS.from_user_input(a), pyproj.CRS.from_user_input(b)
    axes = [(x.direction, x.unit_name) for x in a.axis_info]
    return (
        a.is_engineering
        and b.is_engineering
        and a.name == b.name
        and axes == [(x.direction, x.unit_name) for x in b.axis_info]
    )


def _crs_name(crs) -> str:
    """A CRS's short name ('WGS 84 / UTM zone 11N', 'Site grid'), not its WKT."""
    return pyproj.CRS.from_user_input(crs).name


# --- raster masks --------------------------------------------------------------------------


def _same_grid(src, scene: SceneInfo) -> bool:
    """True when the mask's pixels are the scene's pixels (same transform and shape, and the
    same CRS or none on one of them: a mask saved without one, e.g. from numpy, is taken as
    drawn on the scene's grid, and so is a mask on a scene without CRS, with a warning in
    `_load_raster`)."""
    if (src.height, src.width) != scene.shape:
        return False
    crs_known = src.crs is not None and scene.crs is not None
    if crs_known and src.crs != scene.crs and not same_local_grid(src.crs, scene.crs):
        return False
    return _same_coefficients(src.transform, scene.transform, [0, 1, 2, 3, 4, 5])


def _same_coefficients(mask: Affine, scene: Affine, which: list[int]) -> bool:
    """Whether the two transforms agree in coefficients `which` (a, b, c, d, e, f = 0..5) to
    a millionth of a scene pixel."""
    pixel = max(abs(scene.a), abs(scene.e), 1e-300)
    a, b = np.asarray(mask)[which], np.asarray(scene)[which]
    return bool(np.all(np.abs(a - b) <= 1e-6 * pixel))


def _mask_values(src, path: Path) -> np.ndarray:
    """Distinct valid values of band 1, block by block so memory stays bounded."""
    found: set[float] = set()
    for _, window in src.block_windows(1):
        block = src.read(1, window=window, masked=True)
        valid = block.compressed()
        found.update(np.unique(valid[np.isfinite(valid)]).tolist())
        if len(found) > MAX_CLASSES + 1:
            raise LabelError(
                f"{path}: mask has more than {MAX_CLASSES} distinct values; pass a class mask "
                "(0 = background, one value per class)"
            )
    values = np.asarray(sorted(found), dtype=np.float64)
    if np.any(values != np.round(values)) or np.any(values < 0):
        raise LabelError(
            f"{path}: mask has fractional or negative values; pass a class mask of whole numbers"
        )
    return values[values != 0]


def _on_scene_lattice(src, scene: SceneInfo) -> bool:
    """Whether the mask's pixels are scene pixels (same CRS and pixel size, its origin a whole
    number of scene pixels away) though its extent differs: nearest resampling is then exact."""
    if src.crs != scene.crs:
        return False
    if not _same_coefficients(src.transform, scene.transform, [0, 1, 3, 4]):  # pixel size
        return False
    col, row = ~scene.transform @ (src.transform.c, src.transform.f)
    return abs(col - round(col)) < 1e-6 and abs(row - round(row)) < 1e-6


def _coverage(bounds: tuple[float, float, float, float], scene: SceneInfo) -> float:
    """The share of the scene's extent the mask's `bounds` (in the scene's CRS) cover."""
    left, bottom, right, top = bounds
    s_left, s_bottom, s_right, s_top = scene.bounds
    width = max(0.0, min(right, s_right) - max(left, s_left))
    height = max(0.0, min(top, s_top) - max(bottom, s_bottom))
    return width * height / ((s_right - s_left) * (s_top - s_bottom))


def _other_grid_note(src, path: Path, scene: SceneInfo, bounds) -> str | None:
    """The warning a mask off the scene's grid gets: resampled (unless its pixels are the
    scene's), and how much of the scene it leaves unlabeled; None when there is nothing to say."""
    coverage = _coverage(bounds, scene)
    part = f"covers {coverage:.0%} of the scene; the rest is unlabeled (ignored)"
    if _on_scene_lattice(src, scene):
        return f"{path}: mask {part}" if coverage < 0.995 else None
    note = f"{path}: mask is not on the scene's grid; resampled (nearest) onto it"
    return f"{note}; it {part}" if coverage < 0.995 else note


def _check_raster_overlap(src, path: Path, scene: SceneInfo) -> tuple[float, float, float, float]:
    """Refuse a mask off the scene; returns its bounds in the scene's CRS."""
    if scene.crs is None or src.crs is None:
        raise LabelError(
            f"{path}: mask and scene {scene.path.name} are on different grids and one has no "
            "CRS; give both a CRS or write the mask on the scene's grid"
        )
    # both as (min x, min y, max x, max y): a south-up grid's bounds would have bottom > top
    mask_bounds = grid_bounds(src.height, src.width, src.transform)
    try:
        left, bottom, right, top = transform_bounds(src.crs, scene.crs, *mask_bounds)
    except (CRSError, CPLE_BaseError):
        raise _no_transformation(path, src.crs, scene) from None
    s_left, s_bottom, s_right, s_top = scene.bounds
    if left >= s_right or right <= s_left or bottom >= s_top or top <= s_bottom:
        raise LabelError(
            f"{path}: mask does not overlap the scene {scene.path.name}; "
            "pass the labels made for this scene"
        )
    return left, bottom, right, top


def _load_raster(path: Path, scene: SceneInfo) -> RasterLabels:
    try:
        with rasterio.open(path) as src:
            same, note = _same_grid(src, scene), None
            if not same:
                bounds = _check_raster_overlap(src, path, scene)
                note = _other_grid_note(src, path, scene, bounds)
            elif scene.crs is None and src.crs is not None:
                fix = rio_edit(scene.path, "--like", str(path), "--crs", "like")
                warn_user(
                    f"{path}: the scene {scene.path.name} has no CRS; the mask has its shape and "
                    "transform, so it is read as on the scene's grid, and outputs get no CRS "
                    f"(give the scene the mask's CRS with `{fix}`)"
                )
            elif src.crs is None and scene.crs is not None:
                warn_user(
                    f"{path}: mask has no CRS but the scene's shape and transform; read as on "
                    "the scene's grid (set its CRS with "
                    f"`{rio_edit(path, '--like', str(scene.path), '--crs', 'like')}` to silence "
                    "this)"
                )
            values = _mask_values(src, path)
            nodata = src.nodata
            if src.count > 1:
                warn_user(
                    f"{path}: mask has {src.count} bands; band 1 holds the classes, the others "
                    "are not read (write the class band alone to silence this)"
                )
    except RasterioIOError as exc:
        raise LabelError(
            f"{path}: not a readable mask ({io_error_reason(exc)}); pass a valid GeoTIFF"
        ) from None
    if values.size == 0:
        raise LabelError(
            f"{path}: mask has no labeled pixels (all 0 or nodata); pass a mask with classes"
        )
    if note is not None:
        warn_user(note)
    if nodata == 0:
        warn_user(
            f"{path}: mask declares nodata 0, so its 0 pixels are unlabeled (ignored), not "
            f"background; unset it (`{rio_edit(path, '--unset-nodata')}`) if 0 means "
            "background"
        )
    ints = [int(v) for v in values]
    if IGNORE_INDEX in ints and nodata is None and len(ints) > 1:
        warn_user(
            f"{path}: value {IGNORE_INDEX} is read as a class of its own; if it marks "
            "unlabeled pixels, declare it the mask's nodata "
            f"(`{rio_edit(path, '--nodata', str(IGNORE_INDEX))}`)"
        )
    if ints == list(range(1, len(ints) + 1)) and len(ints) > 1:
        names = ["background"] + [str(v) for v in ints]
    elif len(ints) == 1:
        names = ["background", path.stem]
    else:
        names = ["background"] + [f"value {v}" for v in ints]
    return RasterLabels(
        path=path,
        scene=scene,
        class_names=names,
        class_values=[None] + ints,
        same_grid=same,
    )
