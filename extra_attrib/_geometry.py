"""Window geometry of tiled occlusion: pure functions of shapes, no model involved.

Along one dimension of size ``s`` with window ``w`` and tiling ``k`` (``w % k == 0``) the stride is
``t = w // k`` and windows start at every multiple of ``t`` in ``[-(k - 1) * t, s)``; each window
``[p, p + w)`` is clipped to ``[0, s)``. That gives ``J = ceil(s / t) + k - 1`` positions, and every
element lies in exactly ``k`` windows, at the borders too. In several dimensions a window is the box
product of one position per dimension, so an element lies in ``prod(k)`` windows.

Position ``j`` (``0 <= j < J``) starts at ``(j - (k - 1)) * t``. A perturbation is identified by its
flat index over the grid of positions ``(J_1, ..., J_d)`` in row-major order.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from torch import Tensor


@dataclass(frozen=True)
class TileGeometry:
    """Tiling of one input tensor's non-batch shape.

    Attributes:
        shape (tuple of int): Non-batch shape ``(s_1, ..., s_d)``.
        window (tuple of int): Window size per dimension, ``1 <= w_i <= s_i``.
        k (tuple of int): Windows covering each element per dimension, ``w_i % k_i == 0``.
    """

    shape: Tuple[int, ...]
    window: Tuple[int, ...]
    k: Tuple[int, ...]

    @property
    def stride(self) -> Tuple[int, ...]:
        """Distance ``w_i // k_i`` between neighbouring window starts."""
        return tuple(w // k for w, k in zip(self.window, self.k))

    @property
    def grid(self) -> Tuple[int, ...]:
        """Number of window positions ``J_i = ceil(s_i / t_i) + k_i - 1`` per dimension."""
        return tuple(math.ceil(s / t) + k - 1 for s, t, k in zip(self.shape, self.stride, self.k))

    @property
    def num_perturbations(self) -> int:
        """Total number of windows ``P = prod(J_i)``."""
        return math.prod(self.grid)

    @property
    def coverage(self) -> int:
        """Number of windows covering every element, ``prod(k_i)``."""
        return math.prod(self.k)


def window_bounds(geometry: TileGeometry) -> List[Tuple[List[int], List[int]]]:
    """Clipped ``[lo, hi)`` bounds of every window position, per dimension.

    Args:
        geometry (TileGeometry): The tiling.

    Returns:
        list of (lo, hi): One pair per dimension; ``lo`` and ``hi`` are lists of ``J_i`` ints with
        ``0 <= lo < hi <= s_i``.
    """
    bounds = []
    for s, w, k, t, n in zip(
        geometry.shape, geometry.window, geometry.k, geometry.stride, geometry.grid
    ):
        starts = [(j - (k - 1)) * t for j in range(n)]
        bounds.append(([max(p, 0) for p in starts], [min(p + w, s) for p in starts]))
    return bounds


def perturbation_boxes(geometry: TileGeometry, indices: Sequence[int]) -> List[Tuple[slice, ...]]:
    """Boxes (tuples of slices over the non-batch dimensions) of the given perturbations.

    Args:
        geometry (TileGeometry): The tiling.
        indices (sequence of int): Flat perturbation indices in ``[0, P)``.

    Returns:
        list of tuple of slice: For each index, one ``slice(lo, hi)`` per dimension.
    """
    per_dim = _dim_slices(geometry)
    boxes = []
    for flat in indices:
        box = []
        for slices, n in zip(reversed(per_dim), reversed(geometry.grid)):
            flat, j = divmod(flat, n)
            box.append(slices[j])
        boxes.append(tuple(reversed(box)))
    return boxes


@functools.lru_cache(maxsize=64)
def _dim_slices(geometry: TileGeometry) -> Tuple[Tuple[slice, ...], ...]:
    """Window slices per dimension; cached, since the engine asks once per chunk."""
    return tuple(
        tuple(slice(lo, hi) for lo, hi in zip(los, his)) for los, his in window_bounds(geometry)
    )


def window_positions(geometry: TileGeometry, flat: Tensor) -> List[Tensor]:
    """Per-dimension positions of flat perturbation indices (row-major unravel).

    Args:
        flat (Tensor): Long tensor of flat indices in ``[0, P)``, shape ``(R,)``.
        geometry (TileGeometry): The tiling.

    Returns:
        list of Tensor: One long tensor ``(R,)`` per dimension, entries in ``[0, J_i)``.
    """
    out = []
    step = geometry.num_perturbations
    before = 1  # positions of the dimensions before this one
    for n in geometry.grid:
        step //= n
        pos = flat if step == 1 else torch.div(flat, step, rounding_mode="floor")
        out.append(pos if before == 1 else pos.remainder(n))  # no wrap-around needed first
        before *= n
    return out


def window_masks(geometry: TileGeometry, device: torch.device) -> List[Tensor]:
    """Per-dimension membership of every element in every window position.

    Args:
        geometry (TileGeometry): The tiling.
        device (torch.device): Where the masks live.

    Returns:
        list of Tensor: Per dimension a bool tensor ``(J_i, s_i)``: entry ``(j, u)`` says
        whether element ``u`` lies in window position ``j``. A window's mask over ``S`` is the
        outer AND of one row per dimension.
    """
    masks = []
    for s, (lo, hi) in zip(geometry.shape, window_bounds(geometry)):
        u = torch.arange(s, device=device)
        lo_t = torch.tensor(lo, device=device).unsqueeze(1)
        hi_t = torch.tensor(hi, device=device).unsqueeze(1)
        masks.append((u >= lo_t) & (u < hi_t))
    return masks


def window_mask_rows(
    geometry: TileGeometry, dim: int, positions: Sequence[int], device: torch.device
) -> Tensor:
    """Rows ``positions`` of :func:`window_masks`' table of dimension ``dim``, without the table.

    For long dimensions, where the whole table (``J_i * s_i`` bytes, e.g. 9 times a quarter of a
    float32 series of 15 million elements) and the ``int64`` index it is built from would cost
    several copies of the input: one slice fill per row instead.

    Args:
        geometry (TileGeometry): The tiling.
        dim (int): The dimension.
        positions (sequence of int): Window positions along ``dim``, each in ``[0, J_i)``.
        device (torch.device): Where the rows live.

    Returns:
        Tensor: Bool tensor ``(len(positions), s_i)``.
    """
    lo, hi = window_bounds(geometry)[dim]
    rows = torch.zeros(len(positions), geometry.shape[dim], dtype=torch.bool, device=device)
    for r, p in enumerate(positions):
        rows[r, lo[p] : hi[p]] = True
    return rows


def window_offsets(geometry: TileGeometry, device: torch.device) -> List[Tensor]:
    """Per-dimension flat offsets of every window position's elements.

    With ``S`` flattened in row-major order, the flat offsets of window ``(j_1, ..., j_d)`` are
    the broadcast sum of row ``j_i`` of every table. Clipped windows have fewer than ``w_i``
    elements: their rows repeat the last element, so every row has ``w_i`` entries and the
    windows of a chunk stack into one index tensor; a repeated offset is written twice with the
    same value.

    Args:
        geometry (TileGeometry): The tiling.
        device (torch.device): Where the tables live.

    Returns:
        list of Tensor: Per dimension a long tensor ``(J_i, w_i)`` of element index times the
        dimension's row-major stride; every entry of row ``j`` lies in ``[lo_j, hi_j)`` (times
        the stride) and every element of the window appears.
    """
    tables = []
    stride = math.prod(geometry.shape)
    for s, w, (lo, hi) in zip(geometry.shape, geometry.window, window_bounds(geometry)):
        stride //= s
        lo_t = torch.tensor(lo, device=device).unsqueeze(1)
        hi_t = torch.tensor(hi, device=device).unsqueeze(1)
        idx = torch.minimum(lo_t + torch.arange(w, device=device), hi_t - 1)
        tables.append(idx * stride)
    return tables


def box_sums(values: Tensor, geometry: TileGeometry) -> Tensor:
    """Sum of ``values`` inside every window, computed separably with prefix sums.

    Args:
        values (Tensor): Shape ``(*lead, s_1, ..., s_d)``.
        geometry (TileGeometry): The tiling of the trailing ``d`` dimensions.

    Returns:
        Tensor: Shape ``(*lead, J_1, ..., J_d)``: entry ``j`` is the sum over window ``j``.
    """
    d = len(geometry.shape)
    out = values
    for i, (lo, hi) in enumerate(window_bounds(geometry)):
        axis = out.dim() - d + i
        prefix = torch.nn.functional.pad(out.cumsum(axis).movedim(axis, -1), (1, 0))
        lo_t = torch.tensor(lo, device=values.device)
        hi_t = torch.tensor(hi, device=values.device)
        out = (prefix[..., hi_t] - prefix[..., lo_t]).movedim(-1, axis)
    return out


def box_any(flags: Tensor, geometry: TileGeometry) -> Tensor:
    """Whether any flag is set inside every window, with little memory.

    Separable like :func:`box_sums`, but the counts are ``int16`` prefix sums (``int32`` along a
    dimension of 32768 or more) taken one dimension at a time and turned back into booleans at
    once, so each step shrinks the map to the window grid along one dimension: the largest
    intermediate is one ``int16`` copy of ``flags``.

    Args:
        flags (Tensor): Bool tensor of shape ``(s_1, ..., s_d)``.
        geometry (TileGeometry): The tiling of ``flags``'s dimensions.

    Returns:
        Tensor: Bool tensor of shape ``(J_1, ..., J_d)``.
    """
    out = flags
    for axis, (lo, hi) in enumerate(window_bounds(geometry)):
        if len(lo) == 1 and lo[0] == 0 and hi[0] == out.shape[axis]:
            out = out.any(axis, keepdim=True)  # one window over the whole axis
            continue
        # A count along one axis never exceeds its length: int16 holds it for most shapes.
        small = out.shape[axis] < 2**15
        counts = out.cumsum(axis, dtype=torch.int16 if small else torch.int32)
        hi_t = torch.tensor(hi, device=flags.device) - 1
        lo_t = torch.tensor(lo, device=flags.device) - 1
        upper = counts.index_select(axis, hi_t)
        lower = counts.index_select(axis, lo_t.clamp(min=0))
        del counts
        shape = [1] * out.dim()
        shape[axis] = len(lo)
        # A window starting at 0 has nothing before it: its lower prefix is 0.
        lower.mul_((lo_t >= 0).to(lower.dtype).reshape(shape))
        out = upper > lower
    return out


def accumulate(differences: Tensor, geometry: TileGeometry) -> Tensor:
    """Average the per-window values over the windows covering each element.

    Separable: along each dimension, each output element ``u`` is covered by the ``k`` consecutive
    positions ``u // t, ..., u // t + k - 1``; so a running sum of ``k`` neighbours, each repeated
    ``t`` times and cropped to ``s``, gives the sum over covering windows.

    Args:
        differences (Tensor): Shape ``(*lead, J_1, ..., J_d)``, one value per window.
        geometry (TileGeometry): The tiling of the trailing ``d`` dimensions.

    Returns:
        Tensor: Shape ``(*lead, s_1, ..., s_d)``: the mean over the ``prod(k)`` covering windows.
    """
    d = len(geometry.shape)
    out = differences
    for i, (s, t, k) in enumerate(zip(geometry.shape, geometry.stride, geometry.k)):
        axis = out.dim() - d + i
        if k > 1:
            out = out.unfold(axis, k, 1).sum(-1)
        out = out.repeat_interleave(t, dim=axis).narrow(axis, 0, s)
    if out is differences or not out.is_floating_point():
        return out / geometry.coverage
    # A new tensor of the full input size: divide it in place rather than make a second (#21).
    return out.div_(geometry.coverage)
