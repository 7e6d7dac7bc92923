import sqlite3
import xml.etree.ElementTree as ET

import geopandas as gpd
import pyogrio
import shapely

from tiles.style import class_style_qml, embed_layer_style

NAMES = ["background", "building & shed", "road"]
COLORS = [(0, 0, 0), (230, 25, 75), (0, 130, 200)]


def test_qml_is_a_categorized_renderer_in_class_colors():
    root = ET.fromstring(class_style_qml([1, 2], NAMES, COLORS).split("\n", 1)[1])
    renderer = root.find("renderer-v2")
    assert renderer.get("type") == "categorizedSymbol" and renderer.get("attr") == "class_id"
    categories = renderer.findall("categories/category")
    assert [(c.get("value"), c.get("label")) for c in categories] == [
        ("1", "building & shed"),
        ("2", "road"),
    ]
    colors = [o.get("value") for o in renderer.iter("Option") if o.get("name") == "color"]
    assert colors == ["230,25,75,255", "0,130,200,255"]


def test_style_is_stored_as_default_in_layer_styles(tmp_path):
    gpkg = tmp_path / "x.gpkg"
    frame = gpd.GeoDataFrame({"class_id": [1]}, geometry=[shapely.box(0, 0, 1, 1)], crs=3857)
    pyogrio.write_dataframe(frame, gpkg, layer="classes")
    qml = class_style_qml([1, 2], NAMES, COLORS)
    embed_layer_style(gpkg, "classes", qml)
    embed_layer_style(gpkg, "classes", qml)  # rewriting replaces, never duplicates
    with sqlite3.connect(gpkg) as db:
        rows = db.execute(
            "SELECT f_table_name, f_geometry_column, styleQML, useAsDefault FROM layer_styles"
        ).fetchall()
    assert rows == [("classes", "geom", qml, 1)]
    layers = [name for name, _ in pyogrio.list_layers(gpkg)]
    assert "classes" in layers and "layer_styles" in layers
    assert len(gpd.read_file(gpkg, layer="classes")) == 1
