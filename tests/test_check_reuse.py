"""The self-check's windows count towards the map (#18, #20).

The incremental engine's self-check runs a few windows (the tiling's corners and centre) through
the real model before a sweep trusts a trace. Those outputs are exact dense values: the sweep
scores them instead of evaluating the windows again. Maps must equal dense in float64 whether or
not the outputs were reused, and the sweep must evaluate exactly the checked windows fewer.
"""

import pytest
import torch
from torch import nn

import extra_attrib._drilldown as drilldown_module
import extra_attrib.tiled_occlusion as tiled_module
from extra_attrib import TiledOcclusion
from extra_attrib._engine import occlusion_sweep
from extra_attrib._geometry import TileGeometry
from extra_attrib._incremental import IncrementalSweep, choose_engine, program_for
from extra_attrib._incremental._verify import check_windows, verify_incremental
from extra_attrib._plan import SweepPlan

# One thread: the engines' chunk sizes and timings, as a user on one core would see them.
pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Convolutions then a position-dependent head, in 1, 2 or 3 dimensions."""

    def __init__(self, d, dict_output=False):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[d]
        pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[d]
        self.body = nn.Sequential(conv(2, 4, 3, padding=1), nn.ReLU(), conv(4, 4, 3, padding=1))
        self.pool = pool(2)
        self.head = nn.Linear(4 * 2**d, 3)
        self.dict_output = dict_output

    def forward(self, x):
        y = self.head(self.pool(self.body(x)).flatten(1))
        return {"out": y, "aux": y * 2} if self.dict_output else y


SHAPES = {1: (2, 24), 2: (2, 12, 12), 3: (2, 8, 8, 8)}
WINDOWS = {1: (2, 6), 2: (2, 4, 4), 3: (2, 4, 4, 4)}


def _setup(d, n=2, dict_output=False, seed=0):
    torch.manual_seed(seed)
    model = Net(d, dict_output).double().eval()
    x = torch.randn(n, *SHAPES[d], dtype=torch.float64)
    return model, x


class Counted:
    """The model, counting the rows it is called on."""

    def __init__(self, model):
        self.model = model
        self.rows = 0

    def __call__(self, batch):
        self.rows += batch.shape[0]
        return self.model(batch)


def _checked(model, x, fill, geometry):
    choice = choose_engine("incremental", model, (x,), (fill,), (), None, geometry)
    assert choice.checked is not None, choice.reason
    return choice.checked


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("n", [1, 3])
def test_sweep_scores_checked_windows_instead_of_evaluating(d, k, n):
    model, x = _setup(d, n)
    fill = torch.tensor(0.0, dtype=torch.float64)
    geometry = TileGeometry(SHAPES[d], WINDOWS[d], (1,) + (k,) * d)
    checked = _checked(model, x, fill, geometry)
    assert checked.windows == check_windows(geometry)
    w = len(checked.windows)
    args = ((x,), (fill,), [geometry], [None], lambda out: out)
    plain, reused = Counted(model), Counted(model)
    dense = occlusion_sweep(plain, *args, chunk_size=4)
    with_reuse = occlusion_sweep(reused, *args, chunk_size=4, plan=SweepPlan(precomputed=checked))
    torch.testing.assert_close(
        with_reuse.attributions[0], dense.attributions[0], rtol=0, atol=1e-12
    )
    # The check's windows and its clean copy (the sweep's clean pass) are not evaluated again.
    assert plain.rows - reused.rows == (w + 1) * n
    assert with_reuse.reused == w and dense.reused == 0
    assert with_reuse.perturbations == dense.perturbations == geometry.num_perturbations


def test_targets_per_example_and_dict_output_through_score():
    model, x = _setup(2, 3, dict_output=True)
    fill = torch.randn(1, *SHAPES[2], dtype=torch.float64)  # a tensor baseline, broadcast
    geometry = TileGeometry(SHAPES[2], WINDOWS[2], (1, 2, 2))
    checked = _checked(model, x, fill, geometry)
    targets = [torch.tensor([0, 2, 1]), 1]
    args = ((x,), (fill,), [geometry], targets, lambda out: out["aux"] - out["out"] ** 2)
    dense = occlusion_sweep(Counted(model), *args)
    with_reuse = occlusion_sweep(Counted(model), *args, plan=SweepPlan(precomputed=checked))
    assert with_reuse.reused == len(checked.windows)
    torch.testing.assert_close(
        with_reuse.attributions[0], dense.attributions[0], rtol=0, atol=1e-12
    )


def test_unchanged_and_unrequested_windows_are_not_reused():
    model, x = _setup(2, 1)
    fill = torch.tensor(0.0, dtype=torch.float64)
    geometry = TileGeometry(SHAPES[2], WINDOWS[2], (1, 1, 1))
    x[..., :4, :4] = 0.0  # window 0 (a checked corner) changes nothing: skipped, not reused
    checked = _checked(model, x, fill, geometry)
    args = ((x,), (fill,), [geometry], [0], lambda out: out)
    wanted = [[0, 1, 2, checked.windows[1]]]  # the corner and one other checked window asked for
    dense = occlusion_sweep(model, *args, windows=wanted)
    with_reuse = occlusion_sweep(model, *args, windows=wanted, plan=SweepPlan(precomputed=checked))
    assert with_reuse.reused == 1 and with_reuse.skipped == dense.skipped == 1
    torch.testing.assert_close(with_reuse.attributions[0], dense.attributions[0], rtol=0, atol=0)
    # A copy is another tensor, and a tensor changed in place since the check has other
    # values: no reuse at all.
    other = occlusion_sweep(
        model, (x.clone(),), (fill,), [geometry], [0], lambda out: out,
        plan=SweepPlan(precomputed=checked),
    )  # fmt: skip
    assert other.reused == 0
    x[0, 0, 5, 5] += 1.0
    changed = occlusion_sweep(model, *args, plan=SweepPlan(precomputed=checked))
    assert changed.reused == 0


def test_no_reuse_when_the_check_ran_only_the_first_examples():
    model, x = _setup(2, 3)
    fill = torch.tensor(0.0, dtype=torch.float64)
    geometry = TileGeometry(SHAPES[2], WINDOWS[2], (1, 2, 2))
    sweep = IncrementalSweep(program_for(model, x), (x,), (fill,), geometry)
    kept = []
    verify_incremental(
        model, x, fill, geometry, sweep.clean_output, lambda b: sweep.run(0, b), 1, keep=kept
    )
    assert kept == []  # one example through the model: nothing for the sweep
    verify_incremental(
        model, x, fill, geometry, sweep.clean_output, lambda b: sweep.run(0, b), keep=kept
    )
    assert len(kept) == 1 and kept[0].outputs.shape[0] == len(kept[0].windows) * 3


def _recording(monkeypatch):
    """Records every occlusion sweep's result, in TiledOcclusion and in the drill-down."""
    results = []

    def recorded(*args, **kwargs):
        result = occlusion_sweep(*args, **kwargs)
        results.append(result)
        return result

    monkeypatch.setattr(tiled_module, "occlusion_sweep", recorded)
    monkeypatch.setattr(drilldown_module, "occlusion_sweep", recorded)
    return results


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("engine", ["incremental", "auto"])
def test_attribute_equals_dense_with_reuse(monkeypatch, d, engine):
    model, x = _setup(d, 2)
    base = torch.rand(1, *SHAPES[d], dtype=torch.float64)
    results = _recording(monkeypatch)
    kwargs = dict(window=WINDOWS[d], k=2, baselines=base)
    tiled = TiledOcclusion(model)
    dense = tiled.attribute(x, target=1, engine="dense", **kwargs)
    assert results[-1].reused == 0
    fast = tiled.attribute(x, target=1, engine=engine, **kwargs)
    torch.testing.assert_close(fast, dense, rtol=0, atol=1e-12)
    if engine == "incremental":
        assert results[-1].reused == len(check_windows(tiled_geometry(x, WINDOWS[d], 2)))
        assert tiled.last_perturbations == results[0].perturbations


def tiled_geometry(x, window, k):
    return TileGeometry(tuple(x.shape[1:]), window, (1,) + (k,) * (x.dim() - 2))


def test_attribute_multi_and_refine_equal_dense(monkeypatch):
    model, x = _setup(2, 2)
    results = _recording(monkeypatch)
    tiled = TiledOcclusion(model)
    targets = [0, torch.tensor([2, 1])]
    kwargs = dict(window=(2, 4, 4), k=2)
    dense = tiled.attribute_multi(x, targets, engine="dense", **kwargs)
    fast = tiled.attribute_multi(x, targets, engine="incremental", **kwargs)
    torch.testing.assert_close(fast, dense, rtol=0, atol=1e-12)
    assert results[-1].reused == 5
    results.clear()
    dense = tiled.attribute(x, target=0, refine=0.3, engine="dense", **kwargs)
    assert all(r.reused == 0 for r in results)
    results.clear()
    # A new object: this one checked these shapes' windows already, and a later call checks
    # only its clean output (#30).
    fast = TiledOcclusion(model).attribute(x, target=0, refine=0.3, engine="incremental", **kwargs)
    torch.testing.assert_close(fast, dense, rtol=0, atol=1e-12)
    # The coarse pass reuses the checked windows it asks for; per-example refinements (other
    # tensors) reuse nothing.
    assert results[0].reused >= 1 and all(r.reused == 0 for r in results[1:])
