"""A batch run in groups of examples, each within the memory budget (#30).

The incremental engine keeps the clean activations of every example it sweeps. Where those of
the whole batch exceed the budget, the batch is split into groups of examples that fit, and
each group is explained by its own sweep (its own clean pass and self-check); the maps are
joined along the batch. An example's map depends only on that example (the model scores each
row on its own), so the result is the same as one sweep over the batch, up to float rounding.
The engine is chosen once for the call: the first group measures it, the others reuse the
measurement (:mod:`extra_attrib._plan`'s engine memo).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from extra_attrib._checks import is_int

#: The smallest ``memory_budget`` accepted, in bytes: below it no useful chunk fits.
MIN_MEMORY_BUDGET = 2**20


def check_memory_budget(value: Any) -> Optional[int]:
    """Validate ``memory_budget``: None, or an int of bytes of at least 1 MiB.

    Raises:
        TypeError: Not an int (a bool, a float, a string).
        ValueError: Below :data:`MIN_MEMORY_BUDGET`.
    """
    if value is None:
        return None
    if not is_int(value):
        raise TypeError(
            f"memory_budget={value!r} must be an int (bytes, e.g. 512 * 2**20) or None, "
            f"got {type(value).__name__}"
        )
    if int(value) < MIN_MEMORY_BUDGET:
        raise ValueError(
            f"memory_budget={value!r} is below the minimum of {MIN_MEMORY_BUDGET} bytes (1 MiB): "
            "give the bytes the perturbed copies and the kept activations may take"
        )
    return int(value)


def example_groups(n: int, per_group: int) -> List[slice]:
    """Consecutive groups of at most ``per_group`` of ``n`` examples, sizes differing by one.

    Example::

        >>> example_groups(16, 6)
        [slice(0, 6, None), slice(6, 11, None), slice(11, 16, None)]
    """
    count = math.ceil(n / max(per_group, 1))
    sizes = [n // count + (i < n % count) for i in range(count)]  # the larger ones first
    bounds = [sum(sizes[:i]) for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def split_per_example(value: Any, n: int, rows: slice) -> Tuple[bool, Any]:
    """``value``'s part for the examples ``rows``, where it has one entry per example.

    A tensor or array with ``n`` rows, or a list of ``n`` entries, is sliced; scalars, tuples,
    None and tensors of one element apply to every example and are returned as they are.

    Returns:
        tuple: ``(ok, part)``; ``ok`` is False where ``value`` is per example in a way that
        cannot be split (a list or 1-D tensor of another length: the call reports it).
    """
    if isinstance(value, (Tensor, np.ndarray)):
        size = value.numel() if isinstance(value, Tensor) else value.size
        if value.ndim == 0 or size == 1:
            return True, value
        if value.shape[0] == n:
            return True, value[rows]
        return False, value
    if isinstance(value, list):
        return (True, value[rows]) if len(value) == n else (False, value)
    return True, value


def split_fill(fill: Tensor, x: Tensor, rows: slice) -> Tensor:
    """A baseline's part for the examples ``rows``: sliced where it has the batch dimension."""
    if fill.dim() == x.dim() and fill.shape[0] == x.shape[0] and x.shape[0] > 1:
        return fill[rows]
    return fill


def split_args(args: Tuple[Any, ...], n: int, rows: slice, size: int) -> Optional[Tuple[Any, ...]]:
    """The extra model arguments for the examples ``rows``: tensors with ``n`` rows sliced.

    None where a tensor that is not per example has as many rows as a group (``size``): the
    group's sweep would repeat it with the batch as if it were per example.
    """
    out = []
    for a in args:
        if isinstance(a, Tensor) and a.dim() > 0:
            if a.shape[0] == n:
                out.append(a[rows])
                continue
            if a.shape[0] == size:
                return None
        out.append(a)
    return tuple(out)


@dataclass
class JoinedResult:
    """The sweeps of several groups as one call's result (fields as in ``SweepResult``).

    ``evaluations`` sum the groups' forward passes; ``perturbations`` and ``skipped`` count
    copies of the whole batch, as for one sweep: each group's counts weighted by its share of
    the examples (perturbations rounded up).
    """

    attributions: List[Tensor]
    evaluations: int
    perturbations: int
    skipped: int


def join(results: Sequence[Any], sizes: Sequence[int]) -> JoinedResult:
    """Join the groups' results: maps ``(T, n_g, *S)`` concatenated along the batch."""
    n = sum(sizes)
    inputs = len(results[0].attributions)
    maps = [torch.cat([r.attributions[j] for r in results], dim=1) for j in range(inputs)]
    weighted = sum(r.perturbations * s for r, s in zip(results, sizes))
    return JoinedResult(
        maps,
        sum(r.evaluations for r in results),
        math.ceil(weighted / n),
        sum(r.skipped * s for r, s in zip(results, sizes)) // n,
    )
