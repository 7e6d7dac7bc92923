import json
import warnings

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

import geodnn
from geodnn.metrics import confusion_matrix
from pipelines.cli import main
from pipelines.errors import PipelineError
from pipelines.evaluate import evaluate_scene
from tiles.labels import LabelError, load_labels
from tiles.raster import open_scene


@pytest.fixture
def atlanta(data_dir, tmp_path):
    scene = data_dir / "atlanta-buildings" / "image.tif"
    labels = data_dir / "atlanta-buildings" / "buildings.geojson"
    model = geodnn.build_model(bands=1, classes=2, depth=2, width=4, seed=5, init="kaiming")
    with rasterio.open(scene) as src:
        image = src.read(1, masked=True)
    model.set_normalization([float(image.mean())], [float(image.std())])
    ckpt = tmp_path / "model.pt"
    geodnn.save_checkpoint(model, ckpt, class_names=["background", "building"])
    return scene, labels, ckpt, model


def whole_scene_confusion(scene, labels, model, cols=None):
    """Reference: whole-image prediction (reflect padded) against whole-scene labels."""
    info = open_scene(scene)
    with rasterio.open(scene) as src:
        image = src.read(masked=True).astype("float32").filled(np.nan)
    r = model.receptive_radius
    padded = np.pad(image, ((0, 0), (r, r), (r, r)), mode="reflect")
    with torch.no_grad():
        pred = model.forward_valid(torch.from_numpy(padded)[None])[0].argmax(0)
    truth = load_labels(labels, info).rasterize(Window(0, 0, info.width, info.height), image)
    truth = torch.from_numpy(truth.astype(np.int64))
    if cols is not None:
        truth[:, : cols[0]] = 255
        truth[:, cols[1] :] = 255
    return confusion_matrix(pred, truth, 2)


def test_streamed_confusion_equals_whole_scene_reference(atlanta):
    scene, labels, ckpt, model = atlanta
    result = evaluate_scene(ckpt, scene, labels, chunk=256)
    assert torch.equal(result.scores.confusion, whole_scene_confusion(scene, labels, model))
    assert result.scores.confusion[1].sum() > 0  # the buildings are there


def test_validation_region_scores_only_held_out_columns(atlanta):
    scene, labels, ckpt, model = atlanta
    result = evaluate_scene(
        ckpt, scene, labels, split="columns:0.7", gap=32, region="validation", chunk=300
    )
    # 900 columns: split at 630, guard band of 32 centred on it -> validation from column 646
    reference = whole_scene_confusion(scene, labels, model, cols=(646, 900))
    assert torch.equal(result.scores.confusion, reference)


def test_on_its_training_scene_a_model_is_scored_on_its_own_held_out_region(atlanta):
    """The checkpoint records its store's split: --region validation needs no --split, and
    a split or region that scores the pixels the model was trained on is warned of."""
    scene, labels, ckpt, model = atlanta
    with rasterio.open(scene) as src:
        grid = {"scene_shape": [src.height, src.width], "scene_transform": list(src.transform)[:6]}
    record = {"split": "columns:0.7", "gap": 32, **grid}
    names = ["background", "building"]
    geodnn.save_checkpoint(model, ckpt, class_names=names, training_split=record)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        held_out = evaluate_scene(ckpt, scene, labels, region="validation", chunk=300)
    reference = whole_scene_confusion(scene, labels, model, cols=(646, 900))
    assert torch.equal(held_out.scores.confusion, reference)  # columns:0.7, gap 32, as trained
    not_held_out = "includes pixels the model was trained on .*columns:0.7, gap 32"
    with pytest.warns(UserWarning, match=not_held_out + ".*drop `split` and `gap`"):
        evaluate_scene(ckpt, scene, labels, split="columns:0.3", region="validation")
    with pytest.warns(UserWarning, match=not_held_out + ".*pass region='validation'"):
        evaluate_scene(ckpt, scene, labels)  # region "all"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        evaluate_scene(ckpt, scene, labels, region="train")  # asked for: nothing to warn of
    with pytest.warns(UserWarning, match=r"guard band, within 32 px .*the training gap, gap=32,"):
        evaluate_scene(ckpt, scene, labels, gap=8, region="validation")  # from column 634
    narrow = {**record, "gap": model.receptive_radius - 1}  # validation sees training pixels
    geodnn.save_checkpoint(model, ckpt, class_names=names, training_split=narrow)
    guard = rf"guard band \({narrow['gap']} px\) is narrower than the model's receptive radius"
    with pytest.warns(UserWarning, match=guard):
        evaluate_scene(ckpt, scene, labels, region="validation", chunk=300)
    everything = {**record, "split": "columns:1"}  # a store of training tiles only
    geodnn.save_checkpoint(model, ckpt, class_names=names, training_split=everything)
    with pytest.warns(UserWarning, match="not held out; score a scene the model was not trained"):
        evaluate_scene(ckpt, scene, labels)
    all_of_it = f"^{scene}: the model trained on all of this scene .* none of it is held out"
    with pytest.raises(PipelineError, match=all_of_it):  # was: "use region='all'" (trained on)
        evaluate_scene(ckpt, scene, labels, region="validation")
    with pytest.raises(PipelineError, match=f"^{scene}: the split rows:1 has no validation"):
        evaluate_scene(ckpt, scene, labels, split="rows:1", region="validation")
    with warnings.catch_warnings():  # another scene (here: another grid) is all held out
        warnings.simplefilter("error", UserWarning)
        moved = {**record, "scene_transform": [0.5, 0, 7e5, 0, -0.5, 4e6]}
        geodnn.save_checkpoint(model, ckpt, class_names=names, training_split=moved)
        evaluate_scene(ckpt, scene, labels)
        later = {**record, "scene_name": "image-2027.tif"}  # the same grid, another date
        geodnn.save_checkpoint(model, ckpt, class_names=names, training_split=later)
        evaluate_scene(ckpt, scene, labels)


def test_a_model_of_several_stores_is_scored_on_this_scene_s_held_out_region(atlanta):
    """A model trained on several stores records one split per store: evaluate takes the
    record of the store made from this scene, whichever place it has in the list."""
    scene, labels, ckpt, model = atlanta
    with rasterio.open(scene) as src:
        grid = {"scene_shape": [src.height, src.width], "scene_transform": list(src.transform)[:6]}
    here = {"split": "columns:0.7", "gap": 32, "scene_name": scene.name, **grid}
    elsewhere = {**here, "split": "rows:0.5", "scene_name": "north.tif"}
    names = ["background", "building"]
    geodnn.save_checkpoint(model, ckpt, class_names=names, training_split=[elsewhere, here])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        held_out = evaluate_scene(ckpt, scene, labels, region="validation", chunk=300)
    reference = whole_scene_confusion(scene, labels, model, cols=(646, 900))
    assert torch.equal(held_out.scores.confusion, reference)  # this scene's columns:0.7, gap 32
    with pytest.warns(UserWarning, match="trained on .*columns:0.7, gap 32"):
        evaluate_scene(ckpt, scene, labels)
    geodnn.save_checkpoint(model, ckpt, class_names=names, training_split=[elsewhere])
    with pytest.raises(PipelineError, match="split"):  # no store of this scene: no split known
        evaluate_scene(ckpt, scene, labels, region="validation")


def test_cli_prints_json(atlanta, capsys):
    scene, labels, ckpt, _ = atlanta
    code = main(["evaluate", str(ckpt), str(scene), "--labels", str(labels), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["iou"]) == {"background", "building"} and 0 <= out["pixel_accuracy"] <= 1


def test_labels_with_more_classes_than_the_model_fail_clearly(atlanta, tmp_path, capsys):
    scene, labels, ckpt, _ = atlanta
    import geopandas as gpd

    frame = gpd.read_file(labels)
    frame["kind"] = [f"k{i % 3}" for i in range(len(frame))]
    multi = tmp_path / "multi.gpkg"
    frame.to_file(multi)
    code = main(
        ["evaluate", str(ckpt), str(scene), "--labels", str(multi), "--class-attribute", "kind"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "model predicts 2" in err and "\n" not in err


def test_region_without_split_is_an_error(atlanta, capsys):
    scene, labels, ckpt, _ = atlanta
    code = main(["evaluate", str(ckpt), str(scene), "--labels", str(labels), "--region", "train"])
    err = capsys.readouterr().err
    assert code == 2 and "needs --split" in err and "records no training split" in err
    assert "geodnn tile's defaults: --split columns:0.7 --gap 64)" in err  # not another gap


def test_an_unknown_region_is_named_in_the_python_api(atlanta):
    """The CLI's choices do not guard the function: 'val' got "the split has no val region"."""
    scene, labels, ckpt, _ = atlanta
    with pytest.raises(
        PipelineError, match=r"region 'val' is unknown; use one of all, train, valid"
    ):
        evaluate_scene(ckpt, scene, labels, split="columns:0.7", region="val")


def test_label_classes_that_differ_from_the_model_warn(atlanta, tmp_path):
    scene, labels, ckpt, _ = atlanta
    with warnings.catch_warnings(record=True) as caught:  # one class, named after its file
        warnings.simplefilter("always")
        evaluate_scene(ckpt, scene, labels, chunk=512)
    assert not [w for w in caught if "do not match" in str(w.message)]
    named = gpd.read_file(labels)[["geometry"]].assign(kind="shed")
    named.to_file(tmp_path / "named.gpkg")
    with pytest.warns(UserWarning, match="do not match the model"):
        evaluate_scene(ckpt, scene, tmp_path / "named.gpkg", class_attribute="kind", chunk=512)


def test_labels_are_numbered_as_the_model_was_trained(atlanta, tmp_path):
    scene, labels, _, _ = atlanta
    model = geodnn.build_model(bands=1, classes=3, depth=1, width=4, seed=5, init="kaiming")
    ckpt = tmp_path / "three.pt"
    names = ["background", "house", "shed"]
    geodnn.save_checkpoint(model, ckpt, class_names=names, class_values=[None, "house", "shed"])
    sheds = gpd.read_file(labels)[["geometry"]].assign(kind="shed")
    sheds.to_file(tmp_path / "sheds.gpkg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate_scene(ckpt, scene, tmp_path / "sheds.gpkg", class_attribute="kind")
    assert not [w for w in caught if "kind" in str(w.message)]  # matched by value: no warning
    truth = result.scores.confusion.sum(1)  # rows: true classes
    assert truth[2] > 0 and truth[1] == 0  # the sheds are scored as sheds, not as houses
    other = sheds.assign(kind="barn")
    other.to_file(tmp_path / "barns.gpkg")
    code = main(["evaluate", str(ckpt), str(scene), "--labels", str(tmp_path / "barns.gpkg"),
                 "--class-attribute", "kind"])  # fmt: skip
    assert code == 2


def test_labels_are_scored_by_the_attribute_the_model_was_trained_on(atlanta, tmp_path):
    scene, labels, _, _ = atlanta
    model = geodnn.build_model(bands=1, classes=3, depth=1, width=4, seed=5, init="kaiming")
    ckpt = tmp_path / "three.pt"
    names = ["background", "house", "shed"]
    geodnn.save_checkpoint(
        model, ckpt, class_names=names, class_values=[None, "house", "shed"], class_attribute="kind"
    )
    frame = gpd.read_file(labels)[["geometry"]]
    frame.assign(kind=["shed", "house"] * (len(frame) // 2) + ["shed"] * (len(frame) % 2)).to_file(
        tmp_path / "both.gpkg"
    )
    given = evaluate_scene(ckpt, scene, tmp_path / "both.gpkg", class_attribute="kind")
    taken = evaluate_scene(ckpt, scene, tmp_path / "both.gpkg")  # was: "1 is not a class"
    assert torch.equal(taken.scores.confusion, given.scores.confusion)
    assert (given.scores.confusion.sum(1)[1:] > 0).all()
    frame.to_file(tmp_path / "plain.gpkg")  # no such attribute: one class, as before
    lacking = "value.s. 1 are not among the model's classes.*values of attribute 'kind'"
    with pytest.raises(LabelError, match=lacking):
        evaluate_scene(ckpt, scene, tmp_path / "plain.gpkg")


def test_evaluate_follows_the_checkpoint_threshold_unless_argmax(atlanta, tmp_path):
    scene, labels, _, model = atlanta
    ckpt = tmp_path / "calibrated.pt"
    # threshold 0: every pixel with any class-1 probability is called class 1
    geodnn.save_checkpoint(model, ckpt, class_names=["background", "building"], class_scale=[0, 1])
    calibrated = evaluate_scene(ckpt, scene, labels, chunk=256).scores.confusion
    assert calibrated[:, 0].sum() == 0 and calibrated[:, 1].sum() > 0
    plain = evaluate_scene(ckpt, scene, labels, chunk=256, argmax=True).scores.confusion
    assert torch.equal(plain, whole_scene_confusion(scene, labels, model))


def test_a_region_without_labeled_pixels_is_an_error_not_zero_scores(atlanta, tmp_path, capsys):
    scene, labels, ckpt, _ = atlanta
    with rasterio.open(scene) as src:  # a mask of the west half: the rest is unlabeled
        profile = src.profile | {"count": 1, "dtype": "uint8", "width": 450, "nodata": None}
    with rasterio.open(tmp_path / "west.tif", "w", **profile) as dst:
        dst.write(np.ones((1, src.height, 450), dtype=np.uint8))
    args = ["evaluate", str(ckpt), str(scene), "--labels", str(tmp_path / "west.tif")]
    assert main(args) == 0
    capsys.readouterr()
    code = main([*args, "--split", "columns:0.7", "--region", "validation"])
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar's lines
    assert code == 2 and error.startswith("geodnn: error:") and "no labeled pixel" in error


def test_a_scene_without_valid_pixels_under_the_labels_is_named_not_the_labels(
    atlanta, tmp_path, capsys
):
    scene, labels, ckpt, _ = atlanta
    with rasterio.open(scene) as src:
        profile, data = src.profile, src.read()
    blank = tmp_path / "blank.tif"
    with rasterio.open(blank, "w", **(profile | {"dtype": "float32", "nodata": None})) as dst:
        dst.write(np.full(data.shape, np.nan, dtype=np.float32))  # every band NaN everywhere
    code = main(["evaluate", str(ckpt), str(blank), "--labels", str(labels)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and error.startswith(f"geodnn: error: {blank}: no valid pixel")
    assert "check the scene and its nodata" in error


def test_a_notebook_shows_the_table(atlanta):
    """As the last line of a cell, `result.table()` showed as one escaped string."""
    from IPython.lib.pretty import pretty

    scene, labels, ckpt, _ = atlanta
    result = evaluate_scene(ckpt, scene, labels, chunk=300)
    assert str(result) == result.table() == pretty(result)
    header, background, building = result.table().splitlines()[:3]
    assert header.split() == ["class", "IoU", "F1", "labeled", "px", "predicted", "px"]
    counts = result.scores.confusion
    assert building.split()[-2:] == [str(int(counts[1].sum())), str(int(counts[:, 1].sum()))]
    assert result.to_dict()["labeled_pixels"]["building"] == int(counts[1].sum())


def test_a_scene_with_other_bands_is_one_line_before_the_value_check(atlanta, tmp_path):
    """The value-range check read the scene's bands against the model's first: a ValueError
    (broadcast) instead of the band-count error."""
    from tiles.errors import RasterInputError

    scene, labels, _, _ = atlanta
    model = geodnn.build_model(bands=2, classes=2, depth=1, width=2)
    model.set_normalization([50.0, 60.0], [10.0, 12.0])
    ckpt = tmp_path / "two.pt"
    geodnn.save_checkpoint(model, ckpt)
    with pytest.raises(RasterInputError, match="has 1 band.s. but the model expects 2"):
        evaluate_scene(ckpt, scene, labels)


def test_labels_and_scene_are_read_with_gdal_s_block_cache_bounded(atlanta, monkeypatch):
    import pipelines.evaluate
    from tiles.raster import GDAL_CACHE_BYTES

    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    seen = []
    for name in ("load_labels", "_confusion"):  # the mask's first scan filled 270 MB at 16k^2
        real = getattr(pipelines.evaluate, name)

        def spy(*args, real=real, **kwargs):
            seen.append(rasterio.env.getenv().get("GDAL_CACHEMAX"))
            return real(*args, **kwargs)

        monkeypatch.setattr(pipelines.evaluate, name, spy)
    scene, labels, ckpt, _ = atlanta
    evaluate_scene(ckpt, scene, labels)
    assert seen == [GDAL_CACHE_BYTES] * 2


def test_progress_is_labelled_evaluate_and_quiet_turns_it_off(atlanta, capsys):
    scene, labels, ckpt, _ = atlanta
    argv = ["evaluate", str(ckpt), str(scene), "--labels", str(labels), "--chunk", "256"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "evaluate:" in err and "predict:" not in err  # it was labelled "predict"
    assert main([*argv, "-q"]) == 0
    assert "chunk" not in capsys.readouterr().err
