import pytest
import torch

from geodnn.data import TensorBatches, class_weights
from geodnn.metrics import IGNORE_INDEX, best_iou_threshold, scores, threshold_scale


def test_iou_f1_and_accuracy_on_known_case():
    target = torch.tensor([0, 0, 1, 1, IGNORE_INDEX])
    pred = torch.tensor([0, 1, 1, 1, 1])
    s = scores(pred, target, 2)
    assert s.pixels == 4
    assert s.iou == [0.5, 2 / 3]
    assert s.f1 == [2 / 3, 0.8]
    assert s.pixel_accuracy == 0.75


def test_all_background_predictor_scores_zero_positive_iou():
    target = torch.tensor([0, 0, 0, 1])
    s = scores(torch.zeros(4, dtype=torch.long), target, 2)
    assert s.iou[1] == 0.0 and s.pixel_accuracy == 0.75


def test_class_weights_favor_rare_class_and_skip_ignored():
    labels = torch.tensor([0] * 90 + [1] * 10 + [IGNORE_INDEX] * 50)
    w = class_weights(labels, 2, power=1.0)
    assert w[1] / w[0] == torch.tensor(9.0)
    assert abs(float(w.mean()) - 1.0) < 1e-6


def test_a_class_without_training_pixels_leaves_the_others_weights_alone():
    labels = torch.tensor([0] * 90 + [1] * 10)
    two = class_weights(labels, 2, power=1.0)
    three = class_weights(labels, 3, power=1.0)  # class 2 absent from the training region
    assert torch.allclose(three[:2], two) and three[2] == 0


def test_class_weights_are_capped_at_max_ratio_times_the_smallest():
    from geodnn.data import weights_from_counts

    counts = [1_000_000, 16, 0]
    assert float(weights_from_counts(counts, 0.5)[1]) > 1.99  # 250x background's
    capped = weights_from_counts(counts, 0.5, max_ratio=10.0)
    assert float(capped[1] / capped[0]) == pytest.approx(10.0) and capped[2] == 0
    assert float(capped[:2].mean()) == pytest.approx(1.0)
    mild = weights_from_counts([600, 400], 1.0, max_ratio=10.0)  # a cap that does not bind
    assert torch.allclose(mild, weights_from_counts([600, 400], 1.0))


def test_mean_iou_is_over_the_classes_present():
    target = torch.tensor([0, 0, 1, 1])
    s = scores(torch.tensor([0, 0, 1, 0]), target, 3)  # class 2: neither truth nor predicted
    assert s.iou == [2 / 3, 0.5, 0.0]
    assert s.to_dict()["mean_iou"] == pytest.approx((2 / 3 + 0.5) / 2)
    # reported as absent (JSON null), not as a score of 0 that the mean leaves out
    assert s.to_dict(["a", "b", "c"])["iou"] == {"a": 2 / 3, "b": 0.5, "c": None}
    assert s.to_dict(["a", "b", "c"])["f1"]["c"] is None


def test_tensor_batches_returns_selected_crops():
    data = TensorBatches(torch.arange(8.0).reshape(2, 1, 2, 2), torch.zeros(2, 2, 2))
    x, y = data.get([1])
    assert x.shape == (1, 1, 2, 2) and x[0, 0, 0, 0] == 4.0 and y.dtype == torch.long


def test_best_iou_threshold_keeps_the_cut_with_the_best_iou():
    score = torch.tensor([0.95, 0.9, 0.8, 0.7, 0.6, 0.2])
    positive = torch.tensor([True, True, False, True, False, False])
    # calling the top 2 gives IoU 2/3, the top 4 gives 3/4 (the best), all 6 gives 1/2
    threshold = best_iou_threshold(score, positive)
    assert 0.6 < threshold < 0.7 and threshold == pytest.approx(0.65)
    called = score > threshold
    assert int((called & positive).sum()) / int((called | positive).sum()) == 0.75
    assert best_iou_threshold(score, torch.zeros(6, dtype=torch.bool)) == 0.5


def test_threshold_scale_makes_the_argmax_a_threshold():
    p1 = torch.linspace(0.01, 0.99, 99)
    probs = torch.stack([1 - p1, p1])
    scale = torch.tensor(threshold_scale(0.805)).view(2, 1)
    assert torch.equal((probs * scale).argmax(0) == 1, p1 > 0.805)


def test_best_iou_threshold_never_splits_tied_scores():
    score = torch.tensor([1.0, 1.0, 1.0, 0.3])
    positive = torch.tensor([True, True, False, False])
    threshold = best_iou_threshold(score, positive)  # the three tied pixels go together: 2/3
    assert 0.3 < threshold < 1.0
    called = score > threshold
    assert int((called & positive).sum()) / int((called | positive).sum()) == pytest.approx(2 / 3)
