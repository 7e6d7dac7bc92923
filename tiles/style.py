"""QGIS layer styles for class polygons: a categorized renderer on `class_id` in class colors.

The same QML goes to a sidecar `.qml` next to the GeoPackage and into the GeoPackage's
`layer_styles` table, which QGIS reads to open the layer styled.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import quoteattr

STYLES_TABLE = "layer_styles"

_CREATE_STYLES = f"""
CREATE TABLE IF NOT EXISTS {STYLES_TABLE} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    f_table_catalog TEXT(256),
    f_table_schema TEXT(256),
    f_table_name TEXT(256),
    f_geometry_column TEXT(256),
    styleName TEXT(30),
    styleQML TEXT,
    styleSLD TEXT,
    useAsDefault BOOLEAN,
    description TEXT,
    owner TEXT(30),
    ui TEXT(30),
    update_time DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now'))
)
"""


def _symbol(index: int, rgb: tuple[int, int, int]) -> str:
    color = f"{rgb[0]},{rgb[1]},{rgb[2]},255"
    props = {
        "color": color,
        "outline_color": "35,35,35,255",
        "outline_style": "solid",
        "outline_width": "0.26",
        "outline_width_unit": "MM",
        "style": "solid",
    }
    options = "".join(f'<Option type="QString" name="{k}" value="{v}"/>' for k, v in props.items())
    legacy = "".join(f'<prop k="{k}" v="{v}"/>' for k, v in props.items())
    return (
        f'      <symbol type="fill" name="{index}" alpha="1" clip_to_extent="1" force_rhr="0">\n'
        '        <layer class="SimpleFill" enabled="1" locked="0" pass="0">\n'
        f'          <Option type="Map">{options}</Option>\n'
        f"          {legacy}\n"
        "        </layer>\n"
        "      </symbol>\n"
    )


def class_style_qml(
    class_ids: Sequence[int],
    class_names: Sequence[str],
    class_colors: Sequence[tuple[int, int, int]],
    attribute: str = "class_id",
) -> str:
    """QML of a categorized fill renderer: one category per class id, labelled and colored."""
    categories = "".join(
        f'      <category value="{cid}" label={quoteattr(class_names[cid])} symbol="{k}" '
        'render="true"/>\n'
        for k, cid in enumerate(class_ids)
    )
    symbols = "".join(_symbol(k, tuple(class_colors[cid])) for k, cid in enumerate(class_ids))
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        '<qgis version="3.28.0" styleCategories="Symbology">\n'
        f'  <renderer-v2 type="categorizedSymbol" attr="{attribute}" symbollevels="0" '
        'enableorderby="0" forceraster="0">\n'
        f"    <categories>\n{categories}    </categories>\n"
        f"    <symbols>\n{symbols}    </symbols>\n"
        "  </renderer-v2>\n"
        "</qgis>\n"
    )


def embed_layer_style(
    gpkg: str | os.PathLike,
    layer: str,
    qml: str,
    name: str = "classes",
    geometry_column: str = "geom",
) -> None:
    """Store `qml` as the default style of `layer` in the GeoPackage's `layer_styles` table."""
    with sqlite3.connect(Path(gpkg)) as db:
        db.execute(_CREATE_STYLES)
        db.execute(
            f"DELETE FROM {STYLES_TABLE} WHERE f_table_name = ? AND styleName = ?", (layer, name)
        )
        db.execute(
            f"INSERT INTO {STYLES_TABLE} (f_table_catalog, f_table_schema, f_table_name, "
            "f_geometry_column, styleName, styleQML, styleSLD, useAsDefault, description, owner, "
            "ui) VALUES ('', '', ?, ?, ?, ?, '', 1, ?, '', '')",
            (layer, geometry_column, name, qml, "class colors written by geodnn"),
        )
        # Register the table as GeoPackage attributes so strict readers accept it.
        db.execute(
            "INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier) "
            "VALUES (?, 'attributes', ?)",
            (STYLES_TABLE, STYLES_TABLE),
        )
    db.close()
