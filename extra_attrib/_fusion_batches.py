"""How FusionGrad splits one weight sample's work into calls of the wrapped method.

Pure functions of the arguments: binding positional arguments to the wrapped method's parameter
names, planning the calls under ``batch_size``, and cutting every per-example argument to the rows
of one call.

Which arguments are per-example (the rule :class:`~extra_attrib.FusionGrad` documents):

- ``target``: a tensor with more than one element or a list has one entry per example;
- ``additional_forward_args``: every tensor (also inside a tuple) whose first dimension is ``N``;
- ``baselines`` and ``feature_mask``: a tensor (also inside a tuple) whose first dimension is
  ``N >= 2``; a first dimension of 1 broadcasts and is passed unchanged. Except for methods that
  take ``baselines`` as a *distribution* (GradientShap, DeepLiftShap and their Layer/Neuron
  variants, also inside a NoiseTunnel): their baselines go whole to every call, never split or
  repeated, whatever their number of rows.
- Everything else passes unchanged to every call.

A method defined outside Captum and extra_attrib may take ``baselines`` or ``feature_mask`` either
way. Its ``N``-row tensors are expanded like the inputs as long as every call holds all ``N``
examples (which is right in both readings: a distribution repeated ``m`` times is the same
distribution); a ``batch_size`` that would split the examples raises a ValueError instead.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple

from captum.attr import (
    Attribution,
    DeepLiftShap,
    GradientShap,
    LayerDeepLiftShap,
    LayerGradientShap,
    NeuronDeepLiftShap,
    NeuronGradientShap,
)
from torch import Tensor

#: Methods whose ``baselines`` are a distribution of references, not one row per example.
DISTRIBUTION_BASELINES = (
    DeepLiftShap,
    GradientShap,
    LayerDeepLiftShap,
    LayerGradientShap,
    NeuronDeepLiftShap,
    NeuronGradientShap,
)
_KNOWN_PACKAGES = ("captum.", "extra_attrib.")
PER_EXAMPLE, DISTRIBUTION, UNKNOWN = "per-example", "distribution", "unknown"


def baseline_kind(method: Attribution) -> str:
    """How ``method`` reads a ``baselines`` tensor with ``N`` rows.

    Args:
        method (Attribution): The wrapped method; a NoiseTunnel or FusionGrad is looked through.

    Returns:
        str: ``"distribution"`` (GradientShap, DeepLiftShap, ...), ``"per-example"`` (other
        Captum and extra_attrib methods) or ``"unknown"`` (methods defined elsewhere).
    """
    inner = getattr(method, "attribution_method", None)
    while isinstance(inner, Attribution):
        method, inner = inner, getattr(inner, "attribution_method", None)
    if isinstance(method, DISTRIBUTION_BASELINES):
        return DISTRIBUTION
    if type(method).__module__.startswith(_KNOWN_PACKAGES):
        return PER_EXAMPLE
    return UNKNOWN


def check_split(
    named: Dict[str, Any], num: int, plan: Sequence[Tuple[int, int, int]], kind: str
) -> None:
    """Raise if a call of ``plan`` would split an argument that may not be per-example.

    Args:
        named (dict): The wrapped method's keyword arguments.
        num (int): Number of examples ``N``.
        plan (sequence of tuple): Output of :func:`chunk_plan`.
        kind (str): Output of :func:`baseline_kind`.
    """
    if kind != UNKNOWN or all(e1 - e0 == num for e0, e1, _ in plan):
        return
    for key in ("baselines", "feature_mask"):
        values = named.get(key)
        values = values if isinstance(values, tuple) else (values,)
        if any(num >= 2 and _is_batched(v, num) for v in values):
            raise ValueError(
                f"{key} has {num} rows, as many as the examples, and batch_size would split the "
                f"examples across calls; for a method outside Captum FusionGrad cannot tell "
                f"whether {key} holds one row per example or a distribution shared by all "
                f"examples: use batch_size >= N = {num} (every call then holds all examples) "
                f"or give {key} a different number of rows"
            )


def bind_extra_args(
    method: Attribution, inputs: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]
) -> Dict[str, Any]:
    """Turn the positional arguments meant for ``method.attribute`` into keyword arguments.

    So every argument can be found (and expanded) by name.

    Args:
        method (Attribution): The wrapped method.
        inputs (Any): Its first argument (only used to bind the others).
        args (tuple): Further positional arguments given to ``FusionGrad.attribute``.
        kwargs (dict): Keyword arguments meant for the wrapped method.

    Returns:
        dict: Every argument after ``inputs``, by name.
    """
    if not args:
        return dict(kwargs)
    label = f"{type(method).__name__}.attribute"
    try:
        signature = inspect.signature(method.attribute)
        bound = signature.bind_partial(inputs, *args, **kwargs)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"the extra positional arguments {args!r} do not fit {label}: {err}"
        ) from None
    first = next(iter(signature.parameters))
    named: Dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if name == first:
            continue
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(
                f"{label} takes *{name}; pass the arguments of the wrapped method by keyword, "
                f"got extra positional arguments {args!r}"
            )
        else:
            named[name] = value
    return named


def chunk_plan(num: int, m: int, batch_size: Optional[int]) -> List[Tuple[int, int, int]]:
    """Plan the wrapped calls of one weight sample.

    Args:
        num (int): Number of examples ``N``.
        m (int): Input samples per example.
        batch_size (int or None): Most rows per call; None for one call.

    Returns:
        list of tuple: ``(e0, e1, reps)`` per call: examples ``e0..e1-1``, each repeated
        ``reps`` times, ``(e1 - e0) * reps <= batch_size``; the ``reps`` add up to ``m`` for
        every example.
    """
    if batch_size is None or batch_size >= num * m:
        return [(0, num, m)]
    if batch_size >= num:
        per_call = batch_size // num
        reps = [per_call] * (m // per_call) + ([m % per_call] if m % per_call else [])
        return [(0, num, r) for r in reps]
    blocks = [(e0, min(e0 + batch_size, num)) for e0 in range(0, num, batch_size)]
    return [(e0, e1, 1) for _ in range(m) for e0, e1 in blocks]


def rows(t: Tensor, e0: int, e1: int, reps: int) -> Tensor:
    """Rows ``e0..e1-1`` of ``t``, each repeated ``reps`` times consecutively.

    Args:
        t (Tensor): Shape ``(N, ...)``.
        e0 (int): First row.
        e1 (int): One past the last row.
        reps (int): Copies of each row.

    Returns:
        Tensor: Shape ``((e1 - e0) * reps, ...)``.
    """
    block = t[e0:e1]
    return block if reps == 1 else block.repeat_interleave(reps, dim=0)


def _is_batched(value: Any, num: int) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == num


def _expand_target(target: Any, num: int, e0: int, e1: int, reps: int) -> Any:
    if isinstance(target, Tensor) and target.numel() > 1:
        if not _is_batched(target, num):
            raise ValueError(
                "a target tensor must have one element or one entry per example along dim 0 "
                f"(N={num}), got shape {tuple(target.shape)}"
            )
        return rows(target, e0, e1, reps)
    if isinstance(target, list):
        if len(target) != num:
            raise ValueError(
                f"a target list must have one entry per example (N={num}), got length "
                f"{len(target)}: {target!r}"
            )
        return [item for item in target[e0:e1] for _ in range(reps)]
    return target  # None, int, tuple (one output index for all examples), one-element tensor


def _expand_batched(value: Any, num: int, e0: int, e1: int, reps: int, min_num: int) -> Any:
    """Expands a tensor with ``N`` rows (``N >= min_num``), or each such tensor of a tuple.

    Anything else (scalars, broadcastable tensors, non-tensors) passes unchanged.
    """
    if isinstance(value, tuple):
        return tuple(_expand_batched(v, num, e0, e1, reps, min_num) for v in value)
    if num >= min_num and _is_batched(value, num):
        return rows(value, e0, e1, reps)
    return value


def expand_kwargs(
    named: Dict[str, Any], num: int, e0: int, e1: int, reps: int, kind: str = PER_EXAMPLE
) -> Dict[str, Any]:
    """The wrapped method's keyword arguments for one call.

    Everything that has one row per example is expanded like the inputs (see the module docstring
    for the rule).

    Args:
        named (dict): The wrapped method's keyword arguments.
        num (int): Number of examples ``N``.
        e0 (int): First example of the call.
        e1 (int): One past the last example of the call.
        reps (int): Copies of each example in the call.
        kind (str, optional): Output of :func:`baseline_kind`. Default: ``"per-example"``.

    Returns:
        dict: The keyword arguments of the call.
    """
    out = dict(named)
    if "target" in out:
        out["target"] = _expand_target(out["target"], num, e0, e1, reps)
    if "additional_forward_args" in out:
        out["additional_forward_args"] = _expand_batched(
            out["additional_forward_args"], num, e0, e1, reps, min_num=1
        )
    for key in ("baselines", "feature_mask"):
        if key == "baselines" and kind == DISTRIBUTION:
            continue  # a distribution of references: every call gets all of them
        if key in out:  # a first dim of 1 broadcasts, so it stays
            out[key] = _expand_batched(out[key], num, e0, e1, reps, min_num=2)
    return out
