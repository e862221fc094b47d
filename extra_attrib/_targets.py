"""Scores and targets: which number of the model's output an attribution explains.

Targets are resolved once, on the output for the unperturbed input, to a flat index into each
example's (scored) output, so that every later forward pass is reduced with one ``gather``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Sequence, Tuple, Union

import torch
from torch import Tensor

from extra_attrib._checks import is_int

ScoreType = Union[str, Callable[[Tensor], Tensor]]

SCORES = ("raw", "softmax", "log_softmax")


def score_function(score: ScoreType) -> Callable[[Tensor], Tensor]:
    """Map a ``score`` argument to a function of the model's output.

    Args:
        score (str or callable): ``"raw"``, ``"softmax"``, ``"log_softmax"`` (both over dimension 1,
            the class dimension) or a callable ``score(outputs) -> outputs``.

    Returns:
        callable: The scoring function.
    """
    if callable(score):
        return _checked_score(score)
    if score == "raw":
        return _identity
    if score == "softmax":
        return _softmax
    if score == "log_softmax":
        return _log_softmax
    raise ValueError(f"score={score!r} is not supported: use one of {SCORES} or a callable")


def _checked_score(score: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``score`` with its result checked: a tensor with one row per row of the outputs."""

    def checked(outputs: Tensor) -> Tensor:
        scored = score(outputs)
        if (
            not isinstance(scored, Tensor)
            or scored.dim() == 0
            or (scored.shape[0] != outputs.shape[0])
        ):
            got = (
                f"shape {tuple(scored.shape)}"
                if isinstance(scored, Tensor)
                else f"{type(scored).__name__} {scored!r:.40}"
            )
            raise ValueError(
                f"score={_name(score)} returned {got} for model outputs of shape "
                f"{tuple(outputs.shape)}: a score callable must return a tensor with one row "
                "per example (the first dimension of its argument), e.g. "
                "lambda o: o.softmax(1)"
            )
        return scored

    return checked


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _identity(outputs: Tensor) -> Tensor:
    return outputs


def _softmax(outputs: Tensor) -> Tensor:
    _require_class_dim(outputs, "softmax")
    return torch.softmax(outputs, dim=1)


def _log_softmax(outputs: Tensor) -> Tensor:
    _require_class_dim(outputs, "log_softmax")
    return torch.log_softmax(outputs, dim=1)


def _require_class_dim(outputs: Tensor, name: str) -> None:
    if outputs.dim() < 2:
        raise ValueError(
            f"score={name!r} needs a class dimension, but the model output has shape "
            f"{tuple(outputs.shape)}: use score='raw' for a model with one output per example"
        )


def check_output(outputs: Any, rows: int) -> Tensor:
    """Check that the model returned a tensor with one row per input row.

    Args:
        outputs (Any): What the forward function returned.
        rows (int): The batch size it was given.

    Returns:
        Tensor: ``outputs``.
    """
    if not isinstance(outputs, Tensor):
        raise TypeError(
            f"the forward function returned {type(outputs).__name__}; it must return a Tensor"
        )
    if outputs.dim() == 0 or outputs.shape[0] != rows:
        raise ValueError(
            f"the forward function returned shape {tuple(outputs.shape)} for a batch of {rows}: "
            "its output's first dimension must follow the input batch size"
        )
    return outputs


def resolve_targets(
    targets: Sequence[Any], scored: Tensor, raw: Tensor, argument: str = "target"
) -> Tensor:
    """Flat indices into each example's output, one column per requested target.

    Args:
        targets (sequence): Targets in any form :meth:`TiledOcclusion.attribute` accepts.
        scored (Tensor): Scored output for the unperturbed input, shape ``(N, *O)``.
        raw (Tensor): Raw model output for the unperturbed input (for ``target=None``).
        argument (str, optional): Argument name used in error messages. Default: ``"target"``.

    Returns:
        Tensor: Long tensor of shape ``(N, len(targets))`` on the output's device.
    """
    n = scored.shape[0]
    out_shape = tuple(scored.shape[1:])
    names = [f"{argument}[{i}]" if len(targets) > 1 else argument for i in range(len(targets))]
    columns = [_resolve_one(t, n, out_shape, raw, name) for t, name in zip(targets, names)]
    return torch.stack(columns, dim=1).to(scored.device)


def _resolve_one(
    target: Any, n: int, out_shape: Tuple[int, ...], raw: Tensor, argument: str
) -> Tensor:
    size = math.prod(out_shape)
    if target is None:
        if size == 1:
            return torch.zeros(n, dtype=torch.long)
        return raw.reshape(n, -1).argmax(dim=1).cpu()
    if isinstance(target, Tensor):
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(f"{argument} must hold integers, got a tensor of {target.dtype}")
        if target.numel() == 1:
            target = int(target.item())
        elif target.dim() == 1:
            target = target.tolist()
        else:
            raise ValueError(
                f"{argument} has shape {tuple(target.shape)}: a tensor target must be a scalar "
                f"or hold one index per example ({n})"
            )
    if isinstance(target, list):
        if len(target) != n:
            raise ValueError(
                f"{argument} is a list of {len(target)} targets for {n} examples: "
                "a list target needs one entry per example"
            )
        return torch.tensor([_flat_index(t, out_shape, argument) for t in target])
    return torch.full((n,), _flat_index(target, out_shape, argument), dtype=torch.long)


def _flat_index(target: Any, out_shape: Tuple[int, ...], argument: str) -> int:
    index: Tuple[Any, ...] = target if isinstance(target, tuple) else (target,)
    if len(out_shape) == 0:
        raise ValueError(
            f"{argument}={target!r} given, but the model returns one value per example: "
            "use target=None"
        )
    if len(index) != len(out_shape) or not all(is_int(i) for i in index):
        raise ValueError(
            f"{argument}={target!r} does not index the model's per-example output of shape "
            f"{out_shape}: give {len(out_shape)} integer index(es)"
        )
    flat = 0
    for i, size in zip(index, out_shape):
        i = int(i)
        if not -size <= i < size:
            raise ValueError(
                f"{argument}={target!r} is out of range for the model's per-example output of "
                f"shape {out_shape}"
            )
        flat = flat * size + (i % size)
    return flat


def select(scored: Tensor, index: Tensor, reps: int) -> Tensor:
    """Pick the target scores out of a batch holding ``reps`` copies of the ``N`` examples.

    Args:
        scored (Tensor): Scored outputs, shape ``(reps * N, *O)``.
        index (Tensor): Flat target indices, shape ``(N, T)``.
        reps (int): Number of copies of the batch.

    Returns:
        Tensor: Shape ``(reps, N, T)``.
    """
    n, t = index.shape
    flat = scored.reshape(reps, n, -1)
    return flat.gather(2, index.unsqueeze(0).expand(reps, n, t))


def as_target_list(targets: Any) -> List[Any]:
    """Validate the ``targets`` argument of ``attribute_multi``."""
    if not isinstance(targets, (list, tuple)) or len(targets) == 0:
        raise ValueError(
            f"targets={targets!r} must be a non-empty list, each element a target form that "
            "attribute() accepts"
        )
    return list(targets)
