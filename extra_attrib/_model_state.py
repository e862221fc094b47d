"""The one guard that leaves the user's model as it was: :func:`model_state_kept`.

Used by :class:`~extra_attrib.TiledOcclusion` and :class:`~extra_attrib.FusionGrad` around all
their forward passes. On exit, after success or an exception, every module of the model has

- the same parameter and buffer *objects* under the same names (a buffer or parameter the model
  reassigned during forward, ``self.last = x.mean()``, is put back);
- the same values in them, bit for bit (BatchNorm running statistics updated in train mode,
  a counter incremented in place: written back); a tensor whose bits did not change is not
  written, so its version counter stays, and autograd graphs the user built before still work;
- the same ``requires_grad`` flags, ``.grad`` tensors (objects and values: a method that
  calls ``backward`` cannot add into them) and train/eval flags.

What is kept as the model made it: attributes that did not exist before (a lazily built cache,
a buffer registered during forward), and lazy parameters and buffers (``nn.LazyLinear``) that a
first forward pass materialised -- exactly what a plain ``model(x)`` call would have done. A
parameter that was uninitialised before is therefore not "bit-identical" to anything: it now
holds its first initial values.

Cost: one copy of every parameter and buffer, on its device, for the duration of the block.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

# Exists at runtime (the base of every lazy parameter and buffer) but is missing from torch's stubs.
from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]

__all__ = ["model_state_kept", "same_bits", "uninitialized_names"]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors have the same shape, dtype, device and bit pattern.

    Unlike ``torch.equal``, NaN equals a NaN with the same bits and ``-0.0`` differs from ``0.0``.

    Args:
        a (Tensor): Any tensor.
        b (Tensor): Any tensor.

    Returns:
        bool: True if every element has the same bits.
    """
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    return torch.equal(_bits(a), _bits(b))


def _bits(t: Tensor) -> Tensor:
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype == torch.bool or t.element_size() not in _INT_OF_SIZE:
        return t
    return t.view(_INT_OF_SIZE[t.element_size()])


def _is_uninitialized(t: Any) -> bool:
    return isinstance(t, UninitializedTensorMixin)


def uninitialized_names(model: nn.Module) -> List[str]:
    """Names of the lazy parameters and buffers of ``model`` that no forward pass materialised.

    Args:
        model (nn.Module): Any module.

    Returns:
        list of str: e.g. ``["0.weight", "0.bias"]`` for a fresh ``Sequential(LazyLinear(3))``.
    """
    named = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, t in named if _is_uninitialized(t)]


@dataclass
class _ModuleState:
    module: nn.Module
    training: bool
    parameters: Dict[str, Optional[Tensor]] = field(default_factory=dict)
    buffers: Dict[str, Optional[Tensor]] = field(default_factory=dict)


@dataclass
class _TensorState:
    tensor: Tensor
    value: Optional[Tensor]  # None for a lazy tensor that was not materialised yet
    requires_grad: bool
    grad: Optional[Tensor]
    grad_value: Optional[Tensor]


class _Snapshot:
    """Everything :func:`model_state_kept` restores, taken on entry."""

    def __init__(self, model: nn.Module) -> None:
        self.modules: List[_ModuleState] = []
        self.tensors: Dict[int, _TensorState] = {}
        with torch.no_grad():
            for module in model.modules():
                state = _ModuleState(
                    module, module.training, dict(module._parameters), dict(module._buffers)
                )
                self.modules.append(state)
                for t in list(state.parameters.values()) + list(state.buffers.values()):
                    if t is not None and id(t) not in self.tensors:
                        grad = t.grad if isinstance(t, nn.Parameter) else None
                        self.tensors[id(t)] = _TensorState(
                            t,
                            None if _is_uninitialized(t) else t.detach().clone(),
                            t.requires_grad,
                            grad,
                            None if grad is None else grad.detach().clone(),
                        )

    def restore(self) -> None:
        errors: List[Tuple[str, BaseException]] = []
        for state in self.modules:
            module = state.module
            for kind, saved, current in (
                ("parameter", state.parameters, module._parameters),
                ("buffer", state.buffers, module._buffers),
            ):
                for name, original in saved.items():
                    # TorchScript modules hold these in a wrapper without ``get``.
                    present = name in current
                    if present and current[name] is original:
                        continue
                    try:
                        if present:
                            # setattr, not a dict write: modules such as nn.LSTM keep derived
                            # views of their parameters up to date in __setattr__.
                            setattr(module, name, original)
                        else:  # the model deleted it
                            module.__dict__.pop(name, None)
                            # current is _parameters or _buffers; torch types both as one.
                            current[name] = original  # type: ignore[assignment]
                    except Exception as err:  # keep restoring the rest, report at the end
                        errors.append((f"{kind} {name!r} of {type(module).__name__}", err))
            module.training = state.training
        with torch.no_grad():
            for saved_tensor in self.tensors.values():
                t = saved_tensor.tensor
                if saved_tensor.value is not None and not same_bits(t, saved_tensor.value):
                    t.copy_(saved_tensor.value)
                if t.requires_grad != saved_tensor.requires_grad and t.is_leaf:
                    t.requires_grad_(saved_tensor.requires_grad)
                if isinstance(t, nn.Parameter) and t.grad is not saved_tensor.grad:
                    t.grad = saved_tensor.grad
                grad, grad_value = saved_tensor.grad, saved_tensor.grad_value
                if grad is not None and grad_value is not None and not same_bits(grad, grad_value):
                    grad.copy_(grad_value)
        if errors:
            where, first = errors[0]
            raise RuntimeError(f"could not restore the model's {where}: {first}") from first


_MISSING = object()


def _refuse_meta(model: nn.Module) -> None:
    """Raise a ValueError if the model holds tensors on the ``meta`` device (shapes, no values)."""
    named = list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    )
    meta = [name for name, t in named if t.is_meta]
    if meta:
        shown = ", ".join(meta[:3]) + (f" and {len(meta) - 3} more" if len(meta) > 3 else "")
        raise ValueError(
            f"the model's {shown} {'is' if len(meta) == 1 else 'are'} on the meta device, which "
            "holds shapes but no values, so the model cannot compute attributions: materialise "
            "it first, e.g. model.to_empty(device='cpu') then model.load_state_dict(weights)"
        )


@contextlib.contextmanager
def model_state_kept(model: Any) -> Iterator[None]:
    """Restore a module's parameters, buffers and flags on exit, also after an exception.

    See the module docstring for exactly what is restored and what is kept. A bound method of a
    module (``model.forward``) guards that module; any other function is left alone (the guard
    cannot see which modules it calls).

    Args:
        model (Any): The user's model, or the forward function given to a method.

    Example::

        >>> with model_state_kept(model):
        ...     model.train()(x)          # BatchNorm statistics change here ...
        >>> model.training                # ... and are back, with the flags, afterwards
        False
    """
    owner = getattr(model, "__self__", None)  # a bound method such as model.forward
    if not isinstance(model, nn.Module) and isinstance(owner, nn.Module):
        model = owner
    if not isinstance(model, nn.Module):
        yield
        return
    _refuse_meta(model)
    snapshot = _Snapshot(model)
    try:
        yield
    finally:
        snapshot.restore()
