"""Warnings point at the user's line (tiles/warn.py): a notebook showed the library line that
noticed (`summary.polygons = vectorize_classes(`), two or three calls deep."""

import warnings

import numpy as np

import geodnn
from pipelines.predict import predict_scene
from tiles.warn import OWN_PREFIXES, warn_user


def test_a_warning_from_inside_is_attributed_to_the_caller_outside():
    """Two frames of "our" code (compiled under a name in tiles/) are walked out of."""
    inside = {"warn_user": warn_user}
    exec(  # noqa: S102 (a module of ours, as far as the frames' file names go)
        compile(
            "def deeper():\n    warn_user('seen at the caller')\ndef noticed():\n    deeper()\n",
            OWN_PREFIXES[0] + "noticing.py",
            "exec",
        ),
        inside,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inside["noticed"]()  # this line, outside the packages
    assert caught[0].filename == __file__ and caught[0].category is UserWarning


def test_predict_scene_warnings_point_at_the_call(make_geotiff, tmp_path):
    """Polygons of a scene in EPSG:4326 have areas in squared degrees (warned inside the
    polygon export, calls down) and a scene without CRS gets maps without one (warned from a
    comprehension's frame)."""
    image = np.random.default_rng(0).random((1, 40, 40)).astype("float32")
    model = geodnn.build_model(bands=1, classes=2, depth=1, width=2, seed=0)
    ckpt = tmp_path / "m.pt"
    geodnn.save_checkpoint(model, ckpt)
    for crs, said in (("EPSG:4326", "squared degrees"), (None, "has no CRS")):
        scene = make_geotiff(image, crs=crs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            predict_scene(
                ckpt, scene, tmp_path / "map.tif", vectors=tmp_path / "p.gpkg", overwrite=True
            )
        ours = [w for w in caught if said in str(w.message)]
        assert ours and {w.filename for w in ours} == {__file__}
