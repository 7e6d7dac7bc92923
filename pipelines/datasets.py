"""The tile store seen as geodnn training data (the `geodnn.data.Batches` protocol).

`StoreBatches(store, split, crop=None, seed=0)`: without `crop`, item i is the i-th tile of the
split (T x T, padded edges are NaN / 255). With `crop`, item i is a crop x crop window of tile
i mod N at an offset drawn from (seed, i) alone, inside the tile's valid part where it fits, so
any index (also beyond `len`) names the same crop on every worker and every run; `len` counts
`crops_per_tile` crops per tile, one pass of a sampler.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from tiles.store import TileStore
from tiles.wording import option

from .errors import PipelineError

IN_MEMORY_BYTES = 512 * 2**20  # splits up to this size are loaded once; larger ones read lazily


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
    ) -> None:
        self.store = store if isinstance(store, TileStore) else TileStore.open(store)
        self.split = split
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
            self._labels = self.store.labels(self.tiles)

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
        """Labeled pixels per class in the training region."""
        return self.store.class_pixel_counts

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
            labels = self.store.labels(self.tiles[positions])
        else:
            labels = np.zeros((0, self.tile_size, self.tile_size), dtype=np.uint8)
        return torch.from_numpy(labels.astype(np.int64))

    def _tiles(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._images is not None:
            return self._images[positions], self._labels[positions]
        stored = self.tiles[positions]
        return self.store.images(stored), self.store.labels(stored)

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
