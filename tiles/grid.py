"""Chunk grids with halos: every scene pixel is predicted exactly once, seam-free.

A fully-convolutional model with receptive radius r gives, for a chunk read with a halo of r
pixels, exactly the pixels it would give on the whole scene. At the scene edges the halo is filled
by reflection, index for index the same as `np.pad(scene, r, mode="reflect")` of the whole scene,
so chunked prediction equals whole-image prediction for any chunk size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.windows import Window

from .errors import TilesError
from .raster import read_window
from .wording import option

DEFAULT_CHUNK = 512


class ChunkSizeError(TilesError):
    """The chunk size cannot hold the model's halo (or is not a positive number)."""


def reflect_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Indices start..stop-1 folded into [0, size) like numpy's "reflect" padding (no edge repeat).

    The reflection is periodic with period 2*(size-1), which is what `np.pad(mode="reflect")`
    produces when the padding is wider than the array; a length-1 axis maps everything to 0.
    """
    index = np.arange(start, stop, dtype=np.int64)
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.mod(index, period)
    return np.where(index >= size, period - index, index)


def check_chunk_size(chunk: int, halo: int) -> None:
    """Refuse chunks under 1 pixel or smaller than the halo.

    A core smaller than the halo would make each chunk read more than 9x the pixels it predicts;
    it is never what the user wants, and a larger `--chunk` gives the same result faster.
    """
    if chunk < 1 or chunk < halo:
        raise ChunkSizeError(
            f"chunk size {chunk} is too small for the model's halo of {halo} pixels; "
            f"pass {option('chunk', max(halo, 1))} or more (default {DEFAULT_CHUNK})"
        )


@dataclass(frozen=True, eq=False)
class Chunk:
    """One cell of the grid: the core `window` it predicts and the file window its halo reads.

    `rows` and `cols` index into the array read from `halo_window` and give the core plus a halo
    of `halo` pixels on every side, reflected at the scene edges.
    """

    index: tuple[int, int]
    window: Window
    halo_window: Window
    halo: int
    rows: np.ndarray
    cols: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """Core (height, width) in pixels."""
        return int(self.window.height), int(self.window.width)

    @property
    def padded_shape(self) -> tuple[int, int]:
        return self.shape[0] + 2 * self.halo, self.shape[1] + 2 * self.halo

    def core_slices(self) -> tuple[slice, slice]:
        """Slices of the core inside the padded chunk array."""
        h, w = self.shape
        return slice(self.halo, self.halo + h), slice(self.halo, self.halo + w)


@dataclass(frozen=True)
class ChunkGrid:
    """A row-major grid of `chunk` x `chunk` cores over a (height, width) scene.

    The last row and column are clipped to the scene (never dropped, never doubled); a scene
    smaller than one chunk is one chunk.
    """

    height: int
    width: int
    chunk: int = DEFAULT_CHUNK
    halo: int = 0

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ChunkSizeError(f"scene of {self.height}x{self.width} pixels has nothing to tile")
        if self.halo < 0:
            raise ValueError(f"halo must be >= 0, got {self.halo}")
        check_chunk_size(self.chunk, self.halo)

    @property
    def rows(self) -> int:
        return -(-self.height // self.chunk)

    @property
    def cols(self) -> int:
        return -(-self.width // self.chunk)

    def __len__(self) -> int:
        return self.rows * self.cols

    def __iter__(self) -> Iterator[Chunk]:
        for i in range(self.rows):
            for j in range(self.cols):
                yield self.chunk_at(i, j)

    def chunk_at(self, i: int, j: int) -> Chunk:
        """The chunk in grid row `i`, column `j`."""
        r, c = self.halo, self.chunk
        row0, col0 = i * c, j * c
        h, w = min(c, self.height - row0), min(c, self.width - col0)
        rows = reflect_indices(row0 - r, row0 + h + r, self.height)
        cols = reflect_indices(col0 - r, col0 + w + r, self.width)
        top, left = int(rows.min()), int(cols.min())
        bottom, right = int(rows.max()) + 1, int(cols.max()) + 1
        return Chunk(
            index=(i, j),
            window=Window(col0, row0, w, h),
            halo_window=Window(left, top, right - left, bottom - top),
            halo=r,
            rows=rows - top,
            cols=cols - left,
        )


def read_chunk(src: rasterio.DatasetReader, chunk: Chunk) -> np.ndarray:
    """Read a chunk with its halo: float32 (bands, h+2r, w+2r), NaN for nodata.

    The bounding window is read once; rows and columns are then taken through the reflect map.
    """
    block = read_window(src, chunk.halo_window)
    return np.ascontiguousarray(block[:, chunk.rows][:, :, chunk.cols])


def core_is_empty(padded: np.ndarray, chunk: Chunk) -> bool:
    """True when every pixel of the chunk's core is nodata in every band."""
    rs, cs = chunk.core_slices()
    return bool(np.isnan(padded[:, rs, cs]).all())


def nodata_mask(padded: np.ndarray, chunk: Chunk) -> np.ndarray:
    """(h, w) mask of core pixels that are nodata in every band (those stay nodata in outputs)."""
    rs, cs = chunk.core_slices()
    return np.isnan(padded[:, rs, cs]).all(axis=0)
