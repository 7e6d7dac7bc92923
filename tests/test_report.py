import numpy as np
import pytest
from matplotlib.figure import Figure

from pipelines.report import read_overview, stretch

GREY, RGB = (40, 48), (40, 48, 3)


@pytest.mark.parametrize("bands, shape", [(1, GREY), (2, GREY), (3, RGB), (4, RGB)])
def test_scene_picture_is_grey_below_three_bands_and_rgb_from_three(make_geotiff, bands, shape):
    rng = np.random.default_rng(bands)
    path = make_geotiff(rng.random((bands, 40, 48), dtype=np.float32))
    image, _ = read_overview(path)
    shown = stretch(image)
    assert shown.shape == shape and shown.min() >= 0 and shown.max() <= 1
    Figure().subplots().imshow(shown, cmap="gray")  # as overlay_png draws it; raises if unshowable
    band1, _ = read_overview(path, [1])
    np.testing.assert_array_equal(shown if shown.ndim == 2 else shown[..., 0], stretch(band1))


def test_stretch_shows_band_one_of_a_two_band_array():
    image = np.ma.masked_invalid(np.stack([np.arange(12.0).reshape(3, 4), np.ones((3, 4))]))
    assert stretch(image).shape == (3, 4)
    np.testing.assert_array_equal(stretch(image), stretch(image[:1]))


def test_report_rows_show_a_class_absent_from_the_validation_region():
    import json

    import torch

    from geodnn.metrics import SegmentationScores
    from pipelines.report import metrics_rows

    confusion = torch.tensor([[50, 2, 0], [3, 20, 0], [0, 0, 0]])  # class 2: nowhere
    scores = json.loads(json.dumps(SegmentationScores(confusion).to_dict(["bg", "a", "b"])))
    curve = [{"iteration": 40.0, "elapsed_s": 12.0, "train_loss": 0.3}]
    [row] = metrics_rows({"admm": curve}, {"admm": scores})
    assert row[1:4] == ["0.909", "0.800", "absent"]  # before: TypeError on None
    assert row[4:6] == ["0.889", "absent"]  # F1 of each mapped class, not of the last alone


def test_the_comparison_follows_every_mapped_class(tmp_path):
    from pipelines.report import comparison_png, mapped_iou

    names = ["background", "road", "roof"]
    row = {"val_iou_background": 0.9, "val_iou_road": 0.2, "val_iou_roof": 0.4}
    assert mapped_iou(row, names) == pytest.approx(0.3)  # not the last class's 0.4
    assert mapped_iou({**row, "val_iou_roof": float("nan")}, names) == pytest.approx(0.2)
    assert mapped_iou(row, names[:2]) == pytest.approx(0.2)
    curves = {"admm": [{"iteration": 10.0, "elapsed_s": 2.0, **row}]}
    assert comparison_png(curves, tmp_path / "c.png", names).stat().st_size > 0


def test_the_prediction_overlay_names_each_mapped_class():
    from pipelines.report import add_class_legend

    ax = Figure().subplots()
    add_class_legend(ax, ["road", "roof"], np.array([[1.0, 0, 0], [0, 0, 1.0]]))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["road", "roof"]
