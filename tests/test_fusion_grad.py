"""Tests for extra_attrib.fusion_grad.FusionGrad (NoiseGrad + SmoothGrad)."""

import warnings

import pytest
import torch
import torch.nn as nn
from captum.attr import (
    Attribution,
    DeepLift,
    FeatureAblation,
    GradientAttribution,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    LayerGradCam,
    NoiseTunnel,
    Occlusion,
    Saliency,
)

from extra_attrib._fusion_batches import chunk_plan as _chunk_plan
from extra_attrib._noise import SG_STD_FRACTION
from extra_attrib.fusion_grad import FusionGrad

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def conv_net(batch_norm: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)]
    return nn.Sequential(*layers)


def images(n: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(n, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=dtype)


def snapshot(model: nn.Module):
    return (
        {k: (v, v.detach().clone()) for k, v in model.named_parameters()},
        {k: v.detach().clone() for k, v in model.named_buffers()},
        [mod.training for mod in model.modules()],
    )


def assert_untouched(model: nn.Module, snap) -> None:
    params, buffers, modes = snap
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for name, (obj, value) in params.items():
        assert now[name] is obj, f"parameter {name} was replaced"
        assert torch.equal(obj.detach(), value), f"parameter {name} was written"
        assert obj.grad is None, f"parameter {name} got a gradient"
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), f"buffer {name} changed"
    assert [mod.training for mod in model.modules()] == modes


# Method factories: (name, factory(model), extra kwargs).
METHODS = [
    ("saliency", Saliency, {}),
    ("ig", IntegratedGradients, {"n_steps": 4}),
    ("input_x_gradient", InputXGradient, {}),
    ("guided_backprop", GuidedBackprop, {}),
    ("deeplift", DeepLift, {}),
    ("occlusion", Occlusion, {"sliding_window_shapes": (3, 2, 2), "strides": (3, 2, 2)}),
    ("feature_ablation", FeatureAblation, {}),
]
METHOD_IDS = [name for name, _, _ in METHODS]


# ----------------------------------------------------------------------------- model untouched


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name,factory,kw", METHODS, ids=METHOD_IDS)
def test_model_untouched(name, factory, kw, train):
    model = conv_net().train(train)
    snap = snapshot(model)
    attr = FusionGrad(factory(model)).attribute(images(), target=1, n=2, m=3, **kw)
    assert attr.shape == images().shape and torch.isfinite(attr).all()
    assert_untouched(model, snap)


class Boom(RuntimeError):
    pass


class FailingForward(nn.Module):
    """Raises on the ``fail_at``-th forward pass, after running (and writing BN stats)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.net = conv_net()
        self.calls = 0
        self.fail_at = fail_at

    def forward(self, x):
        out = self.net(x)
        self.calls += 1
        if self.calls == self.fail_at:
            raise Boom("half-way")
        return out


@pytest.mark.parametrize(
    "factory,kw", [(Saliency, {}), (Occlusion, {"sliding_window_shapes": (3, 2, 2)})]
)
def test_model_untouched_when_wrapped_method_raises(factory, kw):
    model = FailingForward(fail_at=3).train()
    snap = snapshot(model)
    with pytest.raises(Boom):
        FusionGrad(factory(model)).attribute(images(), target=0, n=4, m=2, **kw)
    assert model.calls == 3
    assert_untouched(model, snap)
    # ... and the model still works normally afterwards, with its own weights
    model.eval()
    model.fail_at = -1
    ref = model.net(images())
    assert torch.equal(model(images()), ref)


class ModeSwitchingMethod(Attribution):
    """A badly behaved method that puts the model into eval mode and leaves it there."""

    def attribute(self, inputs, target=None):
        self.forward_func.eval()
        return Saliency(self.forward_func).attribute(inputs, target=target)


def test_mode_restored_even_if_wrapped_method_changes_it():
    model = conv_net().train()
    model[1].eval()  # mixed modes must come back exactly
    snap = snapshot(model)
    FusionGrad(ModeSwitchingMethod(model)).attribute(images(), target=0, n=2, m=2)
    assert_untouched(model, snap)


def test_batchnorm_train_mode_stats_do_not_drift_between_weight_samples():
    model = conv_net().train()
    bn = model[1]
    seen = []
    bn.register_forward_pre_hook(lambda mod, inp: seen.append(mod.running_mean.clone()))
    FusionGrad(Saliency(model)).attribute(images(), target=0, n=3, m=2)
    assert len(seen) == 3
    for stats in seen:  # every weight sample starts from the model's own statistics
        assert torch.equal(stats, torch.zeros(4))
    assert torch.equal(bn.running_mean, torch.zeros(4))
    assert int(bn.num_batches_tracked) == 0


def test_tied_weights_untouched_and_noised_consistently():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    snap = snapshot(model)
    seen = []
    shared.register_forward_pre_hook(lambda mod, inp: seen.append(mod.weight.detach().clone()))
    FusionGrad(Saliency(model)).attribute(torch.rand(2, 4), target=0, n=2, m=1)
    assert len(seen) == 4  # two weight samples x two uses
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[2], seen[3])
    assert not torch.equal(seen[0], seen[2])
    assert_untouched(model, snap)


class TiedAcrossModules(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight  # the same Parameter in two modules

    def forward(self, x):
        return self.dec(self.enc(x).relu())


def test_weights_tied_across_modules_get_the_same_noise():
    model = TiedAcrossModules()
    snap = snapshot(model)
    seen = []
    for mod in (model.enc, model.dec):
        mod.register_forward_pre_hook(lambda mod, inp: seen.append(mod.weight.detach().clone()))
    FusionGrad(Saliency(model)).attribute(torch.rand(2, 4), target=0, n=2, m=1)
    assert len(seen) == 4
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[2], seen[3])
    assert not torch.equal(seen[0], model.enc.weight.detach())
    assert not torch.equal(seen[0], seen[2])
    assert_untouched(model, snap)
    assert model.dec.weight is model.enc.weight


# ----------------------------------------------------------------------------- exactness


NOISELESS = {"n": 1, "m": 1, "std": 0.0, "sg_std": 0.0}


@pytest.mark.parametrize("name,factory,kw", METHODS, ids=METHOD_IDS)
def test_noiseless_equals_wrapped_method_exactly(name, factory, kw):
    model = conv_net().eval()
    x = images()
    ref = factory(model).attribute(x, target=2, **kw)
    attr = FusionGrad(factory(model)).attribute(x, target=2, **NOISELESS, **kw)
    assert torch.equal(attr, ref)
    assert attr.dtype == ref.dtype


def test_noiseless_with_many_samples_and_batches_equals_wrapped_method():
    model = conv_net().eval()
    x = images(4)
    target = torch.tensor([0, 1, 2, 3])
    baselines = torch.rand(4, 3, 6, 6)
    ref = IntegratedGradients(model).attribute(x, baselines=baselines, target=target, n_steps=5)
    for batch_size in (None, 12, 5, 3):
        attr = FusionGrad(IntegratedGradients(model)).attribute(
            x,
            target=target,
            baselines=baselines,
            n_steps=5,
            n=2,
            m=3,
            std=0.0,
            sg_std=0.0,
            batch_size=batch_size,
        )
        torch.testing.assert_close(attr, ref, rtol=1e-5, atol=1e-6)


class TwoInputNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(2, 3)

    def forward(self, x, y, scale):
        return (self.a(x) + self.b(y)) * scale


def test_tuple_inputs_additional_forward_args_and_list_target():
    torch.manual_seed(0)
    model = TwoInputNet()
    x, y = torch.rand(3, 4), torch.rand(3, 2)
    scale = torch.tensor([[1.0], [2.0], [-1.0]])
    target = [0, 2, 1]
    ref = Saliency(model).attribute((x, y), target=target, additional_forward_args=(scale,))
    attr = FusionGrad(Saliency(model)).attribute(
        (x, y), target=target, additional_forward_args=(scale,), n=1, m=4, std=0.0, sg_std=0.0
    )
    assert isinstance(attr, tuple) and len(attr) == 2
    for a, r in zip(attr, ref):
        torch.testing.assert_close(a, r)
    noisy = FusionGrad(Saliency(model)).attribute(
        (x, y), target=target, additional_forward_args=scale, n=2, m=2
    )
    assert [a.shape for a in noisy] == [x.shape, y.shape]


def test_extra_positional_arguments_go_to_wrapped_method():
    model = conv_net().eval()
    x = images()
    ref = Occlusion(model).attribute(x, (3, 2, 2), (3, 2, 2), target=1)
    attr = FusionGrad(Occlusion(model)).attribute(x, (3, 2, 2), (3, 2, 2), target=1, **NOISELESS)
    assert torch.equal(attr, ref)
    # a positional target (Saliency.attribute(inputs, target, ...)) is expanded, too
    tgt = torch.tensor([0, 1, 2])
    ref = Saliency(model).attribute(x, tgt)
    attr = FusionGrad(Saliency(model)).attribute(x, tgt, n=1, m=3, std=0.0, sg_std=0.0)
    torch.testing.assert_close(attr, ref)


def test_forward_func_wrapping_the_model_with_explicit_model():
    model = conv_net().eval()
    snap = snapshot(model)

    def prob(x):
        return model(x).softmax(dim=1)

    x = images()
    ref = Saliency(prob).attribute(x, target=1)
    fg = FusionGrad(Saliency(prob), model=model)
    assert torch.equal(fg.attribute(x, target=1, **NOISELESS), ref)
    assert not torch.equal(fg.attribute(x, target=1, n=2, m=1, sg_std=0.0), ref)
    assert_untouched(model, snap)


def test_layer_method_gives_one_row_per_example():
    model = conv_net().eval()
    x = images()
    ref = LayerGradCam(model, model[0]).attribute(x, target=1)
    fg = FusionGrad(LayerGradCam(model, model[0]))
    assert torch.equal(fg.attribute(x, target=1, **NOISELESS), ref)
    assert fg.attribute(x, target=1, n=2, m=3).shape == ref.shape


# ----------------------------------------------------------------------------- noise


class Recorder(nn.Module):
    """Linear model that records the weight it runs with and the rows it receives."""

    def __init__(self, d: int = 200, out: int = 50) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(d, out)
        self.weights, self.rows = [], []

    def forward(self, x):
        self.weights.append(self.lin.weight.detach().clone())
        self.rows.append(x.detach().clone())
        return self.lin(x)


def test_weight_noise_multiplicative_default_is_n_1_02():
    model = Recorder()
    w = model.lin.weight.detach().clone()
    x = torch.rand(2, 200)
    FusionGrad(Saliency(model)).attribute(x, target=0, n=3, m=2, sg_std=0.0)
    assert len(model.weights) == 3  # one batched call per weight sample
    assert all(r.shape == (4, 200) for r in model.rows)
    for noisy in model.weights:
        ratio = noisy / w
        assert abs(ratio.mean().item() - 1.0) < 0.01
        assert abs(ratio.std().item() - 0.2) < 0.01
    assert not torch.equal(model.weights[0], model.weights[1])


def test_weight_noise_additive_default_mean_is_zero():
    model = Recorder()
    w = model.lin.weight.detach().clone()
    FusionGrad(Saliency(model)).attribute(
        torch.rand(2, 200), target=0, n=2, m=1, std=0.05, additive_noise=True, sg_std=0.0
    )
    for noisy in model.weights:
        diff = noisy - w
        assert abs(diff.mean().item()) < 0.002
        assert abs(diff.std().item() - 0.05) < 0.002
    model.weights.clear()
    FusionGrad(Saliency(model)).attribute(
        torch.rand(2, 200), target=0, n=1, m=1, mean=0.3, std=0.0, additive_noise=True, sg_std=0
    )
    torch.testing.assert_close(model.weights[0], w + 0.3)


def test_buffers_and_integer_parameters_get_no_noise():
    model = conv_net().eval()
    model[1].running_var.fill_(2.0)
    seen = []
    model[1].register_forward_pre_hook(
        lambda mod, inp: seen.append((mod.running_var.clone(), mod.weight.detach().clone()))
    )
    FusionGrad(Saliency(model)).attribute(images(), target=0, n=2, m=1, sg_std=0.0)
    for running_var, weight in seen:
        assert torch.equal(running_var, torch.full((4,), 2.0))
        assert not torch.equal(weight, model[1].weight.detach())


def test_input_noise_additive_default_scale_is_fraction_of_each_examples_range():
    model = Recorder(d=4000, out=2)
    x = torch.stack([torch.rand(4000), 10 * torch.rand(4000) - 3])  # ranges ~1 and ~10
    m = 3
    FusionGrad(Saliency(model)).attribute(x, target=0, n=1, m=m, std=0.0)
    (rows,) = model.rows
    assert rows.shape == (2 * m, 4000)
    noise = rows - x.repeat_interleave(m, dim=0)  # example-major, like NoiseTunnel
    for e in range(2):
        expected = SG_STD_FRACTION * (x[e].max() - x[e].min()).item()
        for j in range(m):
            sample = noise[e * m + j]
            assert abs(sample.mean().item()) < 0.1 * expected
            assert abs(sample.std().item() / expected - 1) < 0.05
    assert not torch.equal(noise[0], noise[1])


def test_input_noise_absolute_and_multiplicative():
    model = Recorder(d=4000, out=2)
    x = torch.rand(2, 4000) + 1.0
    FusionGrad(Saliency(model)).attribute(x, target=0, n=1, m=2, std=0.0, sg_std=0.3, sg_mean=0.1)
    noise = model.rows[0] - x.repeat_interleave(2, dim=0)
    assert abs(noise.mean().item() - 0.1) < 0.02 and abs(noise.std().item() - 0.3) < 0.02
    model.rows.clear()
    FusionGrad(Saliency(model)).attribute(
        x, target=0, n=1, m=2, std=0.0, sg_additive_noise=False, sg_std=0.1
    )
    ratio = model.rows[0] / x.repeat_interleave(2, dim=0)
    assert abs(ratio.mean().item() - 1.0) < 0.01 and abs(ratio.std().item() - 0.1) < 0.01
    model.rows.clear()
    FusionGrad(Saliency(model)).attribute(x, target=0, n=1, m=1, std=0.0, sg_additive_noise=False)
    ratio = model.rows[0] / x
    assert abs(ratio.std().item() - SG_STD_FRACTION) < 0.01


def test_result_is_the_mean_over_all_samples():
    """With a linear model Saliency is the weight row, so FusionGrad is the mean noisy row."""
    model = Recorder(d=20, out=3)
    x = torch.rand(2, 20)
    attr = FusionGrad(Saliency(model)).attribute(x, target=1, n=4, m=3, abs=False)
    expected = torch.stack([w[1] for w in model.weights]).mean(0).expand(2, 20)
    torch.testing.assert_close(attr, expected)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_result_and_different_seed_different_result():
    model = conv_net().eval()
    fg = FusionGrad(Saliency(model))
    results = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        results.append(fg.attribute(images(), target=1, n=3, m=2))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])
    a = fg.attribute(images(), target=1, n=3, m=2, generator=torch.Generator().manual_seed(3))
    b = fg.attribute(images(), target=1, n=3, m=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- batching


def test_chunk_plan_covers_every_sample_within_batch_size():
    for num in (1, 3, 7):
        for m in (1, 4, 10):
            for batch_size in (None, 1, 2, 3, 5, 8, 30, 1000):
                plan = _chunk_plan(num, m, batch_size)
                counts = [0] * num
                for e0, e1, reps in plan:
                    assert batch_size is None or (e1 - e0) * reps <= batch_size
                    for e in range(e0, e1):
                        counts[e] += reps
                assert counts == [m] * num
    assert _chunk_plan(3, 4, None) == [(0, 3, 4)]


def test_batch_size_bounds_rows_per_call_and_progress_counts_calls(capsys):
    model = Recorder(d=8, out=2)
    x = torch.rand(3, 8)
    attr = FusionGrad(Saliency(model)).attribute(
        x, target=0, n=2, m=5, batch_size=7, show_progress=True
    )
    assert attr.shape == x.shape
    # 7 rows hold 2 samples of 3 examples: calls of 6, 6, 3 rows per weight sample
    assert [r.shape[0] for r in model.rows] == [6, 6, 3] * 2
    assert "6/6" in capsys.readouterr().err


# ----------------------------------------------------------------------------- composition


def test_noise_tunnel_around_fusion_grad():
    model = conv_net().eval()
    snap = snapshot(model)
    x = images()
    nt = NoiseTunnel(FusionGrad(Saliency(model)))
    attr = nt.attribute(x, nt_samples=3, stdevs=0.1, target=torch.tensor([0, 1, 2]), n=2, m=2)
    assert attr.shape == x.shape and torch.isfinite(attr).all()
    noiseless = nt.attribute(x, nt_samples=2, stdevs=0.0, target=1, **NOISELESS)
    torch.testing.assert_close(noiseless, Saliency(model).attribute(x, target=1))
    assert_untouched(model, snap)


def test_fusion_grad_around_noise_tunnel():
    model = conv_net().eval()
    snap = snapshot(model)
    x = images()
    fg = FusionGrad(NoiseTunnel(Saliency(model)))
    attr = fg.attribute(x, nt_samples=2, stdevs=0.1, target=torch.tensor([0, 1, 2]), n=2, m=2)
    assert attr.shape == x.shape and torch.isfinite(attr).all()
    noiseless = fg.attribute(x, nt_samples=2, stdevs=0.0, target=1, **NOISELESS)
    torch.testing.assert_close(noiseless, Saliency(model).attribute(x, target=1))
    assert_untouched(model, snap)


def test_tiled_occlusion_inner_method():
    try:
        from extra_attrib.tiled_occlusion import TiledOcclusion
    except ImportError:  # pragma: no cover - module written separately
        pytest.skip("extra_attrib.tiled_occlusion not available")
    model = conv_net().eval()
    snap = snapshot(model)
    x = images()
    # One engine named: "auto" times both engines on each call, and their maps agree only to
    # float rounding, so bit-equality needs the same engine on both sides.
    tiling = {"k": 2, "window": (3, 2, 2), "engine": "dense"}
    ref = TiledOcclusion(model).attribute(x, target=1, **tiling)
    fg = FusionGrad(TiledOcclusion(model))
    assert torch.equal(fg.attribute(x, target=1, **tiling, **NOISELESS), ref)
    attr = fg.attribute(x, target=torch.tensor([0, 1, 2]), **tiling, n=2, m=2)
    assert attr.shape == x.shape and not torch.equal(attr, ref)
    assert_untouched(model, snap)


# ----------------------------------------------------------------------------- dtype, device


def test_float64_stays_float64():
    model = conv_net().double().eval()
    x = images(dtype=torch.float64)
    for factory, kw in [(Saliency, {}), (Occlusion, {"sliding_window_shapes": (3, 2, 2)})]:
        attr = FusionGrad(factory(model)).attribute(x, target=0, n=2, m=2, **kw)
        assert attr.dtype == torch.float64 and attr.shape == x.shape


def test_input_not_modified_and_requires_grad_kept():
    model = conv_net().eval()
    x = images()
    x_copy = x.clone()
    FusionGrad(Saliency(model)).attribute(x, target=0, n=2, m=2)
    assert torch.equal(x, x_copy) and not x.requires_grad
    FusionGrad(Saliency(model)).attribute(x, target=0, **NOISELESS)
    assert torch.equal(x, x_copy) and not x.requires_grad


def test_integer_inputs_allowed_with_weight_noise_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    fg = FusionGrad(FeatureAblation(model))
    attr = fg.attribute(tokens, target=0, n=2, m=1, sg_std=0.0, baselines=0)
    assert attr.shape == tokens.shape
    with pytest.raises(ValueError, match="sg_std=0"):
        fg.attribute(tokens, target=0, n=2, m=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_kept():  # pragma: no cover - no GPU on CI
    model = conv_net().cuda().eval()
    x = images().cuda()
    attr = FusionGrad(Saliency(model)).attribute(x, target=0, n=2, m=2)
    assert attr.device == x.device and attr.dtype == x.dtype


# ----------------------------------------------------------------------------- API, errors


def test_properties_follow_wrapped_method():
    model = conv_net()
    assert FusionGrad(Saliency(model)).multiplies_by_inputs is False
    assert FusionGrad(InputXGradient(model)).multiplies_by_inputs is True
    assert FusionGrad(IntegratedGradients(model)).has_convergence_delta() is False
    assert FusionGrad(Saliency(model)).model is model
    assert not isinstance(FusionGrad(Saliency(model)), GradientAttribution)


def test_constructor_errors():
    model = conv_net()
    with pytest.raises(TypeError, match="attribution_method"):
        FusionGrad(model)
    with pytest.raises(TypeError, match="model=None.*not an nn.Module"):
        FusionGrad(Saliency(lambda x: model(x)))
    with pytest.raises(TypeError, match="model must be"):
        FusionGrad(Saliency(model), model="net")


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        ({"n": 0}, ValueError, "n=0 must be >= 1"),
        ({"m": -2}, ValueError, "m=-2 must be >= 1"),
        ({"n": 2.0}, TypeError, "n=2.0 must be an int"),
        ({"m": True}, TypeError, "m=True must be an int"),
        ({"std": -0.1}, ValueError, "std=-0.1 must be >= 0"),
        ({"std": float("nan")}, ValueError, "std=nan must be finite"),
        ({"sg_std": -1.0}, ValueError, "sg_std=-1.0 must be >= 0"),
        ({"sg_std": float("inf")}, ValueError, "sg_std=inf must be finite"),
        ({"mean": "1"}, TypeError, "mean='1' must be a real number"),
        ({"sg_mean": float("nan")}, ValueError, "sg_mean=nan must be finite"),
        ({"batch_size": 0}, ValueError, "batch_size=0 must be >= 1"),
        ({"additive_noise": 1}, TypeError, "additive_noise=1 must be a bool"),
        ({"generator": 3}, TypeError, "generator must be"),
        ({"target": [0, 1]}, ValueError, "target list must have one entry per example"),
        ({"target": torch.tensor([0, 1])}, ValueError, "target tensor"),
        ({"return_convergence_delta": True}, ValueError, "return_convergence_delta"),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    model = conv_net()
    snap = snapshot(model)
    fg = FusionGrad(IntegratedGradients(model))
    kwargs = {"target": 0, **kwargs}
    with pytest.raises(error, match=pattern):
        fg.attribute(images(), **kwargs)
    assert_untouched(model, snap)


def test_bad_inputs():
    fg = FusionGrad(Saliency(conv_net()))
    with pytest.raises(ValueError, match="non-empty tuple"):
        fg.attribute((), target=0)
    with pytest.raises(TypeError, match=r"inputs\[0\] must be a torch.Tensor"):
        fg.attribute([1.0, 2.0], target=0)
    with pytest.raises(ValueError, match="same batch size"):
        fg.attribute((images(3), images(2)), target=0)
    with pytest.raises(ValueError, match="non-empty batch"):
        fg.attribute(torch.rand(0, 3, 6, 6), target=0)
    with pytest.raises(TypeError, match="target was given twice"):
        fg.attribute(images(), 0, target=1)
    with pytest.raises(TypeError, match="do not fit Saliency.attribute"):
        fg.attribute(images(), 0, True, None, "extra")


def test_no_warnings_about_gradient_requirements():
    model = conv_net().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FusionGrad(Saliency(model)).attribute(images(), target=0, n=1, m=2)


# ------------------------------------------------------------------ per-example arguments (#9)


class OwnIntegratedGradients(IntegratedGradients):
    """A method defined outside Captum: FusionGrad cannot know how it reads baselines."""


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_distribution_baselines_are_never_split():
    # DeepLiftShap's baselines are a distribution shared by all examples: batch_size must not cut
    # them along with the examples, even when they have as many rows as the inputs
    from captum.attr import DeepLiftShap

    model = mlp()
    x, bg = torch.rand(4, 6), torch.rand(4, 6)
    plain = DeepLiftShap(model).attribute(x, baselines=bg, target=1)
    for batch_size in (None, 1, 2, 3):
        fused = FusionGrad(DeepLiftShap(model)).attribute(
            x, baselines=bg, target=1, n=1, m=1, std=0, sg_std=0, batch_size=batch_size
        )
        torch.testing.assert_close(fused, plain)


def test_baseline_kind_looks_through_wrappers():
    from captum.attr import DeepLiftShap, GradientShap

    from extra_attrib._fusion_batches import baseline_kind

    model = mlp()
    assert baseline_kind(NoiseTunnel(DeepLiftShap(model))) == "distribution"
    assert baseline_kind(FusionGrad(GradientShap(model))) == "distribution"
    assert baseline_kind(NoiseTunnel(IntegratedGradients(model))) == "per-example"
    assert baseline_kind(OwnIntegratedGradients(model)) == "unknown"


def test_unknown_method_with_example_sized_baselines_refuses_a_split():
    model = mlp()
    x, b = torch.rand(4, 6), torch.rand(4, 6)
    fg = FusionGrad(OwnIntegratedGradients(model))
    with pytest.raises(ValueError, match="baselines has 4 rows.*batch_size"):
        fg.attribute(x, baselines=b, target=0, n=1, m=2, batch_size=2)
    whole = fg.attribute(x, baselines=b, target=0, n=1, m=1, std=0, sg_std=0, batch_size=4)
    torch.testing.assert_close(
        whole, IntegratedGradients(model).attribute(x, baselines=b, target=0)
    )


def test_known_method_per_example_baselines_are_split_with_the_examples():
    model = mlp()
    x, b = torch.rand(4, 6), torch.rand(4, 6)
    fused = FusionGrad(IntegratedGradients(model)).attribute(
        x, baselines=b, target=0, n=1, m=1, std=0, sg_std=0, batch_size=1
    )
    torch.testing.assert_close(
        fused, IntegratedGradients(model).attribute(x, baselines=b, target=0)
    )


# ------------------------------------------------------------------- weight noise must land (#9)


def test_model_not_run_by_the_wrapped_method_raises():
    model, other = mlp(), mlp()
    x = torch.rand(2, 6)
    with pytest.raises(ValueError, match="never used the parameters"):
        FusionGrad(Saliency(model), model=other).attribute(x, target=0, n=2, m=1)
    # without weight noise there is nothing to lose
    FusionGrad(Saliency(model), model=other).attribute(x, target=0, n=1, m=2, std=0)


def test_weight_noise_reaches_an_lstm():
    torch.manual_seed(0)
    lstm = nn.LSTM(2, 4, batch_first=True)
    head = nn.Linear(4, 3)

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = lstm, head

        def forward(self, x):
            return self.head(self.lstm(x.reshape(x.shape[0], 3, 2))[0][:, -1])

    model = Recurrent()
    x = torch.rand(2, 6)
    plain = Saliency(model).attribute(x, target=0, abs=False)
    noisy = FusionGrad(Saliency(model)).attribute(x, target=0, n=2, m=1, sg_std=0, abs=False)
    assert not torch.allclose(plain, noisy)
    (lstm_only,) = [FusionGrad(Saliency(model), model=lstm)]
    assert not torch.allclose(
        plain, lstm_only.attribute(x, target=0, n=2, m=1, sg_std=0, abs=False)
    )
