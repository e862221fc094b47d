"""A run that says how many calls are still to come lets the first one pay for trying (#30)."""

import pytest
import torch

from extra_attrib import TiledOcclusion, explain_dataset
from extra_attrib import _incremental as incremental
from extra_attrib._run_hint import calls_ahead, expected_calls
from tests._dataset_helpers import ATTRIBUTE_KWARGS, ItemsDataset, TinyNet
from tests.test_groups import WINDOW, K, _budget_for, _error, net  # noqa: F401 (fixture)


def test_expected_calls_is_scoped_and_at_least_one():
    assert calls_ahead() == 1.0
    with expected_calls(7.5):
        assert calls_ahead() == 7.5
        with expected_calls(0.2):
            assert calls_ahead() == 1.0
        assert calls_ahead() == 7.5
    assert calls_ahead() == 1.0


def test_a_short_call_in_a_long_run_tries_incremental_at_once(net, flops_only, monkeypatch):  # noqa: F811
    # Each call would save 1 evaluation and trying costs 2.5: alone it runs dense, but a run
    # that says 3 calls like it are coming tries incremental on the first.
    monkeypatch.setattr(incremental._sweep, "_payback", lambda *a: (1.0, 2.5, 16))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    dense = TiledOcclusion(net).attribute(x, target=1, window=WINDOW, k=K, engine="dense")
    alone = TiledOcclusion(net)
    alone.attribute(x, target=1, window=WINDOW, k=K)
    assert "too few windows" in alone.last_engine_reason
    with expected_calls(2):
        two = TiledOcclusion(net)
        two.attribute(x, target=1, window=WINDOW, k=K)
    assert "(2.0 over 2 sweeps like it)" in two.last_engine_reason
    with expected_calls(3):
        run = TiledOcclusion(net)
        auto = run.attribute(x, target=1, window=WINDOW, k=K)
    assert "too few windows" not in run.last_engine_reason
    assert "verified" in run.last_engine_reason
    assert _error(auto, dense) <= 1e-10


def test_the_first_group_counts_the_savings_of_the_groups_after_it(net, flops_only, monkeypatch):  # noqa: F811
    # 6 examples in groups of 2: each group would save 1 and trying costs 2.5, so alone a
    # group would run dense; the first counts 3 groups' savings and tries incremental.
    monkeypatch.setattr(incremental._sweep, "_payback", lambda *a: (1.0, 2.5, 16))
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    budget = _budget_for(net, x, 2)
    tiled = TiledOcclusion(net)
    dense = tiled.attribute(x, target=1, window=WINDOW, k=K, engine="dense")
    auto = tiled.attribute(x, target=1, window=WINDOW, k=K, memory_budget=budget)
    assert "3 groups" in tiled.last_engine_reason
    # Alone, each group would refuse to try; and once the first group measured incremental
    # faster, the later ones follow that measurement instead of asking the payback rule again.
    assert "too few windows" not in tiled.last_engine_reason
    assert _error(auto, dense) <= 1e-10


class _Recording:
    """A method that records what the run said of the calls to come."""

    def __init__(self, model):
        self.attribution_method = TiledOcclusion(model)
        self.ahead = []

    def attribute(self, inputs, **kwargs):
        self.ahead.append((inputs.shape[0], calls_ahead()))
        return self.attribution_method.attribute(inputs, **kwargs)


def test_explain_dataset_says_how_many_batches_are_still_to_come(tmp_path):
    pytest.importorskip("zarr")
    method = _Recording(TinyNet().eval())
    explain_dataset(
        method,
        ItemsDataset(),  # 10 items
        str(tmp_path / "store"),
        batch_size=4,
        show_progress=False,
        dtype=torch.float64,
        **ATTRIBUTE_KWARGS,
    )
    assert method.ahead == [(4, 2.5), (4, 1.5), (2, 1.0)]
    assert calls_ahead() == 1.0
