import sqlite3

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from rasterio.transform import from_origin

from tiles.errors import OutputError
from tiles.vectorize import VectorOptions, qml_path, vectorize_classes

NAMES = ["background", "building", "road"]
COLORS = [(0, 0, 0), (230, 25, 75), (0, 130, 200)]
TRANSFORM = from_origin(500000.0, 4000000.0, 0.5, 0.5)


def class_map(make_geotiff, classes, **kwargs):
    return make_geotiff(classes.astype(np.uint8), nodata=255, transform=TRANSFORM, **kwargs)


def read(gpkg):
    return gpd.read_file(gpkg, layer="classes")


def test_square_spanning_four_windows_is_one_polygon(make_geotiff, tmp_path):
    classes = np.zeros((64, 64), dtype=np.uint8)
    classes[20:44, 10:50] = 1  # crosses the 32-pixel window borders in both directions
    out = tmp_path / "v.gpkg"
    n = vectorize_classes(class_map(make_geotiff, classes), out, NAMES, COLORS,
                          VectorOptions(window=32))  # fmt: skip
    frame = read(out)
    assert n == len(frame) == 1
    row = frame.iloc[0]
    assert (row.class_id, row.class_name) == (1, "building")
    assert row.area == pytest.approx(24 * 40 * 0.25)
    assert row.geometry.equals(shapely.box(500005.0, 3999978.0, 500025.0, 3999990.0))
    assert frame.crs.to_epsg() == 32616


def test_windowed_polygons_equal_whole_scene_polygons(make_geotiff, tmp_path):
    rng = np.random.default_rng(0)
    classes = (rng.random((12, 12)) * 3).astype(np.uint8).repeat(6, 0).repeat(6, 1)[:70, :65]
    classes[3:9, 60:65] = 255
    path = class_map(make_geotiff, classes)
    opts = dict(background=None)
    vectorize_classes(path, tmp_path / "a.gpkg", NAMES, COLORS, VectorOptions(window=16, **opts))
    vectorize_classes(path, tmp_path / "b.gpkg", NAMES, COLORS, VectorOptions(window=999, **opts))
    a, b = read(tmp_path / "a.gpkg"), read(tmp_path / "b.gpkg")
    assert len(a) == len(b)
    key = ["class_id", "area"]
    assert a.sort_values(key)[key].values.tolist() == b.sort_values(key)[key].values.tolist()
    for cid in range(3):
        ua = shapely.unary_union(a[a.class_id == cid].geometry.values)
        ub = shapely.unary_union(b[b.class_id == cid].geometry.values)
        assert ua.symmetric_difference(ub).area == pytest.approx(0.0)


@pytest.mark.parametrize("holes", [0.01, 0.08])
def test_a_region_spanning_every_window_keeps_each_hole(make_geotiff, tmp_path, holes):
    """Its outlines are unioned and its pieces' holes put back (not one overlay of everything):
    the same polygons as polygonizing the scene in one window, holes next to window borders,
    holes touching each other or the outline at a corner included."""
    rng = np.random.default_rng(3)
    classes = np.ones((96, 80), dtype=np.uint8)
    classes[rng.random(classes.shape) < holes] = 0
    path = class_map(make_geotiff, classes)
    vectorize_classes(path, tmp_path / "a.gpkg", NAMES, COLORS, VectorOptions(window=16))
    vectorize_classes(path, tmp_path / "b.gpkg", NAMES, COLORS, VectorOptions(window=999))
    a, b = (read(tmp_path / f"{n}.gpkg").sort_values("area") for n in "ab")
    assert len(a) == len(b) and (a.area.values == b.area.values).all()
    assert all(shapely.equals(a.geometry.values, b.geometry.values))
    assert shapely.is_valid(a.geometry.values).all()
    biggest = a.geometry.values[-1]
    assert len(biggest.interiors) == len(b.geometry.values[-1].interiors) > 10


def test_an_inverted_u_is_one_polygon_though_its_legs_meet_above_the_window_edge(
    make_geotiff, tmp_path
):
    """Its two legs reach the next row of windows apart; they are joined by the bar, which
    does not: both legs must stay one open region."""
    classes = np.zeros((8, 12), dtype=np.uint8)
    classes[0, :] = 1
    classes[0:6, 0] = classes[0:6, 11] = 1
    path = class_map(make_geotiff, classes)
    vectorize_classes(path, tmp_path / "v.gpkg", NAMES, COLORS, VectorOptions(window=4))
    [geom] = read(tmp_path / "v.gpkg").geometry
    assert geom.area == pytest.approx(22 * 0.25)


@pytest.mark.parametrize("seed", range(4))
def test_random_shapes_cut_by_small_windows_are_the_whole_scene_s_polygons(
    make_geotiff, tmp_path, seed
):
    from scipy import ndimage

    noise = ndimage.gaussian_filter(np.random.default_rng(seed).random((60, 52)), 2.0)
    classes = np.digitize(noise, np.quantile(noise, [0.45, 0.7])).astype(np.uint8)
    path = class_map(make_geotiff, classes)
    vectorize_classes(path, tmp_path / "a.gpkg", NAMES, COLORS, VectorOptions(window=7))
    vectorize_classes(path, tmp_path / "b.gpkg", NAMES, COLORS, VectorOptions(window=999))
    a, b = (by_place(read(tmp_path / f"{n}.gpkg")) for n in "ab")
    assert len(a) == len(b) and (a.area.values == b.area.values).all()
    assert all(shapely.equals(a.geometry.values, b.geometry.values))


def by_place(frame):
    """Polygons in a fixed order: by class, area and centroid (equal areas are common)."""
    centroids = frame.geometry.centroid
    frame = frame.assign(cx=centroids.x.round(6), cy=centroids.y.round(6))
    return frame.sort_values(["class_id", "area", "cx", "cy"])


def test_ring_across_windows_keeps_its_hole(make_geotiff, tmp_path):
    classes = np.zeros((40, 40), dtype=np.uint8)
    classes[5:35, 5:35] = 2
    classes[12:28, 12:28] = 0
    out = tmp_path / "v.gpkg"
    vectorize_classes(class_map(make_geotiff, classes), out, NAMES, COLORS,
                      VectorOptions(window=20))  # fmt: skip
    [geom] = read(out).geometry
    assert len(geom.interiors) == 1 and geom.area == pytest.approx((900 - 256) * 0.25)


def test_corner_touching_regions_stay_apart(make_geotiff, tmp_path):
    classes = np.zeros((20, 20), dtype=np.uint8)
    classes[5:10, 5:10] = 1
    classes[10:15, 10:15] = 1  # meets the first only at a corner, on a window corner
    out = tmp_path / "v.gpkg"
    vectorize_classes(class_map(make_geotiff, classes), out, NAMES, COLORS,
                      VectorOptions(window=10))  # fmt: skip
    assert len(read(out)) == 2


def test_min_area_simplify_background_and_nodata(make_geotiff, tmp_path):
    classes = np.zeros((30, 30), dtype=np.uint8)
    classes[2:4, 2:4] = 1  # 1 m2: dropped by min_area
    classes[10:25, 10:25] = 2
    classes[10, 10] = 0  # a notch that simplify may smooth away
    classes[0:2, 20:30] = 255
    out = tmp_path / "v.gpkg"
    vectorize_classes(class_map(make_geotiff, classes), out, NAMES, COLORS,
                      VectorOptions(min_area=2.0, simplify=0.6, window=16))  # fmt: skip
    frame = read(out)
    assert frame.class_id.tolist() == [2]
    assert frame["area"].iloc[0] == pytest.approx((225 - 1) * 0.25)
    assert len(frame.geometry.iloc[0].exterior.coords) <= 6


def test_a_region_of_exactly_min_area_is_kept(make_geotiff, tmp_path):
    """min_area is the smallest area kept ("at least"), not a bound to exceed."""
    classes = np.zeros((20, 20), dtype=np.uint8)
    classes[2:4, 2:4] = 1  # 4 px of 0.25 m2: exactly 1 m2
    out = tmp_path / "v.gpkg"
    options = VectorOptions(min_area=1.0)
    vectorize_classes(class_map(make_geotiff, classes), out, NAMES, COLORS, options)
    frame = read(out)
    assert frame.class_id.tolist() == [1] and frame["area"].tolist() == [pytest.approx(1.0)]


# a 75 x 24 region (3 bytes a row) whose topology-preserving simplification can be
# invalid ("Hole lies outside shell", 6 px here): found by a user run of `geodnn predict`
NOTCHED_REGION = (
    "000000000000001800003f80001ffc001ff8001ff0003ff0003ff0003fe0003ff0003ff0003ff8007ffc007f"
    "fc007ff403fff40fff003ffff41f0fcc0e1ffc0e1ff80f1ff01ffff01ffff001ffe000fff0003ff0003ff000"
    "3ff8003ffc003ffc003ffc001ffc001ffc003ff4001f00003f00003f00003fe0003f80003fe0001fe0001fe0"
    "0017c00003c00015c0003fc0007f80007fc000ff8000ffc000ff80007fc0007ff8007ff8003ff8001ff8001f"
    "f8003ff803fff003fff803fdf003f3f007fff01ffff80ffff801fff801fff800fff800f17000fdf000fd0000"
    "0000000000"
)


def test_simplified_polygons_are_valid(make_geotiff, tmp_path):
    """GEOS's simplification can push a hole outside its shell even when it preserves
    topology; such a polygon is written exact instead."""
    packed = np.frombuffer(bytes.fromhex(NOTCHED_REGION), np.uint8).reshape(75, 3)
    classes = np.unpackbits(packed, axis=1)[:, :24]
    exact, simple = tmp_path / "exact.gpkg", tmp_path / "simple.gpkg"
    scene = class_map(make_geotiff, classes)
    vectorize_classes(scene, exact, NAMES, COLORS)
    vectorize_classes(scene, simple, NAMES, COLORS, VectorOptions(simplify=3.0))
    [before], [after] = read(exact).geometry, read(simple).geometry
    assert not shapely.simplify(before, 3.0, preserve_topology=True).is_valid  # the case
    assert after.is_valid and after.equals(before)


def test_geographic_and_custom_crs_are_kept(make_geotiff, tmp_path):
    classes = np.ones((10, 10), dtype=np.uint8)
    wkt = 'LOCAL_CS["site grid",UNIT["metre",1]]'
    for crs, name in (("EPSG:4326", "geo"), (wkt, "local")):
        out = tmp_path / f"{name}.gpkg"
        vectorize_classes(class_map(make_geotiff, classes, crs=crs), out, NAMES, COLORS)
        frame = read(out)
        assert len(frame) == 1
        if name == "geo":
            assert frame.crs.to_epsg() == 4326


def test_style_is_embedded_and_written_beside(make_geotiff, tmp_path):
    classes = np.zeros((10, 10), dtype=np.uint8)
    out = tmp_path / "v.gpkg"
    assert vectorize_classes(class_map(make_geotiff, classes), out, NAMES, COLORS) == 0
    assert len(read(out)) == 0
    qml = qml_path(out).read_text()
    assert "230,25,75,255" in qml and "0,130,200,255" in qml and 'attr="class_id"' in qml
    with sqlite3.connect(out) as db:
        table, style, default = db.execute(
            "SELECT f_table_name, styleQML, useAsDefault FROM layer_styles"
        ).fetchone()
        contents = [r[0] for r in db.execute("SELECT table_name FROM gpkg_contents")]
    assert (table, style, default) == ("classes", qml, 1) and "layer_styles" in contents


def test_existing_output_needs_overwrite_and_nothing_partial_remains(make_geotiff, tmp_path):
    out = tmp_path / "v.gpkg"
    out.write_bytes(b"old")
    path = class_map(make_geotiff, np.ones((8, 8), dtype=np.uint8))
    with pytest.raises(OutputError, match="overwrite=True"):
        vectorize_classes(path, out, NAMES, COLORS)
    with pytest.raises(IndexError):  # class 1 has no name: fails while writing
        vectorize_classes(path, out, NAMES[:1], COLORS[:1], overwrite=True)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene_0.tif", "v.gpkg"]


def test_overwrite_replaces_geodnn_s_own_polygons_but_not_a_gpkg_with_other_layers(
    make_geotiff, tmp_path
):
    """A GeoPackage is a container: replacing the file would delete a user's layers in it."""
    import pyogrio

    path = class_map(make_geotiff, np.ones((8, 8), dtype=np.uint8))
    out = tmp_path / "v.gpkg"
    vectorize_classes(path, out, NAMES, COLORS)
    assert vectorize_classes(path, out, NAMES, COLORS, overwrite=True) == 1  # ours: replaced
    fields = gpd.GeoDataFrame({"name": ["a"]}, geometry=[shapely.box(0, 0, 1, 1)], crs=32611)
    pyogrio.write_dataframe(fields, out, layer="my_fields", append=True)
    before = out.read_bytes()
    with pytest.raises(OutputError, match=r"v.gpkg: holds other layers \(my_fields\)"):
        vectorize_classes(path, out, NAMES, COLORS, overwrite=True)
    assert out.read_bytes() == before


def test_geographic_crs_warns_that_areas_are_in_degrees(tmp_path):
    classes = np.zeros((1, 32, 32), dtype="uint8")
    classes[0, 8:16, 8:16] = 1
    path = tmp_path / "classes.tif"
    profile = {"driver": "GTiff", "width": 32, "height": 32, "count": 1, "dtype": "uint8"}
    transform = from_origin(-115.2, 36.1, 1e-5, 1e-5)
    with rasterio.open(path, "w", crs="EPSG:4326", transform=transform, **profile) as dst:
        dst.write(classes)
    with pytest.warns(UserWarning, match="squared degrees"):
        n = vectorize_classes(
            path, tmp_path / "p.gpkg", ["bg", "roof"], [(0, 0, 0), (255, 0, 0)], VectorOptions()
        )
    assert n == 1


@pytest.mark.parametrize("min_area", [0.0, 100.0])  # all background; all under min_area
def test_empty_layer_has_the_same_schema_as_a_full_one(make_geotiff, tmp_path, min_area):
    import pyogrio

    full = np.zeros((20, 20), dtype=np.uint8)
    full[15:, 15:] = 255
    full[2:6, 2:6] = 1  # one 4 m2 polygon: dropped by min_area 100
    empty = full if min_area else np.where(full == 1, 0, full)
    n = vectorize_classes(
        class_map(make_geotiff, empty), tmp_path / "e.gpkg", NAMES, COLORS, VectorOptions(min_area)
    )
    vectorize_classes(class_map(make_geotiff, full), tmp_path / "f.gpkg", NAMES, COLORS)
    empty_info, full_info = (
        pyogrio.read_info(tmp_path / name, layer="classes") for name in ("e.gpkg", "f.gpkg")
    )
    assert (n, empty_info["features"], full_info["features"]) == (0, 0, 1)
    for key in ("fields", "dtypes", "ogr_types"):
        assert list(empty_info[key]) == list(full_info[key])
    assert list(empty_info["ogr_types"]) == ["OFTInteger", "OFTString", "OFTReal"]


def test_polygon_export_shows_its_progress_by_rows_of_windows(make_geotiff, tmp_path, capsys):
    classes = np.zeros((64, 64), dtype=np.uint8)
    classes[5:40, 5:40] = 1
    path = class_map(make_geotiff, classes)
    vectorize_classes(path, tmp_path / "a.gpkg", NAMES, COLORS, VectorOptions(window=16))
    assert "polygons" not in capsys.readouterr().err  # off unless asked
    opts = VectorOptions(window=16)
    vectorize_classes(path, tmp_path / "b.gpkg", NAMES, COLORS, opts, progress=True)
    err = capsys.readouterr().err  # stderr is no terminal here: the bar is drawn at its end
    assert "polygons" in err and "4/4" in err


def test_a_full_disk_while_embedding_the_style_is_one_line_naming_the_output(
    make_geotiff, tmp_path, monkeypatch
):
    import tiles.vectorize

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(tiles.vectorize, "embed_layer_style", full)
    out = tmp_path / "v.gpkg"
    classes = np.zeros((20, 20), dtype=np.uint8)
    classes[5:10, 5:10] = 1
    with pytest.raises(OutputError, match=r"v.gpkg: writing failed \(database or disk is full\)"):
        vectorize_classes(class_map(make_geotiff, classes), out, NAMES, COLORS)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".v")) == []


def test_pyogrio_is_quiet_only_while_layers_are_written_and_never_against_the_user(
    another_thread_leaves_first,
):
    import logging

    from tiles.vectorize import _quiet_appends

    log = logging.getLogger("pyogrio")
    with another_thread_leaves_first(_quiet_appends):  # that writer ends first
        assert log.level == logging.WARNING
    assert log.level == logging.NOTSET
    log.setLevel(logging.DEBUG)  # the user's own choice
    try:
        with _quiet_appends():
            assert log.level == logging.DEBUG
    finally:
        log.setLevel(logging.NOTSET)
