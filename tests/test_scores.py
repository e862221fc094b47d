"""The ready-made scores of ``extra_attrib.scores`` on real torchvision architectures (#31).

Each score is checked against the brute-force definition with an independently written score,
on the dense engine and, where the model is traceable, the incremental one; the detection
matching is checked on a model whose boxes the test controls.
"""

import pytest
import torch
import torchvision
from torch import nn

from extra_attrib import TiledOcclusion, scores
from tests._reference import brute_force


def _randomised_batchnorm(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval().double()


class _SmallCNN(nn.Module):
    def __init__(self, outputs=4, as_dict=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, outputs)
        self.as_dict = as_dict

    def forward(self, x):
        y = self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))
        return {"logits": y} if self.as_dict else y


def _both_engines(model, x, **kw):
    """The map from the dense and the incremental engine, which must agree."""
    tiled = TiledOcclusion(model)
    dense = tiled.attribute(x, engine="dense", **kw)
    incremental = tiled.attribute(x, engine="incremental", **kw)
    assert tiled.last_engine == "incremental"
    torch.testing.assert_close(incremental, dense, rtol=1e-9, atol=1e-10)
    return dense


# --------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["raw", "softmax", "log_softmax"])
def test_classification_equals_the_string_score_and_reads_a_dict(kind):
    torch.manual_seed(0)
    model = _randomised_batchnorm(_SmallCNN())
    as_dict = _randomised_batchnorm(_SmallCNN(as_dict=True))
    as_dict.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    kw = dict(target=[1, 3], window=4, k=2)
    expected = TiledOcclusion(model).attribute(x, score=kind, engine="dense", **kw)
    score = scores.Classification(kind, output="logits")
    torch.testing.assert_close(_both_engines(as_dict, x, score=score, **kw), expected)
    on_tensor = TiledOcclusion(model).attribute(x, score=scores.Classification(kind), **kw)
    torch.testing.assert_close(on_tensor, expected)


def test_multi_label_is_the_sigmoid_of_one_class_on_a_torchvision_model():
    model = _randomised_batchnorm(torchvision.models.mobilenet_v3_small(num_classes=5))
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    kw = dict(target=2, window=(3, 8, 8), k=(1, 2, 2))
    got = _both_engines(model, x, score=scores.MultiLabel(), **kw)
    expected = brute_force(model, x, (3, 8, 8), (1, 2, 2), 2, score=lambda o: 1 / (1 + (-o).exp()))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert float(expected.abs().max()) > 0


def test_classification_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"kind='probability' must be one of"):
        scores.Classification("probability")
    with pytest.raises(TypeError, match=r"output=1.5 must be a dict key"):
        scores.MultiLabel(output=1.5)
    x = torch.randn(1, 3, 8, 8)
    model = _SmallCNN(as_dict=True).eval()
    with pytest.raises(TypeError, match=r"MultiLabel\(output=None\) got a dict.*output="):
        TiledOcclusion(model).attribute(x, target=0, window=4, score=scores.MultiLabel())
    with pytest.raises(ValueError, match=r"output='out' is not a key.*\['logits'\]"):
        TiledOcclusion(model).attribute(
            x, target=0, window=4, score=scores.MultiLabel(output="out")
        )


# --------------------------------------------------------------------------------------------
# segmentation
# --------------------------------------------------------------------------------------------


def _segmentation(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models.segmentation, name)(
        weights=None, weights_backbone=None, num_classes=3
    )
    return _randomised_batchnorm(model)


def _independent_region_score(box, per_pixel):
    x1, y1, x2, y2 = box

    def score(outputs):
        maps = outputs["out"]
        if per_pixel == "softmax":
            maps = maps.exp() / maps.exp().sum(1, keepdim=True)
        return maps[:, :, y1:y2, x1:x2].reshape(maps.shape[0], maps.shape[1], -1).mean(-1)

    return score


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"])
def test_class_over_a_box_on_torchvision_segmentation_models(name):
    model = _segmentation(name)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    box = (2, 4, 12, 10)
    kw = dict(target=1, window=(3, 8, 8), k=(1, 2, 2))
    got = _both_engines(model, x, score=scores.ClassOverRegion(box), **kw)
    expected = brute_force(
        model, x, (3, 8, 8), (1, 2, 2), 1, score=_independent_region_score(box, "softmax")
    )
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert float(expected.abs().max()) > 0


class _OutTensor(nn.Module):
    """A segmentation model returning its (N, classes, H, W) tensor, not a dict."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


def test_a_mask_equals_its_box_and_a_tensor_output_equals_the_dict():
    model = _segmentation("lraspp_mobilenet_v3_large")
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:10, 2:12] = True
    kw = dict(target=2, window=8, k=2, engine="dense")
    tiled = TiledOcclusion(model)
    by_box = tiled.attribute(x, score=scores.ClassOverRegion((2, 4, 12, 10), reduce="sum"), **kw)
    by_mask = tiled.attribute(x, score=scores.ClassOverRegion(mask, reduce="sum"), **kw)
    torch.testing.assert_close(by_mask, by_box)
    on_tensor = scores.ClassOverRegion(mask.numpy(), reduce="sum")
    from_tensor = _both_engines(_OutTensor(model), x, target=2, window=8, k=2, score=on_tensor)
    torch.testing.assert_close(from_tensor, by_box)
    whole = tiled.attribute(x, score=scores.ClassOverRegion(per_pixel="raw"), **kw)
    expected = brute_force(model, x, (3, 8, 8), (1, 2, 2), 2, score=lambda o: o["out"].mean((2, 3)))
    torch.testing.assert_close(whole, expected)


def test_class_over_region_errors_name_the_argument():
    with pytest.raises(TypeError, match=r"region must be a boolean mask.*torch.float32"):
        scores.ClassOverRegion(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"region of shape \(4, 4\) selects no pixel"):
        scores.ClassOverRegion(torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"region=\(5, 0, 5, 4\).*x1 < x2"):
        scores.ClassOverRegion((5, 0, 5, 4))
    with pytest.raises(TypeError, match=r"region=\(0, 0, 2.5, 4\) must be"):
        scores.ClassOverRegion((0, 0, 2.5, 4))
    with pytest.raises(ValueError, match=r"per_pixel='probability' must be one of"):
        scores.ClassOverRegion(per_pixel="probability")
    with pytest.raises(ValueError, match=r"reduce='max' must be one of"):
        scores.ClassOverRegion(reduce="max")
    model = _segmentation("lraspp_mobilenet_v3_large")
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    tiled = TiledOcclusion(model)
    mask = torch.ones(8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"mask of shape \(8, 8\).*spatial shape \(16, 16\)"):
        tiled.attribute(x, target=1, window=8, score=scores.ClassOverRegion(mask), engine="dense")
    with pytest.raises(ValueError, match=r"region=\(0, 0, 17, 4\).*not inside.*\(16, 16\)"):
        tiled.attribute(
            x, target=1, window=8, score=scores.ClassOverRegion((0, 0, 17, 4)), engine="dense"
        )


# --------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------


def _detections(boxes, labels, confidences):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "scores": torch.tensor(confidences, dtype=torch.float32),
    }


def test_detected_object_matching_by_class_and_iou():
    ref = (0, 0, 8, 8)
    outputs = [
        _detections(
            [[0, 0, 8, 8], [4, 0, 12, 8], [0, 0, 8, 8], [0, 1, 8, 8]],
            [1, 1, 2, 1],
            [0.3, 0.9, 0.95, 0.6],
        ),
        _detections([], [], []),  # the object is gone: 0
        _detections([[0, 0, 8, 8]], [2], [0.8]),  # only another class there: 0
    ]
    # IoU with the reference: 1, 1/3, 1 (other class), 56/64 = 0.875
    got = scores.DetectedObject(ref, 1)(outputs)
    torch.testing.assert_close(got, torch.tensor([[0.6], [0.0], [0.0]]))
    loose = scores.DetectedObject(torch.tensor(ref), 1, iou_threshold=0.3)(outputs)
    torch.testing.assert_close(loose, torch.tensor([[0.9], [0.0], [0.0]]))
    weighted = scores.DetectedObject(ref, 1, weight_by_iou=True)(outputs)
    torch.testing.assert_close(weighted, torch.tensor([[0.6 * 0.875], [0.0], [0.0]]))
    two = scores.DetectedObject([[0, 0, 8, 8], [1, 0, 9, 8]], [1, 2])(outputs)
    assert two.shape == (3, 2)
    torch.testing.assert_close(two[:, 1], torch.tensor([0.95, 0.0, 0.8]))


def test_box_iou_by_hand():
    a = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    b = torch.tensor([[2.0, 2.0, 6.0, 6.0], [4.0, 0.0, 8.0, 4.0], [0.0, 0.0, 4.0, 4.0]])
    torch.testing.assert_close(scores.box_iou(a, b), torch.tensor([[4 / 28, 0.0, 1.0]]))


class _ControlledDetector(nn.Module):
    """Detections computed from the input: which boxes, classes and confidences it finds.

    Per image of ``(B, 1, 16, 16)``: the object (label 1, box ``(0, 0, 8, 8)``) with confidence
    the mean of the top-left quarter; a neighbour of the same class with IoU 1/3 and a higher
    confidence; the same box with another class; and, only while the bottom-right quarter's mean
    exceeds 0.3, a near copy of the object (IoU 0.875) with confidence that mean.
    """

    def forward(self, images):
        out = []
        for image in images:
            top_left = image[0, :8, :8].mean()
            bottom_right = image[0, 8:, 8:].mean()
            boxes = [[0, 0, 8, 8], [4, 0, 12, 8], [0, 0, 8, 8]]
            labels, conf = [1, 1, 2], [top_left, top_left + 1, top_left + 2]
            if bottom_right > 0.3:
                boxes.append([0, 1, 8, 8])
                labels.append(1)
                conf.append(bottom_right)
            out.append(
                {
                    "boxes": torch.tensor(boxes, dtype=image.dtype),
                    "labels": torch.tensor(labels),
                    "scores": torch.stack(conf),
                }
            )
        return out


def _expected_object_score(weight):
    def score(x):  # the same quantity, from the input directly
        top_left = x[:, 0, :8, :8].mean((1, 2))
        bottom_right = x[:, 0, 8:, 8:].mean((1, 2))
        copy = torch.where(bottom_right > 0.3, bottom_right * weight, torch.zeros_like(top_left))
        return torch.maximum(top_left, copy)[:, None]

    return score


@pytest.mark.parametrize("weight_by_iou", [False, True])
@pytest.mark.parametrize("engine", ["dense", "auto"])
def test_detected_object_on_a_detector_whose_boxes_the_test_controls(engine, weight_by_iou):
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    x[1, 0, 8:, 8:] += 0.5  # the near copy is found in both images, and wins in the second
    score = scores.DetectedObject((0, 0, 8, 8), 1, weight_by_iou=weight_by_iou)
    tiled = TiledOcclusion(_ControlledDetector())
    got = tiled.attribute(x, window=4, k=2, score=score, engine=engine)
    assert tiled.last_engine == "dense"
    if engine == "auto":
        assert "cannot trace" in tiled.last_engine_reason
    weight = 0.875 if weight_by_iou else 1.0
    expected = brute_force(
        lambda v: v, x, (1, 4, 4), (1, 2, 2), 0, score=_expected_object_score(weight)
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # occluding the bottom right makes the copy vanish: the score falls back to the object's own
    assert float(expected[1, 0, 12:, 12:].abs().max()) > 0.01


def _fasterrcnn():
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=3,
        min_size=64,
        max_size=64,
        box_score_thresh=0.0,
    )
    nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=1.0)
    return model.eval()


def test_detected_object_on_torchvision_fasterrcnn_auto_falls_back_to_dense():
    model = _fasterrcnn()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        found = model(x)[0]
    score = scores.DetectedObject(found["boxes"][:2], found["labels"][:2])
    torch.testing.assert_close(score([found]), found["scores"][None, :2])
    tiled = TiledOcclusion(model)
    got = tiled.attribute_multi(x, [0, 1], window=32, k=1, score=score)
    assert tiled.last_engine == "dense" and "cannot trace" in tiled.last_engine_reason
    for j in range(2):
        expected = brute_force(model, x, (3, 32, 32), (1, 1, 1), j, score=score)
        torch.testing.assert_close(got[j], expected.float(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"engine='incremental' cannot run this model"):
        tiled.attribute(x, window=32, score=score, engine="incremental")


def test_detected_object_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"boxes of shape \(3,\) must be one box"):
        scores.DetectedObject([0, 0, 4], 1)
    with pytest.raises(ValueError, match=r"boxes=.*x1 < x2"):
        scores.DetectedObject([4, 0, 0, 4], 1)
    with pytest.raises(ValueError, match=r"labels has 2 entries for 1 boxes"):
        scores.DetectedObject([0, 0, 4, 4], [1, 2])
    with pytest.raises(TypeError, match=r"labels=1.5 must be integer"):
        scores.DetectedObject([0, 0, 4, 4], 1.5)
    with pytest.raises(ValueError, match=r"iou_threshold=0 must be in \(0, 1\]"):
        scores.DetectedObject([0, 0, 4, 4], 1, iou_threshold=0)
    with pytest.raises(TypeError, match=r"weight_by_iou=1 must be True or False"):
        scores.DetectedObject([0, 0, 4, 4], 1, weight_by_iou=1)
    score = scores.DetectedObject([0, 0, 4, 4], 1)
    with pytest.raises(TypeError, match=r"needs the detections of each image.*tensor of shape"):
        score(torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"detections of image 0 are a dict with keys \['boxes'\]"):
        score([{"boxes": torch.zeros(0, 4)}])


# --------------------------------------------------------------------------------------------
# regression
# --------------------------------------------------------------------------------------------


def test_regression_one_output_and_a_function_of_several_on_a_torchvision_model():
    model = _randomised_batchnorm(torchvision.models.resnet18(num_classes=3))
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    kw = dict(window=(3, 8, 8), k=(1, 2, 2))
    one = _both_engines(model, x, score=scores.Regression(index=2), **kw)
    torch.testing.assert_close(one, TiledOcclusion(model).attribute(x, target=2, **kw))
    spread = _both_engines(
        model, x, score=scores.Regression(combine=lambda y: y[:, 0] - y[:, 1].square()), **kw
    )
    expected = brute_force(
        model, x, (3, 8, 8), (1, 2, 2), 0, score=lambda o: (o[:, 0] - o[:, 1] ** 2)[:, None]
    )
    torch.testing.assert_close(spread, expected, rtol=1e-9, atol=1e-12)


def test_regression_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"give exactly one of them"):
        scores.Regression()
    with pytest.raises(ValueError, match=r"give exactly one of them"):
        scores.Regression(0, combine=lambda y: y[:, 0])
    with pytest.raises(TypeError, match=r"index=1.0 must be an int"):
        scores.Regression(1.0)
    with pytest.raises(TypeError, match=r"combine=3 must be callable"):
        scores.Regression(combine=3)
    x = torch.randn(2, 3, 4, 4)
    model = lambda v: v.mean((2, 3))  # noqa: E731
    with pytest.raises(ValueError, match=r"index=5 does not index.*\(3,\)"):
        TiledOcclusion(model).attribute(x, window=2, score=scores.Regression(5))
    with pytest.raises(ValueError, match=r"combine=.*returned shape \(2, 2\).*shape \(2,\)"):
        TiledOcclusion(model).attribute(
            x, window=2, score=scores.Regression(combine=lambda y: y[:, :2])
        )
