"""The engine is chosen by measurement on the sweep's own windows (#20)."""

import time

import pytest
import torch
from torch import nn

from extra_attrib import TiledOcclusion
from extra_attrib._engine import DenseEvaluator, occlusion_sweep
from extra_attrib._geometry import TileGeometry
from extra_attrib._plan import EngineRace, SweepPlan, trial_size

# One thread: the engines' chunk sizes and timings, as a user on one core would see them.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_race_keeps_the_faster_engine_and_remembers_it():
    memo = {}
    race = EngineRace(["dense", "incremental"], {"dense": 4, "incremental": 4}, memo, "k")
    seen = []
    while race.racing:
        name, size = race.next()
        seen.append(name)
        race.record(name, size, {"dense": 1.0, "incremental": 0.9}[name] * size, size)
    assert seen == ["dense", "incremental", "dense", "incremental"]  # interleaved
    assert race.chosen == "incremental" and memo == {"k": "incremental"}
    assert "measured" in race.reason
    again = EngineRace(["dense", "incremental"], {"dense": 4, "incremental": 4}, memo, "k")
    assert not again.racing and again.next() == ("incremental", None)
    assert "earlier call" in again.reason


def test_race_ties_go_to_the_first_and_a_clearly_slower_engine_drops_out():
    race = EngineRace(["dense", "incremental"], {"dense": 2, "incremental": 2})
    race.record("dense", 2, 2.0, 2)
    race.record("incremental", 2, 2.0, 2)
    race.record("dense", 2, 2.0, 2)
    race.record("incremental", 2, 2.0, 2)
    assert race.chosen == "dense"
    slow = EngineRace(["dense", "incremental"], {"dense": 2, "incremental": 2})
    slow.record("dense", 2, 1.0, 2)
    slow.record("incremental", 2, 5.0, 2)  # 5x slower after one chunk: no second trial
    assert slow.chosen == "dense"


def test_an_engine_measured_by_the_self_check_runs_no_trial_chunks():
    names, sizes = ["dense", "incremental"], {"dense": 4, "incremental": 4}
    memo = {}
    race = EngineRace(names, sizes, memo, "k", measured={"dense": 1.0})
    seen = []
    while race.racing:
        name, size = race.next()
        seen.append(name)
        race.record(name, size, 0.6 * size, size)
    assert seen == ["incremental", "incremental"]  # dense's time came with the check
    assert race.chosen == "incremental" and memo == {"k": "incremental"}
    assert "dense on the self-check's pass" in race.reason
    # Measured slower than dense by more than RACE_DROP on its first chunk: out at once.
    slow = EngineRace(names, sizes, measured={"dense": 1.0})
    slow.record("incremental", 4, 4 * 2.0, 4)
    assert slow.chosen == "dense" and not slow.racing
    # Every engine measured: settled without a race; a remembered choice is not overridden.
    both = EngineRace(names, sizes, measured={"dense": 1.0, "incremental": 0.5})
    assert both.chosen == "incremental"
    remembered = EngineRace(names, sizes, {"k": "dense"}, "k", measured={"dense": 9.0})
    assert remembered.chosen == "dense" and "earlier call" in remembered.reason


def test_the_race_times_interior_windows_first(monkeypatch, flops_only):
    from extra_attrib._incremental import _sweep

    model, x = _small_cnn(), torch.randn(1, 3, 32, 32)
    geometry = TileGeometry((3, 32, 32), (3, 8, 8), (1, 2, 2))
    first = []
    original = _sweep.IncrementalSweep.evaluate

    def spy(self, j, windows, where):
        if not first:
            first.extend(windows)
        return original(self, j, windows, where)

    monkeypatch.setattr(_sweep.IncrementalSweep, "evaluate", spy)
    monkeypatch.setattr(_sweep, "TRY_PAYBACK", 0.0)
    tiled = TiledOcclusion(model)
    auto = tiled.attribute(x, target=0, window=(3, 8, 8), k=(1, 2, 2))
    dense = tiled.attribute(x, target=0, window=(3, 8, 8), k=(1, 2, 2), engine="dense")
    torch.testing.assert_close(auto, dense, rtol=1e-4, atol=1e-5)
    grid = geometry.grid[1:]
    rows = {w // grid[1] for w in first}
    assert first and 0 not in rows and grid[0] - 1 not in rows  # no border row


def test_trial_chunks_are_a_small_share_of_the_sweep():
    x = torch.zeros(1, 3, 8, 8)
    assert trial_size([x], 64, 1000, None, None) == 8
    assert trial_size([x], 64, 48, None, None) == 3
    assert trial_size([x], 64, 1000, {"k": 32}, "k") == 32
    assert trial_size([x], 64, 1000, None, None, fixed=5) == 5


class SlowEvaluator(DenseEvaluator):
    """The dense engine, slowed down: a stand-in for an engine the cost model overrates."""

    def evaluate(self, j, windows, windows_on_device):
        time.sleep(0.002 * len(windows))
        return super().evaluate(j, windows, windows_on_device)


def _sweep(plan):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(2, 2, 16, 16)
    model(x)
    geometry = TileGeometry((2, 16, 16), (2, 2, 2), (1, 1, 1))
    return occlusion_sweep(
        model, (x,), (torch.zeros(()),), [geometry], [0], lambda out: out, plan=plan
    )


def test_a_measurement_overrides_any_prediction_and_trials_count_towards_the_map():
    reference = _sweep(None)
    memo = {}
    plan = SweepPlan({"incremental": SlowEvaluator, "dense": None}, engine_memo=memo)
    result = _sweep(plan)
    assert result.engine == "dense", result.engine_reason
    assert "measured" in result.engine_reason
    assert list(memo.values()) == ["dense"]
    # Every window evaluated once, trials included: the same map and counts as dense alone.
    assert result.perturbations == reference.perturbations == 64
    torch.testing.assert_close(result.attributions[0], reference.attributions[0])
    fast = _sweep(SweepPlan({"dense": SlowEvaluator, "incremental": None}))
    assert fast.engine == "incremental"
    torch.testing.assert_close(fast.attributions[0], reference.attributions[0])


def test_plan_fields_and_one_by_one_arguments():
    plan = SweepPlan({"dense": None}, chunk_size=3)
    result = _sweep(plan)
    assert result.engine == "dense" and result.engine_reason == "the only candidate"
    assert result.evaluations == 1 + -(-64 // 3)
    with pytest.raises(ValueError, match="plan.engines"):
        _sweep(SweepPlan({}))


def _net3d():
    layers, c_in = [], 1
    for c in (8, 16, 16):
        layers += [nn.Conv3d(c_in, c, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2)]
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(c_in, 2))


def test_auto_times_both_engines_then_remembers_the_choice():
    tiled = TiledOcclusion(_net3d().eval())
    x = torch.randn(1, 1, 32, 32, 32)
    dense = tiled.attribute(x, target=0, window=(1, 8, 8, 8), engine="dense")
    auto = tiled.attribute(x, target=0, window=(1, 8, 8, 8))
    assert tiled.last_engine in ("dense", "incremental")
    # Timed on the self-check's windows (a clear lead) or on trial chunks of the sweep.
    assert "measured on" in tiled.last_engine_reason
    assert "verified" in tiled.last_engine_reason  # incremental's self-check, whoever won
    torch.testing.assert_close(auto, dense, rtol=1e-4, atol=1e-5)
    first = tiled.last_engine
    tiled.attribute(x, target=0, window=(1, 8, 8, 8))
    assert tiled.last_engine == first
    assert "earlier call" in tiled.last_engine_reason
    # Another shape is measured afresh.
    tiled.attribute(torch.randn(1, 1, 24, 24, 24), target=0, window=(1, 8, 8, 8))
    assert "earlier call" not in tiled.last_engine_reason


def _small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    ).eval()


def test_auto_does_not_try_incremental_where_the_sweep_cannot_pay_for_it(monkeypatch, flops_only):
    from extra_attrib._incremental import _sweep

    model, x = _small_cnn(), torch.randn(1, 3, 16, 16)
    built = []
    original = _sweep.IncrementalSweep.__init__

    def spy(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(_sweep.IncrementalSweep, "__init__", spy)
    # 4 windows: whatever the cost model says, trying costs more than it could save.
    tiled = TiledOcclusion(model)
    dense = tiled.attribute(x, target=0, window=(3, 8, 8), engine="dense")
    auto = tiled.attribute(x, target=0, window=(3, 8, 8))
    assert tiled.last_engine == "dense"
    assert "too few windows to pay for trying incremental" in tiled.last_engine_reason
    torch.testing.assert_close(auto, dense, rtol=0, atol=0)
    # The cost model's prediction is remembered with the trace: a later call (a fresh object
    # too) decides without the clean pass.
    built.clear()
    TiledOcclusion(model).attribute(x, target=0, window=(3, 8, 8))
    assert built == []
    # Where trying is allowed, the same call checks and times incremental.
    monkeypatch.setattr(_sweep, "TRY_PAYBACK", 0.0)
    tiled.attribute(x, target=0, window=(3, 8, 8))
    assert "self-check" in tiled.last_engine_reason
    assert built


def test_the_cost_model_charges_a_fixed_cost_per_node(monkeypatch):
    from extra_attrib._incremental import _ops, _sweep

    model, x = _small_cnn(), torch.randn(1, 3, 16, 16)
    box = (slice(0, 3), slice(4, 8), slice(4, 8))
    zero = (torch.tensor(0.0),)

    def predict():
        program = _sweep._supported_program(model, (x,), ())
        sweep = _sweep._budgeted_sweep(program, (x,), zero, ())
        return sweep.dense_cost, sweep.predicted_gain(box)

    tiled = TiledOcclusion(model)
    tiled.attribute(x, target=0, window=(3, 4, 4), k=(1, 2, 2))
    assert tiled.last_engine == "dense"
    assert "the cost model predicts incremental at" in tiled.last_engine_reason
    dense, gain = predict()
    per_node = _ops.DENSE_NODE_COST, _ops.INCREMENTAL_NODE_COST
    monkeypatch.setattr(_ops, "DENSE_NODE_COST", 0.0)
    monkeypatch.setattr(_ops, "INCREMENTAL_NODE_COST", 0.0)
    flops, flops_gain = predict()
    # Every layer runs for the window (a 4x4 box reaches them all; past the global pooling
    # they run on the whole map, the flatten too); none is a pure view.
    nodes = 7
    assert dense - flops == pytest.approx(nodes * per_node[0])
    # FLOPs alone see a box of a sixteenth of the map and predict a gain; the fixed cost
    # of each of the tiny layers, larger for incremental, says it loses.
    assert flops_gain > 1.2 and gain < 1.0
    incremental = nodes * per_node[1]
    assert 1 / gain == pytest.approx(1 / flops_gain * flops / dense + incremental / dense)
