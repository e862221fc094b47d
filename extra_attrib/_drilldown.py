"""Adaptive drill-down: the full tiling only inside the cells the coarse map ranks highest.

Three rules (issue #12, DESIGN.md §8), for a tiling with window ``w`` and ``k``:

1. **Coarse pass.** The windows at stride ``w`` are evaluated: the ``k = 1`` positions, which are
   tiled positions too (position ``j = m * k + k - 1`` along a dimension starts at ``m * w``), so
   their differences are reused by the full map. Together they give Occlusion with window ``w``
   and stride ``w``: every element of the *cell* ``[m * w, (m + 1) * w)`` (clipped at the border)
   gets the difference of the one coarse window that equals that cell.
2. **Selection.** Per example and per input tensor, the cells are ranked by ``|coarse
   difference|`` (``refine_by="abs"``) or by its positive part (``"positive"``), and the top
   ``ceil(refine * cells)`` are selected. Ties go to the cell with the lower row-major index, and a
   NaN difference ranks above everything (its cell is refined). With several targets the selection
   is the union of every target's own top cells, and every target's map is refined on that union.
3. **Refinement.** Every tiled window that covers an element of a selected cell is evaluated, so
   every element of a selected cell gets exactly the full TiledOcclusion value; every other element
   keeps the coarse value.

The pure functions below (cells, selection, covering windows, merge) know nothing of the model;
:func:`drilldown_sweep` runs the two passes through :func:`extra_attrib._engine.occlusion_sweep`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from extra_attrib._engine import SweepResult, occlusion_sweep
from extra_attrib._geometry import TileGeometry, accumulate
from extra_attrib._targets import describe_score

REFINE_BY = ("abs", "positive")
#: Batch modes of the refinement pass (see :func:`drilldown_sweep`).
BATCH_MODES = ("per_example", "union")


def check_refine(refine: Any, refine_by: Any) -> Optional[float]:
    """Validate ``refine`` and ``refine_by`` of :meth:`TiledOcclusion.attribute`.

    Args:
        refine (float or None): Fraction of coarse cells refined, ``0 < refine <= 1``.
        refine_by (str): ``"abs"`` or ``"positive"``.

    Returns:
        float or None: ``refine`` as a float.
    """
    if refine_by not in REFINE_BY:
        raise ValueError(f"refine_by={refine_by!r} is not supported: use one of {REFINE_BY}")
    if refine is None:
        return None
    if isinstance(refine, bool) or not isinstance(refine, (int, float)):
        raise TypeError(f"refine={refine!r} must be a float in (0, 1] or None")
    if not 0 < refine <= 1:  # also rejects NaN
        raise ValueError(
            f"refine={refine!r} must be in (0, 1]: the fraction of coarse cells that get the "
            "full tiling (1 gives the full map), or None for no drill-down"
        )
    return float(refine)


def cell_grid(geometry: TileGeometry) -> Tuple[int, ...]:
    """Number of coarse cells ``ceil(s_i / w_i)`` per dimension."""
    return tuple(math.ceil(s / w) for s, w in zip(geometry.shape, geometry.window))


def coarse_positions(geometry: TileGeometry) -> List[Tuple[int, ...]]:
    """Per dimension, the window position of each coarse cell: ``m * k_i + k_i - 1``.

    Args:
        geometry (TileGeometry): The tiling.

    Returns:
        list of tuple of int: One tuple of ``ceil(s_i / w_i)`` positions per dimension.
    """
    return [tuple(m * k + k - 1 for m in range(c)) for c, k in zip(cell_grid(geometry), geometry.k)]


def coarse_windows(geometry: TileGeometry) -> List[int]:
    """Flat indices (row-major over ``geometry.grid``) of the coarse windows, increasing."""
    flat = torch.arange(geometry.num_perturbations).reshape(geometry.grid)
    for i, pos in enumerate(coarse_positions(geometry)):
        flat = flat.index_select(i, torch.tensor(pos, dtype=torch.long))
    return flat.flatten().tolist()


def coarse_cell_values(differences: Tensor, geometry: TileGeometry) -> Tensor:
    """The coarse windows' differences, one per cell.

    Args:
        differences (Tensor): Shape ``(*lead, J_1, ..., J_d)``.
        geometry (TileGeometry): The tiling of the trailing ``d`` dimensions.

    Returns:
        Tensor: Shape ``(*lead, C_1, ..., C_d)`` with ``C_i = ceil(s_i / w_i)``.
    """
    d = len(geometry.shape)
    out = differences
    for i, pos in enumerate(coarse_positions(geometry)):
        axis = out.dim() - d + i
        out = out.index_select(axis, torch.tensor(pos, dtype=torch.long, device=out.device))
    return out


def select_cells(values: Tensor, refine: float, refine_by: str, ndim: int) -> Tensor:
    """Top ``ceil(refine * cells)`` cells per example, by the ``refine_by`` ranking.

    Args:
        values (Tensor): Coarse differences per cell, shape ``(T, N, C_1, ..., C_d)``.
        refine (float): Fraction in ``(0, 1]``.
        refine_by (str): ``"abs"`` (rank by ``|value|``) or ``"positive"`` (by ``max(value, 0)``).
        ndim (int): ``d``, the number of cell dimensions.

    Returns:
        Tensor: Bool, shape ``(N, C_1, ..., C_d)``: the union over the ``T`` targets of each
        target's selected cells. Ties are broken towards the lower row-major cell index; NaN
        ranks first.
    """
    lead, cells = values.shape[:-ndim], values.shape[-ndim:]
    total = math.prod(cells)
    # A small tolerance so that e.g. 0.1 * 30 counts as 3 cells, not 4.
    count = min(total, max(1, math.ceil(refine * total - 1e-9)))
    flat = values.reshape(*lead, total).double()
    key = flat.abs() if refine_by == "abs" else flat.clamp(min=0)
    key = torch.nan_to_num(key, nan=math.inf)
    # A stable descending sort keeps equal keys in index order: the lower index wins a tie.
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :count]
    chosen = torch.zeros_like(key, dtype=torch.bool).scatter_(-1, order, True)
    return chosen.any(dim=0).reshape(lead[1:] + cells)


def cell_incidence(geometry: TileGeometry) -> List[Tensor]:
    """Per dimension, which window positions overlap which cells.

    Args:
        geometry (TileGeometry): The tiling.

    Returns:
        list of Tensor: Bool ``(J_i, C_i)`` per dimension; entry ``[j, m]`` is True when window
        position ``j`` (clipped ``[(j - k + 1) * t, (j + 1) * t)``) overlaps cell ``m``
        (``[m * w, (m + 1) * w)`` clipped to ``s``).
    """
    out = []
    for s, w, k, t, n, c in zip(
        geometry.shape,
        geometry.window,
        geometry.k,
        geometry.stride,
        geometry.grid,
        cell_grid(geometry),
    ):
        starts = torch.arange(n) * t - (k - 1) * t
        lo, hi = starts.clamp(min=0), (starts + w).clamp(max=s)
        cell_lo = torch.arange(c) * w
        cell_hi = (cell_lo + w).clamp(max=s)
        out.append((lo[:, None] < cell_hi[None, :]) & (cell_lo[None, :] < hi[:, None]))
    return out


def covering_windows(selected: Tensor, geometry: TileGeometry) -> Tensor:
    """Windows that cover at least one element of a selected cell.

    Args:
        selected (Tensor): Bool, shape ``(*lead, C_1, ..., C_d)``.
        geometry (TileGeometry): The tiling.

    Returns:
        Tensor: Bool, shape ``(*lead, J_1, ..., J_d)``.
    """
    d = len(geometry.shape)
    out = selected.to(torch.float64)
    for i, incidence in enumerate(cell_incidence(geometry)):
        axis = out.dim() - d + i
        # Count of selected cells each window position overlaps, one dimension at a time.
        out = torch.tensordot(out.movedim(axis, -1), incidence.to(out).T, dims=1).movedim(-1, axis)
    return out > 0


def expand_cells(values: Tensor, geometry: TileGeometry) -> Tensor:
    """Paint each cell's value over its elements.

    Args:
        values (Tensor): Shape ``(*lead, C_1, ..., C_d)``.
        geometry (TileGeometry): The tiling.

    Returns:
        Tensor: Shape ``(*lead, s_1, ..., s_d)``.
    """
    d = len(geometry.shape)
    out = values
    for i, (s, w) in enumerate(zip(geometry.shape, geometry.window)):
        axis = out.dim() - d + i
        out = out.repeat_interleave(w, dim=axis).narrow(axis, 0, s)
    return out


def merge(differences: Tensor, selected: Tensor, geometry: TileGeometry) -> Tensor:
    """The drill-down map from the evaluated windows' differences.

    Args:
        differences (Tensor): Shape ``(T, N, J_1, ..., J_d)``; every window covering a selected
            cell and every coarse window must hold its difference, the rest may hold anything
            finite.
        selected (Tensor): Bool, shape ``(N, C_1, ..., C_d)``.
        geometry (TileGeometry): The tiling.

    Returns:
        Tensor: Shape ``(T, N, s_1, ..., s_d)``: the full TiledOcclusion value on the selected
        cells, the coarse value (Occlusion with window and stride ``w``) elsewhere.
    """
    cover = covering_windows(selected, geometry)
    fine = accumulate(torch.where(cover, differences, torch.zeros_like(differences)), geometry)
    coarse = expand_cells(coarse_cell_values(differences, geometry), geometry)
    return torch.where(expand_cells(selected, geometry), fine, coarse)


@dataclass
class DrillResult(SweepResult):
    """What :func:`drilldown_sweep` returns: a :class:`SweepResult` with its own counts.

    Its ``evaluations`` count the forward passes of all passes (each pass has its unperturbed one)
    and its ``perturbations`` count perturbed copies of the batch: the coarse pass's, plus the
    refinement's perturbed rows divided by ``N``, rounded up.

    Attributes:
        selected (list of Tensor): Per input, the refined cells, bool ``(N, *cells)``.
    """

    selected: List[Tensor] = field(default_factory=list)


def drilldown_sweep(  # noqa: D417 (the shared arguments are documented at occlusion_sweep)
    forward_func: Callable[..., Tensor],
    inputs: Tuple[Tensor, ...],
    baselines: Tuple[Tensor, ...],
    geometries: Sequence[TileGeometry],
    targets: Sequence[Any],
    score_fn: Callable[[Tensor], Tensor],
    additional_forward_args: Tuple[Any, ...],
    refine: float,
    refine_by: str = "abs",
    chunk_size: Optional[int] = None,
    show_progress: bool = False,
    batch_mode: str = "per_example",
    **sweep_kwargs: Any,
) -> DrillResult:
    """Coarse pass, selection, refinement.

    The other arguments are those of :func:`occlusion_sweep`.

    Args:
        refine (float): Fraction of cells refined, in ``(0, 1]``.
        refine_by (str, optional): ``"abs"`` or ``"positive"``. Default: ``"abs"``
        batch_mode (str, optional): How the refinement treats a batch of ``N > 1`` examples.
            ``"per_example"``: each example's own windows, in one sweep per example (the engine
            perturbs whole batch copies, so a shared sweep would evaluate every example on
            every other example's windows). ``"union"``: one sweep over the union of the
            examples' windows. Both give the same map (each example is merged with its own
            selection). Default: ``"per_example"``
        **sweep_kwargs: Further keyword arguments of :func:`occlusion_sweep`, passed to every
            pass.

    Returns:
        DrillResult: The maps and what ran.
    """
    if batch_mode not in BATCH_MODES:
        raise ValueError(f"batch_mode={batch_mode!r} is not supported: use one of {BATCH_MODES}")
    n = inputs[0].shape[0]

    def sweep(
        xs: Tuple[Tensor, ...],
        bases: Tuple[Tensor, ...],
        ts: Sequence[Any],
        score: Callable[[Tensor], Tensor],
        extra: Tuple[Any, ...],
        description: str,
        windows: Sequence[Sequence[int]],
    ) -> SweepResult:
        """One sweep over ``windows``: this call's model and settings, differences returned."""
        return occlusion_sweep(
            forward_func,
            xs,
            bases,
            geometries,
            ts,
            score,
            extra,
            chunk_size=chunk_size,
            show_progress=show_progress,
            description=description,
            windows=windows,
            return_differences=True,
            **sweep_kwargs,
        )

    coarse = sweep(
        inputs,
        baselines,
        targets,
        score_fn,
        additional_forward_args,
        "TiledOcclusion coarse pass",
        [coarse_windows(g) for g in geometries],
    )
    evaluations, skipped = coarse.evaluations, coarse.skipped
    rows = 0
    differences = [dif.clone() for dif in coarse.differences or []]
    resolved = coarse.targets if coarse.targets is not None else torch.empty(0)
    selected, needed = [], []
    for dif, g in zip(differences, geometries):
        chosen = select_cells(coarse_cell_values(dif, g), refine, refine_by, len(g.shape))
        selected.append(chosen)
        todo = covering_windows(chosen, g).reshape(n, -1).clone()
        todo[:, coarse_windows(g)] = False  # already evaluated by the coarse pass
        needed.append(todo)

    if batch_mode == "union":
        union = [todo.any(dim=0).nonzero().squeeze(1).tolist() for todo in needed]
        if any(union):
            fine = sweep(
                inputs,
                baselines,
                targets,
                score_fn,
                additional_forward_args,
                "TiledOcclusion refinement",
                union,
            )
            for dif, new, idx in zip(differences, fine.differences or [], union):
                _copy_windows(dif, new, idx, slice(None))
            evaluations += fine.evaluations
            skipped += fine.skipped
            rows += fine.perturbations * n
    else:
        flat_score = _flattened(score_fn)
        for e in range(n):
            mine = [todo[e].nonzero().squeeze(1).tolist() for todo in needed]
            if not any(mine):
                continue
            fine = sweep(
                tuple(x[e : e + 1] for x in inputs),
                tuple(_example_baseline(b, x, e) for b, x in zip(baselines, inputs)),
                [int(t) for t in resolved[e].tolist()],
                flat_score,
                tuple(_example_rows(a, e, n) for a in additional_forward_args),
                f"TiledOcclusion refinement {e + 1}/{n}",
                mine,
            )
            for dif, new, idx in zip(differences, fine.differences or [], mine):
                _copy_windows(dif, new, idx, slice(e, e + 1))
            evaluations += fine.evaluations
            skipped += fine.skipped
            rows += fine.perturbations

    attributions = [
        merge(dif, chosen, g) for dif, chosen, g in zip(differences, selected, geometries)
    ]
    return DrillResult(
        attributions,
        evaluations,
        coarse.perturbations + math.ceil(rows / n),
        skipped,
        selected=selected,
    )


def _copy_windows(into: Tensor, new: Tensor, indices: List[int], rows: slice) -> None:
    """Copy windows ``indices`` of ``new`` ``(T, n, *grid)`` into ``into[:, rows]``."""
    if not indices:
        return
    t, n = into.shape[:2]
    flat_into = into.reshape(t, n, -1)  # a view: ``into`` is contiguous
    index = torch.tensor(indices, dtype=torch.long, device=into.device)
    flat_into[:, rows, index] = new.reshape(t, new.shape[1], -1)[:, :, index].to(into.dtype)


def _flattened(score_fn: Callable[[Any], Tensor]) -> Callable[[Any], Tensor]:
    """``score_fn`` with each row's output flattened, so flat target indices address it."""

    def flat(outputs: Any) -> Tensor:
        scored = score_fn(outputs)
        return scored.reshape(scored.shape[0], -1)

    flat.describe = describe_score(score_fn)  # type: ignore[attr-defined]
    return flat


def _example_baseline(baseline: Tensor, x: Tensor, e: int) -> Tensor:
    """Example ``e``'s part of a baseline broadcastable to ``x`` ``(N, *S)``."""
    if baseline.dim() == x.dim() and baseline.shape[0] == x.shape[0]:
        return baseline[e : e + 1]
    return baseline  # no batch dimension, or a batch dimension of 1: it broadcasts


def _example_rows(value: Any, e: int, n: int) -> Any:
    """Example ``e``'s row of a per-example tensor (first dimension ``n``), else ``value``.

    The engine's rule: a tensor argument whose first dimension is the batch size is per example.
    """
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value[e : e + 1]
    return value
