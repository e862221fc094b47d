"""Scores and targets: which number of the model's output an attribution explains.

Targets are resolved once, on the output for the unperturbed input, to a flat index into each
example's (scored) output, so that every later forward pass is reduced with one ``gather``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from extra_attrib._checks import is_int

ScoreType = Union[str, Callable[[Any], Tensor]]

SCORES = ("raw", "softmax", "log_softmax")


def score_function(score: ScoreType) -> Callable[[Any], Tensor]:
    """Map a ``score`` argument to a function of the model's output.

    The function receives whatever the model returns (a tensor, or a dict or tuple as
    torchvision's segmentation and detection models return); only its result must be a tensor,
    with one row per example, which :func:`check_output` checks.

    Args:
        score (str or callable): ``"raw"``, ``"softmax"``, ``"log_softmax"`` (both over dimension 1,
            the class dimension) or a callable ``score(outputs) -> Tensor``.

    Returns:
        callable: The scoring function; its ``describe`` attribute names it for error messages.
    """
    fn: Callable[[Any], Tensor]
    if callable(score):
        fn = _checked_score(score)
        describe = f"score={_name(score)}"
    elif score == "raw":
        fn, describe = _identity, "the forward function"
    elif score == "softmax":
        fn, describe = _softmax, "score='softmax'"
    elif score == "log_softmax":
        fn, describe = _log_softmax, "score='log_softmax'"
    else:
        raise ValueError(f"score={score!r} is not supported: use one of {SCORES} or a callable")
    fn.describe = describe  # type: ignore[attr-defined]
    return fn


def describe_score(score_fn: Callable[..., Any]) -> str:
    """Who made the scores, for error messages: the model for ``"raw"``, else the score."""
    return str(getattr(score_fn, "describe", "the forward function"))


def _checked_score(score: Callable[[Any], Tensor]) -> Callable[[Any], Tensor]:
    """``score`` with its result checked: a tensor with one row per row of tensor outputs.

    For outputs that are not a tensor (a dict, a tuple), the number of rows is checked by
    :func:`check_output` against the batch size.
    """

    def checked(outputs: Any) -> Tensor:
        scored = score(outputs)
        rows = outputs.shape[0] if isinstance(outputs, Tensor) and outputs.dim() else None
        if (
            not isinstance(scored, Tensor)
            or scored.dim() == 0
            or (rows is not None and scored.shape[0] != rows)
        ):
            got = (
                f"shape {tuple(scored.shape)}"
                if isinstance(scored, Tensor)
                else f"{type(scored).__name__} {scored!r:.40}"
            )
            raise ValueError(
                f"score={_name(score)} returned {got} for model outputs of "
                f"{_describe_value(outputs)}: a score callable must return a tensor with one "
                "row per example (the first dimension of the model's output), e.g. "
                "lambda o: o.softmax(1)"
            )
        return scored

    return checked


def _describe_value(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return f"type {type(value).__name__} with keys {list(value)!r:.80}"
    return f"type {type(value).__name__}"


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _identity(outputs: Any) -> Tensor:
    return outputs  # checked by check_output: a model returning a dict needs a score callable


def _softmax(outputs: Any) -> Tensor:
    _require_class_dim(outputs, "softmax")
    return torch.softmax(outputs, dim=1, dtype=_floating(outputs.dtype))


def _log_softmax(outputs: Any) -> Tensor:
    _require_class_dim(outputs, "log_softmax")
    return torch.log_softmax(outputs, dim=1, dtype=_floating(outputs.dtype))


def _floating(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` if floating, else the default floating dtype: integer logits are numbers too."""
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def _require_class_dim(outputs: Any, name: str) -> None:
    if not isinstance(outputs, Tensor):
        raise TypeError(
            f"score={name!r} needs a tensor output, but the forward function returned "
            f"{_describe_value(outputs)}: give score a callable that takes what the model "
            "returns and gives a tensor with one row per example, e.g. "
            "lambda o: o['out'].sum((2, 3)).softmax(1)"
        )
    if outputs.dim() < 2:
        raise ValueError(
            f"score={name!r} needs a class dimension, but the model output has shape "
            f"{tuple(outputs.shape)}: use score='raw' for a model with one output per example"
        )
    if outputs.is_complex() or outputs.dtype == torch.bool:
        raise TypeError(
            f"score={name!r} needs real numbers, but the model returned {outputs.dtype}: use "
            "score='raw' or a callable"
        )


def check_output(outputs: Any, rows: int, source: str = "the forward function") -> Tensor:
    """Check that the scores are a tensor with one row per input row.

    Args:
        outputs (Any): The scores: what the forward function returned, after ``score``.
        rows (int): The batch size the model was given.
        source (str, optional): Who made them, for the message (see :func:`describe_score`).
            Default: ``"the forward function"``

    Returns:
        Tensor: ``outputs``.
    """
    if not isinstance(outputs, Tensor):
        hint = (
            "; for a model returning a dict or tuple (e.g. torchvision's segmentation models), "
            "give score a callable that turns it into a tensor with one row per example, e.g. "
            "score=lambda o: o['out'].sum((2, 3))"
            if source == "the forward function"
            else ""
        )
        raise TypeError(
            f"{source} returned {type(outputs).__name__}; it must return a Tensor{hint}"
        )
    if outputs.dim() == 0 or outputs.shape[0] != rows:
        raise ValueError(
            f"{source} returned shape {tuple(outputs.shape)} for a batch of {rows}: "
            "its output's first dimension must follow the input batch size"
        )
    return outputs


def resolve_targets(
    targets: Sequence[Any], scored: Tensor, raw: Any, argument: str = "target"
) -> Tensor:
    """Flat indices into each example's output, one column per requested target.

    Args:
        targets (sequence): Targets in any form :meth:`TiledOcclusion.attribute` accepts.
        scored (Tensor): Scored output for the unperturbed input, shape ``(N, *O)``.
        raw (Any): Raw model output for the unperturbed input (for ``target=None``); where it
            is not a tensor with one row per example (a dict, ...), ``scored`` is used instead.
        argument (str, optional): Argument name used in error messages. Default: ``"target"``.

    Returns:
        Tensor: Long tensor of shape ``(N, len(targets))`` on the output's device.
    """
    n = scored.shape[0]
    out_shape = tuple(scored.shape[1:])
    if not isinstance(raw, Tensor) or raw.dim() == 0 or raw.shape[0] != n:
        raw = scored
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
    if isinstance(target, np.ndarray):  # as a tensor: one index per example when 1-D
        if not np.issubdtype(target.dtype, np.integer):
            raise TypeError(f"{argument} must hold integers, got a numpy array of {target.dtype}")
        target = torch.from_numpy(target)
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
            f"{argument}={target!r} given, but the scores hold one value per example (the "
            "model's output, after score if one was given, has shape (N,)): use target=None, "
            "or a score that keeps the class dimension"
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
