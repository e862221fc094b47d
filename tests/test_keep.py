"""The sweep keeps only the clean activations a box reads; the others are recomputed (#20)."""

import pytest
import torch
import torchvision
from torch import nn

from extra_attrib import TiledOcclusion
from extra_attrib._incremental import IncrementalSweep, _sweep, program_for
from extra_attrib._incremental._keep import CleanStore, evictable, resolved
from tests.models import init_bn

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW, K = (3, 8, 8), (1, 2, 2)


def _resnet():
    torch.manual_seed(0)
    return init_bn(torchvision.models.resnet18(num_classes=5)).double().eval()


class Bottleneck(nn.Module):
    """1x1 conv, BN, ReLU, 3x3 conv, BN, 1x1 conv, add: most values are read on their box only."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 3, 1)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        y = self.c(torch.relu(self.bn2(self.b(torch.relu(self.bn(self.a(x)))))))
        return self.head((x + y).mean((2, 3)))


def _bottleneck():
    torch.manual_seed(1)
    return init_bn(Bottleneck()).double().eval()


def _attribute(model, x, engine, **kwargs):
    tiled = TiledOcclusion(model)
    out = tiled.attribute(x, target=0, window=WINDOW, k=K, engine=engine, **kwargs)
    return out, tiled


def _record_stores(monkeypatch):
    """The :class:`CleanStore` of every sweep made from now on, in order."""
    stores = []
    make = CleanStore.__init__

    def init(self, *args, **kwargs):
        make(self, *args, **kwargs)
        stores.append(self)

    monkeypatch.setattr(CleanStore, "__init__", init)
    return stores


def _sweep_of(model, x):
    return IncrementalSweep(program_for(model, x), (x,), (torch.tensor(0.0),))


def test_only_box_readers_are_evicted():
    program = program_for(_bottleneck(), torch.randn(1, 3, 16, 16, dtype=torch.float64))
    names = {n.name for n in evictable(program)}
    # Read on their box only: a, b and the BNs by BN/ReLU, the second ReLU by the 1x1 conv c.
    # Kept: the ReLU feeding the 3x3 conv (its context), c and x (the add's union box).
    assert names == {"a", "bn", "b", "bn2", "relu_1"}


def test_the_sweep_keeps_fewer_bytes_than_the_clean_run():
    model = _resnet()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    sweep = _sweep_of(model, x)
    full_bytes = sweep.program.prune(sweep.program.run_clean(x.clone()))  # no store: all kept
    assert sweep.store.evictable
    assert sweep.activation_bytes < 0.7 * full_bytes
    placeholders = [v for v in sweep.clean.values() if isinstance(v, torch.Tensor) and v.is_meta]
    assert placeholders


@pytest.mark.parametrize("build", [_resnet, _bottleneck])
def test_evicted_activations_give_the_dense_map(build):
    model = build()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    dense, _ = _attribute(model, x, "dense")
    incremental, tiled = _attribute(model, x, "incremental")
    assert tiled.last_engine == "incremental"
    torch.testing.assert_close(incremental, dense, rtol=1e-9, atol=1e-12)


def test_a_full_box_reads_an_evicted_activation_through_its_placeholder(monkeypatch):
    """A box covering the whole map is materialised from the clean values of any node."""
    model = _bottleneck()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    stores = _record_stores(monkeypatch)
    dense, _ = _attribute(model, x, "dense")
    incremental, tiled = _attribute(model, x, "incremental")
    torch.testing.assert_close(incremental, dense, rtol=1e-9, atol=1e-12)
    assert any(store.recomputed for store in stores)


def test_over_the_budget_a_read_activation_is_recomputed_each_time(monkeypatch):
    model = _resnet()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    dense, _ = _attribute(model, x, "dense")
    kept = _sweep_of(model, x).activation_bytes
    monkeypatch.setattr(_sweep, "ACTIVATION_BUDGET_BYTES", kept)  # nothing more may be kept
    stores = _record_stores(monkeypatch)
    incremental, tiled = _attribute(model, x, "incremental")
    assert tiled.last_engine == "incremental"
    torch.testing.assert_close(incremental, dense, rtol=1e-9, atol=1e-12)
    store = stores[-1]
    assert store.kept_bytes <= kept and max(store.recomputed.values()) > 1


def test_a_model_over_the_budget_when_all_is_kept_now_runs_incrementally(monkeypatch):
    model = _resnet()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    sweep = _sweep_of(model, x)
    full_bytes = sweep.program.prune(sweep.program.run_clean(x.clone()))
    budget = (sweep.activation_bytes + full_bytes) // 2
    monkeypatch.setattr(_sweep, "ACTIVATION_BUDGET_BYTES", budget)
    dense, _ = _attribute(model, x, "dense")
    incremental, tiled = _attribute(model, x, "incremental")
    assert tiled.last_engine == "incremental"
    torch.testing.assert_close(incremental, dense, rtol=1e-9, atol=1e-12)


def test_an_unresolved_placeholder_cannot_give_numbers():
    sweep = _sweep_of(_bottleneck(), torch.randn(1, 3, 16, 16, dtype=torch.float64))
    node, stand_in = next(
        (n, v) for n, v in sweep.clean.items() if isinstance(v, torch.Tensor) and v.is_meta
    )
    with pytest.raises((RuntimeError, NotImplementedError)):
        (torch.zeros(stand_in.shape, dtype=stand_in.dtype) + stand_in).sum().item()
    value = resolved(stand_in)
    assert not value.is_meta and value.shape == stand_in.shape
    assert sweep.store.resolve(node) is value  # kept once read, within the budget
