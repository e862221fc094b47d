"""A batch whose clean activations exceed the memory budget runs in groups that fit (#30).

Every map is compared with the dense engine in float64: grouping must not change a value.
"""

import numpy as np
import pytest
import torch
from captum.attr import NoiseTunnel
from torch import nn

from extra_attrib import TiledOcclusion
from extra_attrib import _incremental as incremental
from extra_attrib._groups import (
    check_memory_budget,
    example_groups,
    join,
    split_args,
    split_fill,
    split_per_example,
)
from extra_attrib._incremental import examples_per_group

WINDOW, K = 8, 2


class Net(nn.Module):
    """A small CNN that keeps 0.46 MiB of activations per example at 3x32x32 in float64."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 24, 3, padding=1)
        self.b = nn.Conv2d(24, 24, 3, padding=1)
        self.c = nn.Conv2d(24, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        y = torch.relu(self.b(torch.relu(self.a(x))))
        return self.head(torch.relu(self.c(y)).mean(dim=(2, 3)))


class Scaled(Net):
    """With a per-example scale as an extra argument."""

    def forward(self, x, scale):
        return super().forward(x) * scale


def _bytes_per_example(model, x):
    model_input = (x,)
    fills = (torch.zeros(()),)
    one = examples_per_group(model, model_input, fills, (), budget=2**40)
    assert one == x.shape[0]
    program = incremental.program_for(model, x)
    key = ("example bytes", ((tuple(x.shape[1:]), x.dtype),))
    return int(program.gains[key])


def _budget_for(model, x, examples):
    """A budget that fits ``examples`` examples' activations and not one more."""
    per = _bytes_per_example(model, x)
    return max(2**20, per * examples + per // 2)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().double().eval()


def _error(a, b):
    return float((a - b).abs().max() / max(b.abs().max(), 1e-30))


def test_groups_of_examples_equal_dense_in_float64(net):
    x = torch.randn(7, 3, 32, 32, dtype=torch.float64)
    budget = _budget_for(net, x, 2)
    assert examples_per_group(net, (x,), (torch.zeros(()),), (), budget) == 2
    targets = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    tiled = TiledOcclusion(net)
    dense = tiled.attribute(x, target=targets, window=WINDOW, k=K, engine="dense")
    forced = tiled.attribute(
        x, target=targets, window=WINDOW, k=K, engine="incremental", memory_budget=budget
    )
    assert tiled.last_engine == "incremental"
    assert "7 examples ran in 4 groups of at most 2" in tiled.last_engine_reason
    assert _error(forced, dense) <= 1e-10
    # Without a budget that large batch is one sweep; the default budget is far larger.
    whole = tiled.attribute(x, target=targets, window=WINDOW, k=K, engine="incremental")
    assert "groups" not in tiled.last_engine_reason
    assert _error(whole, dense) <= 1e-10


def test_auto_decides_once_for_the_call_and_equals_dense(net, flops_only, monkeypatch):
    monkeypatch.setattr(incremental._sweep, "TRY_PAYBACK", 0.0)
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    budget = _budget_for(net, x, 2)
    tiled = TiledOcclusion(net)
    dense = tiled.attribute(x, target=3, window=WINDOW, k=K, engine="dense")
    auto = tiled.attribute(x, target=3, window=WINDOW, k=K, memory_budget=budget)
    assert _error(auto, dense) <= 1e-10
    assert "groups" in tiled.last_engine_reason, tiled.last_engine_reason
    # The first group's measurement is remembered for every group's shape.
    keys = [key for key in tiled._engine_memo if key[2][0][0][0] in (1, 2)]
    assert len(keys) == 2 and len({tiled._engine_memo[k] for k in keys}) == 1


def test_attribute_multi_with_list_targets_and_per_example_arguments():
    torch.manual_seed(1)
    model = Scaled().double().eval()
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    scale = torch.rand(5, 1, dtype=torch.float64) + 0.5
    budget = _budget_for(Net().double().eval(), x, 2)
    tiled = TiledOcclusion(model)
    targets = [[0, 1, 2, 3, 4], 2]
    args = dict(window=WINDOW, k=K, additional_forward_args=(scale,))
    dense = tiled.attribute_multi(x, targets, engine="dense", **args)
    grouped = tiled.attribute_multi(x, targets, engine="incremental", memory_budget=budget, **args)
    assert "groups" in tiled.last_engine_reason
    assert _error(grouped, dense) <= 1e-10
    # A per-example baseline is split with the batch as well.
    fill = torch.rand(5, 1, 1, 1, dtype=torch.float64)
    dense = tiled.attribute(x, target=1, baselines=fill, engine="dense", **args)
    grouped = tiled.attribute(
        x, target=1, baselines=fill, engine="incremental", memory_budget=budget, **args
    )
    assert _error(grouped, dense) <= 1e-10


def test_noise_tunnel_copies_run_in_groups_equal_to_dense(net):
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    budget = _budget_for(net, x.expand(4, -1, -1, -1), 2)
    tiled = TiledOcclusion(net)
    nt = NoiseTunnel(tiled)
    kwargs = dict(nt_type="smoothgrad", nt_samples=5, stdevs=0.1, target=2, window=WINDOW, k=K)
    torch.manual_seed(5)
    dense = nt.attribute(x, engine="dense", **kwargs)
    torch.manual_seed(5)
    grouped = nt.attribute(x, engine="incremental", memory_budget=budget, **kwargs)
    assert "5 examples ran in 3 groups" in tiled.last_engine_reason
    assert _error(grouped, dense) <= 1e-10


def test_no_group_fits_runs_dense_or_raises(net):
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)  # 1.8 MiB kept per example
    tiled = TiledOcclusion(net)
    dense = tiled.attribute(x, target=0, window=WINDOW, k=K, engine="dense")
    auto = tiled.attribute(x, target=0, window=WINDOW, k=K, memory_budget=2**20)
    assert tiled.last_engine == "dense" and "budget" in tiled.last_engine_reason
    assert _error(auto, dense) <= 1e-10
    with pytest.raises(ValueError, match="memory_budget"):
        tiled.attribute(x, target=0, window=WINDOW, k=K, engine="incremental", memory_budget=2**20)


def test_a_smaller_budget_bounds_the_dense_buffers(net):
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    tiled = TiledOcclusion(net)
    big = tiled.attribute(x, target=0, window=WINDOW, k=K, engine="dense")
    small = tiled.attribute(x, target=0, window=WINDOW, k=K, engine="dense", memory_budget=2**20)
    assert _error(small, big) <= 1e-10
    copy = x.numel() * 8 + x[0].numel()
    # 1 MiB holds 21 copies of this batch: at most 11 forward passes hold the 81 windows.
    assert tiled.last_evaluations >= 1 + -(-81 // (2**20 // copy))


@pytest.mark.parametrize(
    "value, error",
    [("256MiB", TypeError), (1.5e8, TypeError), (True, TypeError), (1000, ValueError)],
)
def test_memory_budget_is_validated(net, value, error):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(error, match="memory_budget"):
        TiledOcclusion(net.float()).attribute(x, target=0, window=8, memory_budget=value)


def test_group_helpers():
    assert example_groups(16, 6) == [slice(0, 6), slice(6, 11), slice(11, 16)]
    assert example_groups(4, 4) == [slice(0, 4)]
    assert example_groups(3, 1) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    rows = slice(1, 3)
    assert split_per_example([5, 6, 7, 8], 4, rows) == (True, [6, 7])
    assert split_per_example([5, 6], 4, rows) == (False, [5, 6])
    assert split_per_example((1, 2), 4, rows) == (True, (1, 2))
    assert split_per_example(None, 4, rows) == (True, None)
    ok, part = split_per_example(np.arange(4), 4, rows)
    assert ok and part.tolist() == [1, 2]
    ok, part = split_per_example(torch.tensor([3]), 4, rows)
    assert ok and part.tolist() == [3]
    x = torch.zeros(4, 2, 3)
    assert split_fill(torch.zeros(4, 1, 1), x, rows).shape == (2, 1, 1)
    assert split_fill(torch.zeros(2, 1), x, rows).shape == (2, 1)  # per channel: kept
    weight = torch.ones(2, 5)  # as many rows as a group but not per example: no split
    assert split_args((weight,), 4, rows, 2) is None
    assert split_args((torch.ones(4), 3.0), 4, rows, 2)[0].shape == (2,)
    assert check_memory_budget(None) is None and check_memory_budget(2**30) == 2**30

    class R:
        def __init__(self, n, p, s):
            self.attributions = [torch.full((1, n, 2), float(n))]
            self.evaluations, self.perturbations, self.skipped = p + 1, p, s

    joined = join([R(2, 10, 1), R(1, 7, 4)], [2, 1])
    assert joined.attributions[0].shape == (1, 3, 2)
    assert (joined.evaluations, joined.perturbations, joined.skipped) == (19, 9, 2)


# ---------------------------------------------------------------------------------------------
# A run of batches decides once; each later batch checks its clean output (#30)
# ---------------------------------------------------------------------------------------------


def test_later_batches_reuse_the_decision_and_check_their_clean_output(
    net, flops_only, monkeypatch
):
    monkeypatch.setattr(incremental._sweep, "TRY_PAYBACK", 0.0)
    monkeypatch.setattr(incremental._sweep, "MIN_PREDICTED_GAIN", 0.0)
    tiled = TiledOcclusion(net)
    reasons = []
    for n in (2, 2, 1):
        x = torch.randn(n, 3, 32, 32, dtype=torch.float64)
        dense = tiled.attribute(x, target=1, window=WINDOW, k=K, engine="dense")
        auto = tiled.attribute(x, target=1, window=WINDOW, k=K, engine="incremental")
        assert tiled.last_engine == "incremental"
        assert _error(auto, dense) <= 1e-10
        reasons.append(tiled.last_engine_reason)
    assert "5 windows" in reasons[0]
    # The same shapes: the windows were verified by the first batch; its clean output is checked.
    assert "verified against the model on the clean input (largest" in reasons[1]
    assert "windows were verified on the first batch" in reasons[1]
    # Another batch size is another trace: the whole check again.
    assert "5 windows" in reasons[2]


def test_auto_decides_once_per_example_shape(net, flops_only, monkeypatch):
    monkeypatch.setattr(incremental._sweep, "TRY_PAYBACK", 0.0)
    tiled = TiledOcclusion(net)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    tiled.attribute(x, target=1, window=WINDOW, k=K)
    first = tiled.last_engine
    y = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    dense = tiled.attribute(y, target=1, window=WINDOW, k=K, engine="dense")
    auto = tiled.attribute(y, target=1, window=WINDOW, k=K)
    assert tiled.last_engine == first
    assert "earlier call" in tiled.last_engine_reason
    assert _error(auto, dense) <= 1e-10


def test_the_clean_output_check_catches_a_wrong_program(net):
    from extra_attrib._geometry import TileGeometry
    from extra_attrib._incremental import VerificationFailed
    from extra_attrib._incremental._verify import verify_clean

    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    geometry = TileGeometry((3, 32, 32), (3, WINDOW, WINDOW), (1, K, K))
    right = net(x)
    kept = []
    words = verify_clean(net, x, torch.zeros(()), geometry, right, kept)
    assert "largest difference 0" in words and kept[0].clean.equal(right)
    with pytest.raises(VerificationFailed, match="clean-output check"):
        verify_clean(net, x, torch.zeros(()), geometry, right * 1.001)


def test_the_payback_rule_counts_the_fixed_costs_in_evaluations():
    from extra_attrib._geometry import TileGeometry
    from extra_attrib._incremental._sweep import _payback

    x = torch.randn(2, 3, 32, 32)
    geometry = TileGeometry((3, 32, 32), (3, 8, 8), (1, 1, 1))  # 16 windows, 5 checked
    saving, cost, windows = _payback((x,), [geometry], 2.0, None)
    assert windows == 16
    assert saving == pytest.approx(11 * 0.5)  # the windows left after the check, at 2x
    assert cost == pytest.approx(1 + 5 / 2)  # the clean pass and the check's windows
    # Where the check's copies exceed the budget its windows are not reused: they count too.
    _, cost, _ = _payback((x,), [geometry], 2.0, 6 * 3 * 32 * 32 * 4 - 1)
    assert cost == pytest.approx(1 + 5 / 2 + 5)


def test_a_model_fx_cannot_trace_is_traced_once_per_shape():
    traces = []

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            if isinstance(x, torch.fx.Proxy):
                traces.append(1)
            y = self.conv(x)
            if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                y = -y
            return y.mean(dim=(2, 3))

    model = Branchy().eval()
    tiled = TiledOcclusion(model)
    x = torch.randn(2, 3, 16, 16)
    for _ in range(2):
        tiled.attribute(x, target=0, window=8)
        assert tiled.last_engine == "dense" and "cannot trace" in tiled.last_engine_reason
    assert len(traces) == 1


def test_a_run_of_short_calls_tries_incremental_once_their_savings_would_have_paid(
    net, flops_only, monkeypatch
):
    # Each call would save 1 evaluation and trying costs 2.5: the third call tries.
    monkeypatch.setattr(incremental._sweep, "_payback", lambda *a: (1.0, 2.5, 16))
    tiled = TiledOcclusion(net)
    reasons = []
    for _ in range(3):
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        dense = tiled.attribute(x, target=1, window=WINDOW, k=K, engine="dense")
        auto = tiled.attribute(x, target=1, window=WINDOW, k=K)
        assert _error(auto, dense) <= 1e-10
        reasons.append(tiled.last_engine_reason)
    assert "too few windows" in reasons[0] and "earlier calls" not in reasons[0]
    assert "(and 1.0 by earlier calls)" in reasons[1]
    assert "too few windows" not in reasons[2] and "verified" in reasons[2]
