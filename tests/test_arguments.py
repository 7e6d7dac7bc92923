"""The Python API's argument checks (pipelines/arguments.py): a notebook's wrong type is one
line naming the argument; they raised TypeError / AttributeError from rasterio, Dask or pathlib."""

import numpy as np
import pytest

import geodnn
from pipelines.arguments import flag, names, text, whole
from pipelines.errors import PipelineError
from pipelines.evaluate import evaluate_scene
from pipelines.predict import predict_scene
from pipelines.tile import build_store
from pipelines.train import TrainResult


def test_the_checks_take_good_values_and_name_bad_ones():
    assert whole("tile", 64, 1) == 64 and flag("cog", False) is False
    assert text("split", "rows:0.8", "columns:0.7") == "rows:0.8"
    assert names("class_names", ("bg", "road")) == ["bg", "road"] and names("x", None) is None
    assert flag("cog", np.bool_(True)) is True and whole("chunk", np.int64(256), 1) == 256
    for bad in ("64", 64.0, True, 0):
        with pytest.raises(PipelineError, match=r"^tile=.*: pass a whole number >= 1$"):
            whole("tile", bad, 1)
    with pytest.raises(PipelineError, match=r"^cog='no': pass True or False$"):
        flag("cog", "no")
    with pytest.raises(PipelineError, match=r"^split=0.7: pass text such as 'columns:0.7'$"):
        text("split", 0.7, "columns:0.7")
    with pytest.raises(PipelineError, match=r"^class_names='road': pass a list of names"):
        names("class_names", "road")


@pytest.mark.parametrize(
    "kwargs, said",
    [
        ({"tile": "64"}, "tile='64'"),
        ({"gap": 1.5}, "gap=1.5"),
        ({"split": 0.7}, "split=0.7"),
        ({"class_names": "road"}, "class_names='road'"),
        ({"overwrite": "yes"}, "overwrite='yes'"),
    ],
)
def test_build_store_names_a_bad_argument_before_any_work(tmp_path, kwargs, said):
    with pytest.raises(PipelineError, match=f"^{said}: pass"):
        build_store("scene.tif", "labels.gpkg", tmp_path / "s.zarr", **kwargs)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "kwargs, said",
    [({"chunk": "256"}, "chunk='256'"), ({"batch": 0}, "batch=0"), ({"cog": "no"}, "cog='no'")],
)
def test_predict_scene_names_a_bad_argument_before_any_work(tmp_path, kwargs, said):
    with pytest.raises(PipelineError, match=f"^{said}: pass"):
        predict_scene("model.pt", "scene.tif", tmp_path / "map.tif", **kwargs)


@pytest.mark.parametrize(
    "kwargs, said",
    [({"chunk": 256.0}, "chunk=256.0"), ({"gap": "64"}, "gap='64'"), ({"split": 1}, "split=1")],
)
def test_evaluate_scene_names_a_bad_argument(kwargs, said):
    with pytest.raises(PipelineError, match=f"^{said}: pass"):
        evaluate_scene("model.pt", "scene.tif", "labels.gpkg", **kwargs)


def test_a_training_result_stands_for_its_checkpoint(tmp_path):
    """Passing `train`'s result where a checkpoint path goes was pathlib's TypeError."""
    path = tmp_path / "model.pt"
    geodnn.save_checkpoint(geodnn.build_model(bands=1, classes=2, depth=1, width=2), path)
    result = TrainResult(run_dir=tmp_path, checkpoint=path, records=[])
    assert geodnn.load_checkpoint(result).config.classes == 2
