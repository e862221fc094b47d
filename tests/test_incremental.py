"""Incremental occlusion equals the dense engine; its geometry equals brute force."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from extra_attrib import TiledOcclusion
from extra_attrib._incremental import (
    Patch,
    choose_engine,
    gather,
    materialise,
    output_box,
    program_for,
)
from tests.models import init_bn

# The test machine is shared: one thread keeps the model-sized tests fast and steady.
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Geometry and the gather primitive, against definitions
# ---------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(0, 3),
    st.integers(1, 6),
    st.integers(5, 20),
    st.data(),
)
def test_output_box_holds_every_changed_output(kernel, stride, dilation, pad, length, size, data):
    length = min(length, size)
    pad = min(pad, (kernel - 1) * dilation)  # as torch requires: padding at most the reach
    out = (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        return
    start = data.draw(st.integers(0, size - length))
    got_start, got_size = output_box(
        torch.tensor([start]), length, kernel, stride, dilation, pad, out
    )
    lo = int(got_start[0])
    assert 0 <= lo and lo + got_size <= out
    for o in range(out):
        reads = {o * stride - pad + j * dilation for j in range(kernel)}
        if reads & set(range(start, start + length)):
            assert lo <= o < lo + got_size, (o, lo, got_size)


def _random_patch(n, c, full, b, dtype=torch.float64):
    clean = torch.randn(n, c, *full, dtype=dtype)
    size = tuple(torch.randint(1, f + 1, ()).item() for f in full)
    starts = torch.stack([torch.randint(0, f - s + 1, (b,)) for f, s in zip(full, size)], 1)
    values = torch.randn(b * n, c, *size, dtype=dtype)
    return Patch(values, starts, size, clean)


def test_materialise_writes_each_window_box():
    p = _random_patch(2, 3, (6, 7), 4)
    full = materialise(p).view(4, 2, 3, 6, 7)
    for w in range(4):
        expected = p.clean.clone()
        (a, c), (h, wd) = p.starts[w].tolist(), p.size
        expected[:, :, a : a + h, c : c + wd] = p.values.view(4, 2, 3, h, wd)[w]
        torch.testing.assert_close(full[w], expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("full", [(9,), (6, 7), (4, 5, 3)])
def test_gather_equals_padding_the_materialised_map(mode, full):
    d = len(full)
    p = _random_patch(2, 3, full, 5)
    pad = [min(2, f - 1) for f in full]
    dense = materialise(p)  # (B*N, C, *full)
    pads = []
    for q in reversed(pad):
        pads += [q, q]
    if mode == "constant":
        padded = F.pad(dense, pads, value=-7.0)
    else:
        padded = F.pad(dense, pads, mode=mode)
    size = tuple(f + q for f, q in zip(full, pad))
    starts = torch.stack(
        [torch.randint(-q, f + q - s + 1, (5,)) for f, q, s in zip(full, pad, size)], 1
    )
    got = gather(p, starts, size, mode, -7.0).view(5, 2, 3, *size)
    padded = padded.view(5, 2, 3, *padded.shape[2:])
    for w in range(5):
        region = tuple(slice(s + q, s + q + n) for s, q, n in zip(starts[w].tolist(), pad, size))
        torch.testing.assert_close(
            got[w], padded[(w, slice(None), slice(None), *region)], rtol=0, atol=0
        )
    assert d == starts.shape[1]


@pytest.mark.parametrize("seed", range(6))
def test_constant_gather_of_any_box_equals_the_definition(seed):
    """Boxes larger than the map, wholly outside it, or the patch's own boxes (#20's copy path)."""
    gen = torch.Generator().manual_seed(seed)
    full = tuple(int(f) for f in torch.randint(1, 8, (1 + seed % 3,), generator=gen))
    p = _random_patch(2, 3, full, 4)
    dense = materialise(p).view(4, 2, 3, *full)
    for own in (False, True):
        if own:
            starts, size = p.starts.clone(), p.size
        else:
            size = tuple(int(torch.randint(1, f + 5, (), generator=gen)) for f in full)
            starts = torch.stack(
                [torch.randint(-n - 2, f + 2, (4,), generator=gen) for f, n in zip(full, size)], 1
            )
        got = gather(p, starts, size, "constant", -3.0).view(4, 2, 3, *size)
        for w in range(4):
            expected = torch.full((2, 3, *size), -3.0, dtype=torch.float64)
            into, src = [], []
            for s, n, f in zip(starts[w].tolist(), size, full):
                lo, hi = max(s, 0), min(s + n, f)
                into.append(slice(lo - s, max(hi - s, lo - s)))
                src.append(slice(lo, max(hi, lo)))
            expected[(slice(None), slice(None), *into)] = dense[w][(slice(None), slice(None), *src)]
            torch.testing.assert_close(got[w], expected, rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(4))
def test_the_accelerator_gather_equals_the_cpu_copies(seed):
    """CUDA gathers by index arithmetic; the CPU by box copies. Both, on the CPU, agree."""
    from extra_attrib._incremental._boxes import _gather_index, _gather_slices

    gen = torch.Generator().manual_seed(100 + seed)
    full = tuple(int(f) for f in torch.randint(2, 9, (1 + seed % 3,), generator=gen))
    p = _random_patch(2, 3, full, 5)
    size = tuple(int(torch.randint(1, f + 5, (), generator=gen)) for f in full)
    starts = torch.stack(
        [torch.randint(-n - 1, f + 1, (5,), generator=gen) for f, n in zip(full, size)], 1
    )
    for fill in (0.0, -math.inf):
        index = _gather_index(p, p.clean, starts, size, "constant", fill)
        copies = _gather_slices(p, p.clean, starts, size, fill)
        torch.testing.assert_close(index, copies, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Whole models: incremental equals dense
# ---------------------------------------------------------------------------------------------


def _both(model, x, window, k, targets=(1,), rtol=1e-4, **kwargs):
    model.eval()
    tiled = TiledOcclusion(model)
    dense = tiled.attribute_multi(x, list(targets), window=window, k=k, engine="dense", **kwargs)
    assert tiled.last_engine == "dense"
    incr = tiled.attribute_multi(
        x, list(targets), window=window, k=k, engine="incremental", **kwargs
    )
    assert tiled.last_engine == "incremental", tiled.last_engine_reason
    # Attributions are differences of scores: their rounding error scales with the scores.
    with torch.no_grad():
        out_scale = model(x).abs().max().item()
    atol = rtol * dense.abs().max().item() + 10 * torch.finfo(x.dtype).eps * out_scale
    torch.testing.assert_close(incr, dense, rtol=rtol, atol=atol)
    return tiled


class Zoo2d(nn.Module):
    """Every locally handled layer: padding modes, strides, dilation, groups, pools, merges."""

    def __init__(self, classes=4):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, padding_mode="replicate")
        self.c = nn.Conv2d(6, 6, (3, 1), padding=(1, 0), padding_mode="circular", groups=3)
        self.d = nn.Conv2d(8, 8, 3, padding="same", dilation=2)
        self.pad = nn.ZeroPad2d((0, 1, 1, 0))
        self.e = nn.Conv2d(8, 6, 2, stride=1)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1)
        self.branch = nn.Conv2d(6, 4, 1)
        self.head = nn.Linear(10, classes)
        self.acts = nn.ModuleList(
            [
                nn.ReLU(inplace=True),
                nn.SiLU(),
                nn.Hardswish(),
                nn.LeakyReLU(0.2),
                nn.GELU(),
                nn.ReLU6(inplace=True),
            ]
        )

    def forward(self, x):
        x = self.acts[0](self.bn(self.a(x)))
        x = self.acts[1](self.b(x))
        y = self.acts[3](self.d(x)) * torch.sigmoid(x)
        y = self.acts[4](self.e(self.pad(y)))
        y = self.pool(y)
        y = y + self.acts[2](self.c(y))
        z = self.avg(y)
        y = torch.cat([F.conv2d(y, self.branch.weight, self.branch.bias), z], 1)
        y = self.acts[5](y)
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_layer_zoo_2d_float64_every_k(k):
    model = Zoo2d().double()
    x = torch.randn(2, 3, 40, 36, dtype=torch.float64)
    _both(
        model,
        x,
        window=(3, 4 * k, 4 * k) if k < 4 else (3, 8, 8),
        k=(1, k, k) if k < 4 else (1, 4, 4),
        targets=(0, 2),
        rtol=1e-10,
        perturbations_per_eval=3,
    )


def test_layer_zoo_2d_float32_channel_windows_and_tensor_baseline():
    model = Zoo2d()
    x = torch.randn(3, 3, 33, 27)
    baseline = torch.randn(3, 1, 1)
    _both(
        model,
        x,
        window=(3, 6, 6),
        k=(3, 2, 2),
        baselines=baseline,
        targets=(1, 3),
        perturbations_per_eval=5,
    )


class Net1d(nn.Module):
    """A 1D CNN over a time series."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(2, 8, 5, padding=2),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(8, 8, 3, dilation=2, padding=2, padding_mode="reflect"),
            nn.Tanh(),
            nn.AvgPool1d(3, stride=2),
            nn.Conv1d(8, 4, 3, stride=2),
        )
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.body(x).mean(-1))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_1d_cnn(k):
    x = torch.randn(2, 2, 97, dtype=torch.float64)
    _both(Net1d().double(), x, window=8, k=(1, k), targets=(0, 2), rtol=1e-10)


def _net3d(channels=(4, 6, 8)):
    layers, c_in = [], 1
    for c in channels:
        layers += [nn.Conv3d(c_in, c, 3, padding=1), nn.BatchNorm3d(c), nn.ReLU(), nn.MaxPool3d(2)]
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(c_in, 2))


@pytest.mark.parametrize("k", [1, 2])
def test_3d_cnn_over_a_volume(k):
    x = torch.randn(2, 1, 18, 16, 15)
    _both(_net3d(), x, window=(1, 8, 8, 8), k=(1, k, k, k), targets=(0, 1))


def _small_head(model):
    # VGG's 25088x4096 classifier would dominate the test's time; the head runs densely anyway.
    if isinstance(model, torchvision.models.VGG):
        model.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 5)
        )
    return model


@pytest.mark.parametrize(
    "name,size,window",
    [
        ("vgg11", 32, 16),
        ("resnet18", 48, 16),
        ("mobilenet_v2", 48, 16),
    ],
)
def test_torchvision_models(name, size, window):
    model = _small_head(init_bn(getattr(torchvision.models, name)(num_classes=5)))
    x = torch.randn(2, 3, size, size)
    _both(model, x, window=(3, window, window), k=(1, 2, 2), targets=(0, 4))


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "vgg16"])
def test_larger_torchvision_models(name):
    model = _small_head(init_bn(getattr(torchvision.models, name)(num_classes=3)))
    x = torch.randn(1, 3, 32, 32)
    _both(model, x, window=(3, 16, 16), k=(1, 2, 2), targets=(0,))


def test_efficientnet_lite0_demo_model():
    pytest.importorskip("efficientnet_lite_pytorch")
    from extra_attrib.imagenet import load_efficientnet_lite0

    model = load_efficientnet_lite0()
    x = torch.randn(1, 3, 64, 64)
    _both(model, x, window=(3, 32, 32), k=(1, 2, 2), targets=(281, 285))


def test_attribute_and_perturbations_per_eval():
    model = init_bn(torchvision.models.resnet18(num_classes=5)).eval()
    x = torch.randn(2, 3, 32, 32)
    tiled = TiledOcclusion(model)
    expected = tiled.attribute(
        x, target=torch.tensor([1, 3]), window=(3, 16, 16), k=(1, 4, 4), engine="dense"
    )
    for ppe in (5,):
        got = tiled.attribute(
            x,
            target=torch.tensor([1, 3]),
            window=(3, 16, 16),
            k=(1, 4, 4),
            engine="incremental",
            perturbations_per_eval=ppe,
        )
        torch.testing.assert_close(
            got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item()
        )


# ---------------------------------------------------------------------------------------------
# Engine choice
# ---------------------------------------------------------------------------------------------


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.conv(x).mean((2, 3))
        return -self.conv(x).mean((2, 3))


class TinyTransformer(nn.Module):
    """Patch embedding, then self-attention over the patches."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        mixed, _ = self.attn(tokens, tokens, tokens)
        return self.head(mixed.mean(1))


@pytest.mark.parametrize(
    "model,match",
    [
        (Untraceable(), "cannot trace"),
        # transpose is known now (#20); the attention module is not
        (TinyTransformer(), "MultiheadAttention"),
    ],
)
def test_auto_falls_back_and_incremental_names_the_problem(model, match):
    x = torch.randn(1, 3 if isinstance(model, TinyTransformer) else 1, 16, 16)
    tiled = TiledOcclusion(model.eval())
    auto = tiled.attribute(x, target=0, window=8)
    assert tiled.last_engine == "dense"
    assert match in tiled.last_engine_reason
    dense = tiled.attribute(x, target=0, window=8, engine="dense")
    torch.testing.assert_close(auto, dense)
    with pytest.raises(ValueError, match=match):
        tiled.attribute(x, target=0, window=8, engine="incremental")


def test_training_mode_and_extra_arguments_are_refused_with_reasons():
    model = _net3d().train()
    x = torch.randn(2, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="training mode"):
        choose_engine("incremental", model, (x,), (torch.tensor(0.0),), ())
    model.eval()
    with pytest.raises(ValueError, match="additional_forward_args"):
        choose_engine("incremental", model, (x,), (torch.tensor(0.0),), (1.0,))
    choice = choose_engine("auto", model, (x, x), (torch.tensor(0.0),) * 2, ())
    # A model of one input given two tensors: several inputs are possible now (#20), but its
    # trace has one placeholder.
    assert choice.engine == "dense" and "one placeholder per tensor" in choice.reason


def test_auto_picks_incremental_only_when_it_pays():
    big = _net3d((8, 16, 16))
    tiled = TiledOcclusion(big.eval())
    tiled.attribute(
        torch.randn(1, 1, 32, 32, 32), target=0, window=(1, 8, 8, 8), perturbations_per_eval=64
    )
    assert tiled.last_engine == "incremental", tiled.last_engine_reason
    assert "measured" in tiled.last_engine_reason  # timed on the sweep's windows (#20)
    # A window covering the whole input changes every activation: nothing to gain.
    tiled.attribute(torch.randn(1, 1, 8, 8, 8), target=0, window=(1, 8, 8, 8))
    assert tiled.last_engine == "dense"
    assert "cost model" in tiled.last_engine_reason


def test_bad_engine_is_named():
    tiled = TiledOcclusion(_net3d().eval())
    with pytest.raises(ValueError, match="engine='fast'"):
        tiled.attribute(torch.randn(1, 1, 8, 8, 8), target=0, window=4, engine="fast")


def test_trace_is_cached_per_shape_and_model_left_untouched():
    model = init_bn(torchvision.models.resnet18(num_classes=5)).eval()
    x = torch.randn(1, 3, 32, 32)
    assert program_for(model, x) is program_for(model, x.clone())
    assert program_for(model, x) is not program_for(model, torch.randn(1, 3, 40, 40))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    TiledOcclusion(model).attribute(
        x, target=0, window=(3, 16, 16), k=(1, 2, 2), engine="incremental"
    )
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not model.training


def test_nan_inf_baseline_stays_in_window():
    model = Net1d().double().eval()
    x = torch.randn(1, 2, 40, dtype=torch.float64)
    tiled = TiledOcclusion(model)
    dense = tiled.attribute(x, target=0, window=8, k=(1, 2), baselines=math.inf, engine="dense")
    incr = tiled.attribute(
        x, target=0, window=8, k=(1, 2), baselines=math.inf, engine="incremental"
    )
    torch.testing.assert_close(incr, dense, equal_nan=True)


class Operands(nn.Module):
    """Scalars on either side, per-channel parameters, and a spatial (non-local) constant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.randn(4, 1, 1, dtype=torch.float64))
        self.position = nn.Parameter(torch.randn(1, 4, 24, 20, dtype=torch.float64))
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = 1.0 - torch.sigmoid(self.conv(x))
        y = torch.clamp(y * self.scale + 0.5, -1.0, 1.0)
        y = self.conv2(y / 2.0)
        y = y + self.position  # differs per position: this add runs densely
        return self.head(y.amax((2, 3)))


def test_scalar_channel_and_spatial_operands():
    x = torch.randn(2, 2, 24, 20, dtype=torch.float64)
    _both(
        Operands().double(),
        x,
        window=(2, 6, 6),
        k=(1, 2, 3),
        targets=(0, 1),
        rtol=1e-10,
        perturbations_per_eval=4,
    )


def test_replaced_layer_retraces_and_train_mode_is_refused_after_caching():
    model = _net3d().eval()
    x = torch.randn(1, 1, 8, 8, 8)
    first = program_for(model, x)
    model[2] = nn.Tanh()
    assert program_for(model, x) is not first
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        program_for(model, x)


class FunctionalDropout(nn.Module):
    def __init__(self, training_flag):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.training_flag = training_flag

    def forward(self, x):
        y = self.conv(x)
        # F.dropout defaults to training=True, whatever model.eval() says.
        y = F.dropout(y, 0.5, self.training) if self.training_flag else F.dropout(y, 0.5)
        return y.mean((2, 3))


def test_functional_dropout_follows_its_training_argument():
    x = torch.randn(1, 1, 8, 8)
    program_for(FunctionalDropout(True).eval(), x)
    with pytest.raises(ValueError, match="dropout in training mode"):
        program_for(FunctionalDropout(False).eval(), x)


def test_forward_hooks_fall_back_to_dense():
    """A traced graph would bypass hooks: a hooked model runs densely and says why."""
    model = _net3d().eval()
    x = torch.randn(1, 1, 8, 8, 8)
    handle = model.register_forward_hook(lambda _m, _i, out: out * 2)
    try:
        tiled = TiledOcclusion(model)
        auto = tiled.attribute(x, target=0, window=4)
        assert tiled.last_engine == "dense" and "forward hook" in tiled.last_engine_reason
        with pytest.raises(ValueError, match="forward hook"):
            tiled.attribute(x, target=0, window=4, engine="incremental")
    finally:
        handle.remove()
    plain = TiledOcclusion(model).attribute(x, target=0, window=4, engine="dense")
    torch.testing.assert_close(auto, 2 * plain)


class Recorder(nn.Module):
    """Keeps the first input it sees in a plain attribute: tracing must not leave a Proxy."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(2, 2)
        self.first = None

    def forward(self, x):
        if self.first is None:
            self.first = x
        return self.head(self.conv(x).mean((2, 3)))


def test_tracing_leaves_no_trace_in_module_attributes():
    model = Recorder().eval()
    x = torch.randn(1, 1, 8, 8)
    program_for(model, x)
    assert model.first is None
    TiledOcclusion(model).attribute(x, target=0, window=4, engine="incremental")
    assert isinstance(model.first, torch.Tensor)
