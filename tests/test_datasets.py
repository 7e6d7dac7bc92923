"""The tile store as geodnn training data: full tiles, deterministic crops, lazy reads."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import zarr

from geodnn.data import Batches, TensorBatches
from geodnn.model import build_model
from pipelines.datasets import (
    Interleaved,
    SceneStores,
    StoreBatches,
    ValidationWindows,
    pooled_band_stats,
    spread_evenly,
)
from pipelines.errors import PipelineError
from tiles.split import SplitSpec
from tiles.store import TileStore, build_store


@pytest.fixture
def store_path(tmp_path, make_geotiff):
    """A 2-band 60 x 90 scene; 24 px tiles; the bottom-right pixels are nodata."""
    rng = np.random.default_rng(3)
    image = rng.uniform(0, 100, size=(2, 60, 90)).astype(np.float32)
    image[:, 50:, 80:] = np.nan
    mask = (rng.uniform(size=(60, 90)) > 0.7).astype(np.uint8)
    scene = make_geotiff(image, name="scene.tif")
    labels = make_geotiff(mask, name="mask.tif")
    return build_store(
        scene, labels, tmp_path / "s.zarr", tile=24, split=SplitSpec("columns", 0.6, 6)
    )


def test_full_tiles_follow_the_protocol(store_path):
    data: Batches = StoreBatches(store_path, split="validation")
    store = TileStore.open(store_path)
    assert len(data) == len(store.indices("validation")) > 0
    x, y = data.get([0, len(data) - 1])
    assert x.dtype == torch.float32 and x.shape == (2, 2, 24, 24)
    assert y.dtype == torch.int64 and y.shape == (2, 24, 24)
    last = store.indices("validation")[-1]
    np.testing.assert_array_equal(y[1].numpy(), store.labels([last])[0].astype(np.int64))
    assert torch.isnan(x[1]).any() and (y[1] == 255).any()  # nodata corner and padding
    with pytest.raises(IndexError):
        data.get([len(data)])


def test_crops_are_deterministic_and_lie_in_their_tile(store_path):
    data = StoreBatches(store_path, split="train", crop=8, seed=5)
    again = StoreBatches(store_path, split="train", crop=8, seed=5)
    other = StoreBatches(store_path, split="train", crop=8, seed=6)
    indices = list(range(0, 3 * len(data), 7))  # also beyond len: a sampler may draw many
    x, y = data.get(indices)
    assert x.shape == (len(indices), 2, 8, 8) and y.shape == (len(indices), 8, 8)
    x2, y2 = again.get(indices)
    assert torch.equal(y, y2) and torch.equal(torch.nan_to_num(x), torch.nan_to_num(x2))
    assert not torch.equal(torch.nan_to_num(other.get(indices)[0]), torch.nan_to_num(x))
    store = TileStore.open(store_path)
    for k, i in enumerate(indices[:10]):
        position, row, col = data.locate(i)
        tile = store.indices("train")[position]
        h, w = store.windows([tile])[0, 2:]
        assert row + 8 <= max(h, 8) and col + 8 <= max(w, 8)
        full = store.images([tile])[0]
        np.testing.assert_array_equal(x[k].numpy(), full[:, row : row + 8, col : col + 8])


def test_every_crop_offset_of_a_tile_is_drawn_and_a_crop_may_be_the_whole_tile(store_path):
    """The last row and column of a tile are trained on too; a crop as large as the tile
    (which the crop check allows) takes the tile whole, no error."""
    data = StoreBatches(store_path, split="train", crop=20, seed=2)
    full = [k for k, w in enumerate(data.windows) if tuple(w[2:]) == (24, 24)]
    assert full  # a whole 24 px tile: 5 row and 5 column offsets
    tiles = len(data.tiles)
    offsets = [data.locate(full[0] + tiles * n)[1:] for n in range(400)]
    assert {row for row, _ in offsets} == {col for _, col in offsets} == set(range(5))
    whole = StoreBatches(store_path, split="train", crop=24)
    x, y = whole.get(range(len(whole)))
    assert x.shape == (len(whole), 2, 24, 24) and y.shape == (len(whole), 24, 24)


def test_lazy_reads_match_in_memory(store_path):
    eager = StoreBatches(store_path, split="train", crop=10, seed=1)
    lazy = StoreBatches(store_path, split="train", crop=10, seed=1, in_memory_bytes=0)
    assert eager.in_memory and not lazy.in_memory
    indices = [3, 0, 3, 40]
    a, b = eager.get(indices), lazy.get(indices)
    assert torch.equal(a[1], b[1]) and torch.equal(torch.nan_to_num(a[0]), torch.nan_to_num(b[0]))


def test_metadata_is_exposed(store_path):
    data = StoreBatches(store_path, split="val")
    store = TileStore.open(store_path)
    assert data.bands == 2 and data.class_names == ["background", "mask"]
    np.testing.assert_array_equal(data.band_mean, store.band_mean)
    np.testing.assert_array_equal(data.class_counts, store.class_pixel_counts)
    assert len(data.class_colors) == 2


def test_crop_larger_than_the_tile_is_refused(store_path):
    with pytest.raises(PipelineError, match="crop 30"):
        StoreBatches(store_path, crop=30)


def test_empty_request(store_path):
    x, y = StoreBatches(store_path, crop=8).get([])
    assert x.shape == (0, 2, 8, 8) and y.shape == (0, 8, 8)


def _validation_canvas(val: StoreBatches, border: int) -> np.ndarray:
    """Every validation tile's valid pixels on a NaN canvas of the scene grown by `border` (and
    by one tile more at the bottom and right, where edge tiles are padded)."""
    rows, cols = (n + 2 * border + val.tile_size for n in val.store.scene_shape)
    canvas = np.full((val.bands, rows, cols), np.nan, np.float32)
    images, _ = val.get(range(len(val)))
    for image, (row, col, height, width) in zip(images.numpy(), val.store.windows(val.tiles)):
        r, c = row + border, col + border
        canvas[:, r : r + height, c : c + width] = image[:, :height, :width]
    return canvas


@pytest.mark.parametrize("halo", [5, 30])  # within one neighbouring tile, and reaching two
@pytest.mark.parametrize("in_memory", [True, False])
def test_validation_windows_add_only_validation_neighbours_as_context(store_path, halo, in_memory):
    val = StoreBatches(store_path, "validation")
    limit = {} if in_memory else {"in_memory_bytes": 0}  # lazy: each tile read from the store
    windows = ValidationWindows(StoreBatches(store_path, "validation", **limit), halo)
    assert windows.tiles.in_memory == in_memory
    canvas = _validation_canvas(val, halo)
    size = val.tile_size + 2 * halo
    images, labels = windows.get(range(len(windows)))
    assert images.shape == (len(val), val.bands, size, size)
    assert torch.equal(labels, val.get(range(len(val)))[1])
    for image, (row, col, _, _) in zip(images.numpy(), val.store.windows(val.tiles)):
        # the canvas holds no training pixel: equal windows mean no training pixel leaked in
        np.testing.assert_array_equal(image, canvas[:, row : row + size, col : col + size])
    interior = images[:, :, halo:-halo, halo:-halo]
    assert torch.isfinite(images).sum() > torch.isfinite(interior).sum()  # context was added


def test_validation_windows_score_each_tile_as_the_whole_region_would(store_path):
    val = StoreBatches(store_path, "validation")
    model = build_model(val.bands, 2, depth=3, width=4, seed=0)
    model.set_normalization(val.band_mean, val.band_std)
    halo = model.receptive_radius
    windows = ValidationWindows(val, halo)
    canvas = torch.from_numpy(_validation_canvas(val, halo))[None]
    t = val.tile_size
    with torch.no_grad():
        region = model(canvas)[0]
        images, _ = windows.get(range(len(windows)))
        tiles = model(images)[:, :, halo : halo + t, halo : halo + t]
    for logits, (row, col, height, width) in zip(tiles, val.store.windows(val.tiles)):
        expected = region[:, row + halo : row + halo + height, col + halo : col + halo + width]
        assert torch.allclose(logits[:, :height, :width], expected, atol=1e-5)


def test_validation_windows_read_each_tile_once(store_path, monkeypatch):
    lazy = StoreBatches(store_path, "validation", in_memory_bytes=0)
    windows = ValidationWindows(lazy, halo=30)  # each window reaches two tiles each way
    reads: list[int] = []
    original = lazy.store.images
    monkeypatch.setattr(lazy.store, "images", lambda idx: reads.extend(idx) or original(idx))
    images, labels = windows.get(range(len(windows)))
    assert sorted(reads) == sorted(int(i) for i in lazy.tiles)  # every tile once, no more
    again, _ = windows.get(range(len(windows)))  # the next epoch: the tiles read are kept
    assert sorted(reads) == sorted(int(i) for i in lazy.tiles)
    torch.testing.assert_close(again, images, rtol=0, atol=0, equal_nan=True)
    tile_bytes = lazy.tile_image(0).nbytes
    budget = ValidationWindows(lazy, halo=30, keep_bytes=2 * tile_bytes)  # keeps two tiles
    reads.clear()
    for _ in range(2):
        torch.testing.assert_close(
            budget.get(range(len(budget)))[0], images, rtol=0, atol=0, equal_nan=True
        )
    assert len(reads) == 2 * len(lazy.tiles) - 2  # all but the two kept are read again
    assert torch.equal(labels, StoreBatches(store_path, "validation").get(range(len(lazy)))[1])
    reads.clear()
    assert torch.equal(lazy.tile_labels([1, 0]), labels[[1, 0]]) and not reads  # no image read
    with pytest.raises(IndexError, match="out of range"):
        windows.get([len(windows)])
    with pytest.raises(IndexError, match="out of"):
        lazy.tile_labels([-1])


def test_validation_windows_need_whole_tiles(store_path):
    with pytest.raises(ValueError, match="no crop"):
        ValidationWindows(StoreBatches(store_path, "train", crop=8), 4)


def numbered(values: list[int]) -> TensorBatches:
    """Items whose image and label are filled with their own number."""
    v = torch.tensor(values, dtype=torch.float32)
    return TensorBatches(
        v.view(-1, 1, 1, 1).expand(-1, 1, 2, 2), v.long().view(-1, 1, 1).expand(-1, 2, 2)
    )


def test_interleaved_takes_the_sets_in_turn_and_keeps_the_order_asked():
    joined = Interleaved([numbered([10, 11, 12]), numbered([20]), numbered([30, 31])])
    assert len(joined) == 6
    x, y = joined.get(range(6))
    assert x[:, 0, 0, 0].tolist() == [10, 20, 30, 11, 31, 12]  # round by round
    x, y = joined.get([5, 0, 3, 1])
    assert x[:, 0, 0, 0].tolist() == [12, 10, 11, 20] and y[:, 0, 0].tolist() == [12, 10, 11, 20]
    assert joined.owners([4, 0, 2]) == [(0, [0]), (2, [1, 0])]
    assert joined.get([])[0].shape == (0, 1, 2, 2)
    with pytest.raises(IndexError):
        joined.get([6])


def test_a_spread_of_interleaved_sets_samples_each_in_proportion():
    """Evenly spaced indices follow the rounds: 64 of two sets of 64 were 63 of the first."""
    joined = Interleaved([numbered(list(range(64))), numbered(list(range(100, 164)))])
    x, _ = joined.get(joined.spread(64))
    values = x[:, 0, 0, 0]
    assert (values < 100).sum() == 32 and (values >= 100).sum() == 32
    assert values[values < 100].tolist() == spread_evenly(64, 32).tolist()  # evenly within
    uneven = Interleaved([numbered([0] * 30), numbered([1] * 60), numbered([2] * 10)])
    x, _ = uneven.get(uneven.spread(10))
    assert torch.bincount(x[:, 0, 0, 0].long()).tolist() == [3, 6, 1]
    assert len(uneven.spread(500)) == 100 and uneven.spread(0) == []


@pytest.fixture
def two_scene_stores(tmp_path, make_geotiff):
    """Two stores of two scenes of different brightness (band means ~50 and ~150)."""
    rng = np.random.default_rng(7)
    paths = []
    for k, (low, high) in enumerate([(0, 100), (100, 200)]):
        image = rng.uniform(low, high, size=(2, 48, 72 + 24 * k)).astype(np.float32)
        mask = (rng.uniform(size=image.shape[1:]) > 0.8).astype(np.uint8)
        (tmp_path / f"scene{k}").mkdir()  # both masks are mask.tif: one class name, "mask"
        scene = make_geotiff(image, name=f"scene{k}/image.tif")
        labels = make_geotiff(mask, name=f"scene{k}/mask.tif")
        out = tmp_path / f"s{k}.zarr"
        paths.append(build_store(scene, labels, out, tile=24, split=SplitSpec("columns", 0.6, 6)))
    return paths


def test_pooled_band_stats_are_those_of_every_training_pixel(two_scene_stores):
    parts = [StoreBatches(p, split="train") for p in two_scene_stores]
    mean, std = pooled_band_stats(parts)
    pixels = np.concatenate(
        [np.moveaxis(p.store.images(p.tiles), 1, 0).reshape(2, -1) for p in parts], axis=1
    )
    np.testing.assert_allclose(mean, np.nanmean(pixels, axis=1), rtol=1e-6)
    np.testing.assert_allclose(std, np.nanstd(pixels, axis=1), rtol=1e-5)
    assert 90 < mean[0] < 110  # between the two scenes' ~50 and ~150


def test_scene_stores_join_training_validation_and_counts(two_scene_stores):
    stores = SceneStores.open(two_scene_stores, crop=8, seed=1)
    train, val = stores.training_data(), stores.validation_windows(halo=4)
    assert len(train) == sum(len(p) for p in stores.train)
    x, y = train.get(range(len(train)))
    assert x.shape[1:] == (2, 8, 8) and y.shape[1:] == (8, 8)
    assert len(val) == sum(len(p) for p in stores.val)
    first = [stores.val[k].tile_labels([0])[0] for k in range(2)]
    _, labels = val.get([0, 1])  # the first scored tiles: one of each store
    assert torch.equal(labels[0], first[0]) and torch.equal(labels[1], first[1])
    counts = [p.class_counts for p in stores.train]
    np.testing.assert_array_equal(stores.class_counts, counts[0] + counts[1])
    scored = stores.scored_labels(3)
    assert [len(s) for s in scored] == [2, 1]
    one = SceneStores.open(two_scene_stores[:1], crop=8, seed=1)
    assert isinstance(one.training_data(), StoreBatches)
    np.testing.assert_array_equal(one.band_stats[0], one.first.band_mean)


def test_training_splits_of_several_stores_share_one_memory_budget(two_scene_stores, monkeypatch):
    first = StoreBatches(two_scene_stores[0], split="train")
    monkeypatch.setattr("pipelines.datasets.IN_MEMORY_BYTES", first.nbytes)
    stores = SceneStores.open(two_scene_stores, crop=8, seed=1)
    assert [p.in_memory for p in stores.train] == [True, False]


def test_validation_windows_of_several_stores_share_one_memory_budget(
    two_scene_stores, monkeypatch
):
    """The tiles kept between epochs stay within one budget, not one budget per store."""
    tile = StoreBatches(two_scene_stores[0], split="validation").tile_image(0).nbytes
    monkeypatch.setattr("pipelines.datasets.IN_MEMORY_BYTES", 2 * tile)
    stores = SceneStores.open(two_scene_stores, crop=8, seed=1)
    windows = stores.validation_windows(halo=4)
    assert all(len(part) >= 2 for part in stores.val)  # more tiles each than its share holds
    windows.get(range(len(windows)))
    kept = [image.nbytes for part in windows.parts for image in part._kept.values()]
    assert 0 < sum(kept) <= 2 * tile


def test_stores_one_model_cannot_train_on_together_are_refused(
    two_scene_stores, tmp_path, make_geotiff
):
    rng = np.random.default_rng(8)
    image = rng.uniform(0, 100, size=(2, 48, 72)).astype(np.float32)
    scene = make_geotiff(image, name="other.tif")
    mask = (rng.uniform(size=(48, 72)) > 0.8).astype(np.uint8)
    cases = {
        "3 band(s)": (make_geotiff(np.concatenate([image, image[:1]]), name="rgb.tif"), mask, 24),
        "classes [background, m1 = 2]": (scene, mask + (mask > 0), 24),
        "12 px tiles": (scene, mask, 12),
    }
    for k, (difference, (image_path, labels, tile)) in enumerate(cases.items()):
        other = build_store(
            image_path,
            make_geotiff(labels.astype(np.uint8), name=f"m{k}.tif"),
            tmp_path / f"bad{k}.zarr",
            tile=tile,
            split=SplitSpec("columns", 0.6, 6),
        )
        with pytest.raises(PipelineError, match="cannot train on both") as caught:
            SceneStores.open([two_scene_stores[0], other], crop=8, seed=0)
        assert str(caught.value).startswith(f"{other}: this store has {difference}")
        one_class_each = "= 2" in difference  # the fix: both masks' class as 1
        assert ("rewrite each mask so its class is 1" in str(caught.value)) == one_class_each


def test_classes_of_the_same_values_under_other_names_train_as_the_first_store_s(
    two_scene_stores,
):
    zarr.open_group(two_scene_stores[1], mode="r+").attrs["class_names"] = ["background", "streets"]
    with pytest.warns(UserWarning, match=r"\['background', 'streets'\] have the label values"):
        stores = SceneStores.open(two_scene_stores, crop=8, seed=0)
    assert stores.first.class_names == ["background", "mask"]


def test_a_store_with_some_of_the_first_store_s_classes_trains_renumbered(tmp_path, make_geotiff):
    """A scene without water trains beside one with water (it was refused): its labels are
    renumbered by value as the first store's, in training, validation and class counts."""
    rng = np.random.default_rng(9)
    paths = []
    for k, values in enumerate([[1, 2, 3], [2, 3]]):  # the second lacks value 1
        image = rng.uniform(0, 100, size=(2, 48, 72)).astype(np.float32)
        mask = rng.choice([0, *values], size=(48, 72)).astype(np.uint8)
        scene = make_geotiff(image, name=f"scene{k}.tif")
        labels = make_geotiff(mask, name=f"mask{k}.tif")
        split = SplitSpec("columns", 0.6, 6)
        paths.append(build_store(scene, labels, tmp_path / f"s{k}.zarr", tile=24, split=split))
    with pytest.warns(UserWarning, match=r"s1.zarr: has no class 1 of .*s0.zarr"):
        stores = SceneStores.open(paths, crop=None, seed=0)
    second, raw = stores.train[1], TileStore.open(paths[1])
    assert raw.class_values == [None, 2, 3]  # its ids 1, 2 are the first store's 2, 3
    _, labels = second.get(range(len(second)))
    stored = torch.from_numpy(raw.labels(second.tiles).astype(np.int64))
    expected = torch.where((stored > 0) & (stored < 255), stored + 1, stored)
    assert torch.equal(labels, expected)
    assert torch.equal(stores.val[1].tile_labels([0])[0], expected_val(raw, stores.val[1]))
    counts = np.asarray(raw.class_pixel_counts)
    first = np.asarray(TileStore.open(paths[0]).class_pixel_counts)
    np.testing.assert_array_equal(stores.class_counts, first + [counts[0], 0, *counts[1:]])
    reverse = [paths[1], paths[0]]  # the first store must hold every class
    with pytest.raises(PipelineError, match="cannot train on both.*listed first has them all"):
        SceneStores.open(reverse, crop=None, seed=0)
    names = TileStore.open(paths[1]).class_names
    zarr.open_group(paths[1], mode="r+").attrs["class_names"] = [names[0], names[2], names[1]]
    with pytest.warns(UserWarning, match=r"s1.zarr: its classes .* have the label values of"):
        SceneStores.open(paths, crop=None, seed=0)  # value 2 named as the first store's 3


def expected_val(raw: TileStore, val: StoreBatches) -> torch.Tensor:
    stored = torch.from_numpy(raw.labels(val.tiles[:1]).astype(np.int64))[0]
    return torch.where((stored > 0) & (stored < 255), stored + 1, stored)


def test_scenes_of_very_different_pixel_sizes_are_warned_of(
    two_scene_stores, tmp_path, make_geotiff
):
    from rasterio.transform import from_origin

    rng = np.random.default_rng(9)
    image = rng.uniform(0, 100, size=(2, 48, 72)).astype(np.float32)
    coarse = from_origin(733601.0, 3725139.0, 1.0, 1.0)  # 1 m pixels, the others 0.5 m
    scene = make_geotiff(image, name="coarse.tif", transform=coarse)
    mask = make_geotiff((image[0] > 80).astype(np.uint8), name="mask.tif", transform=coarse)
    other = build_store(
        scene, mask, tmp_path / "coarse.zarr", tile=24, split=SplitSpec("columns", 0.6, 6)
    )
    with pytest.warns(UserWarning, match=r"pixels are 0.5 to 1 m on the ground"):
        SceneStores.open([two_scene_stores[0], other], crop=8, seed=0)


def test_a_store_validating_where_another_trains_is_warned_of(
    store, overlapping_store, other_store
):
    with pytest.warns(UserWarning) as caught:
        SceneStores.open([store, overlapping_store], crop=32, seed=0)
    said = [str(w.message) for w in caught if "validation region lies partly" in str(w.message)]
    assert len(said) == 1 and said[0].startswith(f"{overlapping_store}: ")
    assert f"ground that {store} trains on" in said[0]
    west = TileStore.open(overlapping_store).region_footprint("validation")
    assert west.intersection(TileStore.open(store).region_footprint("train")).area > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # apart on the ground: nothing to say
        SceneStores.open([store, other_store], crop=32, seed=0)


def test_a_copy_of_a_listed_store_is_refused(store, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    with pytest.raises(PipelineError, match=f"^{copy}: this store holds the tiles of {store}"):
        SceneStores.open([store, copy], crop=32, seed=0)


def test_a_footprint_is_reprojected_to_the_crs_asked_for(store):
    opened = TileStore.open(store)
    here = opened.region_footprint("train")
    metres = opened.region_footprint("train", "EPSG:32611")  # Vegas: UTM 11N
    w = opened.windows(opened.indices("train"))
    pixels = (w[:, 0] + w[:, 2]).max() * (w[:, 1] + w[:, 3]).max()  # from the crop's corner
    assert opened.crs.to_epsg() == 4326
    assert metres.area / (pixels * opened.pixel_size_m**2) == pytest.approx(1, abs=0.02)
    assert metres.bounds[0] > 600_000 and here.bounds[0] < -115
    assert TileStore.open(store).region_footprint("validation").intersection(here).area == 0
