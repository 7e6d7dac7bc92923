"""The tile store seen as geodnn training data (the `geodnn.data.Batches` protocol).

`StoreBatches(store, split, crop=None, seed=0)`: without `crop`, item i is the i-th tile of the
split (T x T, padded edges are NaN / 255). With `crop`, item i is a crop x crop window of tile
i mod N at an offset drawn from (seed, i) alone, inside the tile's valid part where it fits, so
any index (also beyond `len`) names the same crop on every worker and every run; `len` counts
`crops_per_tile` crops per tile, one pass of a sampler.

`SceneStores.open(paths, crop, seed)`: the stores of several scenes one model trains on, checked
to fit it together, their splits joined store by store in turn (`Interleaved`), their band
statistics pooled.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from geodnn.data import Batches
from tiles.labels import id_map_by_value
from tiles.raster import shares_ground
from tiles.store import TileStore
from tiles.warn import warn_user
from tiles.wording import option

from .errors import PipelineError

IN_MEMORY_BYTES = 512 * 2**20  # splits up to this size are loaded once; larger ones read lazily
# pixel sizes on the ground within this factor of each other count as one resolution
RESOLUTION_TOLERANCE = 1.5


class StoreBatches:
    """Image and label tiles (or deterministic random crops of them) of one split of a store."""

    def __init__(
        self,
        store: TileStore | str | os.PathLike,
        split: str = "train",
        crop: int | None = None,
        seed: int = 0,
        crops_per_tile: int | None = None,
        in_memory_bytes: int = IN_MEMORY_BYTES,
        id_map: np.ndarray | None = None,
    ) -> None:
        self.store = store if isinstance(store, TileStore) else TileStore.open(store)
        self.split = split
        # store class id -> the run's (256 entries, 255 kept) for a store with some of the
        # first store's classes (`check_compatible`); None: the store's ids are the run's
        self.id_map = id_map
        self.seed = int(seed)
        self.tiles = self.store.indices(split)
        windows = self.store.windows(self.tiles) if len(self.tiles) else np.zeros((0, 4))
        self.windows = np.asarray(windows, dtype=np.int64)  # row_off, col_off, height, width
        self.tile_size = self.store.tile_size
        self.crop = self._check_crop(crop)
        self.crops_per_tile = crops_per_tile or (
            1 if self.crop is None else max(1, (self.tile_size // self.crop) ** 2)
        )
        self._images: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        if self.nbytes <= in_memory_bytes:
            self._images = self.store.images(self.tiles)
            self._labels = self._read_labels(self.tiles)

    def _read_labels(self, stored: np.ndarray) -> np.ndarray:
        labels = self.store.labels(stored)
        return labels if self.id_map is None else self.id_map[labels]

    def _check_crop(self, crop: int | None) -> int | None:
        if crop is None:
            return None
        if not 1 <= int(crop) <= self.tile_size:
            raise PipelineError(
                f"{self.store.path}: crop {crop} does not fit the store's {self.tile_size} px "
                f"tiles; use a crop of 1..{self.tile_size} or re-tile with a larger "
                f"{option('tile')}"
            )
        return int(crop)

    @property
    def nbytes(self) -> int:
        """Bytes of this split's image and label tiles."""
        per_tile = (self.store.bands * 4 + 1) * self.tile_size**2
        return int(len(self.tiles) * per_tile)

    @property
    def in_memory(self) -> bool:
        return self._images is not None

    def __len__(self) -> int:
        return len(self.tiles) * self.crops_per_tile

    # metadata of the store, for model building and maps
    @property
    def bands(self) -> int:
        return self.store.bands

    @property
    def class_names(self) -> list[str]:
        return self.store.class_names

    @property
    def class_colors(self) -> list[tuple[int, int, int]]:
        return self.store.class_colors

    @property
    def class_values(self) -> list | None:
        return self.store.class_values

    @property
    def band_mean(self) -> np.ndarray:
        return self.store.band_mean

    @property
    def band_std(self) -> np.ndarray:
        return self.store.band_std

    @property
    def class_counts(self) -> np.ndarray:
        """Labeled pixels per class of the store in the training region."""
        return self.store.class_pixel_counts

    def run_class_ids(self) -> np.ndarray:
        """The run's class id of each of the store's classes."""
        ids = np.arange(self.store.classes)
        return ids if self.id_map is None else self.id_map[ids].astype(np.int64)

    def locate(self, index: int) -> tuple[int, int, int]:
        """(position of the tile in this split, row offset, column offset) of item `index`."""
        if index < 0 or not len(self.tiles) or (self.crop is None and index >= len(self.tiles)):
            raise IndexError(f"item {index} is out of range for {len(self)} items")
        position = index % len(self.tiles)
        if self.crop is None:
            return position, 0, 0
        rng = np.random.default_rng((self.seed, index))
        height, width = (int(v) for v in self.windows[position, 2:4])
        row = int(rng.integers(0, max(height - self.crop, 0) + 1))
        col = int(rng.integers(0, max(width - self.crop, 0) + 1))
        return position, row, col

    def tile_image(self, position: int) -> np.ndarray:
        """The image of the split's tile at `position`, whole (bands, T, T), NaN = nodata."""
        if self._images is not None:
            return self._images[position]
        return self.store.images([self.tiles[position]])[0]

    def tile_labels(self, positions: Sequence[int]) -> torch.Tensor:
        """Labels int64 (B, T, T) of the split's tiles at `positions`, without their images."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) and not (positions.min() >= 0 and positions.max() < len(self.tiles)):
            raise IndexError(
                f"tile positions {positions.tolist()} out of range for {len(self.tiles)}"
            )
        if self._labels is not None:
            labels = self._labels[positions]
        elif len(positions):
            labels = self._read_labels(self.tiles[positions])
        else:
            labels = np.zeros((0, self.tile_size, self.tile_size), dtype=np.uint8)
        return torch.from_numpy(labels.astype(np.int64))

    def _tiles(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._images is not None:
            return self._images[positions], self._labels[positions]
        stored = self.tiles[positions]
        return self.store.images(stored), self._read_labels(stored)

    def get(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images float32 (B, bands, h, w), NaN = nodata; labels int64 (B, h, w), 255 = ignore."""
        places = [self.locate(int(i)) for i in indices]
        if not places:
            size = self.crop or self.tile_size
            return torch.zeros(0, self.bands, size, size), torch.zeros(0, size, size).long()
        positions = np.asarray([p for p, _, _ in places], dtype=np.int64)
        images, labels = self._tiles(positions)
        if self.crop is not None:
            c = self.crop
            images = np.stack(
                [im[:, r : r + c, k : k + c] for im, (_, r, k) in zip(images, places)]
            )
            labels = np.stack([lb[r : r + c, k : k + c] for lb, (_, r, k) in zip(labels, places)])
        return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)), torch.from_numpy(
            labels.astype(np.int64)
        )


class ValidationWindows:
    """Validation tiles read with a halo of context from the neighbouring validation tiles.

    Scored tile by tile with only its own pixels, a tile's border (as wide as the network's
    receptive radius, most of a 128 px tile for a deep chain) would see zero padding where
    `geodnn predict` sees the real neighbours, so the score in metrics.csv would not be the one
    users get. Item i is tile i of `tiles` (a `StoreBatches` of a split, whole tiles) as a
    (bands, T + 2 halo)^2 window, NaN where no validation pixel lies (outside the split, which
    keeps training pixels out), and its label tile; score the centre T x T of the logits.
    Tiles read are kept (`_kept`, up to `keep_bytes`): the scored tiles are the same every
    epoch, so a lazily read split (`StoreBatches(..., in_memory_bytes=0)`) costs only them and
    their neighbours; past the budget (a huge val_tiles) tiles are read again each time.
    """

    def __init__(self, tiles: StoreBatches, halo: int, keep_bytes: int = IN_MEMORY_BYTES) -> None:
        if tiles.crop is not None:
            raise ValueError("ValidationWindows reads whole tiles: give it a StoreBatches, no crop")
        self.tiles, self.halo, self.windows = tiles, int(halo), tiles.windows
        self._at = {(int(w[0]), int(w[1])): p for p, w in enumerate(self.windows)}
        self._kept: dict[int, np.ndarray] = {}
        self._keep_bytes = int(keep_bytes)

    def __len__(self) -> int:
        return len(self.tiles)

    def get(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images float32 (B, bands, T + 2 halo, T + 2 halo), NaN = no data or no context;
        labels int64 (B, T, T) of the tiles themselves. A tile is read once, whichever windows
        touch it (out-of-range items: IndexError from `tile_labels`)."""
        labels = self.tiles.tile_labels([int(i) for i in indices])
        read: dict[int, np.ndarray] = {}  # this batch's tiles beyond the kept ones
        windows = [self._window(int(i), read) for i in indices]
        size = self.tiles.tile_size + 2 * self.halo
        if not windows:
            return torch.zeros(0, self.tiles.bands, size, size), labels
        return torch.from_numpy(np.stack(windows)), labels

    def _window(self, position: int, read: dict[int, np.ndarray]) -> np.ndarray:
        t, h = self.tiles.tile_size, self.halo
        row, col = (int(v) for v in self.windows[position, :2])
        out = np.full((self.tiles.bands, t + 2 * h, t + 2 * h), np.nan, dtype=np.float32)
        reach = -(-h // t)  # neighbours this many tiles away still reach into the halo
        for dr in range(-reach, reach + 1):
            for dc in range(-reach, reach + 1):
                other = self._at.get((row + dr * t, col + dc * t))
                if other is not None:
                    self._paste(out, other, row - h, col - h, read)
        return out

    def _paste(
        self, out: np.ndarray, position: int, top: int, left: int, read: dict[int, np.ndarray]
    ) -> None:
        """Copy tile `position`'s valid pixels into `out`, whose (0, 0) is scene (top, left);
        `read` holds the tiles this batch has read beyond those kept."""
        row, col, height, width = (int(v) for v in self.windows[position])
        r0, c0 = max(row, top), max(col, left)
        r1 = min(row + height, top + out.shape[1])
        c1 = min(col + width, left + out.shape[2])
        if r1 <= r0 or c1 <= c0:
            return
        image = self._kept.get(position)
        if image is None:
            image = read.get(position)
        if image is None:
            image = read[position] = self.tiles.tile_image(position)
            if image.nbytes * (len(self._kept) + 1) <= self._keep_bytes:
                self._kept[position] = image
        block = image[:, r0 - row : r1 - row, c0 - col : c1 - col]
        out[:, r0 - top : r1 - top, c0 - left : c1 - left] = block


def spread_evenly(size: int, count: int) -> np.ndarray:
    """Up to `count` distinct positions of 0..size-1, evenly spread, first and last included."""
    return np.unique(np.linspace(0, size - 1, min(size, count)).astype(np.int64))


class Interleaved:
    """Several item sets (one per tile store) as one, their items taken in turn: item 0 of each
    set, then item 1 of each, and so on, so the first k items (the `val_tiles` scored) span
    every scene instead of filling up from the first one. `get` keeps the order of the indices
    asked for; every set must give items of one shape. Its maps cost 12 bytes per item."""

    def __init__(self, parts: Sequence[Batches]) -> None:
        self.parts = list(parts)
        lengths = [len(p) for p in self.parts]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        part = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)  # set by set
        local = (np.arange(self.offsets[-1]) - self.offsets[part]).astype(np.int32)
        order = np.lexsort((part, local))  # by local index, then set: round by round
        self.part, self.local = part[order], local[order]
        self.place = np.empty_like(local)  # set-by-set position -> index here
        self.place[order] = np.arange(len(order), dtype=np.int32)

    def __len__(self) -> int:
        return len(self.part)

    def owners(self, indices: Sequence[int]) -> list[tuple[int, list[int]]]:
        """(set, its local indices) for each set that holds some of `indices`, in set order."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and not (indices.min() >= 0 and indices.max() < len(self)):
            raise IndexError(f"items {indices.tolist()} out of range for {len(self)}")
        part = self.part[indices]
        return [(k, self.local[indices[part == k]].tolist()) for k in np.unique(part).tolist()]

    def spread(self, count: int) -> list[int]:
        """Up to `count` items shared among the sets in proportion to their sizes (largest
        remainders) and evenly spread within each: a sample of every scene (the calibrated
        tiles), where evenly spaced indices here would follow the rounds and miss sets."""
        sizes = np.diff(self.offsets)
        quota = sizes * min(count, len(self)) / max(len(self), 1)
        shares = np.floor(quota).astype(np.int64)
        extra = int(min(count, len(self)) - shares.sum())
        shares[np.argsort(shares - quota, kind="stable")[:extra]] += 1
        picks = [
            self.offsets[k] + spread_evenly(n, c) for k, (n, c) in enumerate(zip(sizes, shares))
        ]
        return sorted(self.place[np.concatenate(picks)].tolist()) if picks else []

    def get(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if not len(indices):
            return self.parts[0].get([])
        owners = self.owners(indices)
        got = [self.parts[k].get(local) for k, local in owners]
        order = np.concatenate([np.flatnonzero(self.part[indices] == k) for k, _ in owners])
        back = torch.from_numpy(np.argsort(order, kind="stable"))
        return torch.cat([x for x, _ in got])[back], torch.cat([y for _, y in got])[back]


def pooled_band_stats(parts: Sequence[StoreBatches]) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and standard deviation over the training regions of several stores, as
    one store of all their pixels would give (each store's share weighted by its valid pixels;
    by its training tiles for stores made before they were counted)."""
    counts = [p.store.attrs.get("band_valid_pixels") for p in parts]
    if any(c is None for c in counts):
        counts = [[len(p.tiles)] * p.bands for p in parts]
    n = np.asarray(counts, dtype=np.float64)  # (stores, bands)
    means = np.stack([p.band_mean for p in parts])
    variances = np.stack([p.band_std for p in parts]) ** 2
    total = n.sum(axis=0)
    mean = (n * means).sum(axis=0) / total
    variance = (n * (variances + (means - mean) ** 2)).sum(axis=0) / total
    return mean, np.sqrt(variance)


def check_compatible(a: TileStore, b: TileStore) -> np.ndarray | None:
    """Refuse a store `b` that one model cannot train on beside `a`: other bands, other
    classes (by their label values; by name for stores that lack the values) or another tile
    size. A store `b` with some of `a`'s classes (a scene without water) is trained with its
    labels renumbered as `a`'s (the id lookup returned), with a warning; classes of the same
    values under other names (a single class is named after its label file) are trained as
    one, under the first store's names, with a warning."""
    known = a.class_values is not None and b.class_values is not None
    same_classes = a.classes == b.classes and (
        a.class_values == b.class_values if known else a.class_names == b.class_names
    )
    some = known and not same_classes and _some_of(b, a)
    problems = [
        (a.bands == b.bands, f"{b.bands} band(s), {a.path} {a.bands}", "scenes of the same bands"),
        (same_classes or some, f"classes {_classes(b)}, {a.path} {_classes(a)}", _class_fix(a, b)),
        (
            a.tile_size == b.tile_size,
            f"{b.tile_size} px tiles, {a.path} {a.tile_size} px",
            f"every store tiled at one size ({option('tile', a.tile_size)})",
        ),
    ]
    for ok, difference, fix in problems:
        if not ok:
            raise PipelineError(
                f"{b.path}: this store has {difference}, so one model cannot train on both; "
                f"train on {fix}"
            )
    id_map = id_map_by_value(b.class_values, a.class_values) if some else None
    if some:
        lacking = [n for n, v in zip(a.class_names, a.class_values) if v not in b.class_values]
        warn_user(
            f"{b.path}: has no class {', '.join(lacking)} of {a.path}; its classes are trained "
            "as that store's, by label value"
        )
    ids = range(b.classes) if id_map is None else id_map[: b.classes]
    theirs = [a.class_names[int(i)] for i in ids]  # the first store's name for each of b's values
    if theirs != b.class_names:
        warn_user(
            f"{b.path}: its classes {b.class_names} have the label values of {a.path}'s "
            f"{theirs} and are trained as those; if they are other things, label them "
            "with other values"
        )
    return id_map


def _some_of(store: TileStore, of: TileStore) -> bool:
    """Whether `store`'s classes are some of `of`'s by label value: two or more, or one from a
    class attribute (a file's single class is 1 whatever it is, so it matches no class of
    several by value; `_class_fix` says what to do)."""
    values, theirs = store.class_values, of.class_values
    named = len(values) > 2 or store.attrs.get("class_attribute") is not None
    return named and len(values) < len(theirs) and set(values[1:]) <= set(theirs[1:])


def check_not_a_copy(listed: list[StoreBatches], other: TileStore) -> None:
    """Refuse a store whose metadata is another listed store's (a copy, or the same scene
    tiled again the same way): its tiles would count twice in training and validation."""
    for part in listed:
        if part.store.attrs == other.attrs:
            raise PipelineError(
                f"{other.path}: this store holds the tiles of {part.store.path} (a copy, or "
                "the same scene tiled the same way); list each scene once"
            )


def _class_fix(a: TileStore, b: TileStore) -> str:
    """How to give two stores' labels the same classes; for one class each of other values
    (a 0/255 road mask beside road polygons, which are 1), the mask rewrite that does it."""
    fix = "labels of the same classes in every scene (the same values in a mask, or the same "
    fix += "class attribute)"
    if a.class_values and b.class_values and set(a.class_values) < set(b.class_values):
        fix += f"; a scene may lack some classes if the store listed first has them all ({b.path})"
    if all(s.classes == 2 and s.class_values and s.class_values[1] is not None for s in (a, b)):
        fix += (
            ": rewrite each mask so its class is 1, as in vector labels (e.g. `rio calc "
            '"(> (read 1) 0)" --dtype uint8 --profile nodata=255 mask.tif mask-1.tif`), and '
            "tile it again"
        )
    return fix


def _classes(store: TileStore) -> str:
    """A store's classes as a refusal shows them: names, with their label values where known."""
    values = store.class_values or [None] * store.classes
    named = [n if v is None else f"{n} = {v!r}" for n, v in zip(store.class_names, values)]
    return f"[{', '.join(named)}]"


@dataclass
class SceneStores:
    """The tile stores (one per scene) a run trains on, each as its training split (crops) and
    its validation split (whole tiles, read lazily), checked to fit one model. Memory does not
    grow with the number of stores: their training splits share one in-memory budget (the
    rest read lazily), and their validation windows one budget of kept tiles."""

    train: list[StoreBatches]
    val: list[StoreBatches]

    @classmethod
    def open(cls, paths: Sequence[os.PathLike], crop: int | None, seed: int) -> SceneStores:
        train, budget = [], IN_MEMORY_BYTES
        for path in paths:
            store, id_map = TileStore.open(path), None
            if train:
                id_map = check_compatible(train[0].store, store)
                check_not_a_copy(train, store)
            part = StoreBatches(
                store, "train", crop=crop, seed=seed, in_memory_bytes=budget, id_map=id_map
            )
            budget -= part.nbytes if part.in_memory else 0
            train.append(part)
        val = [StoreBatches(p.store, "val", in_memory_bytes=0, id_map=p.id_map) for p in train]
        stores = cls(train, val)
        stores.warn_if_resolutions_differ()
        stores.warn_if_validation_is_trained_on()
        return stores

    def warn_if_validation_is_trained_on(self) -> None:
        """A store's validation region on ground that another store trains on (overlapping
        scenes) is not held out: its scores would count pixels the model learned."""
        located = [p.store for p in self.train if p.store.crs is not None]
        if len(located) < 2:
            return
        crs = located[0].crs  # compared in one CRS
        trained = [s.region_footprint("train", crs) for s in located]
        for store in located:
            held = store.region_footprint("validation", crs)
            for other, ground in zip(located, trained):
                if other is not store and shares_ground(held, ground):
                    warn_user(
                        f"{store.path}: its validation region lies partly on ground that "
                        f"{other.path} trains on (overlapping scenes), so its validation scores "
                        "count pixels the model learned; tile the scenes so that no store "
                        "validates where another trains, or leave one out"
                    )
                    break

    def warn_if_resolutions_differ(self) -> None:
        """A convolution's filters are tied to a ground size: scenes of very different pixel
        sizes are different data to one model."""
        sizes = [s for s in (p.store.pixel_size_m for p in self.train) if s]
        if sizes and max(sizes) / min(sizes) >= RESOLUTION_TOLERANCE:
            warn_user(
                f"{', '.join(map(str, self.paths))}: the scenes' pixels are {min(sizes):.3g} to "
                f"{max(sizes):.3g} m on the ground, so the model sees each size less; resample "
                "the scenes to one resolution (`rio warp ... --res`) or train one model per size"
            )

    @property
    def first(self) -> StoreBatches:
        """The first store's training split: the run's bands, class names, colors and values."""
        return self.train[0]

    @property
    def paths(self) -> list[Path]:
        return [p.store.path for p in self.train]

    def training_data(self) -> StoreBatches | Interleaved:
        """Every store's training crops, as one set (a single store's as it is)."""
        return self.train[0] if len(self.train) == 1 else Interleaved(self.train)

    def validation_windows(self, halo: int) -> ValidationWindows | Interleaved:
        """Every store's validation tiles with their halo, taken in turn store by store."""
        return self._windows(self.val, halo)

    def calibration_windows(self, halo: int) -> ValidationWindows | Interleaved:
        """Every store's training tiles (whole, read lazily) with their halo, in turn."""
        tiles = [
            StoreBatches(p.store, "train", in_memory_bytes=0, id_map=p.id_map) for p in self.train
        ]
        return self._windows(tiles, halo)

    @staticmethod
    def _windows(parts: list[StoreBatches], halo: int) -> ValidationWindows | Interleaved:
        keep = IN_MEMORY_BYTES // len(parts)
        windows = [ValidationWindows(p, halo, keep_bytes=keep) for p in parts]
        return windows[0] if len(windows) == 1 else Interleaved(windows)

    @property
    def band_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-band normalization: the store's own, or pooled over every training region."""
        if len(self.train) == 1:
            return self.first.band_mean, self.first.band_std
        return pooled_band_stats(self.train)

    @property
    def class_counts(self) -> np.ndarray:
        """Labeled training pixels per class, summed over the stores."""
        total = np.zeros(self.first.store.classes, dtype=np.int64)
        for part in self.train:
            np.add.at(total, part.run_class_ids(), np.asarray(part.class_counts, dtype=np.int64))
        return total

    def scored_labels(self, limit: int) -> list[torch.Tensor]:
        """Each store's labels of the first `limit` validation tiles in the order scored."""
        order = Interleaved(self.val)
        owners = order.owners(list(range(min(len(order), limit))))
        return [self.val[k].tile_labels(local) for k, local in owners]
