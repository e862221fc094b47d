"""Tests of extra_attrib.evaluation: the Quantus adapter inside real Quantus metrics, tie breaking,
and the insertion / deletion curves."""

import numpy as np
import pytest
import torch
from captum.attr import NoiseTunnel, Occlusion, Saliency
from torch import nn

import extra_attrib
from extra_attrib.evaluation import (
    area_under_curve,
    break_ties,
    perturbation_curve,
    quantus_explain_func,
)


class TinyCNN(nn.Module):
    """Conv + ReLU + linear head on (N, 3, 6, 8) images, 3 classes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture
def data():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = torch.rand(4, 3, 6, 8)
    y = model(x).argmax(1)
    masks = np.zeros((4, 1, 6, 8), bool)
    masks[:, :, 2:6, 2:6] = True
    return model, x.numpy(), y.numpy(), masks


# ------------------------------------------------------------------------------------------------
# The adapter
# ------------------------------------------------------------------------------------------------


def test_adapter_matches_captum_with_channels_summed(data):
    model, x, y, _ = data
    explain = quantus_explain_func(Occlusion, sliding_window_shapes=(3, 2, 2), strides=(3, 2, 2))
    a = explain(model=model, inputs=x, targets=y)
    expected = Occlusion(model).attribute(
        torch.from_numpy(x),
        target=torch.from_numpy(y),
        sliding_window_shapes=(3, 2, 2),
        strides=(3, 2, 2),
    )
    assert isinstance(a, np.ndarray) and a.shape == (4, 1, 6, 8)
    np.testing.assert_allclose(a, expected.sum(1, keepdim=True).numpy(), rtol=1e-6, atol=1e-7)


def test_adapter_options(data):
    model, x, y, _ = data
    unreduced = quantus_explain_func("Saliency", channel_reduction=None)(model, x, y)
    mean = quantus_explain_func("Saliency", channel_reduction="mean")(model, x, y)
    assert unreduced.shape == x.shape
    np.testing.assert_allclose(mean, unreduced.mean(1, keepdims=True), rtol=1e-6)
    # Quantus's explain_func_kwargs override the adapter's; `device` is consumed by the adapter.
    explain = quantus_explain_func("Saliency", abs=True)
    signed = explain(model, x, y, abs=False, device="cpu")
    assert (signed < 0).any() and (explain(model, x, y) >= 0).all()
    # A scalar target and a tensor input are accepted.
    assert explain(model, torch.from_numpy(x), 1).shape == (4, 1, 6, 8)


def test_seed_makes_stochastic_methods_repeatable_and_keeps_global_rng(data):
    model, x, y, _ = data
    explain = quantus_explain_func(
        lambda m: NoiseTunnel(Saliency(m)),
        seed=3,
        nt_type="smoothgrad",
        nt_samples=3,
        stdevs=0.2,
    )
    state = torch.get_rng_state()
    a1, a2 = explain(model, x, y), explain(model, x, y)
    assert torch.equal(state, torch.get_rng_state())
    np.testing.assert_array_equal(a1, a2)
    unseeded = quantus_explain_func(
        lambda m: NoiseTunnel(Saliency(m)), nt_type="smoothgrad", nt_samples=3, stdevs=0.2
    )
    assert not np.array_equal(unseeded(model, x, y), unseeded(model, x, y))


def test_adapter_inside_quantus_localisation_metric(data):
    quantus = pytest.importorskip("quantus")
    model, x, y, masks = data
    metric = quantus.PointingGame(disable_warnings=True)
    explain = quantus_explain_func(
        Occlusion, sliding_window_shapes=(3, 2, 2), strides=(3, 2, 2), tie_break=True, seed=0
    )
    scores = metric(
        model=model, x_batch=x, y_batch=y, a_batch=None, s_batch=masks, explain_func=explain
    )
    assert len(scores) == 4 and all(s in (True, False, 0, 1) for s in scores)


def test_adapter_inside_quantus_metrics_that_reexplain(data):
    """MaxSensitivity explains perturbed inputs; MPRT explains randomised copies of the model."""
    quantus = pytest.importorskip("quantus")
    model, x, y, _ = data
    explain = quantus_explain_func("Saliency")
    sens = quantus.MaxSensitivity(nr_samples=2, lower_bound=0.05, disable_warnings=True)(
        model=model, x_batch=x, y_batch=y, a_batch=None, explain_func=explain
    )
    assert len(sens) == 4 and np.all(np.isfinite(sens))
    mprt = quantus.MPRT(return_last_correlation=True, disable_warnings=True)(
        model=model, x_batch=x, y_batch=y, a_batch=None, explain_func=explain
    )
    # Saliency depends on the weights: after randomisation its maps are no longer the same.
    assert len(mprt) == 4 and np.all(np.array(mprt) < 0.99)


def test_adapter_with_tiled_occlusion_inside_quantus(data):
    quantus = pytest.importorskip("quantus")
    if not hasattr(extra_attrib, "TiledOcclusion"):
        pytest.skip("TiledOcclusion is not exported yet")
    model, x, y, masks = data
    explain = quantus_explain_func("TiledOcclusion", window=(3, 4, 4), k=(1, 2, 2))
    scores = quantus.RelevanceMassAccuracy(disable_warnings=True)(
        model=model, x_batch=x, y_batch=y, a_batch=None, s_batch=masks, explain_func=explain
    )
    assert len(scores) == 4 and np.all(np.isfinite(scores))


def test_adapter_validation(data):
    model, x, y, _ = data
    with pytest.raises(TypeError, match="instance"):
        quantus_explain_func(Saliency(model))
    with pytest.raises(ValueError, match="NotAMethod"):
        quantus_explain_func("NotAMethod")
    with pytest.raises(TypeError, match="method"):
        quantus_explain_func(3)
    with pytest.raises(ValueError, match="channel_reduction"):
        quantus_explain_func("Saliency", channel_reduction="max")
    with pytest.raises(TypeError, match="seed"):
        quantus_explain_func("Saliency", seed=1.5)
    with pytest.raises(ValueError, match="targets"):
        quantus_explain_func("Saliency")(model, x, y[:2])
    with pytest.raises(ValueError, match="inputs"):
        quantus_explain_func("Saliency")(model, x[0, 0, 0], y)


# ------------------------------------------------------------------------------------------------
# Tie breaking
# ------------------------------------------------------------------------------------------------


def test_break_ties_keeps_order_of_distinct_values_and_randomises_ties():
    a = np.array([[0.0, 1.0, 1.0, 2.0, 0.0]])
    for seed in range(5):
        b = break_ties(a, seed=seed)
        assert b.dtype == np.float64 and b.shape == a.shape
        order = np.argsort(-b[0])
        assert order[0] == 3 and set(order[1:3]) == {1, 2} and set(order[3:]) == {0, 4}
    winners = {int(break_ties(np.zeros((1, 16)), seed=s).argmax()) for s in range(20)}
    assert len(winners) > 5
    np.testing.assert_array_equal(break_ties(a, seed=1), break_ties(a, seed=1))
    with pytest.raises(ValueError, match="scale"):
        break_ties(a, scale=0)


# ------------------------------------------------------------------------------------------------
# Insertion / deletion curves
# ------------------------------------------------------------------------------------------------


def test_curve_endpoints_and_area(data):
    model, x, y, _ = data
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    attr = torch.rand(4, 1, 6, 8)
    probs = torch.softmax(model(x), 1)[torch.arange(4), y]
    ins = perturbation_curve(model, x, attr, target=y, mode="insertion", n_steps=4, baseline=0.5)
    dele = perturbation_curve(model, x, attr, target=y, mode="deletion", n_steps=4, baseline=0.5)
    base_probs = torch.softmax(model(torch.full_like(x, 0.5)), 1)[torch.arange(4), y]
    assert ins.shape == dele.shape == (4, 5)
    torch.testing.assert_close(ins[:, -1], probs)
    torch.testing.assert_close(ins[:, 0], base_probs)
    torch.testing.assert_close(dele[:, 0], probs)
    torch.testing.assert_close(dele[:, -1], base_probs)
    torch.testing.assert_close(
        area_under_curve(torch.ones(2, 7)), torch.ones(2, dtype=torch.float64)
    )
    torch.testing.assert_close(
        area_under_curve(torch.tensor([[0.0, 1.0]])), torch.tensor([0.5], dtype=torch.float64)
    )
    # Blur (the RISE insertion start) and predicted targets run too.
    assert perturbation_curve(model, x, attr, n_steps=2, batch_size=2).shape == (4, 3)


def test_deletion_curve_matches_quantus_pixel_flipping(data):
    """Deletion = Quantus PixelFlipping with the same order, step and baseline.

    Quantus flattens (C, H, W) and needs ``H * W % features_in_step == 0``: with 6 x 8 images a step
    of 24 features removes 8 whole RGB pixels.
    """
    quantus = pytest.importorskip("quantus")
    model, x, y, _ = data
    attr = np.random.default_rng(0).random((4, 1, 6, 8))  # no ties
    pf = quantus.PixelFlipping(features_in_step=3 * 8, disable_warnings=True)
    theirs = np.array(pf(model=model, x_batch=x, y_batch=y, a_batch=attr, softmax=True))
    black = torch.from_numpy(x.reshape(4, -1).min(1)).view(4, 1, 1, 1)  # Quantus's "black"
    ours = perturbation_curve(
        model,
        torch.from_numpy(x),
        torch.from_numpy(attr),
        torch.from_numpy(y),
        mode="deletion",
        n_steps=6,
        baseline=black.expand(4, 3, 6, 8),
    )
    np.testing.assert_allclose(ours[:, 1:].numpy(), theirs, rtol=1e-5, atol=1e-6)


def test_curve_breaks_ties_randomly(data):
    model, x, y, _ = data
    x = torch.from_numpy(x)
    flat = torch.zeros(4, 1, 6, 8)
    curves = [
        perturbation_curve(
            model,
            x,
            flat,
            target=0,
            mode="deletion",
            n_steps=4,
            generator=torch.Generator().manual_seed(s),
        )
        for s in range(3)
    ]
    assert not torch.equal(curves[0], curves[1]) or not torch.equal(curves[1], curves[2])
    again = perturbation_curve(
        model,
        x,
        flat,
        target=0,
        mode="deletion",
        n_steps=4,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(curves[0], again)


def test_curve_validation(data):
    model, x, y, _ = data
    x = torch.from_numpy(x)
    attr = torch.rand(4, 6, 8)
    with pytest.raises(ValueError, match="mode"):
        perturbation_curve(model, x, attr, mode="both")
    with pytest.raises(ValueError, match="n_steps"):
        perturbation_curve(model, x, attr, n_steps=0)
    with pytest.raises(ValueError, match="attributions"):
        perturbation_curve(model, x, torch.rand(4, 2, 6, 8))
    with pytest.raises(ValueError, match="baseline"):
        perturbation_curve(model, x, attr, baseline="noise")
    with pytest.raises(ValueError, match="score"):
        perturbation_curve(model, x, attr, score="log")
    with pytest.raises(TypeError, match="forward_func"):
        perturbation_curve(None, x, attr)
    with pytest.raises(ValueError, match="curve"):
        area_under_curve(torch.ones(3))


# ------------------------------------------------------------------------------------------------
# Argument checks shared with the rest of the package (#10)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argument", ["n_steps", "batch_size"])
def test_curve_refuses_bools_like_the_rest_of_the_package(argument):
    model, x = TinyCNN(), torch.rand(2, 3, 6, 8)
    with pytest.raises(TypeError, match=rf"{argument}=True must be an int"):
        perturbation_curve(model, x, torch.rand(2, 6, 8), target=0, **{argument: True})


def test_break_ties_refuses_a_bool_scale():
    with pytest.raises(TypeError, match="scale=True"):
        break_ties(np.zeros((1, 2)), scale=True)


def test_quantus_adapter_refuses_a_bool_seed():
    with pytest.raises(TypeError, match="seed=True"):
        quantus_explain_func("Saliency", seed=True)
    with pytest.raises(TypeError, match="tie_break=1"):
        quantus_explain_func("Saliency", tie_break=1)


def test_curve_scores_are_the_package_scores():
    model, x = TinyCNN(), torch.rand(2, 3, 6, 8)
    attr = torch.rand(2, 6, 8)
    kw = dict(target=1, n_steps=3, baseline=0.0, mode="deletion")
    soft = perturbation_curve(model, x, attr, score="softmax", **kw)
    torch.testing.assert_close(
        perturbation_curve(model, x, attr, score=lambda o: o.softmax(1), **kw), soft
    )
    log = perturbation_curve(model, x, attr, score="log_softmax", **kw)
    torch.testing.assert_close(log.exp(), soft)
    with pytest.raises(ValueError, match="score=.*one row per example"):
        perturbation_curve(model, x, attr, score=lambda o: o.sum(), **kw)


def test_curve_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(3))
    model(torch.rand(2, 3, 6, 8))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    perturbation_curve(model, torch.rand(2, 3, 6, 8), torch.rand(2, 6, 8), target=0, n_steps=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
