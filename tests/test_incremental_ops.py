"""Operations of today's CNNs in the incremental engine (#20): each equals the dense engine in
float64 and stays local (the op itself never runs densely)."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from extra_attrib import TiledOcclusion
from extra_attrib._incremental import _program, _rules, _rules_moved
from tests.models import init_bn

# One thread: the engines' chunk sizes and timings, as a user on one core would see them.
pytestmark = pytest.mark.usefixtures("one_thread")


def _both(model, x, window, k=1, targets=(0,), monkeypatch=None, **kwargs):
    """Dense and incremental attributions agree to 1e-9 relative (float64); returns the names
    of the nodes that ran densely in the incremental sweep."""
    model = init_bn(model).eval().double()
    x = x.double()
    tiled = TiledOcclusion(model)
    dense = tiled.attribute_multi(x, list(targets), window=window, k=k, engine="dense", **kwargs)
    ran_dense = []
    if monkeypatch is not None:
        original = _rules._run_dense

        def spy(program, step, *args):
            ran_dense.append(step.node.name)
            return original(program, step, *args)

        monkeypatch.setattr(_rules, "_run_dense", spy)
        monkeypatch.setattr(_rules_moved, "_run_dense", spy)
        monkeypatch.setitem(_program._HANDLERS, "dense", spy)
    incr = tiled.attribute_multi(
        x, list(targets), window=window, k=k, engine="incremental", **kwargs
    )
    assert tiled.last_engine == "incremental", tiled.last_engine_reason
    # Relative to the map, or to the scores where the map is far smaller than them (a random
    # EfficientNet at 32² gives maps of 1e-13 from scores of 1e-1: their rounding, 1e-15, depends
    # on the chunk sizes the tuner picks and on the batch of the clean pass, which the
    # self-check's pass gives; it is no engine error).
    with torch.no_grad():
        outputs = model(x).abs().max().item()
    scale = max(dense.abs().max().item(), 1e-5 * outputs)
    torch.testing.assert_close(incr, dense, rtol=1e-9, atol=1e-9 * scale)
    return ran_dense


def _head(channels, classes=3):
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


# ---------------------------------------------------------------------------------------------
# Static shape checks, identities in eval, norm-activation layers
# ---------------------------------------------------------------------------------------------


class ShapeChecked(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = _head(6)

    def forward(self, x):
        y = self.conv(x)
        torch._assert(y.ndim == 4, "expected 4D input")
        torch._assert((y.dim() == 4) & (y.shape[1] == 6), "six channels")
        torch._assert(y.dtype == x.dtype, "same dtype")
        return self.head(F.relu(y))


def test_static_shape_checks_are_evaluated_on_known_shapes(monkeypatch):
    ran_dense = _both(ShapeChecked(), torch.randn(2, 3, 24, 24), (3, 8, 8), 2, (0, 2), monkeypatch)
    # Only the head mixes the map; the checks never materialise the patch.
    assert not any(n.startswith(("conv", "relu", "getattr", "dim")) for n in ran_dense), ran_dense


def test_timm_norm_activation_layers_are_pointwise(monkeypatch):
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        BatchNormAct2d(8, act_layer=nn.SiLU),
        nn.Conv2d(8, 8, 3, padding=1),
        BatchNormAct2d(8, act_layer=nn.ReLU, drop_layer=nn.Dropout),
        _head(8),
    )
    ran_dense = _both(model, torch.randn(1, 3, 24, 24), (3, 6, 6), 1, (1,), monkeypatch)
    assert not any("batch_norm" in n for n in ran_dense), ran_dense
    assert timm is not None


class StochasticDepthNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.sd = torchvision.ops.StochasticDepth(0.3, "row")
        self.head = _head(3)

    def forward(self, x):
        y = x + self.sd(self.conv(x))
        y = y + torchvision.ops.stochastic_depth(self.conv(y), 0.2, "batch", training=False)
        return self.head(y)


def test_stochastic_depth_in_eval_is_the_identity(monkeypatch):
    ran_dense = _both(
        StochasticDepthNet(), torch.randn(1, 3, 20, 20), (3, 5, 5), 1, (0,), monkeypatch
    )
    assert not any("stochastic_depth" in n for n in ran_dense), ran_dense


def test_stochastic_depth_in_training_is_refused_with_where():
    model = StochasticDepthNet().eval()
    model.sd.train()
    with pytest.raises(ValueError, match="stochastic_depth"):
        TiledOcclusion(model).attribute(
            torch.randn(1, 3, 20, 20), target=0, window=5, engine="incremental"
        )


# ---------------------------------------------------------------------------------------------
# Rearranged channels: ConvNeXt's channels-last block, channel shuffle, split, repeat
# ---------------------------------------------------------------------------------------------


class ConvNeXtBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.fc1 = nn.Linear(c, 4 * c)
        self.fc2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.head = _head(c)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))
        y = self.gamma * y
        y = x + y.permute(0, 3, 1, 2)
        z = F.layer_norm(y.permute(0, 2, 3, 1), (y.shape[1],)).permute(0, 3, 1, 2)
        return self.head(z)


def test_channels_last_norm_and_mlp_stay_local(monkeypatch):
    x = torch.randn(2, 8, 28, 28)
    ran_dense = _both(ConvNeXtBlock(), x, (8, 7, 7), 1, (0, 2), monkeypatch)
    assert not any(n.startswith(("permute", "norm", "fc", "layer_norm")) for n in ran_dense), (
        ran_dense
    )


def _shuffle(x, groups):
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, -1, h, w)


class ShuffleSplit(nn.Module):
    """Channel shuffle, split/chunk along channels, channel slices, unsqueeze, repeat."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.head = _head(16)

    def forward(self, x):
        y = _shuffle(self.a(x), 2)
        left, right = y.chunk(2, dim=1)
        parts = torch.split(y, [4, 4], 1)
        y = torch.cat([self.b(left) + parts[1], right], 1)
        y = y * self.scale.expand_as(y)
        y = y[:, :8]
        y = y.unsqueeze(1).reshape(y.size(0), 8, y.size(2), y.size(3))
        return self.head(y.repeat(1, 2, 1, 1))


def test_channel_shuffle_split_slices_and_repeat_stay_local(monkeypatch):
    ran_dense = _both(ShuffleSplit(), torch.randn(2, 3, 24, 20), (3, 6, 4), 2, (1,), monkeypatch)
    local = ("view", "transpose", "chunk", "split", "getitem", "expand_as", "repeat", "unsqueeze")
    assert not any(n.startswith(local) for n in ran_dense), ran_dense


def test_flatten_over_space_still_runs_densely(monkeypatch):
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 12 * 12, 2)

        def forward(self, x):
            y = self.conv(x)
            return self.fc(y.view(y.size(0), -1))

    ran_dense = _both(Flat(), torch.randn(2, 3, 12, 12), (3, 4, 4), 1, (1,), monkeypatch)
    assert "view" in ran_dense


# ---------------------------------------------------------------------------------------------
# Decoders: transposed convolutions and upsampling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "d,kernel,stride,padding,dilation,output_padding,groups",
    [
        (2, 2, 2, 0, 1, 0, 1),
        (2, 3, 2, 1, 1, 1, 2),
        (2, 4, 3, 2, 1, 0, 1),
        (2, 3, 1, 1, 2, 0, 1),
        (1, 5, 2, 2, 1, 1, 1),
        (3, 2, 2, 0, 1, 0, 1),
    ],
)
def test_transposed_convolution(
    monkeypatch, d, kernel, stride, padding, dilation, output_padding, groups
):
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[d - 1]
    deconv = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[d - 1]
    pool = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[d - 1]
    model = nn.Sequential(
        conv(2, 4, 3, padding=1),
        nn.ReLU(),
        deconv(4, 4, kernel, stride, padding, output_padding, groups, dilation=dilation),
        conv(4, 4, 1),
        pool(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    size = {1: (30,), 2: (14, 12), 3: (8, 8, 8)}[d]
    window = (2,) + tuple(4 for _ in size)
    ran_dense = _both(model, torch.randn(2, 2, *size), window, 1, (0, 1), monkeypatch)
    assert "_2" not in ran_dense, ran_dense  # the transposed convolution (node _2) ran locally


class Decoder(nn.Module):
    def __init__(self, mode, scale, d=2):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[d - 1]
        self.a = conv(2, 4, 3, padding=1, stride=2)
        self.up = nn.Upsample(scale_factor=scale, mode=mode)
        self.b = conv(4, 3, 3, padding=1)
        self.mode, self.scale, self.d = mode, scale, d

    def forward(self, x):
        y = self.b(self.up(F.relu(self.a(x))))
        y = F.interpolate(y, scale_factor=2, mode="nearest")
        return y.mean(dim=tuple(range(2, 2 + self.d)))


@pytest.mark.parametrize(
    "mode,scale,d",
    [
        ("nearest", 2, 2),
        ("nearest", 4, 2),
        ("bilinear", 2, 2),
        ("bilinear", 3, 2),
        ("linear", 2, 1),
        ("trilinear", 2, 3),
    ],
)
def test_upsampling_nearest_and_linear(monkeypatch, mode, scale, d):
    size = {1: (80,), 2: (32, 28), 3: (16, 16, 12)}[d]
    window = (2,) + tuple(4 for _ in size)
    ran_dense = _both(
        Decoder(mode, scale, d), torch.randn(1, 2, *size), window, 2, (0, 2), monkeypatch
    )
    assert not any(n in ("up", "interpolate") for n in ran_dense), ran_dense


@pytest.mark.parametrize("mode,corners", [("bilinear", True), ("bicubic", False)])
def test_other_interpolation_runs_densely_and_exactly(monkeypatch, mode, corners):
    model = Decoder(mode, 2)
    model.up.align_corners = corners
    ran_dense = _both(model, torch.randn(1, 2, 12, 12), (2, 4, 4), 1, (1,), monkeypatch)
    assert "up" in ran_dense


# ---------------------------------------------------------------------------------------------
# Real models (random weights, small inputs)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,size",
    [("efficientnet_b0", 32), ("convnext_tiny", 64), ("shufflenet_v2_x0_5", 48)],
)
def test_torchvision_models_now_incremental(name, size):
    model = getattr(torchvision.models, name)(num_classes=3)
    _both(model, torch.randn(1, 3, size, size), (3, size // 2, size // 2), 1, (0, 2))


@pytest.mark.parametrize("name", ["efficientnet_b0", "cspresnet50", "res2net50_14w_8s"])
def test_timm_models_now_incremental(name):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, num_classes=3)
    _both(model, torch.randn(1, 3, 32, 32), (3, 16, 16), 1, (1,))


def test_monai_unet_decoder_runs_incrementally(monkeypatch):
    monai = pytest.importorskip("monai.networks.nets")
    model = monai.UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=(4, 8, 16),
        strides=(2, 2),
        num_res_units=1,
        norm="batch",
    )
    ran_dense = _both(
        model,
        torch.randn(1, 1, 32, 32, 32),
        (1, 6, 6, 6),
        1,
        ((0, 3, 3, 3), (1, 8, 8, 8)),
        monkeypatch,
        perturbations_per_eval=64,
    )
    # The inner decoder's transposed convolutions run locally; the last one's box covers
    # most of the full-resolution map, so it runs densely.
    assert "model_1_submodule_2_0_conv" not in ran_dense, ran_dense
    assert "model_1_submodule_1_submodule_2_0_conv" not in ran_dense, ran_dense
