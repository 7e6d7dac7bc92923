"""Spatial train/validation split of a scene, with a guard band so halos never cross it.

`columns:0.7` puts the split line at 70 % of the width: training tiles lie left of it, validation
tiles right of it, and a guard band `gap` pixels wide, centred on the line, holds no tile of either.
A tile whose halo is at most `gap` pixels therefore never sees a pixel of the other region (the
halo of a training tile ends where the validation region starts). `rows:0.7` does the same with
the top 70 % of rows. A fraction of 1 puts the whole scene in training (no validation).

Tiles are laid on each region separately, from its top-left corner; the last row/column of tiles
is clipped to the region (the store pads it), so each pixel of a region is in exactly one tile and
no tile straddles the split.
"""

from __future__ import annotations

from dataclasses import dataclass

from rasterio.windows import Window

from .errors import TilesError
from .warn import warn_user
from .wording import option

TRAIN, VALIDATION = 0, 1
SPLIT_NAMES = {TRAIN: "train", VALIDATION: "validation"}


# what `geodnn tile` and a store build use unless told otherwise
DEFAULT_TILE, DEFAULT_SPLIT, DEFAULT_GAP = 128, "columns:0.7", 64


@dataclass(frozen=True)
class SplitSpec:
    """Where to cut the scene: along `axis` ("columns" or "rows") at `fraction`, `gap` px apart."""

    axis: str = "columns"
    fraction: float = 0.7
    gap: int = DEFAULT_GAP

    def describe(self) -> str:
        side = "left" if self.axis == "columns" else "top"
        return (
            f"{self.axis}:{self.fraction:g}: train = {side} {self.fraction:.0%} of {self.axis}, "
            f"validation = the rest, guard band of {self.gap} px between them (no tile in it)"
        )


@dataclass(frozen=True)
class Region:
    """A rectangle of the scene grid holding tiles of one split (rows [row0, row1), cols ...)."""

    split: int
    row0: int
    row1: int
    col0: int
    col1: int

    @property
    def name(self) -> str:
        return SPLIT_NAMES[self.split]

    @property
    def shape(self) -> tuple[int, int]:
        return self.row1 - self.row0, self.col1 - self.col0


@dataclass(frozen=True)
class TileWindow:
    """One tile: its split and its window on the scene grid (clipped at region edges)."""

    split: int
    window: Window

    @property
    def row_col_shape(self) -> tuple[int, int, int, int]:
        """(row_off, col_off, height, width), the store's `windows` row."""
        w = self.window
        return int(w.row_off), int(w.col_off), int(w.height), int(w.width)


def warn_if_gap_below_radius(where: object, gap: int, radius: int) -> None:
    """A guard band narrower than a model's receptive radius lets validation pixels near it see
    training pixels: said when training on such a split and when scoring its validation."""
    if gap < radius:
        warn_user(
            f"{where}: the split's guard band ({gap} px) is narrower than the model's receptive "
            f"radius ({radius} px), so validation pixels near it see training pixels and its "
            f"scores are not fully held out; re-tile with {option('gap', radius)} or more (and "
            "retrain) for an honest validation score"
        )


def parse_split(text: str, gap: int = DEFAULT_GAP) -> SplitSpec:
    """Parse `columns:0.7` / `rows:0.7` into a SplitSpec; raise TilesError with the fix."""
    axis, _, value = text.partition(":")
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if axis not in ("columns", "rows") or not 0.0 < fraction <= 1.0:
        raise TilesError(
            f"split '{text}' is not understood; use columns:F or rows:F with 0 < F <= 1 "
            "(e.g. columns:0.7)"
        )
    if gap < 0:
        raise TilesError(f"gap {gap} is negative; pass {option('gap', 0)} or more (pixels)")
    return SplitSpec(axis, fraction, int(gap))


def _room_fix(shape: tuple[int, int], spec: SplitSpec) -> str:
    """What makes room for both regions, each checked with split_regions' own arithmetic: a
    split in the middle, which keeps the gap (a gap is what keeps validation honest: it
    should stay at least the model's receptive radius), the widest gap that fits at this
    fraction, and (where it fits) splitting the other axis."""
    height, width = shape
    length, other, other_length = (
        (width, "rows", height) if spec.axis == "columns" else (height, "columns", width)
    )
    fixes = []
    if spec.fraction != 0.5 and _widest_gap(length, 0.5) >= spec.gap:
        fixes.append(f"move the split ({option('split', f'{spec.axis}:0.5')})")
    widest = _widest_gap(length, spec.fraction)
    if 0 <= widest < spec.gap:
        fixes.append(f"lower {option('gap')} to {widest} or less")
    if other_length > length and _widest_gap(other_length, spec.fraction) >= spec.gap:
        fixes.append(f"split the {other} ({option('split', f'{other}:{spec.fraction:g}')})")
    return ", or ".join(fixes) or "pass a larger scene"


def _widest_gap(length: int, fraction: float) -> int:
    """The widest gap split_regions fits at `fraction` of `length` (negative: none): the
    training region keeps >= 1 px before line - gap // 2, validation >= 1 px after it."""
    line = round(fraction * length)
    return min(2 * (line - 1) + 1, 2 * (length - 1 - line))


def split_regions(shape: tuple[int, int], spec: SplitSpec) -> list[Region]:
    """The training region and (unless fraction is 1) the validation region of a scene."""
    height, width = shape
    length = width if spec.axis == "columns" else height
    if spec.fraction >= 1.0:
        spans = [(TRAIN, 0, length)]
    else:
        line = round(spec.fraction * length)
        train_end = line - spec.gap // 2
        val_start = train_end + spec.gap
        if train_end < 1 or val_start > length - 1:
            raise TilesError(
                f"split {spec.axis}:{spec.fraction:g} with a {spec.gap} px gap leaves no room "
                f"for both regions in a {height}x{width} scene; {_room_fix(shape, spec)}"
            )
        spans = [(TRAIN, 0, train_end), (VALIDATION, val_start, length)]
    if spec.axis == "columns":
        return [Region(split, 0, height, a, b) for split, a, b in spans]
    return [Region(split, a, b, 0, width) for split, a, b in spans]


def region_tiles(region: Region, tile: int) -> list[TileWindow]:
    """Tiles of `tile` px covering `region` exactly once, row-major; edge tiles are clipped."""
    out = []
    for row in range(region.row0, region.row1, tile):
        for col in range(region.col0, region.col1, tile):
            height = min(tile, region.row1 - row)
            width = min(tile, region.col1 - col)
            out.append(TileWindow(region.split, Window(col, row, width, height)))
    return out


def split_tiles(shape: tuple[int, int], spec: SplitSpec, tile: int) -> list[TileWindow]:
    """All tiles of a scene, training region first, then validation."""
    if tile < 1:
        raise TilesError(
            f"tile size {tile} is too small; pass {option('tile', DEFAULT_TILE)} (1 or more)"
        )
    return [t for region in split_regions(shape, spec) for t in region_tiles(region, tile)]
