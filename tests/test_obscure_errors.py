"""The small wrong or obscure errors of #21 item 4: each gets a clear error or the right result."""

import warnings

import numpy as np
import pytest
import torch
from captum.attr import Saliency
from matplotlib.backends.backend_agg import FigureCanvasAgg
from torch import nn

from extra_attrib import FusionGrad, TiledOcclusion
from extra_attrib.visualization import plot_attribution


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def test_fusion_grad_warns_when_huge_noise_makes_the_map_non_finite():
    model, x = _mlp(), torch.randn(2, 4)
    with pytest.warns(RuntimeWarning, match=r"NaN or Inf.*std=1e\+30") as caught:
        out = FusionGrad(Saliency(model)).attribute(x, target=0, std=1e30, n=2, m=1)
    assert not torch.isfinite(out).all()
    assert caught[0].filename == __file__  # points at the user's call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FusionGrad(Saliency(model)).attribute(x, target=0, n=2, m=1)


def test_a_model_on_the_meta_device_is_named():
    model = nn.Linear(4, 2, device="meta")
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"weight, bias are on the meta device.*to_empty"):
        TiledOcclusion(model).attribute(x, target=0, window=2)
    with pytest.raises(ValueError, match=r"meta device"):
        FusionGrad(Saliency(model)).attribute(x, target=0)
    with pytest.raises(ValueError, match=r"inputs is on the meta device"):
        TiledOcclusion(_mlp()).attribute(x.to("meta"), target=0, window=2)


@pytest.mark.parametrize("score", ["softmax", "log_softmax"])
def test_softmax_of_integer_outputs_is_the_softmax_of_their_values(score):
    x = torch.randn(2, 6)
    as_int = lambda v: (v * 10).round().long()  # noqa: E731
    got = TiledOcclusion(as_int).attribute(x, target=1, window=2, score=score)
    expected = TiledOcclusion(lambda v: as_int(v).float()).attribute(
        x, target=1, window=2, score=score
    )
    torch.testing.assert_close(got, expected)
    with pytest.raises(TypeError, match=r"score='softmax' needs real numbers.*torch.bool"):
        TiledOcclusion(lambda v: v > 0).attribute(x, target=1, window=2, score="softmax")


def test_plot_save_path_naming_a_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    attr, image = np.random.randn(8, 8), np.random.rand(8, 8, 3)
    for path in (".", str(tmp_path), str(tmp_path) + "/", "..", tmp_path):
        with pytest.raises(ValueError, match=r"names a folder, not a file"):
            plot_attribution(attr, image, save_path=path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_numpy_per_example_target_is_one_index_per_example():
    model, x = _mlp(), torch.randn(2, 4)
    tiled = TiledOcclusion(model)
    expected = tiled.attribute(x, target=torch.tensor([1, 2]), window=2)
    torch.testing.assert_close(tiled.attribute(x, target=np.array([1, 2]), window=2), expected)
    torch.testing.assert_close(
        tiled.attribute(x, target=np.int64(1), window=2)[0],
        tiled.attribute(x, target=1, window=2)[0],
    )
    with pytest.raises(TypeError, match="target must hold integers.*float64"):
        tiled.attribute(x, target=np.array([1.0, 2.0]), window=2)


def test_a_score_of_shape_n_is_not_blamed_on_the_model():
    with pytest.raises(ValueError, match=r"after score.*shape \(N,\).*target=None") as info:
        TiledOcclusion(_mlp()).attribute(
            torch.randn(2, 4), target=1, window=2, score=lambda o: o.sum(1)
        )
    assert "the model returns one value" not in str(info.value)


def test_additional_forward_args_with_the_wrong_rows_are_named():
    x = torch.randn(2, 8)
    model = lambda v, w: (v * w).sum(1, keepdim=True)  # noqa: E731
    with pytest.raises(
        ValueError, match=r"additional_forward_args of shape \(3, 8\).*batch size 2"
    ):
        TiledOcclusion(model).attribute(x, window=2, additional_forward_args=(torch.randn(3, 8),))
    # A tensor argument that is not per example (one row for all) still works.
    got = TiledOcclusion(model).attribute(x, window=1, additional_forward_args=(torch.ones(1, 8),))
    torch.testing.assert_close(got, x)


def _panel_colours(fig):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return len(np.unique(rgba.reshape(-1, 4), axis=0))


def test_maps_with_nan_or_inf_warn_and_inf_is_drawn():
    rng = np.random.default_rng(0)
    attr = rng.standard_normal((8, 8))
    attr[2, 2] = np.inf
    attr[5, 5] = -np.inf
    with pytest.warns(RuntimeWarning, match=r"0 NaN and 2 Inf.*ends of the colour scale"):
        fig = plot_attribution(attr, method="heat_map", colorbar=False)
    # The panel shows the map, with +-Inf at the ends of the scale; not a blank panel.
    assert _panel_colours(fig) > 20
    with pytest.warns(RuntimeWarning, match=r"64 NaN and 0 Inf.*no finite value"):
        plot_attribution(np.full((8, 8), np.nan), method="heat_map")
