"""Models of several inputs in the incremental engine (#20, item 2).

Each input is occluded in turn with the others clean, as Captum's Occlusion and the dense engine
do. The incremental engine gives each swept input its own boxes; an input it cannot sweep (a
vector, a path through an operation it does not know) runs densely through the model. Every map
must equal the dense engine's in float64, and the self-check must cover every input.
"""

import pytest
import torch
import torch.nn.functional as F
from captum.attr import Occlusion
from torch import nn

from extra_attrib import TiledOcclusion
from extra_attrib._engine import occlusion_sweep
from extra_attrib._geometry import TileGeometry
from extra_attrib._incremental import _program, choose_engine, program_for
from extra_attrib._incremental import _sweep as incremental_sweep
from extra_attrib._incremental._verify import check_windows
from extra_attrib._plan import PrecomputedWindows, SweepPlan
from tests.models import init_bn

RTOL = 1e-9


# One thread: the engines' chunk sizes and timings, as a user on one core would see them.
pytestmark = pytest.mark.usefixtures("one_thread")


class TwoImages(nn.Module):
    """Two 2D inputs of different channels fused mid-network by a sum and a concatenation."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(1, 4, 5, padding=2), nn.ReLU())
        self.fuse = nn.Conv2d(8, 6, 3, padding=1)
        self.down = nn.MaxPool2d(2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(24, 5)

    def forward(self, x, m):
        a, b = self.a(x), self.b(m)
        y = self.down(F.relu(self.fuse(torch.cat([a + b, b], 1))))
        return self.head(self.pool(y).flatten(1))


class ImageAndVector(nn.Module):
    """A CNN trunk for the image, a linear layer for a per-example vector, fused at the head."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1)
        )
        self.vec = nn.Linear(5, 4)
        self.head = nn.Linear(4 * 4 + 4, 3)

    def forward(self, x, v):
        feats = F.adaptive_avg_pool2d(self.trunk(x), 2).flatten(1)
        return self.head(torch.cat([feats, torch.tanh(self.vec(v))], 1))


class ImageVolumeVector(nn.Module):
    """Three inputs: a 2D image, a 3D volume and a vector, fused late."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.volume = nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.ReLU())
        self.vec = nn.Linear(4, 3)
        self.head = nn.Linear(3 * 4 + 3 * 8 + 3, 4)

    def forward(self, x, vol, v):
        a = F.adaptive_max_pool2d(self.image(x), 2).flatten(1)
        b = F.adaptive_avg_pool3d(self.volume(vol), 2).flatten(1)
        return self.head(torch.cat([a, b, self.vec(v)], 1))


class UnknownOnOneBranch(nn.Module):
    """The second input's branch uses einsum (unknown to the engine) before the fusion."""

    def __init__(self, fuse_before=False):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(6, 2)
        self.fuse_before = fuse_before

    def forward(self, x, m):
        a = self.a(x)
        b = self.b(m)
        if self.fuse_before:  # the unknown op after the fusion: every input reaches it
            b = b + a
        energy = torch.einsum("nchw,nchw->nc", b, b)
        return self.head(torch.cat([a.mean((2, 3)), energy], 1))


class PoolOnSecondBranch(nn.Module):
    """Only the second input's branch has a pooling layer (to break its rule in a test)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.b = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(16, 3)

    def forward(self, x, m):
        y = F.relu(self.a(x) * self.b(m))
        return self.head(F.adaptive_avg_pool2d(y, 2).flatten(1))


class WithExtraTensors(nn.Module):
    """Two images and tensor extra arguments: a per-example scale and a shared bias."""

    def __init__(self):
        super().__init__()
        self.net = TwoImages()

    def forward(self, x, m, scale, bias):
        return self.net(x, m) * scale + bias


def _make(cls, *args, **kwargs):
    torch.manual_seed(0)
    return init_bn(cls(*args, **kwargs)).double().eval()


def _close(incremental, dense):
    for j, (a, b) in enumerate(zip(incremental, dense)):
        assert a.shape == b.shape, j
        scale = float(b.abs().max())
        assert scale > 0, f"input {j}: an all-zero dense map tests nothing"
        assert float((a - b).abs().max()) <= RTOL * scale, f"input {j}"


def _both(model, inputs, **kwargs):
    tiled = TiledOcclusion(model)
    dense = tiled.attribute(inputs, engine="dense", **kwargs)
    incremental = tiled.attribute(inputs, engine="incremental", **kwargs)
    return incremental, dense, tiled


def _r(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 3])
def test_two_images_each_input_gets_its_own_boxes(n):
    model = _make(TwoImages)
    x, m = _r(n, 3, 16, 16), _r(n, 1, 16, 16)
    baselines = (0.5, _r(1, 1, 16, 16))  # a number and a tensor, broadcast
    target = torch.arange(n) % 5
    incremental, dense, tiled = _both(
        model,
        (x, m),
        baselines=baselines,
        target=target,
        window=((3, 4, 4), (1, 8, 8)),
        k=((1, 2, 2), (1, 2, 1)),  # per input and per dimension
    )
    assert tiled.last_engine == "incremental", tiled.last_engine_reason
    for j in (0, 1):
        assert f"input {j} verified" in tiled.last_engine_reason
    _close(incremental, dense)


def test_k1_equals_captum_occlusion_for_both_inputs():
    model = _make(TwoImages)
    x, m = _r(2, 3, 16, 16), _r(2, 1, 16, 16)
    tiled = TiledOcclusion(model)
    ours = tiled.attribute((x, m), target=1, window=((3, 4, 4), (1, 8, 8)), engine="incremental")
    theirs = Occlusion(model).attribute(
        (x, m),
        target=1,
        sliding_window_shapes=((3, 4, 4), (1, 8, 8)),
        strides=((3, 4, 4), (1, 8, 8)),
    )
    _close(ours, tiled.attribute((x, m), target=1, window=((3, 4, 4), (1, 8, 8)), engine="dense"))
    for a, b in zip(ours, theirs):  # Captum returns float32 here
        torch.testing.assert_close(a, b.double(), rtol=1e-5, atol=1e-7)


def test_vector_input_is_swept_densely_and_the_image_incrementally():
    model = _make(ImageAndVector)
    x, v = _r(2, 2, 12, 12), _r(2, 5)
    incremental, dense, tiled = _both(
        model, (x, v), baselines=(0.0, _r(1, 5)), target=2, window=((2, 4, 4), (2,)), k=(2, 1)
    )
    assert tiled.last_engine == "incremental"
    assert "input 1 runs dense" in tiled.last_engine_reason
    assert "input 0 verified" in tiled.last_engine_reason
    _close(incremental, dense)


def test_three_inputs_image_volume_and_vector():
    model = _make(ImageVolumeVector)
    x, vol, v = _r(2, 1, 8, 8), _r(2, 1, 6, 6, 6), _r(2, 4)
    incremental, dense, tiled = _both(
        model,
        (x, vol, v),
        baselines=(0.0, -1.0, 0.0),
        target=[0, 3],
        window=((1, 4, 4), (1, 2, 2, 2), (1,)),
        k=(2, 2, 1),
    )
    assert tiled.last_engine == "incremental", tiled.last_engine_reason
    assert "input 1 verified" in tiled.last_engine_reason
    assert "input 2 runs dense" in tiled.last_engine_reason
    _close(incremental, dense)


def test_auto_measures_and_equals_dense(flops_only):
    model = _make(TwoImages)
    x, m = _r(2, 3, 16, 16), _r(2, 1, 16, 16)
    choice = choose_engine(
        "auto",
        model,
        (x, m),
        (torch.tensor(0.0),) * 2,
        (),
        None,
        [
            TileGeometry((3, 16, 16), (3, 4, 4), (1, 2, 2)),
            TileGeometry((1, 16, 16), (1, 4, 4), (1, 2, 2)),
        ],
    )
    assert choice.engine == "measure", choice.reason  # both engines possible: the sweep races
    tiled = TiledOcclusion(model)
    auto = tiled.attribute((x, m), target=0, window=4, k=2)
    assert tiled.last_engine in ("dense", "incremental")
    assert "input 1 verified" in tiled.last_engine_reason
    dense = tiled.attribute((x, m), target=0, window=4, k=2, engine="dense")
    _close(auto, dense)


def test_one_branch_through_an_unknown_op_runs_that_input_dense():
    model = _make(UnknownOnOneBranch)
    x, m = _r(2, 2, 8, 8), _r(2, 1, 8, 8)
    incremental, dense, tiled = _both(model, (x, m), target=1, window=4, k=2)
    assert tiled.last_engine == "incremental"
    assert "input 1 runs dense" in tiled.last_engine_reason
    assert "einsum" in tiled.last_engine_reason
    _close(incremental, dense)


def test_every_input_through_an_unknown_op_declines_with_the_reason():
    model = _make(UnknownOnOneBranch, fuse_before=True)
    x, m = _r(2, 2, 8, 8), _r(2, 1, 8, 8)
    tiled = TiledOcclusion(model)
    auto = tiled.attribute((x, m), target=1, window=4, k=2)
    assert tiled.last_engine == "dense"
    assert "no input can be swept incrementally" in tiled.last_engine_reason
    assert "einsum" in tiled.last_engine_reason
    _close(auto, tiled.attribute((x, m), target=1, window=4, k=2, engine="dense"))
    with pytest.raises(ValueError, match="einsum"):
        tiled.attribute((x, m), target=1, window=4, k=2, engine="incremental")


def _wrong_pool(original):
    def rule(program, step, env, clean, b, cost):
        out = original(program, step, env, clean, b, cost)
        if isinstance(out, _program.Patch):  # a wrong box: the values shifted by one
            out = _program.Patch(out.values.roll(1, -1), out.starts, out.size, out.clean)
        return out

    return rule


def test_self_check_catches_a_wrong_rule_on_the_second_input(monkeypatch, flops_only):
    model = _make(PoolOnSecondBranch)
    x, m = _r(2, 2, 12, 12), _r(2, 1, 12, 12)
    tiled = TiledOcclusion(model)
    incremental = tiled.attribute((x, m), target=0, window=4, k=2, engine="incremental")
    dense = tiled.attribute((x, m), target=0, window=4, k=2, engine="dense")
    _close(incremental, dense)  # the model is right without the broken rule
    monkeypatch.setitem(_program._HANDLERS, "pool", _wrong_pool(_program._HANDLERS["pool"]))
    auto = TiledOcclusion(model)
    result = auto.attribute((x, m), target=0, window=4, k=2)
    assert auto.last_engine == "dense"
    assert "self-check" in auto.last_engine_reason and "input 1" in auto.last_engine_reason
    _close(result, dense)
    with pytest.raises(ValueError, match="input 1"):
        auto.attribute((x, m), target=0, window=4, k=2, engine="incremental")


def test_self_check_catches_a_wrong_program_on_the_second_input_only(monkeypatch):
    model = _make(TwoImages)
    x, m = _r(1, 3, 16, 16), _r(1, 1, 16, 16)
    original = _program.IncrementalProgram.run_patched

    def wrong(self, clean, patch, cost=None, index=0):
        out = original(self, clean, patch, cost, index)
        return out + 1e-3 if index == 1 else out

    monkeypatch.setattr(_program.IncrementalProgram, "run_patched", wrong)
    with pytest.raises(ValueError, match="input 1: the window check failed"):
        choose_engine(
            "incremental",
            model,
            (x, m),
            (torch.tensor(0.0),) * 2,
            (),
            None,
            [
                TileGeometry((3, 16, 16), (3, 8, 8), (1, 1, 1)),
                TileGeometry((1, 16, 16), (1, 8, 8), (1, 1, 1)),
            ],
        )


def test_tensor_extra_arguments_stay_clean():
    model = _make(WithExtraTensors)
    x, m = _r(2, 3, 16, 16), _r(2, 1, 16, 16)
    scale, bias = _r(2, 1), _r(5)  # per example (repeated with each copy), and shared
    incremental, dense, tiled = _both(
        model, (x, m), additional_forward_args=(scale, bias), target=3, window=4, k=2
    )
    assert tiled.last_engine == "incremental", tiled.last_engine_reason
    _close(incremental, dense)


def test_python_extra_arguments_decline_with_the_reason():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TwoImages()

        def forward(self, x, m, factor):
            return self.net(x, m) * factor

    model = _make(Scaled)
    x, m = _r(1, 3, 16, 16), _r(1, 1, 16, 16)
    tiled = TiledOcclusion(model)
    auto = tiled.attribute((x, m), additional_forward_args=(2.0,), target=0, window=8)
    assert tiled.last_engine == "dense"
    assert "additional_forward_args[0] is a float" in tiled.last_engine_reason
    dense = tiled.attribute(
        (x, m), additional_forward_args=(2.0,), target=0, window=8, engine="dense"
    )
    _close(auto, dense)


def test_program_cache_is_keyed_on_every_input():
    model = _make(TwoImages)
    x, m = _r(1, 3, 16, 16), _r(1, 1, 16, 16)
    first = program_for(model, (x, m))
    assert program_for(model, (x.clone(), m.clone())) is first
    assert program_for(model, (x, _r(1, 1, 20, 20))) is not first
    assert program_for(model, (x, m.float())) is not first
    assert [len(r) > 1 for r in first.reach] == [True, True]


class Counted:
    """The model, counting the rows of its first input."""

    def __init__(self, model):
        self.model = model
        self.rows = 0

    def __call__(self, *args):
        self.rows += args[0].shape[0]
        return self.model(*args)


def test_checked_windows_of_every_input_count_towards_the_map():
    model = _make(TwoImages)
    n = 2
    x, m = _r(n, 3, 16, 16), _r(n, 1, 16, 16)
    fills = (torch.tensor(0.0, dtype=torch.float64),) * 2
    geometries = [
        TileGeometry((3, 16, 16), (3, 4, 4), (1, 2, 2)),
        TileGeometry((1, 16, 16), (1, 8, 8), (1, 1, 1)),
    ]
    choice = choose_engine("incremental", model, (x, m), fills, (), None, geometries)
    checked = choice.checked
    assert isinstance(checked, tuple) and [c.index for c in checked] == [0, 1]
    assert all(isinstance(c, PrecomputedWindows) for c in checked)
    reused_windows = sum(len(check_windows(g)) for g in geometries)
    args = ((x, m), fills, geometries, [None], lambda out: out)
    plain, reused = Counted(model), Counted(model)
    dense = occlusion_sweep(plain, *args, chunk_size=4)
    with_reuse = occlusion_sweep(reused, *args, chunk_size=4, plan=SweepPlan(precomputed=checked))
    for a, b in zip(with_reuse.attributions, dense.attributions):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # The checked windows and the clean pass (the checks' passes carry the clean copy).
    assert plain.rows - reused.rows == (reused_windows + 1) * n
    assert with_reuse.reused == reused_windows
    # Another call (a copy of the second input) reuses nothing.
    other = occlusion_sweep(
        model, (x, m.clone()), fills, geometries, [None], lambda out: out,
        plan=SweepPlan(precomputed=checked),
    )  # fmt: skip
    assert other.reused == 0


def test_drilldown_over_two_inputs_equals_dense():
    model = _make(TwoImages)
    x, m = _r(1, 3, 16, 16), _r(1, 1, 16, 16)
    incremental, dense, tiled = _both(model, (x, m), target=2, window=8, k=2, refine=0.3)
    assert tiled.last_engine == "incremental"
    _close(incremental, dense)


class FunctionalWeights(nn.Module):
    """Functional convolutions whose weights have as many rows as the batch (4)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 2, 3, 3))
        self.v = nn.Parameter(torch.randn(4, 1, 3, 3))
        self.head = nn.Linear(4, 3)

    def forward(self, x, m):
        y = F.conv2d(x, self.w, padding=1) + F.conv2d(m, self.v, padding=1)
        return self.head(F.adaptive_avg_pool2d(F.relu(y), 1).flatten(1))


def test_constants_with_as_many_rows_as_the_batch_are_not_repeated():
    # Only values computed from an input are repeated for the copies of the batch; a weight
    # of N rows is a constant.
    model = _make(FunctionalWeights)
    x, m = _r(4, 2, 8, 8), _r(4, 1, 8, 8)
    incremental, dense, tiled = _both(model, (x, m), target=0, window=4, k=2)
    assert tiled.last_engine == "incremental", tiled.last_engine_reason
    _close(incremental, dense)


class GatedByVector(nn.Module):
    """An image trunk whose features are gated per channel by a per-example vector (FiLM)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.gate = nn.Linear(5, 4)
        self.shift = nn.Linear(5, 1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(16, 3)

    def forward(self, x, v):
        g = torch.sigmoid(self.gate(v))[:, :, None, None]
        y = F.relu(self.conv1(x)) * g + self.shift(v)[:, :, None, None]
        return self.head(F.adaptive_avg_pool2d(self.conv2(y), 2).flatten(1))


def test_a_gate_from_the_vector_keeps_the_image_boxes(monkeypatch):
    model = _make(GatedByVector)
    x, v = _r(2, 2, 12, 12), _r(2, 5)
    seen = []
    binary = _program._HANDLERS["binary"]

    def spy(program, step, env, clean, b, cost):
        out = binary(program, step, env, clean, b, cost)
        seen.append(type(out).__name__)
        return out

    monkeypatch.setitem(_program._HANDLERS, "binary", spy)
    incremental, dense, tiled = _both(model, (x, v), target=1, window=((2, 4, 4), (1,)), k=(2, 1))
    assert tiled.last_engine == "incremental", tiled.last_engine_reason
    assert seen and set(seen) == {"Patch"}  # the product and the sum stay boxes
    _close(incremental, dense)


class IntegerMask(nn.Module):
    """An image and an integer mask, cast inside the model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3, 2)

    def forward(self, x, mask):
        y = self.conv(x) * mask.to(x.dtype)
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_integer_input_runs_dense_and_the_image_incrementally():
    model = _make(IntegerMask)
    x, mask = _r(2, 2, 8, 8), torch.randint(1, 3, (2, 1, 8, 8))
    incremental, dense, tiled = _both(model, (x, mask), target=1, window=4, k=2)
    assert tiled.last_engine == "incremental", tiled.last_engine_reason
    assert "input 1 runs dense" in tiled.last_engine_reason
    assert "torch.int64" in tiled.last_engine_reason
    _close(incremental, dense)


def test_clean_activations_of_every_input_count_towards_the_budget(monkeypatch):
    model = _make(TwoImages)
    x, m = _r(2, 3, 16, 16), _r(2, 1, 16, 16)
    fills = (torch.tensor(0.0),) * 2
    small = _program.IncrementalProgram(model, (x[:1], m[:1]))
    one = incremental_sweep.IncrementalSweep(small, (x[:1], m[:1]), fills)
    one_input_only = incremental_sweep.IncrementalSweep(
        program_for(model.a, x[:1]), (x[:1],), (fills[0],)
    )
    assert one.activation_bytes > one_input_only.activation_bytes
    monkeypatch.setattr(incremental_sweep, "ACTIVATION_BUDGET_BYTES", one.activation_bytes)
    choice = choose_engine("auto", model, (x, m), fills, ())
    assert choice.engine == "dense" and "budget" in choice.reason


class VectorThenImage(nn.Module):
    """``ImageAndVector`` with the vector first: input 0 is one incremental runs densely."""

    def __init__(self):
        super().__init__()
        self.inner = ImageAndVector()

    def forward(self, v, x):
        return self.inner(x, v)


def test_the_race_times_the_first_input_incremental_sweeps(monkeypatch, flops_only):
    from extra_attrib._engine import DenseEvaluator

    model = _make(VectorThenImage)
    v, x = _r(1, 5), _r(1, 2, 16, 16)
    kwargs = dict(target=0, window=((2,), (2, 4, 4)), k=((1,), (1, 2, 2)))
    dense = TiledOcclusion(model).attribute((v, x), engine="dense", **kwargs)
    seen = []
    for cls in (DenseEvaluator, incremental_sweep.IncrementalSweep):
        original = cls.evaluate

        def spy(self, j, windows, where, original=original):
            seen.append(j)
            return original(self, j, windows, where)

        monkeypatch.setattr(cls, "evaluate", spy)
    monkeypatch.setattr(incremental_sweep, "TRY_PAYBACK", 0.0)
    tiled = TiledOcclusion(model)
    auto = tiled.attribute((v, x), **kwargs)
    assert "measured on" in tiled.last_engine_reason
    # The image (input 1) is swept first, so the trial chunks time incremental on it.
    assert seen and seen[0] == 1
    for a, b in zip(auto, dense):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
