"""The fast path proves itself: every failure listed in issue #18, as a test.

Each model here made ``engine="auto"`` return a wrong map (or crash where dense works) before the
engine checked itself. Now ``auto`` equals dense in float64, and a forced ``engine="incremental"``
equals dense or raises a ValueError naming the problem.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from extra_attrib import TiledOcclusion
from extra_attrib import _incremental as incremental
from extra_attrib._geometry import TileGeometry
from extra_attrib._incremental import changed_span, program_for
from extra_attrib._incremental._verify import check_windows, largest_difference

WINDOW, K = (2, 6, 6), (1, 2, 2)


# One thread: the engines' chunk sizes and timings, as a user on one core would see them.
pytestmark = pytest.mark.usefixtures("one_thread")


def _error(a, b):
    return (a - b).abs().max().item() / b.abs().max().item()


def _auto_equals_dense(model, x, tol=1e-9, target=0, window=WINDOW, k=K, **kwargs):
    """``auto`` equals dense; returns the attribution object after the auto call."""
    tiled = TiledOcclusion(model)
    dense = tiled.attribute(x, target=target, window=window, k=k, engine="dense", **kwargs)
    auto = tiled.attribute(x, target=target, window=window, k=k, **kwargs)
    assert _error(auto, dense) <= tol, (tiled.last_engine, tiled.last_engine_reason)
    return tiled


def _incremental_kept(tiled, engine="auto"):
    """Incremental ran, or, under auto, passed its self-check and lost the timing race, now
    or in an earlier call with the same shapes (#20)."""
    reason = tiled.last_engine_reason
    if tiled.last_engine == "incremental":
        return True
    if "earlier call" in reason:
        return engine == "auto"
    return engine == "auto" and "measured" in reason and "verified" in reason


def _incremental_equals_dense_or_raises(model, x, match, tol=1e-9, window=WINDOW, k=K):
    tiled = TiledOcclusion(model)
    dense = tiled.attribute(x, target=0, window=window, k=k, engine="dense")
    try:
        incr = tiled.attribute(x, target=0, window=window, k=k, engine="incremental")
    except ValueError as error:
        assert match in str(error), str(error)
        return
    assert _error(incr, dense) <= tol


class Head(nn.Module):
    """A position-dependent head, so that windows are told apart."""

    def __init__(self, channels, cells=(3, 2)):
        super().__init__()
        self.cells = cells
        self.linear = nn.Linear(channels * cells[0] * cells[1], 3)

    def forward(self, y):
        return self.linear(F.adaptive_avg_pool2d(y, self.cells).flatten(1))


# ---------------------------------------------------------------------------------------------
# Padding geometry: mirrored and wrapped copies of a changed element
# ---------------------------------------------------------------------------------------------


class Padded(nn.Module):
    def __init__(self, **conv):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, **conv)
        self.head = Head(3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)))


PADDINGS = [
    dict(kernel_size=3, padding=2, padding_mode="reflect"),
    dict(kernel_size=4, padding="same", padding_mode="reflect"),
    dict(kernel_size=2, padding="same", padding_mode="circular"),
    dict(kernel_size=3, dilation=2, padding=3, padding_mode="reflect"),
    dict(kernel_size=3, padding=2, padding_mode="replicate"),
    dict(kernel_size=3, padding=1, padding_mode="circular"),
    dict(kernel_size=(4, 5), padding="same", padding_mode="replicate", stride=1),
    dict(kernel_size=3, padding=3, padding_mode="circular", stride=2),
]


@pytest.mark.parametrize("conv", PADDINGS, ids=lambda c: "-".join(map(str, c.values())))
def test_padding_modes_and_same_padding_equal_dense(conv, flops_only):
    model = Padded(**conv).double().eval()
    x = torch.randn(2, 2, 20, 17, dtype=torch.float64)
    tiled = TiledOcclusion(model)
    dense = tiled.attribute(x, target=0, window=WINDOW, k=K, engine="dense")
    for engine in ("auto", "incremental"):
        got = tiled.attribute(x, target=0, window=WINDOW, k=K, engine=engine)
        assert _incremental_kept(tiled, engine), tiled.last_engine_reason
        assert _error(got, dense) <= 1e-12


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(["constant", "reflect", "replicate", "circular"]),
    st.integers(2, 12),
    st.data(),
)
def test_changed_span_holds_every_changed_padded_position(mode, full, data):
    left = data.draw(st.integers(0, full - 1))
    right = data.draw(st.integers(0, full - 1))
    length = data.draw(st.integers(1, full))
    a = data.draw(st.integers(0, full - length))
    x = torch.arange(full, dtype=torch.float64).view(1, 1, full)
    y = x.clone()
    y[..., a : a + length] = -1.0
    kwargs = {"mode": mode} if mode != "constant" else {}
    changed = (F.pad(x, (left, right), **kwargs) != F.pad(y, (left, right), **kwargs)).view(-1)
    lo, hi = changed_span(torch.tensor([a]), length, full, mode, left, right)
    for p in changed.nonzero().view(-1).tolist():
        assert int(lo) <= p - left < int(hi), (p - left, int(lo), int(hi))


# ---------------------------------------------------------------------------------------------
# In-place operations
# ---------------------------------------------------------------------------------------------


class InPlaceModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = Head(3)

    def forward(self, x):
        y = self.conv(x)
        z = self.relu(y)
        return self.head(z + 2 * y)  # y was overwritten by the in-place ReLU


class InPlaceDiscarded(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = Head(3)

    def forward(self, x):
        y = self.conv(x)
        F.relu(y, inplace=True)  # result discarded: y itself changes
        return self.head(y)


class AugmentedSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 3, 3, padding=1)
        self.head = Head(3)

    def forward(self, x):
        y = self.a(x)
        skip = y
        y += self.b(x)  # skip is y: it sees the sum
        return self.head(y * skip)


class InPlaceSafe(nn.Module):
    """In-place writes whose input nobody reads again: incremental stays available."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = Head(3)

    def forward(self, x):
        y = self.relu(self.conv(x))
        y += self.conv(x)
        return self.head(F.relu(y, inplace=True))


@pytest.mark.parametrize("cls", [InPlaceModule, InPlaceDiscarded, AugmentedSkip])
def test_observable_in_place_writes_are_refused_and_named(cls):
    model = cls().double().eval()
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    tiled = _auto_equals_dense(model, x)
    assert tiled.last_engine == "dense" and "in place" in tiled.last_engine_reason
    with pytest.raises(ValueError, match="in place, which node"):
        tiled.attribute(x, target=0, window=WINDOW, k=K, engine="incremental")


def test_in_place_writes_nobody_reads_again_stay_incremental(flops_only):
    model = InPlaceSafe().double().eval()
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    tiled = _auto_equals_dense(model, x)
    assert _incremental_kept(tiled), tiled.last_engine_reason


# ---------------------------------------------------------------------------------------------
# A cached trace must not outlive the model it was made from
# ---------------------------------------------------------------------------------------------


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, 3, 1, 1))

    def forward(self, y):
        return y * self.gamma


class Tempered(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.scale = Scale()
        self.head = Head(3)
        self.temperature = 1.0

    def forward(self, x):
        return self.head(torch.tanh(self.scale(self.conv(x)) / self.temperature))


def _changes():
    def reassign(m):
        m.scale.gamma = nn.Parameter(torch.full((1, 3, 1, 1), 3.0, dtype=torch.float64))

    def load_assign(m):
        state = {k: v.clone() * 2 for k, v in m.state_dict().items()}
        m.load_state_dict(state, assign=True)

    def temperature(m):
        m.temperature = 5.0

    def conv_settings(m):
        m.conv.padding = (2, 2)
        m.conv.dilation = (2, 2)

    return [reassign, load_assign, temperature, conv_settings]


@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
def test_a_cached_trace_follows_the_model(change, flops_only):
    model = Tempered().double().eval()
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    tiled = TiledOcclusion(model)
    tiled.attribute(x, target=0, window=WINDOW, k=K)  # traces and caches
    change(model)
    dense = tiled.attribute(x, target=0, window=WINDOW, k=K, engine="dense")
    for engine in ("auto", "incremental"):
        got = tiled.attribute(x, target=0, window=WINDOW, k=K, engine=engine)
        assert _incremental_kept(tiled, engine), tiled.last_engine_reason
        assert _error(got, dense) <= 1e-12


def test_unchanged_model_reuses_its_trace():
    model = Tempered().double().eval()
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    assert program_for(model, x) is program_for(model, x.clone())
    model.temperature = 2.0
    assert program_for(model, x) is not program_for(Tempered().double().eval(), x)


# ---------------------------------------------------------------------------------------------
# A leaf layer's own forward
# ---------------------------------------------------------------------------------------------


class QatNet(nn.Module):
    def __init__(self):
        super().__init__()
        qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
        self.conv = torch.ao.nn.qat.Conv2d(2, 3, 3, padding=1, qconfig=qconfig)
        self.head = Head(3)

    def forward(self, x):
        return self.head(self.conv(x))


class Patched(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = Head(3)
        plain = self.conv.forward
        self.conv.forward = lambda x: plain(x).clamp(min=0.0) ** 2

    def forward(self, x):
        return self.head(self.conv(x))


def test_qat_conv_with_its_own_forward_is_refused():
    model = QatNet().eval()
    x = torch.randn(1, 2, 16, 16)
    model(torch.randn(4, 2, 16, 16))  # observers see data
    tiled = _auto_equals_dense(model, x, tol=1e-6)
    assert tiled.last_engine == "dense" and "overrides the forward" in tiled.last_engine_reason
    with pytest.raises(ValueError, match="overrides the forward of Conv2d"):
        tiled.attribute(x, target=0, window=WINDOW, k=K, engine="incremental")


def test_instance_patched_forward_is_refused():
    model = Patched().double().eval()
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    tiled = _auto_equals_dense(model, x)
    assert tiled.last_engine == "dense" and "patched onto" in tiled.last_engine_reason


# ---------------------------------------------------------------------------------------------
# What tracing cannot see: the self-check catches it
# ---------------------------------------------------------------------------------------------


class Autocast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = Head(3)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = self.conv(x)
        return self.head(y.float())


def test_autocast_inside_forward_is_caught_by_the_self_check(flops_only):
    model = Autocast().eval()
    x = torch.randn(1, 2, 16, 16)
    tiled = _auto_equals_dense(model, x, tol=1e-6)
    assert tiled.last_engine == "dense"
    assert "clean-output check failed" in tiled.last_engine_reason
    with pytest.raises(ValueError, match="self-check against the model failed"):
        tiled.attribute(x, target=0, window=WINDOW, k=K, engine="incremental")


class GuardedSkip(nn.Module):
    """MONAI's UpCat pattern: a branch behind torch.jit.isinstance, False for an fx proxy."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.head = Head(3)

    def forward(self, x):
        y = self.a(x)
        z = self.b(torch.tanh(y))
        if torch.jit.isinstance(y, torch.Tensor):
            z = z + 40.0 * y
        return self.head(z)


def test_a_branch_tracing_drops_is_caught_by_the_self_check(flops_only):
    model = GuardedSkip().double().eval()
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    tiled = _auto_equals_dense(model, x)
    assert tiled.last_engine == "dense" and "self-check" in tiled.last_engine_reason


def _basic_unet(spatial_dims):
    monai = pytest.importorskip("monai.networks.nets")
    return monai.BasicUNet(
        spatial_dims=spatial_dims, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 8, 4)
    ).eval()


@pytest.mark.parametrize("dims", [2, 3])
def test_monai_basic_unet_runs_densely_with_a_reason(dims):
    model = _basic_unet(dims).double()
    size = 32  # four poolings, and instance norm needs more than one element at the bottom
    x = torch.randn(1, 1, *(size,) * dims, dtype=torch.float64)
    window = (1,) + (8 if dims == 2 else 16,) * dims
    k = (1,) + (2 if dims == 2 else 1,) * dims
    target = (1,) + (size // 2,) * dims
    tiled = _auto_equals_dense(model, x, target=target, window=window, k=k)
    assert tiled.last_engine == "dense", tiled.last_engine_reason
    assert "not possible" in tiled.last_engine_reason


# ---------------------------------------------------------------------------------------------
# Output rows, and tracing side effects
# ---------------------------------------------------------------------------------------------


class BatchSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = Head(3)

    def forward(self, x):
        return self.head(self.conv(x)).sum(0, keepdim=True).expand(x.shape[0], -1)


class BatchMix(nn.Module):
    """One row per input row, but every row mixes the whole batch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = Head(3)

    def forward(self, x):
        y = self.head(self.conv(x))
        return y.sum(0, keepdim=True).flatten(1)


def test_output_rows_are_checked_as_the_dense_engine_checks_them():
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    model = BatchMix().double().eval()
    for engine in ("dense", "auto", "incremental"):
        with pytest.raises(ValueError, match="first dimension must follow the input batch"):
            TiledOcclusion(model).attribute(x, target=0, window=WINDOW, k=K, engine=engine)


def test_a_model_mixing_rows_of_the_batch_gets_the_dense_map():
    x = torch.randn(2, 2, 16, 16, dtype=torch.float64)
    # One perturbation per pass: the dense map of a model mixing rows depends on the chunks.
    tiled = _auto_equals_dense(BatchSum().double().eval(), x, perturbations_per_eval=1)
    assert tiled.last_engine == "dense"


class Appender(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = Head(3)
        self.seen = []
        self.stats = {}

    def forward(self, x):
        y = self.conv(x)
        self.seen.append(y)
        self.stats["last"] = y
        return self.head(y)


def test_tracing_leaves_no_proxy_in_containers():
    model = Appender().double().eval()
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    program_for(model, x)
    assert model.seen == [] and model.stats == {}
    TiledOcclusion(model).attribute(x, target=0, window=WINDOW, k=K)
    assert all(isinstance(t, torch.Tensor) for t in model.seen)
    assert all(isinstance(t, torch.Tensor) for t in model.stats.values())


class BatchStatistics(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3, track_running_stats=False)
        self.head = Head(3)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)))


def test_batchnorm_without_running_statistics_is_refused():
    model = BatchStatistics().double().eval()
    x = torch.randn(2, 2, 16, 16, dtype=torch.float64)
    # One perturbation per pass: batch statistics make the dense map depend on the chunks.
    tiled = _auto_equals_dense(model, x, perturbations_per_eval=1)
    assert tiled.last_engine == "dense" and "running statistics" in tiled.last_engine_reason


# ---------------------------------------------------------------------------------------------
# Memory, and failures during the sweep
# ---------------------------------------------------------------------------------------------


def test_clean_activations_over_budget_choose_dense(monkeypatch):
    model = InPlaceSafe().double().eval()
    x = torch.randn(4, 2, 16, 16, dtype=torch.float64)
    # Below one example's activations: no group fits (a larger batch runs in groups, #30).
    monkeypatch.setattr(incremental._sweep, "ACTIVATION_BUDGET_BYTES", 64)
    tiled = _auto_equals_dense(model, x)
    assert tiled.last_engine == "dense" and "budget" in tiled.last_engine_reason
    with pytest.raises(ValueError, match="budget"):
        tiled.attribute(x, target=0, window=WINDOW, k=K, engine="incremental")


def test_activations_no_patch_reaches_are_not_kept():
    model = InPlaceSafe().double().eval()
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    program = program_for(model, x)
    sweep = incremental.IncrementalSweep(program, (x,), (torch.tensor(0.0),))
    head_nodes = [s.node for s in program.steps if s.node not in program.patchable]
    assert head_nodes and all(sweep.clean[n] is None for n in head_nodes if n.op != "get_attr")
    assert sweep.activation_bytes < 16 * 16 * 3 * 8 * 8


def test_out_of_memory_during_the_sweep_falls_back(monkeypatch, flops_only):
    model = InPlaceSafe().double().eval()
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64)

    def fail(self, j, windows, on_device):
        raise torch.OutOfMemoryError("out of memory (simulated)")

    monkeypatch.setattr(incremental.IncrementalSweep, "evaluate", fail)
    tiled = _auto_equals_dense(model, x)
    assert tiled.last_engine == "dense"
    assert "OutOfMemoryError during the sweep" in tiled.last_engine_reason
    with pytest.raises(torch.OutOfMemoryError):
        tiled.attribute(x, target=0, window=WINDOW, k=K, engine="incremental")


def test_any_exception_while_checking_falls_back(monkeypatch, flops_only):
    model = InPlaceSafe().double().eval()
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64)

    def broken(*args, **kwargs):
        raise IndexError("a rule's bug")

    monkeypatch.setattr(incremental._sweep, "verify_incremental", broken)
    tiled = _auto_equals_dense(model, x)
    assert "raised IndexError: a rule's bug" in tiled.last_engine_reason
    with pytest.raises(ValueError, match="a rule's bug"):
        tiled.attribute(x, target=0, window=WINDOW, k=K, engine="incremental")


# ---------------------------------------------------------------------------------------------
# Deployed models: TorchScript, torch.compile, torch.export
# ---------------------------------------------------------------------------------------------


def _plain():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1), Head(3)
    ).eval()


def _deployed(kind, net, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "script":
            return torch.jit.script(net)
        if kind == "trace":
            return torch.jit.trace(net, x)
        if kind == "compile":
            return torch.compile(net, backend="eager")
        batch = torch.export.Dim("batch")
        return torch.export.export(net, (x.repeat(2, 1, 1, 1),), dynamic_shapes=({0: batch},))
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("script", "TorchScript"),
        ("trace", "TorchScript"),
        ("compile", "torch.compile"),
        ("export", "torch.export"),
    ],
)
def test_deployed_models_run_densely_with_a_reason(kind, reason):
    net = _plain()
    x = torch.randn(1, 2, 16, 16)
    deployed = _deployed(kind, net, x)
    model = deployed.module() if kind == "export" else deployed
    expected = TiledOcclusion(net).attribute(x, target=0, window=WINDOW, k=K, engine="dense")
    tiled = TiledOcclusion(model)
    for engine in ("dense", "auto"):
        got = tiled.attribute(x, target=0, window=WINDOW, k=K, engine=engine)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert tiled.last_engine == "dense"
    assert reason in tiled.last_engine_reason
    with pytest.raises(ValueError, match=reason):
        tiled.attribute(x, target=0, window=WINDOW, k=K, engine="incremental")


# ---------------------------------------------------------------------------------------------
# The check itself
# ---------------------------------------------------------------------------------------------


def test_check_windows_are_the_corners_and_the_centre():
    assert check_windows(TileGeometry((1, 8, 8), (1, 4, 4), (1, 2, 2))) == [0, 4, 20, 24, 12]
    three = check_windows(TileGeometry((1, 9, 9, 9), (1, 3, 3, 3), (1, 1, 1, 1)))
    assert len(three) == 9
    assert check_windows(TileGeometry((3,), (3,), (1,))) == [0]


def test_largest_difference_treats_nan_and_inf_alike_as_equal():
    a = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    assert largest_difference(a, a.clone()) == 0.0
    assert largest_difference(a, torch.tensor([1.0, 0.0, float("inf"), 2.5])) == float("inf")
    assert largest_difference(a, torch.tensor([1.0, float("nan"), float("inf"), 2.5])) == 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_largest_difference_of_finite_values_and_overflow(dtype):
    a = torch.tensor([[1.0, -2.0], [3.0, 4.0]], dtype=dtype)
    b = torch.tensor([1.5, -2.0], dtype=dtype)  # broadcast over rows
    assert largest_difference(a, b) == pytest.approx(6.0)
    assert largest_difference(a[:0], b) == 0.0
    big = torch.finfo(dtype).max
    # Finite values whose difference overflows the dtype: not mistaken for equal ones.
    wide = largest_difference(torch.tensor([big], dtype=dtype), torch.tensor([-big], dtype=dtype))
    assert wide >= big
    assert largest_difference(a.half(), b.half()) == pytest.approx(6.0)


def test_a_verified_choice_says_so(flops_only):
    model = InPlaceSafe().double().eval()
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    tiled = _auto_equals_dense(model, x)
    assert "verified against the model on the clean input and 5 windows" in (
        tiled.last_engine_reason
    )


def test_the_check_sends_only_the_first_examples_through_the_model_past_the_budget():
    model = InPlaceSafe().double().eval()
    x = torch.randn(3, 2, 16, 16, dtype=torch.float64)
    geometry = TileGeometry((2, 16, 16), WINDOW, K)
    program = program_for(model, x)
    sweep = incremental.IncrementalSweep(program, (x,), (torch.tensor(0.0),), geometry)
    rows = []

    def counted(batch):
        rows.append(batch.shape[0])
        return model(batch)

    verified = incremental.verify_incremental(
        counted, x, torch.tensor(0.0), geometry, sweep.clean_output, lambda b: sweep.run(0, b), 1
    )
    assert rows == [6] and "5 windows" in verified  # 1 example: clean + 5 windows
    rows.clear()
    incremental.verify_incremental(
        counted, x, torch.tensor(0.0), geometry, sweep.clean_output, lambda b: sweep.run(0, b)
    )
    # On CPU in passes of whole copies, about CHECK_ROWS rows each (#30).
    assert rows == [6, 6, 6]


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(0, 4),
    st.integers(5, 20),
    st.data(),
)
def test_output_span_holds_every_output_reading_the_span(kernel, stride, dilation, pad, size, data):
    out = (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        return
    lo = data.draw(st.integers(-pad, size + pad - 1))
    hi = data.draw(st.integers(lo + 1, size + pad))
    start, got = incremental.output_span(
        torch.tensor([lo]), torch.tensor([hi]), kernel, stride, dilation, pad, out
    )
    first = int(start[0])
    assert 0 <= first and first + got <= out
    for o in range(out):
        reads = {o * stride - pad + j * dilation for j in range(kernel)}
        if reads & set(range(lo, hi)):
            assert first <= o < first + got, (o, first, got)


class DictOfTensors(nn.Module):
    """A dict whose tensor entry forward overwrites: tracing must restore it, not compare it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = Head(3)
        self.cache = {"last": torch.zeros(2, 2)}

    def forward(self, x):
        y = self.conv(x)
        self.cache["last"] = y
        return self.head(y)


def test_tracing_restores_a_dict_of_tensors_it_overwrote():
    model = DictOfTensors().double().eval()
    before = model.cache["last"]
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    program_for(model, x)
    assert model.cache["last"] is before
