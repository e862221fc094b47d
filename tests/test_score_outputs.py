"""``score`` receives whatever the model returns: dicts (segmentation models) and tuples (#21)."""

import pytest
import torch
import torchvision
from torch import nn

from extra_attrib import TiledOcclusion
from tests._reference import brute_force

SEGMENTATION = ["fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]


def _segmentation(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models.segmentation, name)(
        weights=None, weights_backbone=None, num_classes=3
    )
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval().double()


def _region_score(outputs):
    """Per class, the output summed over a region of the image: ``(N, classes)``."""
    mask = torch.zeros(outputs["out"].shape[-2:], dtype=torch.bool)
    mask[8:20, 4:24] = True
    return outputs["out"][:, :, mask].sum(-1)


@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation_model_through_a_dict_score_on_both_engines(name):
    model = _segmentation(name)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    kw = dict(target=1, window=(3, 16, 16), k=(1, 2, 2), score=_region_score)
    tiled = TiledOcclusion(model)
    dense = tiled.attribute(x, engine="dense", **kw)
    assert tiled.last_engine == "dense"
    incremental = tiled.attribute(x, engine="incremental", **kw)
    assert tiled.last_engine == "incremental"
    expected = brute_force(model, x, (3, 16, 16), (1, 2, 2), 1, score=_region_score)
    torch.testing.assert_close(dense, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(incremental, expected, rtol=1e-9, atol=1e-9)
    assert float(expected.abs().max()) > 0


class _TwoOutputs(nn.Module):
    """Returns a tuple: class scores and a feature map, as many multi-head models do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        features = torch.relu(self.conv(x))
        return self.head(features.mean((2, 3))), features


def test_tuple_output_with_auto_engine_and_refine_and_attribute_multi():
    torch.manual_seed(1)
    model = _TwoOutputs().double().eval()
    x = torch.randn(2, 2, 12, 12, dtype=torch.float64)
    first = lambda o: o[0]  # noqa: E731
    tiled = TiledOcclusion(model)
    plain = TiledOcclusion(lambda x: model(x)[0])
    for engine in ("dense", "incremental", "auto"):
        got = tiled.attribute(x, target=2, window=4, k=2, score=first, engine=engine)
        torch.testing.assert_close(got, plain.attribute(x, target=2, window=4, k=2))
    expected = brute_force(model, x, (2, 4, 4), (1, 2, 2), 2, score=first)
    torch.testing.assert_close(got, expected)
    both = tiled.attribute_multi(x, [0, 2], window=4, k=2, score=first)
    torch.testing.assert_close(both[1], expected)
    refined = tiled.attribute(x, target=2, window=4, k=2, score=first, refine=1.0)
    torch.testing.assert_close(refined, expected)


def test_target_none_on_a_dict_output_is_the_top_score():
    model = _TwoOutputs().double().eval()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    as_dict = lambda x: {"logits": model(x)[0]}  # noqa: E731
    tiled = TiledOcclusion(as_dict)
    got = tiled.attribute(x, window=4, score=lambda o: o["logits"])
    top = model(x)[0].argmax(1)
    torch.testing.assert_close(
        got, TiledOcclusion(model).attribute(x, target=top, window=4, score=lambda o: o[0])
    )


def test_a_dict_output_without_a_score_callable_says_what_to_do():
    model = _segmentation("lraspp_mobilenet_v3_large")
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    for score in ("raw", "softmax", "log_softmax"):
        with pytest.raises(TypeError, match=r"OrderedDict.*score.*callable"):
            TiledOcclusion(model).attribute(x, target=1, window=8, score=score, engine="dense")


def test_a_score_returning_the_wrong_rows_or_no_tensor_is_named():
    as_dict = lambda x: {"out": x.sum((2, 3))}  # noqa: E731
    x = torch.randn(2, 3, 4, 4)
    tiled = TiledOcclusion(as_dict)
    with pytest.raises(ValueError, match=r"score=.*returned shape \(1, 3\) for a batch of 2"):
        tiled.attribute(x, target=1, window=2, score=lambda o: o["out"][:1])
    with pytest.raises(ValueError, match=r"score=.*returned dict.*keys \['out'\]"):
        tiled.attribute(x, target=1, window=2, score=lambda o: o)


def test_perturbation_curve_takes_a_dict_model_through_score():
    from extra_attrib.evaluation import perturbation_curve

    model = _TwoOutputs().double().eval()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    attr = torch.randn(2, 8, 8, dtype=torch.float64)
    as_dict = lambda v: {"logits": model(v)[0]}  # noqa: E731
    for target in (None, 1):
        got = perturbation_curve(
            as_dict, x, attr, target=target, mode="deletion", n_steps=4, score=lambda o: o["logits"]
        )
        expected = perturbation_curve(
            lambda v: model(v)[0], x, attr, target=target, mode="deletion", n_steps=4, score="raw"
        )
        torch.testing.assert_close(got, expected)
