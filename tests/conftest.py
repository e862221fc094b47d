import os

import matplotlib
import pytest
import torch

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Runs a test with torch on one thread, restoring the thread count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def flops_only(monkeypatch):
    """The cost model without its fixed cost per node: FLOPs and elements alone.

    The tests' toy models have a few tiny layers, where the per-node cost (fitted on real CNNs)
    rightly predicts that incremental loses; tests of the race and its bookkeeping use this to
    have ``auto`` try incremental on them anyway.
    """
    from extra_attrib._incremental import _ops

    monkeypatch.setattr(_ops, "DENSE_NODE_COST", 0.0)
    monkeypatch.setattr(_ops, "INCREMENTAL_NODE_COST", 0.0)


def pytest_configure(config):
    os.environ.setdefault("MPLBACKEND", "Agg")
