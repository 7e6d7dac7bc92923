import numpy as np
import pytest
import rasterio

from tiles.grid import (
    ChunkGrid,
    ChunkSizeError,
    core_is_empty,
    nodata_mask,
    read_chunk,
    reflect_indices,
)


@pytest.mark.parametrize(
    "height, width, chunk",
    [(1, 1, 512), (7, 1000, 64), (1001, 999, 256), (512, 512, 512), (513, 511, 512), (5, 3, 2)],
)
def test_grid_covers_every_pixel_exactly_once(height, width, chunk):
    grid = ChunkGrid(height, width, chunk, halo=min(chunk, 3))
    count = np.zeros((height, width), dtype=np.int32)
    for c in grid:
        w = c.window
        count[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width] += 1
    assert (count == 1).all()
    assert len(grid) == len(list(grid)) == -(-height // chunk) * -(-width // chunk)


def test_scene_smaller_than_one_chunk_is_one_chunk():
    [only] = list(ChunkGrid(30, 20, 512, halo=8))
    assert (only.window.height, only.window.width) == (30, 20)
    assert only.padded_shape == (46, 36)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 10])
@pytest.mark.parametrize("halo", [0, 1, 4, 9, 23])
def test_reflect_indices_match_numpy_pad(size, halo):
    axis = np.arange(size)
    expected = np.pad(axis, halo, mode="reflect")
    assert (axis[reflect_indices(-halo, size + halo, size)] == expected).all()


@pytest.mark.parametrize(
    "shape, chunk, halo", [((1, 1), 5, 5), ((7, 1000), 16, 9), ((40, 33), 10, 7), ((3, 5), 3, 2)]
)
def test_chunks_read_exactly_the_padded_whole_scene(make_geotiff, shape, chunk, halo):
    rng = np.random.default_rng(0)
    scene = rng.random((2, *shape), dtype=np.float32)
    path = make_geotiff(scene)
    padded = np.pad(scene, ((0, 0), (halo, halo), (halo, halo)), mode="reflect")
    with rasterio.open(path) as src:
        for c in ChunkGrid(*shape, chunk, halo):
            r0, c0 = c.window.row_off, c.window.col_off
            h, w = c.padded_shape
            assert np.array_equal(read_chunk(src, c), padded[:, r0 : r0 + h, c0 : c0 + w])
            hw = c.halo_window
            assert hw.row_off >= 0 and hw.col_off >= 0
            assert hw.row_off + hw.height <= shape[0] and hw.col_off + hw.width <= shape[1]


def test_interior_chunk_reads_only_its_halo_window():
    c = ChunkGrid(100, 100, 20, halo=5).chunk_at(2, 3)
    assert (c.halo_window.row_off, c.halo_window.col_off) == (35, 55)
    assert (c.halo_window.height, c.halo_window.width) == (30, 30)


@pytest.mark.parametrize("chunk, halo", [(0, 0), (-4, 0), (7, 8)])
def test_chunk_too_small_for_halo_names_the_fix(chunk, halo):
    with pytest.raises(ChunkSizeError, match="pass chunk=") as info:
        ChunkGrid(100, 100, chunk, halo)
    assert "\n" not in str(info.value)


def test_a_pixel_is_nodata_only_when_every_band_is(make_geotiff):
    """A pixel missing in one band of a multiband scene is still predicted, not masked."""
    scene = np.full((2, 12, 12), 5.0, dtype=np.float32)
    scene[1, 3, 4] = np.nan  # one band missing: still data
    scene[:, 7, 8] = np.nan  # every band missing: nodata
    [chunk] = ChunkGrid(12, 12, 12, halo=2)
    with rasterio.open(make_geotiff(scene)) as src:
        padded = read_chunk(src, chunk)
    expected = np.zeros((12, 12), dtype=bool)
    expected[7, 8] = True
    np.testing.assert_array_equal(nodata_mask(padded, chunk), expected)
    assert not core_is_empty(padded, chunk)
