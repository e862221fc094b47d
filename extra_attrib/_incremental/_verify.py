"""The incremental engine checks itself against the real model before a sweep trusts it.

A traced program is a copy of the model's arithmetic, made once; the model is the truth, every
call. Tracing can miss what Python does in ``forward`` (in-place writes through aliases, branches
on attributes or types, ``torch.autocast``), and a rule can get a geometry wrong. So before a
sweep uses the incremental engine, :func:`verify_incremental` compares it with the model:

- the program's output on the clean input must equal the model's;
- a few windows, every corner of the tiling plus one interior window, run through the model in
  one batched pass and through the incremental engine in one chunk; their outputs must agree.

Agreement is judged per dtype (:data:`TOLERANCES`): the difference must be within ``atol`` times
the largest clean output or ``rtol`` times the largest change a checked window makes, whichever is
larger. Any disagreement raises :class:`VerificationFailed`, naming the check and the size of the
difference; ``engine="auto"`` then runs densely, a forced ``engine="incremental"`` raises.

Cost: the model on ``1 + W`` copies of the batch (of its first examples where the copies of
all would exceed the dense engine's memory budget; on CPU in passes of about :data:`CHECK_ROWS`
rows) (``W = 2**d + 1`` windows at most) and one
incremental chunk of ``W`` windows. The model's outputs on the ``W`` windows are the exact dense
values of those windows: where the check ran the whole batch, it hands them on
(:class:`extra_attrib._plan.PrecomputedWindows`) and the sweep scores them instead of
evaluating those windows again (#18, #20). The saving is what the chosen engine would spend on
``W`` windows: nearly the whole check where dense wins, little where incremental is much faster.
Net of it, ``python -m benchmarks.zoo --check-cost`` measured 2.4 % of an ``auto`` call for
ResNet18 at 224² (961 windows), 9.3 % for VGG11 there and 18 % for a 3D CNN on 64³ (729 windows,
incremental 10x faster), on a shared machine (``benchmarks/results/zoo.md``).
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils._pytree import (
    keystr,
    tree_flatten,
    tree_flatten_with_path,
    tree_map,
    tree_unflatten,
)

from extra_attrib._geometry import TileGeometry, perturbation_boxes
from extra_attrib._plan import PrecomputedWindows, synchronize
from extra_attrib._targets import check_output

#: Per dtype, ``(atol, rtol)``: the incremental output may differ from the model's by at most
#: ``max(atol * largest clean output, rtol * largest change a checked window makes)``. Float
#: rounding of the same operations on differently shaped boxes stays orders of magnitude below;
#: the defects the check exists for (a wrong box, a dropped branch, stale weights) are far above.
TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-11, 1e-8),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (1e-2, 3e-2),
    torch.bfloat16: (3e-2, 1e-1),
}


#: Rows per forward pass of the check's model pass on CPU (whole copies of the batch): about the
#: rows the dense engine's tuner settles on for image CNNs (2-8), so that the pass costs what the
#: same windows would cost the dense engine and times it fairly (#30).
CHECK_ROWS = 8


class VerificationFailed(ValueError):
    """The incremental engine disagrees with the model; the message names the check."""


def tolerance(dtype: torch.dtype) -> Tuple[float, float]:
    """``(atol, rtol)`` of :data:`TOLERANCES` for ``dtype`` (float32's for unlisted dtypes)."""
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def check_windows(geometry: TileGeometry) -> List[int]:
    """Flat indices of the windows the check runs: every corner of the grid, then the centre.

    Args:
        geometry (TileGeometry): The tiling.

    Returns:
        list of int: Distinct indices, at most ``2**d + 1``.

    Example::

        >>> check_windows(TileGeometry((1, 8, 8), (1, 4, 4), (1, 2, 2)))  # grid (1, 5, 5)
        [0, 4, 20, 24, 12]
    """
    grid = geometry.grid
    chosen: List[int] = []
    ends = [sorted({0, n - 1}) for n in grid]
    for position in itertools.product(*ends):
        flat = _flat(position, grid)
        if flat not in chosen:
            chosen.append(flat)
    centre = _flat(tuple(n // 2 for n in grid), grid)
    if centre not in chosen:
        chosen.append(centre)
    return chosen


def _flat(position: Tuple[int, ...], grid: Tuple[int, ...]) -> int:
    flat = 0
    for p, n in zip(position, grid):
        flat = flat * n + p
    return flat


def occluded_copies(x: Tensor, fill: Tensor, boxes: List[Tuple[slice, ...]]) -> Tensor:
    """The batch ``x`` followed by one copy per box with the box set to the baseline.

    Args:
        x (Tensor): Input ``(N, *S)``.
        fill (Tensor): Baseline, broadcastable to ``x``.
        boxes (list of tuple of slice): One slice per non-batch dimension each.

    Returns:
        Tensor: ``((1 + len(boxes)) * N, *S)``, clean copy first.
    """
    fill = fill.expand_as(x)
    copies = x.unsqueeze(0).repeat(1 + len(boxes), *([1] * x.dim()))
    for w, box in enumerate(boxes):
        region = (slice(None),) + tuple(box)
        copies[1 + w][region] = fill[region]
    return copies.reshape(-1, *x.shape[1:])


def largest_difference(a: Tensor, b: Tensor) -> float:
    """Largest ``|a - b|``, with equal values (infinities too) and NaN against NaN counting 0.

    A NaN or infinity on one side only counts as an infinite difference.
    """
    a, b = a.detach(), b.detach()
    if a.dtype == b.dtype and a.dtype in (torch.float32, torch.float64):
        # The common case in the tensors' own dtype: two passes instead of a float64 copy of
        # each and five (0.17 s of a 3 s call on a 3D U-Net's segmentation maps). Any NaN or
        # infinity in the difference (also an overflow of finite values) takes the exact path.
        difference = torch.sub(a, b).abs_()
        largest = difference.max() if difference.numel() else difference.new_zeros(())
        if bool(largest.isfinite()):
            return float(largest)
    a, b = a.double(), b.double()
    same = (a == b) | (a.isnan() & b.isnan())
    if bool(same.all()):
        return 0.0
    return float((a - b).abs().masked_fill(same, 0.0).nan_to_num(math.inf).max())


def _largest(t: Tensor) -> float:
    finite = t.detach().double().abs().nan_to_num(0.0, 0.0, 0.0)
    return float(finite.max()) if finite.numel() else 0.0


def verify_incremental(
    forward_func: Callable[..., Any],
    x: Tensor,
    fill: Tensor,
    geometry: TileGeometry,
    clean_output: Any,
    run_windows: Callable[[List[Tuple[slice, ...]]], Any],
    budget_bytes: int = 256 * 2**20,
    keep: Optional[List[PrecomputedWindows]] = None,
    index: int = 0,
    context: Tuple[Any, ...] = (),
    passes: bool = True,
) -> str:
    """Check the incremental engine against the model on the clean input and a few windows.

    Args:
        forward_func (callable): The model.
        x (Tensor): Input ``(N, *S)``.
        fill (Tensor): Baseline, broadcastable to ``x``.
        geometry (TileGeometry): The tiling of ``x``.
        clean_output (Tensor, dict or tuple): The traced program's output on ``x``.
        run_windows (callable): Incremental outputs ``(W * N, ...)`` for a list of ``W`` boxes.
        budget_bytes (int, optional): Most bytes the occluded copies may take; past it only the
            first examples (at least one) go through the model. Default: 256 MiB, the dense
            engine's budget
        keep (list, optional): Where the check passes and the model saw every example, a
            :class:`extra_attrib._plan.PrecomputedWindows` with the model's outputs on the
            checked windows is appended to it, for the sweep to reuse; nothing is appended
            where only the first examples went through the model. Default: None (nothing kept)
        index (int, optional): Which input of a model of several inputs ``x`` is, for what is
            kept; ``forward_func`` then takes the occluded copies of that input alone (the
            caller supplies the others, clean). Default: 0
        context (tuple, optional): Every input and extra argument of the call, for what is
            kept (:class:`extra_attrib._plan.PrecomputedWindows`). Default: ``(x,)``
        passes (bool, optional): Whether the model may see the copies in several passes (of
            about :data:`CHECK_ROWS` rows on CPU); False for a ``forward_func`` that needs
            every copy at once. Default: True

    Returns:
        str: What was checked and the largest difference, for the engine's reason.

    Raises:
        VerificationFailed: A check disagrees beyond :func:`tolerance`; the message names it.
    """
    n = x.shape[0]
    windows = check_windows(geometry)
    boxes = perturbation_boxes(geometry, windows)
    # The model sees the first m examples only where the copies of all would exceed the budget
    # (examples are independent rows; the incremental side runs all of them anyway).
    per_example = (1 + len(boxes)) * x[0].numel() * x.element_size()
    m = max(1, min(n, budget_bytes // max(per_example, 1)))
    given_fill, fill = fill, fill.expand_as(x)
    with torch.no_grad():
        copies = occluded_copies(x[:m], fill[:m], boxes)
        synchronize(x.device)
        began = time.perf_counter()
        output = _in_passes(forward_func, copies, m, x.device) if passes else forward_func(copies)
        synchronize(x.device)
        model_seconds = time.perf_counter() - began
        real, real_where = _tensors(output, (1 + len(boxes)) * m, "the model")
    del copies
    clean, clean_where = _flatten(clean_output)
    if clean_where != real_where:
        raise VerificationFailed(
            f"the clean-output check failed: the traced program returns {clean_where}, the "
            f"model {real_where}"
        )
    errors = [_check_clean(c, r[:m], m) for c, r in zip(clean, real)]
    with torch.no_grad():
        incremental, where = _tensors(run_windows(boxes), len(boxes) * n, "the incremental engine")
    if where != real_where:
        raise VerificationFailed(
            f"the window check failed: incremental outputs are {where}, the model's {real_where}"
        )
    for i, r in zip(incremental, real):
        errors.append(_check_windows(i, r[:m], r[m:], len(boxes), n, m))
    if keep is not None and m == n:
        # Rows m onwards are the windows' copies. Copied: a model may write its next output into
        # the tensor it returned (the sweep's clean pass runs before these are scored).
        outputs = tree_map(_after(m), output)
        # The model's pass is a measurement of dense on this call's windows (a window costs
        # dense the same wherever it lies), per copy of the batch, for the engine race (#20).
        timings = {"dense": model_seconds / (1 + len(boxes))}
        clean = tree_map(_before(m), output)
        keep.append(
            PrecomputedWindows(
                x, given_fill, geometry, windows, outputs, index, context, clean, timings
            )
        )
    return (
        f"verified against the model on the clean input and {len(boxes)} windows (largest "
        f"difference {max(errors):.2g})"
    )


def verify_clean(
    forward_func: Callable[..., Any],
    x: Tensor,
    fill: Tensor,
    geometry: TileGeometry,
    clean_output: Any,
    keep: Optional[List[PrecomputedWindows]] = None,
) -> str:
    """The clean-output check alone, for a batch after the first of a run (#30).

    Where the whole check passed before for these shapes and tiling on the same traced program
    (a batch of ``explain_dataset``, a group of a large batch), each later batch checks the
    program's clean output against the model's; the window check, which tests the trace's
    boxes for these shapes and tiling, is not repeated. The model's clean output is kept for
    the sweep (its clean pass), so this costs no model pass of its own.

    Raises:
        VerificationFailed: The clean outputs disagree.
    """
    n = x.shape[0]
    with torch.no_grad():
        output = forward_func(x.clone())  # a model may write into its input
        real, real_where = _tensors(output, n, "the model")
    clean, clean_where = _flatten(clean_output)
    if clean_where != real_where:
        raise VerificationFailed(
            f"the clean-output check failed: the traced program returns {clean_where}, the "
            f"model {real_where}"
        )
    errors = [_check_clean(c, r, n) for c, r in zip(clean, real)]
    if keep is not None:
        kept = tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, output)
        keep.append(PrecomputedWindows(x, fill, geometry, [], None, clean=kept))
    return (
        f"verified against the model on the clean input (largest difference {max(errors):.2g}); "
        "its windows were verified on the first batch with these shapes"
    )


def _in_passes(forward_func: Callable[..., Any], copies: Tensor, m: int, device: Any) -> Any:
    """The model's output on ``copies``, in passes of about :data:`CHECK_ROWS` rows (#30).

    Whole copies of the ``m`` examples per pass, at least 2 rows where there are (one row
    leaves oneDNN on CPU). One pass of every copy is several times the rows the dense engine
    runs at once (ResNet-50 at 224²: 24 rows took 1.5x the time per row of 2-8 on one
    thread), which would slow the check and flatter incremental in the race. Accelerators
    run one pass. The outputs are joined as one pass would return them.
    """
    rows = copies.shape[0]
    if torch.device(device).type != "cpu" or rows <= CHECK_ROWS:
        return forward_func(copies)
    step = m * max(1, CHECK_ROWS // m, -(-2 // m))
    parts = [forward_func(copies[start : start + step]) for start in range(0, rows, step)]
    flat = [tree_flatten(p) for p in parts]
    leaves = [
        torch.cat(list(column)) if all(isinstance(v, Tensor) for v in column) else column[0]
        for column in zip(*(f[0] for f in flat))
    ]
    return tree_unflatten(leaves, flat[0][1])


def _before(m: int) -> Callable[[Any], Any]:
    """Keeps the first ``m`` rows (the clean copy) of a tensor, copied."""
    return lambda t: t[:m].clone()


def _after(m: int) -> Callable[[Any], Any]:
    """Drops the first ``m`` rows (the clean copy) of a tensor, copying the rest."""
    return lambda t: t[m:].clone()


def _tensors(output: Any, rows: int, who: str) -> Tuple[List[Tensor], List[str]]:
    """The tensors of an output (a tensor, or a dict/tuple of them) and where each sits.

    Raises:
        VerificationFailed: A part is not a tensor.
        ValueError: A tensor's first dimension is not ``rows`` (the windows of the check cannot
            be told apart in it; the dense engine refuses such a model too).
    """
    leaves, where = _flatten(output)
    for leaf, at in zip(leaves, where):
        if not isinstance(leaf, Tensor):
            raise VerificationFailed(
                f"the output check failed: {who} returns {type(leaf).__name__} at {at}; every "
                "output must be a tensor with one row per example"
            )
        check_output(leaf, rows, who)
    return leaves, where


def _flatten(output: Any) -> Tuple[List[Any], List[str]]:
    """The parts of an output and where each sits (``["['out']"]`` for a dict's ``out``).

    Where, not the container's type: the traced program returns fx's immutable dict where the
    model returns an ``OrderedDict``.
    """
    pairs = tree_flatten_with_path(output)[0]
    return [leaf for _, leaf in pairs], [keystr(path) or "the output" for path, _ in pairs]


def _check_clean(clean_output: Any, real_clean: Tensor, m: int) -> float:
    """The clean-output check of one output tensor's first ``m`` rows; returns the difference."""
    if not isinstance(clean_output, Tensor):
        raise VerificationFailed(
            f"the clean-output check failed: the traced program returns "
            f"{type(clean_output).__name__} where the model returns a tensor"
        )
    clean_output = clean_output[:m]
    if clean_output.shape != real_clean.shape or clean_output.dtype != real_clean.dtype:
        raise VerificationFailed(
            f"the clean-output check failed: the traced program returns "
            f"{tuple(clean_output.shape)} {clean_output.dtype}, the model "
            f"{tuple(real_clean.shape)} {real_clean.dtype}"
        )
    atol, _ = tolerance(real_clean.dtype)
    scale = _largest(real_clean)
    error = largest_difference(clean_output, real_clean)
    if error > atol * scale:
        raise VerificationFailed(
            f"the clean-output check failed: the traced program differs from the model by "
            f"{error:.3g} ({_ratio(error, scale)} of the largest output; tolerance {atol:g} "
            f"for {real_clean.dtype})"
        )
    return error


def _check_windows(
    incremental: Tensor, real_clean: Tensor, real_windows: Tensor, w: int, n: int, m: int
) -> float:
    """The window check of one output tensor; returns its largest difference.

    ``incremental`` holds ``w * n`` rows, window-major; the model's ``real_windows`` the
    ``w * m`` rows of the first ``m`` examples.
    """
    incremental = incremental.reshape(w, n, *incremental.shape[1:])[:, :m]
    incremental = incremental.reshape(w * m, *incremental.shape[2:])
    if incremental.shape != real_windows.shape:
        raise VerificationFailed(
            f"the window check failed: incremental outputs have shape "
            f"{tuple(incremental.shape)}, the model's {tuple(real_windows.shape)}"
        )
    atol, rtol = tolerance(real_windows.dtype)
    scale = _largest(real_clean)
    effect = largest_difference(real_windows.reshape(w, *real_clean.shape), real_clean.unsqueeze(0))
    allowed = max(atol * scale, rtol * (effect if math.isfinite(effect) else 0.0))
    window_error = largest_difference(incremental, real_windows)
    if window_error > allowed:
        raise VerificationFailed(
            f"the window check failed on {w} windows (corners and centre): incremental "
            f"differs from the model by {window_error:.3g} ({_ratio(window_error, effect)} of "
            f"the largest change a window makes, {_ratio(window_error, scale)} of the largest "
            f"output; tolerance {allowed:.3g} for {real_windows.dtype})"
        )
    return window_error


def _ratio(error: float, scale: float) -> str:
    if scale == 0.0:
        return "inf" if error else "0"
    return f"{error / scale:.3g}"
