"""The Zarr tile store: image and label tiles of a scene, its spatial split, and its statistics.

Layout (a Zarr group; tested with zarr 3):
- `images`     (N, bands, T, T) float32, NaN = nodata (also NaN/inf in the file, and padding)
- `labels`     (N, T, T) uint8, 0 = background, 1..K classes, 255 = ignore (unlabeled, nodata,
               padding)
- `windows`    (N, 4) int64: row_off, col_off, height, width of the tile's valid part on the scene
- `transforms` (N, 6) float64: the tile's affine (a, b, c, d, e, f), i.e. of its pixel (0, 0)
- `split`      (N,) uint8: 0 = train, 1 = validation
Attributes: format, version, scene path/CRS (WKT)/transform/shape, tile size, class names and
colors, per-band mean and std and label pixel counts of the TRAINING tiles, the split.

Edge tiles are clipped to their region and padded to T x T (NaN image, 255 labels), so every
pixel of a region is in exactly one tile. Tiles without a single valid image pixel are skipped.
The store is built tile batch by tile batch (each tile read by a Dask task), so memory does not
grow with the scene, in a temporary folder that is renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import dask
import numpy as np
import rasterio
import shapely
import zarr
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from .errors import OutputError, StoreError, TilesError
from .labels import (
    IGNORE_INDEX,
    LabelSource,
    ignore_nodata,
    load_labels,
    plain_class_value,
    split_layer,
)
from .raster import (
    SceneInfo,
    grid_footprint,
    ground_pixel_size,
    open_scene,
    read_window,
    warn_if_no_crs,
)
from .scratch import (
    LOCK_SUFFIX,
    held_or_refused,
    hold_lock,
    is_orphan,
    release_lock,
    scratch_tag,
)
from .split import DEFAULT_TILE, SPLIT_NAMES, TRAIN, SplitSpec, TileWindow, split_tiles
from .stitch import check_writable_folder
from .warn import warn_user
from .wording import option

FORMAT = "geodnn.tilestore"
VERSION = 1
TABLE_ROWS = 4096
ARRAYS = ("images", "labels", "windows", "transforms", "split")


@dataclass
class BandStats:
    """Running per-band count, mean and sum of squared deviations (Chan et al. merge)."""

    bands: int
    count: np.ndarray = field(init=False)
    mean: np.ndarray = field(init=False)
    m2: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.count = np.zeros(self.bands)
        self.mean = np.zeros(self.bands)
        self.m2 = np.zeros(self.bands)

    def add(self, image: np.ndarray) -> None:
        """Fold in a (bands, h, w) tile, ignoring NaN."""
        flat = image.reshape(self.bands, -1).astype(np.float64)
        valid = ~np.isnan(flat)
        n = valid.sum(axis=1).astype(np.float64)
        if not n.any():
            return
        safe = np.where(valid, flat, 0.0)
        mean = np.divide(safe.sum(axis=1), n, out=np.zeros(self.bands), where=n > 0)
        m2 = np.where(valid, (flat - mean[:, None]) ** 2, 0.0).sum(axis=1)
        total = self.count + n
        delta = mean - self.mean
        share = np.divide(n, total, out=np.zeros(self.bands), where=total > 0)
        self.mean = self.mean + delta * share
        self.m2 = self.m2 + m2 + delta**2 * self.count * share
        self.count = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(
            np.divide(self.m2, self.count, out=np.zeros(self.bands), where=self.count > 0)
        )


@dataclass
class Tile:
    """A read tile, padded to T x T."""

    spec: TileWindow
    image: np.ndarray
    labels: np.ndarray

    @property
    def empty(self) -> bool:
        return bool(np.isnan(self.image).all())


def read_tile(scene: SceneInfo, labels: LabelSource, spec: TileWindow, size: int) -> Tile:
    """Read one tile's image and labels (nodata -> ignore) and pad them to size x size."""
    with rasterio.open(scene.path) as src:
        image = read_window(src, spec.window)
    label = ignore_nodata(labels.rasterize(spec.window), image)
    h, w = label.shape
    padded_image = np.full((scene.count, size, size), np.nan, dtype=np.float32)
    padded_image[:, :h, :w] = image
    padded_label = np.full((size, size), IGNORE_INDEX, dtype=np.uint8)
    padded_label[:h, :w] = label
    return Tile(spec, padded_image, padded_label)


def _tile_rows(tiles: Sequence[Tile], transform: Affine) -> dict[str, np.ndarray]:
    windows = np.array([t.spec.row_col_shape for t in tiles], dtype=np.int64)
    # each tile's transform: the scene's, its origin moved to the tile's corner
    affines = [window_transform(Window(int(w[1]), int(w[0]), 1, 1), transform) for w in windows]
    return {
        "images": np.stack([t.image for t in tiles]),
        "labels": np.stack([t.labels for t in tiles]),
        "windows": windows,
        "transforms": np.array([tuple(a)[:6] for a in affines], dtype=np.float64),
        "split": np.array([t.spec.split for t in tiles], dtype=np.uint8),
    }


def _create_arrays(group, capacity: int, bands: int, size: int) -> dict:
    # small per-tile tables in chunks of TABLE_ROWS rows: each batch of tiles rewrites one chunk,
    # not a chunk the size of the whole table (which would make building a big store quadratic)
    rows = max(1, min(capacity, TABLE_ROWS))
    shapes = {
        "images": ((capacity, bands, size, size), (1, bands, size, size), "float32", np.nan),
        "labels": ((capacity, size, size), (1, size, size), "uint8", IGNORE_INDEX),
        "windows": ((capacity, 4), (rows, 4), "int64", 0),
        "transforms": ((capacity, 6), (rows, 6), "float64", 0.0),
        "split": ((capacity,), (rows,), "uint8", 0),
    }
    create = getattr(group, "create_array", None) or group.create_dataset  # zarr 3, else zarr 2
    return {
        name: create(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill)
        for name, (shape, chunks, dtype, fill) in shapes.items()
    }


def _is_tile_store(path: Path) -> bool:
    """Whether `path` is a geodnn tile store of any format version: a Zarr group marked with our
    format name. Only such a folder is ours to replace."""
    try:
        return zarr.open_group(str(path), mode="r").attrs.get("format") == FORMAT
    except Exception:  # not a Zarr group at all
        return False


def _occupant(path: Path) -> str | None:
    """What is at `path`: None (nothing), "store" (a geodnn tile store), "empty" (an empty
    folder), or, for anything else, what it is in words (for the refusal)."""
    if path.is_symlink():
        return "a symbolic link"
    if not path.exists():
        return None
    if not path.is_dir():
        return "a file, not a geodnn tile store"
    if _is_tile_store(path):
        return "store"
    if not any(path.iterdir()):
        return "empty"
    return "a folder that is not a geodnn tile store"


def _check_replaceable(out: Path, found: str | None, overwrite: bool) -> None:
    """Refuse anything at `out` but a tile store or an empty folder (replaced only with
    `overwrite`): --overwrite must never delete a user's file or folder."""
    if found in (None, "store", "empty"):
        if found is not None and not overwrite:
            raise OutputError(
                f"{out}: already exists; pass {option('overwrite', True)} to replace it"
            )
        return
    only = f" ({option('overwrite', True)} replaces only a tile store)" if overwrite else ""
    raise OutputError(
        f"{out}: is {found}{only}; pick another {option('out')} or remove it yourself"
    )


def _check_not_an_input(out: Path, scene: str | os.PathLike, labels: str | os.PathLike) -> None:
    """Refuse an output that is (or holds) the scene or the labels file, however spelled."""
    target = out.resolve()
    for given, what in (
        (Path(scene), "the input scene"),
        (split_layer(labels)[0], "the labels file"),
    ):
        source = given.resolve()
        if source == target:
            raise OutputError(f"{out}: is {what}; pick another output name")
        if target in source.parents:
            raise OutputError(f"{out}: holds {what} {given}; pick another output name")


def _prepare_target(
    out: Path, overwrite: bool, scene: str | os.PathLike, labels: str | os.PathLike
) -> Path:
    """Check the output location; return the temporary folder the store is built in."""
    if not out.parent.is_dir():
        raise OutputError(f"{out}: output folder {out.parent} does not exist; create it first")
    _check_not_an_input(out, scene, labels)
    _check_replaceable(out, _occupant(out), overwrite)
    check_writable_folder(out)  # before the build: the store is built next to its final name
    _remove_orphans(out)
    return _scratch_path(out, "tmp")


SCRATCH_KINDS = ("tmp", "old")  # beside a store: a build's new store, a replaced one (removed)


def _scratch_path(out: Path, kind: str) -> Path:
    """A hidden name beside `out` for a store being built (tmp) or being removed (old),
    tagged with host and PID so that stores of killed builds can be told apart."""
    return out.parent / f".{out.name}.{kind}-{scratch_tag()}"


def _remove_orphans(out: Path) -> None:
    """Remove the temporary stores, and the replaced stores being removed, that earlier builds
    of `out` left (killed or interrupted, or a removal that failed): nothing else would. A
    build in progress holds its lock and is left alone."""
    for kind in SCRATCH_KINDS:
        prefix = f".{out.name}.{kind}-"
        for tmp in out.parent.glob(f"{prefix}*"):
            tag = tmp.name.removeprefix(prefix)
            # a replaced store named as before the host and PID were in it (its removal failed)
            unnamed_old = kind == "old" and re.fullmatch(r"[0-9a-f]{8}", tag) is not None
            if tmp.is_dir() and (unnamed_old or _is_orphan(tmp, tag)):
                remove_tree(tmp)
                with contextlib.suppress(OSError):
                    os.unlink(tmp.with_name(tmp.name + LOCK_SUFFIX))


def _is_orphan(tmp: Path, tag: str) -> bool:
    """Whether no build holds `tmp` (`scratch.is_orphan`); its name is HOST-PID-HEX, or PID-HEX
    as named before the host was part of it."""
    parts = tag.rsplit("-", 2)
    if len(parts) == 2:
        parts.insert(0, socket.gethostname())
    host, pid = parts[0], parts[1] if len(parts) == 3 else ""
    return is_orphan(tmp, host, pid)


def remove_tree(path: Path, attempts: int = 40, pause_s: float = 0.05) -> None:
    """rmtree that outlasts a writer still finishing: zarr writes chunks from its own thread,
    which a Ctrl-C in the main thread does not stop at once, so a chunk folder can refill
    while it is removed ("Directory not empty"). Never raises: a leftover is an orphan that
    the next build removes (`_remove_orphans`), and an interrupt must stay an interrupt."""
    for _ in range(attempts):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(pause_s)
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def replacing(out: Path) -> Iterator[None]:
    """Hold the store `out` alone while it is replaced or removed: a training reading it
    (`scratch.using`, shared) would otherwise go on with another scene's tiles, without a
    word; refused in one line while another command uses it."""
    refusal = partial(
        StoreError,
        f"{out}: another geodnn command is using this store (a training reading it, or another "
        f"rebuild); wait for it to end, or write the new store to another {option('out')}",
    )
    with held_or_refused(out, refusal, exclusive=True):
        yield


def _move_into_place(tmp: Path, out: Path, overwrite: bool, held: bool = False) -> None:
    """Replace `out` with the finished store `tmp`; the old store is removed only after.

    The build takes a while and the path may have changed meanwhile: without `overwrite`,
    anything now at `out` is refused untouched; with it, what is there is checked again once
    moved aside, and anything but a store or an empty folder is moved back, intact, and refused.
    `held`: the build holds `out` already (`replacing`), else it is held for the swap.
    """
    if os.path.lexists(out) and not overwrite:  # another build's, made meanwhile: not touched
        _check_replaceable(out, _occupant(out), overwrite)
    if not os.path.lexists(out):
        os.replace(tmp, out)
        return
    with contextlib.nullcontext() if held else replacing(out):
        _swap_in(tmp, out, overwrite)


def _swap_in(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the store at `out` aside, `tmp` into its place, and remove the old one."""
    old = _scratch_path(out, "old")
    lock = hold_lock(old)  # held while it is removed: an interrupt leaves an orphan
    try:
        os.replace(out, old)
        found = _occupant(old)
        if found not in ("store", "empty"):
            os.replace(old, out)
            _check_replaceable(out, found, overwrite)
        os.replace(tmp, out)
        remove_tree(old)  # the new store is in place: a failure here must not undo that
    finally:
        release_lock(lock, keep_file=old.exists())


def _fitted_tile(tile: int, shape: tuple[int, int], scene) -> int:
    """The tile size, at most the scene's longer side: a larger tile would only be padding,
    read, stored and copied into every batch (a 50 x 60 scene at --tile 3000 took 1.9 GB)."""
    longest = max(shape)
    if tile <= longest:
        return tile
    warn_user(
        f"{scene}: {option('tile', tile)} is larger than the scene ({shape[0]} x {shape[1]} px); "
        f"tiles of {longest} px are used"
    )
    return longest


def _metadata(scene: SceneInfo, labels: LabelSource, spec: SplitSpec, size: int) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "scene_path": str(Path(scene.path).resolve()),
        "labels_path": str(Path(labels.path).resolve()),
        "crs": scene.crs.to_wkt() if scene.crs is not None else None,
        "scene_transform": list(tuple(scene.transform)[:6]),
        "scene_shape": [scene.height, scene.width],
        "bands": scene.count,
        "tile_size": size,
        "class_names": list(labels.class_names),
        # each class id's value in the label file (None: background), so that another label
        # file can be numbered the same way (`geodnn evaluate`)
        "class_values": [plain_class_value(v) for v in labels.class_values],
        "class_colors": [list(c) for c in labels.class_colors],
        "class_attribute": labels.class_attribute,  # `geodnn evaluate` takes it by default
        "ignore_index": IGNORE_INDEX,
        "split": {
            "axis": spec.axis,
            "fraction": spec.fraction,
            "gap": spec.gap,
            "description": spec.describe(),
            "codes": {"train": 0, "validation": 1},
        },
    }


def _write_tiles(
    group,
    scene: SceneInfo,
    labels: LabelSource,
    tiles: list[TileWindow],
    size: int,
    batch: int,
    progress: Callable[[int], None] | None,
) -> tuple[int, BandStats, np.ndarray, dict[str, int]]:
    arrays = _create_arrays(group, len(tiles), scene.count, size)
    stats = BandStats(scene.count)
    counts = np.zeros(labels.classes, dtype=np.int64)
    per_split = {name: 0 for name in SPLIT_NAMES.values()}
    written = 0
    for start in range(0, len(tiles), batch):
        tasks = [
            dask.delayed(read_tile)(scene, labels, t, size) for t in tiles[start : start + batch]
        ]
        kept = [t for t in dask.compute(*tasks, scheduler="threads") if not t.empty]
        if kept:
            rows = _tile_rows(kept, scene.transform)
            for name in ARRAYS:
                arrays[name][written : written + len(kept)] = rows[name]
            written += len(kept)
        for tile in kept:
            per_split[SPLIT_NAMES[tile.spec.split]] += 1
            if tile.spec.split == TRAIN:
                stats.add(tile.image)
                valid = tile.labels[tile.labels != IGNORE_INDEX]
                counts += np.bincount(valid, minlength=labels.classes)[: labels.classes]
        if progress is not None:
            progress(len(tasks))
    for name in ARRAYS:
        arrays[name].resize((written,) + arrays[name].shape[1:])
    return written, stats, counts, per_split


def _duplicates(names: Sequence[str]) -> list[str]:
    """Names that occur more than once, in first-seen order."""
    return [name for name, n in Counter(names).items() if n > 1]


def _check_distinct_names(names: Sequence[str], labels: str | os.PathLike, given: bool) -> None:
    """Refuse repeated or empty class names: per-class outputs (metrics, scores, map
    categories) are keyed by name."""
    repeated = ", ".join(map(repr, _duplicates(names)))
    empty = not all(str(n).strip() for n in names)
    if not repeated and not empty:
        return
    where = "the class names given" if given else "the label classes"
    problem = "a class name is empty"
    if repeated:
        problem = f"class name {repeated} occurs more than once"
    raise TilesError(
        f"{labels}: {problem} in {where} ({', '.join(map(repr, names))}); give each class a "
        "distinct name (geodnn tile --class-names, [scene] class_names in a run config)"
    )


def build_store(
    scene: str | os.PathLike,
    labels: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tile: int = DEFAULT_TILE,
    split: SplitSpec | None = None,
    class_attribute: str | None = None,
    class_names: Sequence[str] | None = None,
    overwrite: bool = False,
    batch: int = 32,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> Path:
    """Tile `scene` with its `labels` into a Zarr store at `out` (atomically); return its
    absolute path.

    `progress(n)` is called after each batch with the number of tiles processed, `on_start(total)`
    once with the number of candidate tiles. `class_names` renames the label classes.
    """
    out = Path(out)
    split = split or SplitSpec()
    # a store that trainings read is refused at once, and held for the whole rebuild (a
    # training starting meanwhile is refused), not for the swap alone, which lost the build
    held = overwrite and os.path.lexists(out)
    with replacing(out) if held else contextlib.nullcontext():
        tmp = _prepare_target(out, overwrite, scene, labels)
        info = open_scene(scene)
        source = load_labels(labels, info, class_attribute)
        warn_if_no_crs(info)  # a mask on its grid is read; the store and every map get no CRS
        if source.classes < 2:  # e.g. a class attribute that is 0 (background) everywhere
            raise TilesError(
                f"{labels}: every labeled pixel is background, so there is no class to learn; "
                "pick another class attribute, or label every feature as one class (no attribute)"
            )
        if class_names is not None:
            if len(class_names) != source.classes:
                raise TilesError(
                    f"{labels}: {len(class_names)} class names given for {source.classes} classes "
                    f"({', '.join(source.class_names)}); give one name per class"
                )
            source.class_names = list(class_names)
        _check_distinct_names(source.class_names, labels, given=class_names is not None)
        tile = _fitted_tile(tile, info.shape, scene)
        tiles = split_tiles(info.shape, split, tile)
        if on_start is not None:
            on_start(len(tiles))
        lock = hold_lock(tmp)
        try:
            group = zarr.open_group(str(tmp), mode="w")
            written, stats, counts, per_split = _write_tiles(
                group, info, source, tiles, tile, batch, progress
            )
            if per_split["train"] == 0 or not stats.count.all():
                raise TilesError(
                    f"{scene}: the training region has no valid pixels in some band; "
                    f"move the split ({option('split')}) so training covers imaged pixels"
                )
            attrs = _metadata(info, source, split, tile)
            attrs.update(
                tiles=written,
                tiles_per_split=per_split,
                band_mean=stats.mean.tolist(),
                band_std=stats.std.tolist(),
                band_valid_pixels=stats.count.astype(np.int64).tolist(),
                class_pixel_counts=counts.tolist(),
            )
            group.attrs.update(attrs)
            _warn_of_untrained_classes(out, source.class_names, counts, source.unused_ids)
            _move_into_place(tmp, out, overwrite, held)
        finally:
            if tmp.exists():
                remove_tree(tmp)
            release_lock(lock, keep_file=tmp.exists())
    return out.absolute()  # a config that names it (pasted by a notebook) reads it anywhere


def _warn_of_untrained_classes(
    out: Path, names: Sequence[str], counts: np.ndarray, unused: set[int]
) -> None:
    """A class without labeled training pixels cannot be learned from this store: said when
    it is made, where the fix (often another split) is. Ids no label has at all were warned
    of when the labels were read."""
    counts = counts.tolist()
    missing = [name for i, name in enumerate(names) if counts[i] == 0 and i not in unused]
    if missing:
        warn_user(
            f"{out}: class(es) {', '.join(missing)} have no labeled pixels in the training "
            "region, so they cannot be learned from this store (their labels lie in the "
            "validation region or the guard band, outside the scene, or under nodata); if in "
            f"validation, rebuild with another {option('split')}"
        )


REBUILD = "rebuild it with `geodnn tile ... --overwrite`"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a number


def _is_count(value: object) -> bool:
    return _is_int(value) and value >= 1


def _is_number(value: object) -> bool:
    return _is_int(value) or isinstance(value, float)


def _list_of(check: Callable[[object], bool], length: int | None = None) -> Callable:
    """A check for a JSON list (of `length` items, if given) whose items all pass `check`."""

    def test(value: object) -> bool:
        if not isinstance(value, list) or (length is not None and len(value) != length):
            return False
        return all(check(item) for item in value)

    return test


def _is_names(value: object) -> bool:
    return bool(value) and _list_of(lambda name: isinstance(name, str))(value)


def _split_counts(value: object) -> bool:
    return isinstance(value, dict) and all(_is_int(value.get(k)) for k in SPLIT_NAMES.values())


# The metadata a store must have to be read, and what each is (for the refusal).
NEEDED = {
    "scene_path": (lambda v: isinstance(v, str), "a file path"),
    "scene_transform": (_list_of(_is_number, 6), "a list of 6 numbers"),
    "scene_shape": (_list_of(_is_count, 2), "a list of 2 whole numbers >= 1"),
    "bands": (_is_count, "a whole number >= 1"),
    "tile_size": (_is_count, "a whole number >= 1"),
    "class_names": (_is_names, "a list of names"),
    "class_colors": (_list_of(_list_of(_is_int, 3)), "a list of [red, green, blue] colors"),
    "class_pixel_counts": (_list_of(_is_int), "a list of whole numbers"),
    "band_mean": (_list_of(_is_number), "a list of numbers"),
    "band_std": (_list_of(_is_number), "a list of numbers"),
    "tiles_per_split": (_split_counts, "a table of tile counts per split"),
}
# Metadata a store may lack (older stores, a scene without CRS), checked when present.
OPTIONAL = {
    "crs": (lambda v: v is None or isinstance(v, str), "WKT text"),
    "class_values": (lambda v: v is None or isinstance(v, list), "a list"),
    "split": (lambda v: isinstance(v, dict), "a table"),
}


def _shown(value: object) -> str:
    """A metadata value as a message shows it: short, and text marked as text."""
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{text} (text)" if isinstance(value, str) else text


def _check_version(path: Path, attrs) -> None:
    """Refuse a store of another format version (a version written as text is one too)."""
    if "version" not in attrs:
        raise StoreError(f"{path}: tile store metadata 'version' is missing; {REBUILD}")
    version = attrs["version"]
    if not _is_int(version) or version != VERSION:
        raise StoreError(
            f"{path}: tile store format version {_shown(version)}, this geodnn reads "
            f"version {VERSION}; {REBUILD}"
        )


def _check_metadata(path: Path, attrs) -> None:
    """Refuse a store whose metadata (edited by hand, or old) lacks a key this geodnn reads or
    holds a value of the wrong kind or length: one line naming the key, not a KeyError later."""
    for key, (check, kind) in {**NEEDED, **OPTIONAL}.items():
        if key not in attrs:
            if key in NEEDED:
                raise StoreError(f"{path}: tile store metadata {key!r} is missing; {REBUILD}")
            continue
        if not check(attrs[key]):
            raise StoreError(
                f"{path}: tile store metadata {key!r} is {_shown(attrs[key])}, not {kind}; "
                f"{REBUILD}"
            )
    classes = len(attrs["class_names"])
    lengths = {
        "band_mean": (attrs["bands"], "bands"),
        "band_std": (attrs["bands"], "bands"),
        "class_colors": (classes, "classes"),
        "class_pixel_counts": (classes, "classes"),
    }
    for key, (n, what) in lengths.items():
        if len(attrs[key]) != n:
            raise StoreError(
                f"{path}: tile store metadata {key!r} has {len(attrs[key])} values for {n} "
                f"{what}; {REBUILD}"
            )


class TileStore:
    """Read access to a tile store: metadata, tiles by index, and tile indices per split."""

    def __init__(self, path: Path, group) -> None:
        self.path = path
        self.group = group
        self.attrs = dict(group.attrs)

    @classmethod
    def open(cls, path: str | os.PathLike) -> TileStore:
        """Open and validate a store; raise StoreError (naming the file and the fix) otherwise."""
        path = Path(path)
        if not path.exists():
            raise StoreError(f"{path}: tile store not found; build it with `geodnn tile`")
        try:
            group = zarr.open_group(str(path), mode="r")
        except Exception:
            raise StoreError(
                f"{path}: not a Zarr tile store; build one with `geodnn tile`"
            ) from None
        attrs = group.attrs
        if attrs.get("format") != FORMAT:
            raise StoreError(
                f"{path}: not a geodnn tile store (format {attrs.get('format')!r}); "
                "build one with `geodnn tile`"
            )
        _check_version(path, attrs)
        _check_metadata(path, attrs)
        missing = [name for name in ARRAYS if name not in group]
        if missing:
            raise StoreError(
                f"{path}: tile store is incomplete (no {', '.join(missing)}); {REBUILD}"
            )
        repeated = _duplicates(list(attrs["class_names"]))
        if repeated:
            raise StoreError(
                f"{path}: tile store attribute class_names repeats "
                f"{', '.join(map(repr, repeated))}; rebuild it with distinct class names "
                "(`geodnn tile ... --overwrite`, [scene] class_names)"
            )
        if len(attrs["class_names"]) < 2:  # built before `build_store` refused it
            raise StoreError(
                f"{path}: tile store has one class ({attrs['class_names'][0]}), nothing to "
                "learn; rebuild it from labels with a positive class (`geodnn tile ... "
                "--overwrite`)"
            )
        return cls(path, group)

    def __len__(self) -> int:
        return int(self.group["split"].shape[0])

    @property
    def bands(self) -> int:
        return int(self.attrs["bands"])

    @property
    def tile_size(self) -> int:
        return int(self.attrs["tile_size"])

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    @property
    def class_colors(self) -> list[tuple[int, int, int]]:
        return [tuple(int(v) for v in c) for c in self.attrs["class_colors"]]

    @property
    def class_values(self) -> list | None:
        """Each class id's value in the label file (None: background); None for stores made
        before it was recorded."""
        values = self.attrs.get("class_values")
        return None if values is None else list(values)

    @property
    def classes(self) -> int:
        return len(self.class_names)

    @property
    def band_mean(self) -> np.ndarray:
        return np.asarray(self.attrs["band_mean"], dtype=np.float64)

    @property
    def band_std(self) -> np.ndarray:
        return np.asarray(self.attrs["band_std"], dtype=np.float64)

    @property
    def class_pixel_counts(self) -> np.ndarray:
        return np.asarray(self.attrs["class_pixel_counts"], dtype=np.int64)

    @property
    def crs(self) -> CRS | None:
        wkt = self.attrs.get("crs")
        return CRS.from_wkt(wkt) if wkt else None

    @property
    def scene_transform(self) -> Affine:
        return Affine(*self.attrs["scene_transform"])

    @property
    def scene_shape(self) -> tuple[int, int]:
        return tuple(self.attrs["scene_shape"])

    @property
    def pixel_size_m(self) -> float | None:
        """The scene's pixel side on the ground in metres (`ground_pixel_size`)."""
        height, width = self.scene_shape
        return ground_pixel_size(self.crs, self.scene_transform, width, height)

    @property
    def scene_path(self) -> Path:
        return Path(self.attrs["scene_path"])

    def _rows(self, name: str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows of one array in the order given (duplicates allowed)."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if index.size == 0:
            return np.zeros((0,) + self.group[name].shape[1:], dtype=self.group[name].dtype)
        if index.min() < 0 or index.max() >= len(self):
            raise IndexError(f"tile index out of range 0..{len(self) - 1}")
        unique, inverse = np.unique(index, return_inverse=True)
        return self.group[name].oindex[unique][inverse]

    def images(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        return self._rows("images", indices)

    def labels(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        return self._rows("labels", indices)

    def windows(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        return self.group["windows"][:] if indices is None else self._rows("windows", indices)

    def transforms(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        return self.group["transforms"][:] if indices is None else self._rows("transforms", indices)

    def tile_transform(self, index: int) -> Affine:
        return Affine(*self._rows("transforms", [index])[0])

    def region_footprint(self, split: str, crs: CRS | str | None = None) -> shapely.Polygon:
        """The ground a split's tiles cover (their bounding rectangle on the scene grid) as a
        shapely polygon in the store's CRS or, given `crs`, reprojected to it; an empty one for
        a split without tiles. Lets stores of overlapping scenes be compared."""
        windows = self.windows(self.indices(split))
        if not len(windows):
            return shapely.Polygon()
        top, left = windows[:, 0].min(), windows[:, 1].min()
        bottom, right = (windows[:, 0] + windows[:, 2]).max(), (windows[:, 1] + windows[:, 3]).max()
        rows, cols = (int(top), int(bottom)), (int(left), int(right))
        return grid_footprint(self.scene_transform, rows, cols, self.crs, crs)

    def indices(self, split: str | None = None) -> np.ndarray:
        """Tile indices of a split ("train" or "validation"/"val"), or of all tiles."""
        codes = self.group["split"][:]
        if split is None:
            return np.arange(len(codes))
        names = {"train": 0, "validation": 1, "val": 1}
        if split not in names:
            raise StoreError(f"{self.path}: unknown split '{split}'; use train or validation")
        return np.flatnonzero(codes == names[split])
