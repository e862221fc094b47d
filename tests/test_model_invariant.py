"""The user's model comes out of every method untouched and usable, over a zoo of odd models.

Invariant, after success and after an exception, for TiledOcclusion, FusionGrad and both under
NoiseTunnel: every parameter and buffer is the same object with the same bits as before (also when
the model reassigned it during forward), the train/eval flags are back, no tensor reachable from
the model is an inference tensor, and the model still trains (one optimizer step works and changes
the weights). Lazy parameters that were uninitialised before are materialised, as a plain forward
call would do (see extra_attrib._model_state).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Dict, List

import pytest
import torch
from captum.attr import NoiseTunnel, Saliency
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils import parametrize

from extra_attrib import FusionGrad, TiledOcclusion
from extra_attrib._model_state import model_state_kept, same_bits

FEATURES = 6
CLASSES = 3


# ------------------------------------------------------------------------------------ the zoo


class Cache(nn.Module):
    """Builds a cache on its first forward pass (a plain attribute, not a buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(FEATURES, CLASSES)
        self.cache = None

    def forward(self, x: Tensor) -> Tensor:
        if self.cache is None:
            self.cache = torch.cos(torch.arange(FEATURES, dtype=x.dtype))
        return self.lin(x * self.cache)


class ReassignBN(nn.Module):
    """Reassigns a buffer in forward, with BatchNorm (whatever mode the test sets)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(FEATURES)
        self.lin = nn.Linear(FEATURES, CLASSES)
        self.register_buffer("last", torch.zeros(1))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        self.last = x.detach().mean().reshape(1)
        self.calls += 1
        return self.lin(self.bn(x))


class Tied(nn.Module):
    """Two layers sharing one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(FEATURES, FEATURES)
        self.b = nn.Linear(FEATURES, FEATURES)
        self.b.weight = self.a.weight
        self.out = nn.Linear(FEATURES, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


class Symmetric(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return w.triu() + w.triu(1).transpose(0, 1)


def parametrized() -> nn.Module:
    model = nn.Sequential(nn.Linear(FEATURES, FEATURES), nn.Tanh(), nn.Linear(FEATURES, CLASSES))
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    return model


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, 4, batch_first=True)
        self.out = nn.Linear(4, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        seq, _ = self.lstm(x.reshape(x.shape[0], FEATURES // 2, 2))
        return self.out(seq[:, -1])


class Raising(nn.Module):
    """BatchNorm in train mode and a buffer written in place, then an error on the 2nd call."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(FEATURES)
        self.lin = nn.Linear(FEATURES, CLASSES)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.armed = False
        self.count = 0  # a plain attribute: FusionGrad substitutes copies of the buffers

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.count += 1
        self.calls = self.calls + 0  # reassigned too
        out = self.lin(self.bn(x))
        if self.armed and self.count >= 2:
            raise RuntimeError("boom mid-sweep")
        return out


class InnerGrad(nn.Module):
    """Computes a gradient inside forward, like an energy-based or physics model."""

    def __init__(self) -> None:
        super().__init__()
        self.energy = nn.Linear(FEATURES, 1)
        self.out = nn.Linear(FEATURES, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        with torch.enable_grad():
            z = x if x.requires_grad else x.detach().requires_grad_()
            e = torch.tanh(self.energy(z)).pow(2).sum()
            (g,) = torch.autograd.grad(e, z, create_graph=True)
        return self.out(g + x)


def lazy() -> nn.Module:
    return nn.Sequential(nn.LazyLinear(CLASSES))


def lazy_initialised() -> nn.Module:
    model = nn.Sequential(nn.LazyLinear(CLASSES))
    with torch.no_grad():
        model(torch.zeros(1, FEATURES))
    return model


def bn_train() -> nn.Module:
    return nn.Sequential(
        nn.Linear(FEATURES, FEATURES), nn.BatchNorm1d(FEATURES), nn.Linear(FEATURES, CLASSES)
    ).train()


def reassign_eval() -> nn.Module:
    return ReassignBN().eval()


def reassign_train() -> nn.Module:
    return ReassignBN().train()


ZOO: Dict[str, Callable[[], nn.Module]] = {
    "cache": Cache,
    "lazy_initialised": lazy_initialised,
    "reassign_eval": reassign_eval,
    "reassign_train": reassign_train,
    "bn_train": bn_train,
    "tied": Tied,
    "parametrized": parametrized,
    "lstm": Recurrent,
    "inner_grad": InnerGrad,
}


# ------------------------------------------------------------------------------- the methods


def tiled(model: nn.Module, x: Tensor) -> Tensor:
    return TiledOcclusion(model).attribute(x, target=0, window=2, k=2)


def fusion(model: nn.Module, x: Tensor) -> Tensor:
    return FusionGrad(Saliency(model)).attribute(x, target=0, n=2, m=2, batch_size=4)


def tunnel_tiled(model: nn.Module, x: Tensor) -> Tensor:
    return NoiseTunnel(TiledOcclusion(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=2, stdevs=0.1, target=0, window=2, k=2
    )


def tunnel_fusion(model: nn.Module, x: Tensor) -> Tensor:
    return NoiseTunnel(FusionGrad(Saliency(model))).attribute(
        x, nt_type="smoothgrad", nt_samples=2, stdevs=0.1, target=0, n=2, m=1
    )


def fusion_tiled(model: nn.Module, x: Tensor) -> Tensor:
    return FusionGrad(TiledOcclusion(model), model).attribute(
        x, target=0, n=2, m=2, window=3, batch_size=2
    )


METHODS: Dict[str, Callable[[nn.Module, Tensor], Tensor]] = {
    "tiled": tiled,
    "fusion": fusion,
    "tunnel_tiled": tunnel_tiled,
    "tunnel_fusion": tunnel_fusion,
    "fusion_tiled": fusion_tiled,
}


# ----------------------------------------------------------------------------- the invariant


def inputs() -> Tensor:
    return torch.rand(4, FEATURES, generator=torch.Generator().manual_seed(3))


def snapshot(model: nn.Module) -> Dict[str, Any]:
    tensors = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for kind, store in (("p", module._parameters), ("b", module._buffers)):
            for name, t in store.items():
                if t is not None:
                    tensors[(prefix, kind, name)] = (t, t.detach().clone(), t.requires_grad)
    return {"tensors": tensors, "modes": [m.training for m in model.modules()]}


def reachable_tensors(model: nn.Module) -> List[Tensor]:
    found: List[Tensor] = []

    def walk(value: Any, depth: int = 0) -> None:
        if isinstance(value, Tensor):
            found.append(value)
        elif depth < 3 and isinstance(value, (list, tuple)):
            for v in value:
                walk(v, depth + 1)
        elif depth < 3 and isinstance(value, dict):
            for v in value.values():
                walk(v, depth + 1)

    for module in model.modules():
        for value in vars(module).values():
            walk(value)
    return found


def assert_invariant(model: nn.Module, before: Dict[str, Any]) -> None:
    for key, (obj, value, requires_grad) in before["tensors"].items():
        prefix, kind, name = key
        module = model.get_submodule(prefix)
        store = module._parameters if kind == "p" else module._buffers
        assert store.get(name) is obj, f"{key} was replaced"
        assert same_bits(obj, value), f"{key} changed"
        assert obj.requires_grad == requires_grad, f"{key}.requires_grad changed"
        if kind == "p":
            assert obj.grad is None, f"{key} got a gradient"
    assert [m.training for m in model.modules()] == before["modes"]
    inference = [tuple(t.shape) for t in reachable_tensors(model) if t.is_inference()]
    assert not inference, f"inference tensors reachable from the model: {inference}"
    assert_trains(model)


def assert_trains(model: nn.Module) -> None:
    x = inputs()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.1)
    with torch.enable_grad():
        loss = model(x).square().sum()
        loss.backward()
    optimizer.step()
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, params))


# ---------------------------------------------------------------------------------- the tests


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", sorted(ZOO))
def test_model_untouched_and_usable(name: str, method: str) -> None:
    torch.manual_seed(0)
    model = ZOO[name]()
    before = snapshot(model)
    attr = METHODS[method](model, inputs())
    assert attr.shape == (4, FEATURES)
    assert torch.isfinite(attr).all()
    assert_invariant(model, before)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_model_restored_after_exception(method: str) -> None:
    model = Raising().train()
    before = snapshot(model)
    model.armed = True
    with pytest.raises(RuntimeError, match="boom mid-sweep"):
        METHODS[method](model, inputs())
    model.armed = False
    assert_invariant(model, before)


@pytest.mark.parametrize("method", ["tiled", "tunnel_tiled"])
def test_lazy_module_is_materialised_like_a_forward_call(method: str) -> None:
    model = lazy()
    METHODS[method](model, inputs())
    weight = model[0].weight
    assert type(weight) is nn.Parameter and weight.shape == (CLASSES, FEATURES)
    assert not weight.is_inference() and weight.requires_grad
    assert_trains(model)


@pytest.mark.parametrize("method", ["fusion", "fusion_tiled"])
def test_fusion_grad_refuses_uninitialised_lazy_module(method: str) -> None:
    model = lazy()
    with pytest.raises(ValueError, match="uninitiali[sz]ed.*0.weight"):
        METHODS[method](model, inputs())


def test_cache_stays_usable_by_saliency() -> None:
    model = Cache()
    x = inputs()
    TiledOcclusion(model).attribute(x, target=0, window=2)
    assert not model.cache.is_inference()
    assert Saliency(model).attribute(x, target=0).shape == x.shape


def test_untouched_tensors_keep_their_version() -> None:
    # restoring must not write a tensor whose bits did not change: a graph built before still
    # backpropagates afterwards
    model = bn_train().eval()
    x = inputs()
    with torch.enable_grad():
        loss = model(x).sum()
    versions = [p._version for p in model.parameters()]
    TiledOcclusion(model).attribute(x, target=0, window=2)
    assert [p._version for p in model.parameters()] == versions
    loss.backward()


def test_guard_restores_reassigned_and_deleted_entries() -> None:
    model = ReassignBN()
    before = snapshot(model)
    with model_state_kept(model):
        model.last = torch.full((1,), 7.0)
        model.bn.running_mean.add_(1)
        del model.bn.running_var
        model.lin.weight = nn.Parameter(torch.zeros(CLASSES, FEATURES))
        model.lin.weight.requires_grad_(False)
        model.bn.weight.requires_grad_(False)
        model.train()
    assert_invariant(model, before)


def test_same_bits() -> None:
    a = torch.tensor([0.0, float("nan")])
    assert same_bits(a, a.clone())
    assert not same_bits(a, torch.tensor([-0.0, float("nan")]))
    assert not same_bits(a, a.double())
    assert same_bits(torch.tensor([True]), torch.tensor([True]))


def test_existing_gradients_are_kept() -> None:
    model = Tied()
    with torch.enable_grad():
        model(inputs()).sum().backward()
    grads = {name: (p.grad, p.grad.clone()) for name, p in model.named_parameters()}
    with model_state_kept(model):
        with torch.enable_grad():
            model(inputs()).square().sum().backward()  # accumulates into .grad in place
        model.out.weight.grad = None
    for name, p in model.named_parameters():
        assert p.grad is grads[name][0] and torch.equal(p.grad, grads[name][1])


_EDITS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "add",
                "reassign_buffer",
                "reassign_param",
                "delete_buffer",
                "freeze",
                "train",
                "negate_zero",
            ]
        ),
        st.integers(0, 10),
    ),
    max_size=8,
)


@settings(max_examples=40, deadline=None)
@given(_EDITS, st.booleans())
def test_guard_undoes_any_sequence_of_edits(edits, fail) -> None:
    model = ReassignBN()
    with torch.no_grad():
        model.lin.bias.zero_()  # zeros whose sign bit an edit may flip
    before = snapshot(model)
    params = list(model.parameters())
    buffers = [(m, name) for m in model.modules() for name in list(m._buffers)]
    with pytest.raises(RuntimeError, match="edit failed") if fail else contextlib.nullcontext():
        with model_state_kept(model):
            for kind, i in edits:
                p = params[i % len(params)]
                module, name = buffers[i % len(buffers)]
                with torch.no_grad():
                    if kind == "add":
                        p.add_(1.0)
                    elif kind == "negate_zero":
                        model.lin.bias.neg_()
                    elif kind == "reassign_buffer" and module._buffers.get(name) is not None:
                        setattr(module, name, module._buffers[name].clone() + 1)
                    elif kind == "reassign_param":
                        model.lin.weight = nn.Parameter(torch.zeros(CLASSES, FEATURES))
                    elif kind == "delete_buffer" and name in module._buffers:
                        delattr(module, name)
                    elif kind == "freeze":
                        p.requires_grad_(False)
                    elif kind == "train":
                        model.train(not model.training)
            if fail:
                raise RuntimeError("edit failed")
    assert_invariant(model, before)


def test_bound_forward_method_is_guarded_too() -> None:
    model = reassign_train()
    before = snapshot(model)
    TiledOcclusion(model.forward).attribute(inputs(), target=0, window=2)
    assert_invariant(model, before)
