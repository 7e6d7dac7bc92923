import torch

from geodnn.data import TensorBatches, class_weights
from geodnn.metrics import IGNORE_INDEX, scores


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


def test_tensor_batches_returns_selected_crops():
    data = TensorBatches(torch.arange(8.0).reshape(2, 1, 2, 2), torch.zeros(2, 2, 2))
    x, y = data.get([1])
    assert x.shape == (1, 1, 2, 2) and x[0, 0, 0, 0] == 4.0 and y.dtype == torch.long
