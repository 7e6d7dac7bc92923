"""Labels on the scene grid: rasterized vectors, raster masks, classes, reprojection, bad input."""

from __future__ import annotations

import json
import re
import shlex
import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.windows import Window

from geodnn.metrics import IGNORE_INDEX as GEODNN_IGNORE_INDEX
from tiles.errors import LabelError, TilesError
from tiles.labels import IGNORE_INDEX, load_labels
from tiles.raster import open_scene
from tiles.store import build_store

X0, Y0, PIXEL = 733601.0, 3725139.0, 0.5  # the conftest default grid (Atlanta's)


def pixel_box(row0: int, col0: int, row1: int, col1: int) -> shapely.Polygon:
    """A polygon covering pixels rows [row0, row1), cols [col0, col1) of the default grid."""
    return shapely.box(X0 + col0 * PIXEL, Y0 - row1 * PIXEL, X0 + col1 * PIXEL, Y0 - row0 * PIXEL)


def write_vector(tmp_path, geometries, name="labels.geojson", crs="EPSG:32616", **columns):
    frame = gpd.GeoDataFrame(columns, geometry=list(geometries), crs=crs)
    path = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyogrio warns when writing without a CRS, on purpose here
        frame.to_file(path, engine="pyogrio")
    return path


def whole(source, info) -> np.ndarray:
    return source.rasterize(Window(0, 0, info.width, info.height))


@pytest.fixture
def scene(make_geotiff):
    return open_scene(make_geotiff(np.ones((1, 20, 30), dtype=np.uint16), name="scene.tif"))


def test_known_polygons_burn_exactly_their_pixels(tmp_path, scene):
    path = write_vector(tmp_path, [pixel_box(2, 4, 6, 10), pixel_box(10, 20, 12, 29)])
    source = load_labels(path, scene)
    expected = np.zeros((20, 30), dtype=np.uint8)
    expected[2:6, 4:10] = 1
    expected[10:12, 20:29] = 1
    assert source.class_names == ["background", "labels"]
    np.testing.assert_array_equal(whole(source, scene), expected)


def test_window_rasterization_matches_the_whole_scene(data_dir):
    info = open_scene(data_dir / "atlanta-buildings" / "image.tif")
    source = load_labels(data_dir / "atlanta-buildings" / "buildings.geojson", info)
    full = whole(source, info)
    assert 0.01 < full.mean() < 0.2  # buildings are a real minority class
    for col, row, width, height in [(0, 0, 128, 128), (100, 250, 300, 77), (850, 870, 50, 30)]:
        part = source.rasterize(Window(col, row, width, height))
        np.testing.assert_array_equal(part, full[row : row + height, col : col + width])


def test_windows_of_a_rotated_scene_burn_every_feature(tmp_path, make_geotiff):
    # a 30 degree rotated grid: a window's two-corner "bounds" miss most of its footprint
    rotated = Affine.translation(X0, Y0) * Affine.rotation(30) * Affine.scale(PIXEL, -PIXEL)
    info = open_scene(make_geotiff(np.ones((1, 64, 64), np.uint8), transform=rotated))
    corners = [(0, 0), (3, 0), (3, 3), (0, 3)]
    squares = [
        shapely.Polygon([rotated * (c + dc, r + dr) for dc, dr in corners])
        for r in range(4, 60, 12)
        for c in range(4, 60, 12)
    ]
    source = load_labels(write_vector(tmp_path, squares), info)
    full = whole(source, info)
    expected = np.zeros((64, 64), dtype=np.uint8)
    for r in range(4, 60, 12):
        for c in range(4, 60, 12):
            expected[r : r + 3, c : c + 3] = 1
    np.testing.assert_array_equal(full, expected)
    for col, row in [(0, 0), (16, 16), (32, 8), (48, 48)]:
        part = source.rasterize(Window(col, row, 16, 16))
        np.testing.assert_array_equal(part, expected[row : row + 16, col : col + 16])


def test_windows_of_a_mask_on_a_rotated_scene_grid_are_read_in_place(make_geotiff):
    """A boundless read ignores a transform's rotation terms: windows away from (0, 0) came back
    shifted and partly ignore."""
    rotated = Affine.translation(X0, Y0) * Affine.rotation(30) * Affine.scale(PIXEL, -PIXEL)
    info = open_scene(make_geotiff(np.ones((1, 40, 50), np.uint8), transform=rotated))
    mask = np.random.default_rng(5).integers(0, 2, (40, 50)).astype(np.uint8)
    source = load_labels(make_geotiff(mask, name="mask.tif", transform=rotated), info)
    for col, row, width, height in [(0, 0, 16, 16), (20, 10, 16, 16), (34, 24, 16, 16)]:
        part = source.rasterize(Window(col, row, width, height))
        np.testing.assert_array_equal(part, mask[row : row + height, col : col + width])


def test_match_classes_numbers_a_subset_as_the_model_did(tmp_path, scene, make_geotiff):
    boxes = [pixel_box(0, 0, 4, 4), pixel_box(6, 6, 9, 9)]
    path = write_vector(tmp_path, boxes, kind=["tank", "tank"])
    source = load_labels(path, scene, class_attribute="kind")
    assert whole(source, scene).max() == 1  # alone in its file, "tank" is class 1
    source.match_classes([None, "road", "shed", "tank"], ["background", "r", "s", "t"])
    assert set(np.unique(whole(source, scene))) == {0, 3}
    assert source.class_names == ["background", "r", "s", "t"]
    mask = np.zeros((20, 30), np.uint8)
    mask[5:9, 5:9] = 2  # a 0/1/2 mask's class 2 alone
    masked = load_labels(make_geotiff(mask, name="m.tif"), scene)
    masked.match_classes([None, 1, 2], ["background", "one", "two"])
    assert set(np.unique(whole(masked, scene))) == {0, 2}


def test_match_classes_refuses_values_the_model_lacks_and_matches_single_classes(tmp_path, scene):
    path = write_vector(tmp_path, [pixel_box(0, 0, 4, 4), pixel_box(6, 6, 9, 9)], kind=["a", "z"])
    source = load_labels(path, scene, class_attribute="kind")
    with pytest.raises(LabelError, match="z are not among the model's classes") as info:
        source.match_classes([None, "a", "b"], ["background", "a", "b"])
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    single = load_labels(write_vector(tmp_path, [pixel_box(0, 0, 4, 4)], name="b.gpkg"), scene)
    single.match_classes([None, 255], ["background", "building"])  # a 0/255 mask's model
    assert whole(single, scene).sum() == 16


def test_window_without_features_is_background(tmp_path, scene):
    source = load_labels(write_vector(tmp_path, [pixel_box(0, 0, 2, 2)]), scene)
    assert not source.rasterize(Window(10, 10, 5, 5)).any()


@pytest.fixture
def atlanta_4326(tmp_path, data_dir):
    """The Atlanta building polygons reprojected from UTM 16N to EPSG:4326."""
    path = tmp_path / "buildings_4326.geojson"
    gpd.read_file(data_dir / "atlanta-buildings" / "buildings.geojson").to_crs("EPSG:4326").to_file(
        path
    )
    return path


def test_labels_in_another_crs_are_reprojected_to_the_scene(data_dir, atlanta_4326):
    info = open_scene(data_dir / "atlanta-buildings" / "image.tif")
    original = data_dir / "atlanta-buildings" / "buildings.geojson"
    expected = whole(load_labels(original, info), info)
    result = whole(load_labels(atlanta_4326, info), info)
    assert (result != expected).mean() < 1e-4
    assert abs(int(result.sum()) - int(expected.sum())) <= 0.001 * expected.sum()


def test_geographic_scene_takes_projected_labels(tmp_path, make_geotiff):
    # The scene on EPSG:4326 (like Vegas); labels drawn in UTM are reprojected onto it.
    transform = from_origin(-87.0, 33.66, 1e-5, 1e-5)
    path = make_geotiff(np.ones((1, 40, 40), dtype=np.uint8), crs="EPSG:4326", transform=transform)
    info = open_scene(path)
    square_ll = shapely.box(-87.0 + 10e-5, 33.66 - 30e-5, -87.0 + 30e-5, 33.66 - 10e-5)
    utm = gpd.GeoSeries([square_ll], crs="EPSG:4326").to_crs("EPSG:32616")
    labels = write_vector(tmp_path, utm, crs="EPSG:32616")
    result = whole(load_labels(labels, info), info)
    expected = np.zeros((40, 40), dtype=np.uint8)
    expected[10:30, 10:30] = 1
    assert (result != expected).sum() <= 40  # a pixel row's worth at most along the edges
    assert result[12:28, 12:28].all() and not result[:8].any()


def test_text_class_attribute_maps_sorted_values_to_ids(tmp_path, scene):
    boxes = [pixel_box(0, 0, 2, 2), pixel_box(5, 5, 7, 7), pixel_box(10, 10, 12, 12)]
    path = write_vector(tmp_path, boxes, kind=["tree", "building", "road"])
    source = load_labels(path, scene, class_attribute="kind")
    assert source.class_names == ["background", "building", "road", "tree"]
    labels = whole(source, scene)
    assert labels[0, 0] == 3 and labels[5, 5] == 1 and labels[10, 10] == 2 and labels[15, 15] == 0


def test_integer_class_attribute_keeps_its_ids_and_missing_values_are_ignored(tmp_path, scene):
    boxes = [pixel_box(0, 0, 2, 2), pixel_box(5, 5, 7, 7), pixel_box(10, 10, 12, 12)]
    path = write_vector(tmp_path, boxes, code=[3.0, 1.0, None])
    source = load_labels(path, scene, class_attribute="code")
    assert source.class_names == ["background", "1", "2", "3"]
    labels = whole(source, scene)
    assert labels[0, 0] == 3 and labels[5, 5] == 1 and labels[10, 10] == IGNORE_INDEX


def test_numbers_in_text_classes_are_ordered_by_value(tmp_path, scene):
    boxes = [pixel_box(0, 0, 2, 2), pixel_box(5, 5, 7, 7), pixel_box(10, 10, 12, 12)]
    path = write_vector(tmp_path, boxes, code=["10", "2", "1"])
    source = load_labels(path, scene, class_attribute="code")
    assert source.class_names == ["background", "1", "2", "10"]  # was 1, 10, 2
    labels = whole(source, scene)
    assert labels[0, 0] == 3 and labels[5, 5] == 2 and labels[10, 10] == 1


def test_sparse_integer_codes_are_warned_of_as_empty_classes(tmp_path, scene):
    boxes = [pixel_box(0, 0, 2, 2), pixel_box(5, 5, 7, 7), pixel_box(10, 10, 12, 12)]
    path = write_vector(tmp_path, boxes, code=[10, 20, 30])
    with pytest.warns(UserWarning, match=r"ids up to 30, but no feature has 27 of them \(1, 2"):
        source = load_labels(path, scene, class_attribute="code")
    assert source.classes == 31  # the codes stay the class ids
    path = write_vector(tmp_path, boxes, code=[1, 3, 3])  # one id this scene lacks: said too
    with pytest.warns(UserWarning, match=r"ids up to 3, but no feature has 1 of them \(2\)"):
        load_labels(path, scene, class_attribute="code")


def test_integer_class_254_is_the_highest_accepted(tmp_path, scene):
    """254 is the documented top class id; 255 is the ignore index and is refused."""
    path = write_vector(tmp_path, [pixel_box(0, 0, 2, 2)], name="top.geojson", code=[254])
    with pytest.warns(UserWarning, match="ids up to 254"):  # sparse: ids 1..253 have no feature
        source = load_labels(path, scene, class_attribute="code")
    assert source.classes == 255 and source.class_names[-1] == "254"
    assert (source.rasterize(Window(0, 0, 2, 2)) == 254).all()
    path = write_vector(tmp_path, [pixel_box(0, 0, 2, 2)], name="over.geojson", code=[255])
    with pytest.raises(LabelError, match="has class ids outside 0..254"):
        load_labels(path, scene, class_attribute="code")


def test_geopackage_and_shapefile_are_read(tmp_path, scene):
    for name in ("labels.gpkg", "labels.shp"):
        path = write_vector(tmp_path, [pixel_box(3, 3, 6, 6)], name=name)
        assert whole(load_labels(path, scene), scene).sum() == 9


def test_one_layer_of_a_multi_layer_geopackage_is_named_like_qgis_does(tmp_path, scene):
    path = tmp_path / "labels.gpkg"
    for layer, box in [("roofs", pixel_box(0, 0, 4, 4)), ("sheds", pixel_box(6, 6, 9, 9))]:
        gpd.GeoDataFrame(geometry=[box], crs="EPSG:32616").to_file(path, layer=layer)
    with pytest.raises(LabelError, match="has 2 layers \\(roofs, sheds\\); name one as") as info:
        load_labels(path, scene)  # before, the first layer alone was read, with no error
    assert "\n" not in str(info.value) and "labels.gpkg|layername=LAYER" in str(info.value)
    sheds = load_labels(f"{path}|layername=sheds", scene)
    assert whole(sheds, scene).sum() == 9 and sheds.class_names == ["background", "sheds"]
    with pytest.raises(LabelError, match="has no layer 'barns' \\(roofs, sheds\\)"):
        load_labels(f"{path}|layername=barns", scene)


def test_a_geopackage_with_one_feature_layer_and_a_style_table_is_read(tmp_path, scene):
    from tiles.style import embed_layer_style

    path = tmp_path / "styled.gpkg"  # as QGIS saves a style, and geodnn's own polygons carry
    gpd.GeoDataFrame(geometry=[pixel_box(0, 0, 4, 4)], crs="EPSG:32616").to_file(path, layer="a")
    embed_layer_style(path, "a", "<qgis/>", geometry_column="geometry")
    assert whole(load_labels(path, scene), scene).sum() == 16


def test_nodata_pixels_of_the_image_are_ignored(tmp_path, scene):
    source = load_labels(write_vector(tmp_path, [pixel_box(0, 0, 4, 4)]), scene)
    image = np.ones((2, 4, 4), dtype=np.float32)
    image[1, 0, 0] = np.nan  # one band missing is enough
    labels = source.rasterize(Window(0, 0, 4, 4), image=image)
    assert labels[0, 0] == IGNORE_INDEX and (labels.ravel()[1:] == 1).all()


def test_vegas_mask_on_the_same_grid_maps_255_to_class_1(data_dir):
    info = open_scene(data_dir / "vegas-roads" / "image.tif")
    mask_path = data_dir / "vegas-roads" / "roads.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same grid: no resampling warning
        source = load_labels(mask_path, info)
    assert source.class_names == ["background", "roads"]
    with rasterio.open(mask_path) as src:
        raw = src.read(1, window=Window(600, 600, 256, 128))
    labels = source.rasterize(Window(600, 600, 256, 128))
    np.testing.assert_array_equal(labels, (raw == 255).astype(np.uint8))
    assert 0 < labels.mean() < 0.5


def test_mask_nodata_and_multiclass_values(make_geotiff):
    info = open_scene(make_geotiff(np.ones((1, 6, 6), dtype=np.uint8), name="scene.tif"))
    mask = np.array([[0, 10, 20, 99] * 2] * 6, dtype=np.uint8)[:, :6]
    source = load_labels(make_geotiff(mask, name="mask.tif", nodata=99), info)
    assert source.class_names == ["background", "value 10", "value 20"]
    labels = whole(source, info)
    np.testing.assert_array_equal(labels[0], [0, 1, 2, IGNORE_INDEX, 0, 1])


def test_mask_on_another_grid_is_resampled_nearest_with_a_warning(make_geotiff):
    info = open_scene(make_geotiff(np.ones((1, 8, 8), dtype=np.uint8), name="scene.tif"))
    coarse = np.zeros((3, 3), dtype=np.uint8)
    coarse[0, 0] = 1  # covers scene pixels rows/cols 0..1 (the mask has 1 m pixels)
    transform = from_origin(X0, Y0, 1.0, 1.0)
    mask = make_geotiff(coarse, name="mask.tif", transform=transform)
    with pytest.warns(UserWarning, match="resampled.*; it covers 56% of the scene; the rest"):
        source = load_labels(mask, info)  # 6 x 6 of 8 x 8 scene pixels
    labels = whole(source, info)
    assert (labels[:2, :2] == 1).all() and labels[:6, 2:6].max() == 0
    assert (labels[6:, :] == IGNORE_INDEX).all() and (labels[:, 6:] == IGNORE_INDEX).all()


def test_a_mask_with_the_scene_s_grid_numbers_in_another_crs_is_resampled(make_geotiff, scene):
    """Equal shape and transform are not the same grid when the CRS differs (NAD83 / WGS 84):
    such a mask was read pixel for pixel, silently."""
    mask = np.zeros((20, 30), np.uint8)
    mask[2:5, 3:9] = 1
    path = make_geotiff(mask, name="nad83.tif", crs="EPSG:26916")
    with pytest.warns(UserWarning, match="nad83.tif: mask is not on the scene's grid; resampled"):
        source = load_labels(path, scene)
    assert not source.same_grid


def test_a_mask_with_negative_values_is_refused(make_geotiff, scene):
    """-1 for unlabeled without a declared nodata: refused, not mapped to wrong class ids."""
    mask = np.zeros((20, 30), dtype=np.int16)
    mask[:10], mask[10:, :5] = 1, -1
    with pytest.raises(LabelError, match="neg.tif: mask has fractional or negative values"):
        load_labels(make_geotiff(mask, name="neg.tif"), scene)


def test_a_mask_of_part_of_the_scene_on_its_pixels_says_what_it_leaves_unlabeled(
    make_geotiff,
):
    """Cut from a mask of the whole scene: nothing is resampled, but 3/4 of the scene has no
    labels, which a user should hear of."""
    info = open_scene(make_geotiff(np.ones((1, 8, 8), dtype=np.uint8), name="scene.tif"))
    part = np.array([[1, 0, 0, 1]] * 4, dtype=np.uint8)  # rows 2-5, cols 4-7 of the scene
    mask = make_geotiff(part, name="part.tif", transform=from_origin(X0 + 2, Y0 - 1, 0.5, 0.5))
    with pytest.warns(UserWarning, match=r"part.tif: mask covers 25% of the scene") as caught:
        labels = whole(load_labels(mask, info), info)
    assert not [w for w in caught if "resampled" in str(w.message)]
    assert (labels[2:6, 4:8] == part).all() and (labels[:2] == IGNORE_INDEX).all()
    assert (labels[:, :4] == IGNORE_INDEX).all()


def test_north_up_mask_covering_a_south_up_scene_is_placed(make_geotiff):
    south_up = Affine(1.0, 0.0, 1000.0, 0.0, 1.0, 1960.0)  # row 0 is the southern edge
    info = open_scene(make_geotiff(np.ones((1, 40, 40), np.float32), transform=south_up))
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[:10] = 1  # the northern half, y 1980..2000
    path = make_geotiff(mask, name="mask.tif", transform=from_origin(1000.0, 2000.0, 2.0, 2.0))
    with pytest.warns(UserWarning, match="resampled"):
        source = load_labels(path, info)
    labels = whole(source, info)
    assert (labels[:20] == 0).all() and (labels[20:] == 1).all()


def test_truncated_mask_names_the_gdal_reason(make_geotiff, tmp_path, scene):
    rng = np.random.default_rng(0)
    full = make_geotiff(rng.integers(0, 3, (20, 30), dtype=np.uint8), name="full.tif")
    path = tmp_path / "cut.tif"
    path.write_bytes(full.read_bytes()[:-300])
    with pytest.raises(LabelError, match="not a readable mask") as info:
        load_labels(path, scene)
    assert "See previous exception" not in str(info.value)


def test_missing_label_file(tmp_path, scene):
    with pytest.raises(LabelError, match="not found"):
        load_labels(tmp_path / "nope.geojson", scene)


def test_empty_label_file(tmp_path, scene):
    path = tmp_path / "empty.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(LabelError, match="no features"):
        load_labels(path, scene)


def test_vector_labels_without_crs(tmp_path, scene):
    path = write_vector(tmp_path, [pixel_box(0, 0, 2, 2)], name="nocrs.gpkg", crs=None)
    with pytest.raises(LabelError, match="no CRS"):
        load_labels(path, scene)


def test_labels_that_do_not_overlap(tmp_path, scene):
    far = shapely.box(X0 + 5000, Y0 + 5000, X0 + 5010, Y0 + 5010)
    with pytest.raises(LabelError, match="do not overlap"):
        load_labels(write_vector(tmp_path, [far]), scene)


@pytest.mark.parametrize("origin", [(X0 + 15, Y0), (X0, Y0 + 10)])  # east of it; north of it
def test_a_mask_that_only_touches_the_scene_s_edge_does_not_overlap(make_geotiff, scene, origin):
    """A clear error, not a mask that "covers 0%" of the scene and labels nothing."""
    mask = make_geotiff(
        np.ones((20, 30), np.uint8), name="m.tif", transform=from_origin(*origin, PIXEL, PIXEL)
    )
    with pytest.raises(LabelError, match="m.tif: mask does not overlap the scene scene.tif"):
        load_labels(mask, scene)


def test_unknown_class_attribute_lists_the_available_ones(tmp_path, scene):
    path = write_vector(tmp_path, [pixel_box(0, 0, 2, 2)], kind=["a"], height=[3])
    with pytest.raises(LabelError, match="one of: kind, height"):
        load_labels(path, scene, class_attribute="class")


def test_unreadable_label_file(tmp_path, scene):
    path = tmp_path / "broken.geojson"
    path.write_text("{ this is not json")
    with pytest.raises(LabelError, match="not a readable"):
        load_labels(path, scene)


def test_class_attribute_on_a_mask_is_refused(data_dir):
    info = open_scene(data_dir / "vegas-roads" / "image.tif")
    with pytest.raises(LabelError, match="vector labels"):
        load_labels(data_dir / "vegas-roads" / "roads.tif", info, class_attribute="x")


def test_ignore_index_is_the_one_geodnn_uses():
    assert IGNORE_INDEX == GEODNN_IGNORE_INDEX == 255


def test_every_label_error_is_one_line_naming_the_file(tmp_path, scene):
    path = write_vector(tmp_path, [pixel_box(0, 0, 2, 2)], kind=["a"])
    with pytest.raises(LabelError) as info:
        load_labels(path, scene, class_attribute="nope")
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_vector_labels_on_a_scene_without_crs(tmp_path, make_geotiff):
    info = open_scene(make_geotiff(np.ones((1, 8, 8), dtype=np.uint8), crs=None))
    fix = "has no CRS.*`rio edit-info --crs EPSG:CODE /.*/scene_0.tif`"  # the path given
    with pytest.raises(LabelError, match=fix):
        load_labels(write_vector(tmp_path, [pixel_box(0, 0, 2, 2)]), info)


def test_mask_without_crs_on_the_scene_grid_is_read_with_a_warning(make_geotiff, scene):
    mask = np.zeros((20, 30), np.uint8)
    mask[2:5, 3:9] = 1
    with pytest.warns(UserWarning, match="mask has no CRS but the scene's shape"):
        source = load_labels(make_geotiff(mask, name="m.tif", crs=None), scene)
    np.testing.assert_array_equal(whole(source, scene), mask)
    shifted = make_geotiff(
        mask, name="s.tif", crs=None, transform=from_origin(X0 + 5, Y0, 0.5, 0.5)
    )
    with pytest.raises(LabelError, match="different grids and one has no CRS"):
        load_labels(shifted, scene)


def test_a_mask_with_a_crs_on_the_grid_of_a_scene_without_one_is_read_with_a_warning(
    make_geotiff,
):
    """The mirror case (was refused as "different grids and one has no CRS")."""
    info = open_scene(make_geotiff(np.ones((1, 20, 30), np.uint8), name="bare.tif", crs=None))
    mask = np.zeros((20, 30), np.uint8)
    mask[2:5, 3:9] = 1
    with pytest.warns(UserWarning, match="the scene bare.tif has no CRS; the mask has its sh") as w:
        source = load_labels(make_geotiff(mask, name="m.tif"), info)
    np.testing.assert_array_equal(whole(source, info), mask)
    from click.testing import CliRunner
    from rasterio.rio.main import main_group

    (said,) = [str(x.message) for x in w if "has no CRS; the mask has" in str(x.message)]
    command = shlex.split(re.search(r"`(rio edit-info [^`]+)`", said)[1])
    folder = Path(info.path).parent  # the fix it gives, run on the files it names
    args = [str(folder / a) if (folder / a).is_file() else a for a in command[1:]]
    assert CliRunner().invoke(main_group, args).exit_code == 0
    assert open_scene(info.path).crs == CRS.from_epsg(32616)


def test_an_attribute_that_is_background_everywhere_scores_but_does_not_tile(
    tmp_path, scene, make_geotiff
):
    """A negatives-only check set can be evaluated; a tile store of it has nothing to learn."""
    path = write_vector(tmp_path, [pixel_box(0, 0, 2, 2), pixel_box(5, 5, 7, 7)], cls=[0, 0])
    assert load_labels(path, scene, class_attribute="cls").class_names == ["background"]
    image = make_geotiff(np.ones((1, 20, 30), dtype=np.uint16), name="image.tif")
    with pytest.raises(TilesError, match=r"every labeled pixel is background"):
        build_store(image, path, tmp_path / "s.zarr", class_attribute="cls", tile=16)
    assert not (tmp_path / "s.zarr").exists()


def test_a_mask_with_a_crs_on_a_scene_without_one_is_one_line(make_geotiff):
    bare = open_scene(make_geotiff(np.ones((1, 20, 30), dtype=np.uint16), crs=None))
    mask = make_geotiff(np.ones((10, 10), dtype=np.uint8), name="m.tif")
    with pytest.raises(LabelError, match=r"m.tif: mask and scene .* one has no CRS"):
        load_labels(mask, bare)


def test_a_boolean_attribute_is_its_class_and_false_is_background(tmp_path, scene):
    boxes = [pixel_box(0, 0, 2, 2), pixel_box(5, 5, 7, 7), pixel_box(10, 10, 12, 12)]
    roofs = pd.array([True, False, None], dtype="boolean")
    path = write_vector(tmp_path, boxes, name="l.gpkg", is_roof=roofs)
    assert pyogrio.read_info(path)["dtypes"].tolist() == ["bool"]  # NULL: read back as float
    source = load_labels(path, scene, class_attribute="is_roof")
    assert source.class_names == ["background", "is_roof"]
    labels = whole(source, scene)
    assert labels[0, 0] == 1 and labels[5, 5] == 0 and labels[10, 10] == IGNORE_INDEX


def test_a_table_without_geometries_is_a_one_line_error(tmp_path, scene):
    path = tmp_path / "labels.csv"
    path.write_text("id,class\n1,road\n2,roof\n")
    with pytest.raises(LabelError, match=r"labels.csv: has no geometries"):
        load_labels(path, scene)


def test_empty_geometries_are_dropped_without_a_warning(tmp_path, scene):
    path = write_vector(tmp_path, [pixel_box(2, 2, 4, 4), shapely.Polygon()], name="l.gpkg")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        source = load_labels(path, scene)
    assert whole(source, scene).sum() == 4
    hollow = write_vector(tmp_path, [shapely.Polygon()] * 3, name="hollow.gpkg")
    with pytest.raises(
        LabelError, match="hollow.gpkg: label file has 3 features, all with empty geo"
    ):
        load_labels(hollow, scene)  # not "no features": there are three


def test_lines_and_points_are_burned_one_pixel_wide_with_a_warning(tmp_path, scene):
    line = shapely.LineString([(X0 + 0.25, Y0 - 5.25), (X0 + 14.75, Y0 - 5.25)])  # along row 10
    point = shapely.Point(X0 + 1.25, Y0 - 1.25)  # pixel (2, 2)
    path = write_vector(tmp_path, [line, point, pixel_box(15, 0, 17, 2)])
    with pytest.warns(UserWarning, match=r"1 line and 1 point feature\(s\) are burned one pixel"):
        labels = whole(load_labels(path, scene), scene)
    assert labels[10].sum() == 30 and labels[2, 2] == 1 and labels.sum() == 30 + 1 + 4


def test_a_geotiff_mask_is_read_whatever_its_suffix(tmp_path, scene, make_geotiff):
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[3:5, 3:5] = 1
    path = make_geotiff(mask, name="mask.geotiff")
    np.testing.assert_array_equal(whole(load_labels(path, scene), scene), mask)


def test_projected_coordinates_under_a_geographic_crs_blame_the_crs(tmp_path, scene):
    """GeoJSON without a 'crs' member is read as EPSG:4326: UTM coordinates in it are not
    'labels of another scene' but a missing CRS."""
    path = tmp_path / "labels.geojson"
    ring = [[X0 + 1, Y0 - 1], [X0 + 5, Y0 - 1], [X0 + 5, Y0 - 5], [X0 + 1, Y0 - 1]]
    feature = {
        "type": "Feature",
        "properties": {},
        "geometry": {"type": "Polygon", "coordinates": [ring]},
    }
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    with pytest.raises(LabelError, match=r"not longitude/latitude.*set their real CRS"):
        load_labels(path, scene)


SITE_GRID = 'LOCAL_CS["Site grid",UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'


def test_labels_on_a_local_site_grid(tmp_path, make_geotiff):
    """A local (engineering) CRS: the same site grid in a GeoTIFF and a GeoPackage (written
    differently by GDAL) lines up; against UTM there is no transformation: one line."""
    site = open_scene(make_geotiff(np.ones((1, 20, 30), dtype=np.uint16), crs=SITE_GRID))
    path = write_vector(tmp_path, [pixel_box(2, 4, 6, 10)], name="site.gpkg", crs=SITE_GRID)
    assert whole(load_labels(path, site), site).sum() == 24
    utm = open_scene(make_geotiff(np.ones((1, 20, 30), dtype=np.uint16), name="utm.tif"))
    with pytest.raises(LabelError, match=r"no transformation from the labels' CRS \('Site grid'\)"):
        load_labels(path, utm)
    mask = make_geotiff(np.ones((10, 10), dtype=np.uint8), name="m.tif", crs=SITE_GRID)
    with pytest.raises(LabelError, match=r"m.tif: PROJ has no transformation"):
        load_labels(mask, utm)


def test_a_mask_of_several_bands_reads_band_1_with_a_warning(scene, make_geotiff):
    mask = np.zeros((2, 20, 30), dtype=np.uint8)
    mask[0, 3:5, 3:5], mask[1, 10:12, 10:12] = 1, 1
    with pytest.warns(UserWarning, match=r"mask has 2 bands; band 1 holds the classes"):
        source = load_labels(make_geotiff(mask, name="two.tif"), scene)
    np.testing.assert_array_equal(whole(source, scene), mask[0])


def test_a_mask_value_255_without_nodata_is_warned_of(make_geotiff, scene):
    """0 / 1 / 255 masks (255 = unlabeled) trained 255 as a class, silently; the printed fix
    (declaring it nodata) makes it unlabeled."""
    from click.testing import CliRunner
    from rasterio.rio.main import main_group

    mask = np.zeros((20, 30), np.uint8)
    mask[2:5, 3:9] = 1
    mask[:, 25:] = 255
    path = make_geotiff(mask, name="m255.tif")
    with pytest.warns(UserWarning, match=r"value 255 is read as a class .*rio edit-info") as said:
        source = load_labels(path, scene)
    assert source.classes == 3
    fix = re.search(r"`(rio edit-info [^`]+)`", str(said[0].message))[1]
    assert CliRunner().invoke(main_group, shlex.split(fix)[1:]).exit_code == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert load_labels(path, scene).classes == 2
