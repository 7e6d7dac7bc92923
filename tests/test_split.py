"""The spatial split: regions, the guard band that keeps halos apart, and tile coverage."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tiles.errors import TilesError
from tiles.split import (
    TRAIN,
    VALIDATION,
    SplitSpec,
    parse_split,
    split_regions,
    split_tiles,
)


def coverage(shape, tiles) -> np.ndarray:
    """How many tiles cover each pixel, and with which split (-1 none)."""
    count = np.zeros(shape, dtype=np.int64)
    owner = np.full(shape, -1, dtype=np.int64)
    for t in tiles:
        w = t.window
        rows = slice(w.row_off, w.row_off + w.height)
        cols = slice(w.col_off, w.col_off + w.width)
        count[rows, cols] += 1
        owner[rows, cols] = t.split
    return count, owner


@pytest.mark.parametrize(
    "shape, spec, tile",
    [
        ((300, 1000), SplitSpec("columns", 0.7, 32), 128),
        ((1000, 300), SplitSpec("rows", 0.7, 32), 128),
        ((131, 257), SplitSpec("columns", 0.5, 7), 16),
        ((50, 60), SplitSpec("columns", 0.7, 4), 128),  # regions smaller than one tile
    ],
)
def test_no_tile_halo_reaches_the_other_region(shape, spec, tile):
    tiles = split_tiles(shape, spec, tile)
    count, owner = coverage(shape, tiles)
    assert count.max() == 1  # nothing doubled
    gap = spec.gap
    for t in tiles:
        w = t.window
        # the tile grown by its halo of `gap` px must not touch a pixel of the other split
        r0, r1 = max(w.row_off - gap, 0), w.row_off + w.height + gap
        c0, c1 = max(w.col_off - gap, 0), w.col_off + w.width + gap
        seen = owner[r0:r1, c0:c1]
        other = VALIDATION if t.split == TRAIN else TRAIN
        assert not (seen == other).any()


def test_columns_split_covers_everything_but_the_guard_band():
    shape, spec = (300, 1000), SplitSpec("columns", 0.7, 32)
    count, owner = coverage(shape, split_tiles(shape, spec, 128))
    uncovered = np.flatnonzero(count[0] == 0)
    np.testing.assert_array_equal(uncovered, np.arange(700 - 16, 700 + 16))
    assert (count[:, :684] == 1).all() and (count[:, 716:] == 1).all()
    assert (owner[:, :684] == TRAIN).all() and (owner[:, 716:] == VALIDATION).all()


def test_rows_split_puts_training_on_top():
    regions = split_regions((100, 40), SplitSpec("rows", 0.6, 10))
    assert [(r.name, r.row0, r.row1, r.col0, r.col1) for r in regions] == [
        ("train", 0, 55, 0, 40),
        ("validation", 65, 100, 0, 40),
    ]


def test_edge_tiles_are_clipped_not_dropped():
    tiles = split_tiles((130, 300), SplitSpec("columns", 1.0, 0), 128)
    sizes = {(t.window.height, t.window.width) for t in tiles}
    assert sizes == {(128, 128), (128, 44), (2, 128), (2, 44)}
    assert len(tiles) == 6 and all(t.split == TRAIN for t in tiles)


def test_parse_split_and_its_errors():
    assert parse_split("rows:0.6", 8) == SplitSpec("rows", 0.6, 8)
    assert "70%" in parse_split("columns:0.7").describe()
    for bad in ("columns", "diagonal:0.5", "columns:0", "columns:1.5", "rows:x"):
        with pytest.raises(TilesError, match="columns:F or rows:F"):
            parse_split(bad)
    with pytest.raises(TilesError, match="pass gap=0 or more"):
        parse_split("columns:0.7", -1)


@pytest.mark.parametrize("tile", [0, -1])
def test_a_tile_size_under_1_is_a_one_line_tiles_error(tile):
    """Checked up front: through the Python API, range() would raise a raw ValueError."""
    with pytest.raises(TilesError, match=f"tile size {tile} is too small; pass tile=128") as info:
        split_tiles((10, 10), SplitSpec("columns", 1.0, 0), tile)
    assert "\n" not in str(info.value)


def test_scene_too_small_for_split_and_gap():
    with pytest.raises(TilesError, match="lower `gap`"):
        split_regions((10, 40), SplitSpec("columns", 0.7, 32))


@pytest.mark.parametrize(
    "shape, spec, fix",
    [
        ((300, 1), SplitSpec("columns", 0.7, 0), r"scene; split the rows \(split='rows:0.7'\)$"),
        ((300, 40), SplitSpec("columns", 0.7, 64), r"lower `gap` to 22 or less, or split the rows"),
        ((70, 40), SplitSpec("columns", 0.7, 64), r"scene; lower `gap` to 22 or less$"),
        ((100, 300), SplitSpec("columns", 0.001, 4), r"scene; move the split \(split='colu"),
        # a deep model's guard band (radius 961): the split that keeps it comes first
        (
            (1300, 1300),
            SplitSpec("columns", 0.7, 961),
            r"scene; move the split \(split='columns:0.5'\), or lower `gap` to 778 or less$",
        ),
        ((1, 1), SplitSpec("columns", 0.7, 0), r"pass a larger scene$"),
    ],
)
def test_a_split_without_room_says_the_fix_that_works(shape, spec, fix):
    """A 1-px-wide scene was told to 'lower --gap or move the split' at --gap 0; each fix
    said is checked to work."""
    with pytest.raises(TilesError, match=fix) as said:
        split_regions(shape, spec)
    gap = re.search(r"`gap` to (\d+)", str(said.value))
    if gap:
        for g in (int(gap[1]), int(gap[1]) + 1):  # the widest that fits, and one more
            fits = g == int(gap[1])
            try:
                split_regions(shape, SplitSpec(spec.axis, spec.fraction, g))
                assert fits
            except TilesError:
                assert not fits
    for axis, fraction in re.findall(r"split='(\w+):([\d.]+)'", str(said.value)):
        split_regions(shape, SplitSpec(axis, float(fraction), spec.gap))
