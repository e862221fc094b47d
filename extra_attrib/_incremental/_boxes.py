"""Changed values and their geometry.

A :class:`Patch` is the clean map plus one box of new values per window; a :class:`Moved` is a
patch seen through rearranged dimensions. :func:`gather` reads the patched map at any coordinates;
:func:`changed_span` and :func:`output_span` give the boxes a sliding-window op changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from extra_attrib._incremental._keep import resolved

if TYPE_CHECKING:
    from extra_attrib._incremental._ops import _Cost


@dataclass
class Patch:
    """A changed activation: the clean map plus one fixed-size box of new values per window.

    Attributes:
        values (Tensor): New values, ``(B * N, C, *size)``, window-major.
        starts (Tensor): Box starts on the CPU, ``(B, d)`` int64, with
            ``0 <= starts[:, i] <= full[i] - size[i]``.
        size (tuple of int): Box size per spatial dimension.
        clean (Tensor): The clean activation ``(N, C, *full)``.
    """

    values: Tensor
    starts: Tensor
    size: Tuple[int, ...]
    clean: Tensor

    @property
    def full(self) -> Tuple[int, ...]:
        return tuple(self.clean.shape[2:])

    @property
    def windows(self) -> int:
        return self.starts.shape[0]


class _Dense:
    """A full value of the perturbed batch (``B * N`` rows), or anything computed from one."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def source_index(coords: Tensor, size: int, mode: str) -> Tuple[Tensor, Optional[Tensor]]:
    """Map absolute coordinates (possibly outside ``[0, size)``) to source indices.

    Args:
        coords (Tensor): Integer coordinates, any shape.
        size (int): Length of the map along this dimension.
        mode (str): ``"constant"`` (out-of-range positions take a fill value), ``"reflect"``,
            ``"replicate"`` or ``"circular"``, as in :func:`torch.nn.functional.pad`.

    Returns:
        (Tensor, Tensor or None): Indices in ``[0, size)``, and for ``"constant"`` a bool mask of
        the in-range positions (``None`` when all are in range or for the other modes).
    """
    if mode == "constant":
        valid = (coords >= 0) & (coords < size)
        return coords.clamp(0, size - 1), None if bool(valid.all()) else valid
    if mode == "replicate":
        return coords.clamp(0, size - 1), None
    if mode == "circular":
        return coords.remainder(size), None
    if mode == "reflect":
        idx = coords.abs()
        return torch.where(idx > size - 1, 2 * (size - 1) - idx, idx), None
    raise ValueError(f"padding mode {mode!r} is not one of constant, reflect, replicate, circular")


def gather(
    value: Patch, starts: Tensor, size: Sequence[int], mode: str = "constant", fill: float = 0.0
) -> Tensor:
    """Values of the patched map on one box per window, at absolute coordinates.

    Args:
        value (Patch): The changed activation, ``B`` windows.
        starts (Tensor): Box start per window, ``(B, d)`` int64 on the CPU; may lie outside the
            map, as may the box.
        size (sequence of int): Box size per spatial dimension.
        mode (str, optional): How out-of-range coordinates read, see :func:`source_index`.
            Default: ``"constant"``
        fill (float, optional): Value of out-of-range positions in ``"constant"`` mode.
            Default: 0.0

    Returns:
        Tensor: ``(B * N, C, *size)``: the patch's values inside its box, the clean
        activation elsewhere. On the patch's own boxes this is ``value.values`` itself, not a
        copy: callers only read it.
    """
    if tuple(size) == tuple(value.size) and torch.equal(starts, value.starts):
        return value.values  # the patch's own boxes (a 1x1 convolution's context)
    clean = resolved(value.clean)
    if mode == "constant" and clean.device.type == "cpu":
        return _gather_slices(value, clean, starts, size, fill)
    return _gather_index(value, clean, starts, size, mode, fill)


def _gather_index(
    value: Patch, clean: Tensor, starts: Tensor, size: Sequence[int], mode: str, fill: float
) -> Tensor:
    """:func:`gather` by index arithmetic: one launch per step, any padding mode."""
    device = clean.device
    n, c = clean.shape[:2]
    full = value.full
    d = len(full)
    b = starts.shape[0]
    lin = torch.zeros((b,) + (1,) * d, dtype=torch.long)
    rel = torch.zeros((b,) + (1,) * d, dtype=torch.long)
    inside = torch.ones((b,) + (1,) * d, dtype=torch.bool)
    valid: Optional[Tensor] = None
    stride, pstride = 1, 1
    for i in reversed(range(d)):
        shape = [b] + [1] * d
        shape[1 + i] = size[i]
        coords = starts[:, i : i + 1] + torch.arange(size[i])
        idx, ok = source_index(coords, full[i], mode)
        lin = lin + idx.view(shape) * stride
        r = idx - value.starts[:, i : i + 1]
        inside = inside & ((r >= 0) & (r < value.size[i])).view(shape)
        rel = rel + r.clamp(0, value.size[i] - 1).view(shape) * pstride
        if ok is not None:
            valid = ok.view(shape) if valid is None else valid & ok.view(shape)
        stride *= full[i]
        pstride *= value.size[i]
    out_shape = (b,) + tuple(size)
    lin, rel, inside = lin.expand(out_shape), rel.expand(out_shape), inside.expand(out_shape)
    box = math.prod(size)
    from_clean = clean.reshape(n * c, -1).index_select(1, lin.reshape(-1).to(device))
    from_clean = from_clean.view(n, c, b, *size).movedim(2, 0)
    index = rel.reshape(b, 1, box).to(device).expand(b, n * c, box)
    from_patch = value.values.reshape(b, n * c, -1).gather(2, index).view(b, n, c, *size)
    out = torch.where(inside.to(device).view(b, 1, 1, *size), from_patch, from_clean)
    if valid is not None:
        out = out.masked_fill(~valid.expand(out_shape).to(device).view(b, 1, 1, *size), fill)
    return out.reshape(b * n, c, *size)


def _gather_slices(
    value: Patch, clean: Tensor, starts: Tensor, size: Sequence[int], fill: float
) -> Tensor:
    """:func:`gather` in constant mode by copying boxes, one window at a time.

    On the CPU two box copies per window (the clean map's, then the patch's part of the box)
    touch each value once, where the index-based :func:`gather` reads, gathers and selects
    each value three times (#20). On an accelerator the index-based form is one launch instead
    of ``2 * B``.
    """
    n, c = clean.shape[:2]
    full = value.full
    b = starts.shape[0]
    new = value.values.view(b, n, c, *value.size)
    copies = []
    partial = False
    for start, own in zip(starts.tolist(), value.starts.tolist()):
        into: List[slice] = [slice(None), slice(None)]
        src: List[slice] = [slice(None), slice(None)]
        into_mine: List[slice] = [slice(None), slice(None)]
        mine: List[slice] = [slice(None), slice(None)]
        for s, length, f, p, m in zip(start, size, full, own, value.size):
            lo, hi = max(s, 0), max(min(s + length, f), max(s, 0))
            partial = partial or hi - lo < length
            into.append(slice(lo - s, hi - s))
            src.append(slice(lo, hi))
            plo = max(p, s)
            phi = max(min(p + m, s + length), plo)
            into_mine.append(slice(plo - s, phi - s))
            mine.append(slice(plo - p, phi - p))
        copies.append((tuple(into), tuple(src), tuple(into_mine), tuple(mine)))
    out = clean.new_full((b, n, c, *size), fill) if partial else clean.new_empty((b, n, c, *size))
    for w, (to_box, from_clean, to_own, from_own) in enumerate(copies):
        box = out[w]
        box[to_box] = clean[from_clean]
        box[to_own] = new[w][from_own]
    return out.reshape(b * n, c, *size)


def materialise(value: Patch) -> Tensor:
    """The full patched maps ``(B * N, C, *full)`` of every window."""
    clean = resolved(value.clean)
    b = value.windows
    out = clean.unsqueeze(0).repeat(b, *([1] * clean.dim()))
    new = value.values.view(b, *clean.shape[:2], *value.size)
    for w, start in enumerate(value.starts.tolist()):
        region = tuple(slice(s, s + n) for s, n in zip(start, value.size))
        out[(w, slice(None), slice(None)) + region] = new[w]
    return out.reshape(b * clean.shape[0], *clean.shape[1:])


def output_box(
    starts: Tensor, length: int, kernel: int, stride: int, dilation: int, pad: int, out: int
) -> Tuple[Tensor, int]:
    """Output box of a sliding-window op (conv/pool) whose input changed on a box.

    Output ``o`` reads inputs ``o * stride - pad + j * dilation``, ``0 <= j < kernel``; it
    changes when one of them lies in ``[a, a + length)``.

    Args:
        starts (Tensor): Input box starts ``a``, ``(B,)`` int64.
        length (int): Input box length.
        kernel (int): The op's kernel size.
        stride (int): The op's stride.
        dilation (int): The op's dilation.
        pad (int): The op's left padding.
        out (int): Output length.

    Returns:
        (Tensor, int): Output box starts ``(B,)``, clamped inside ``[0, out - size]``, and the
        output box size.
    """
    reach = (kernel - 1) * dilation
    size = min(-(-(length + reach) // stride), out)
    lo = -((reach - starts - pad) // stride)  # ceil((a + pad - reach) / stride)
    return lo.clamp(0, out - size), size


def _as_dense(value: Any, cost: Optional[_Cost] = None) -> Any:
    if isinstance(value, (Patch, Moved)):
        out = materialise(value) if isinstance(value, Patch) else materialise_moved(value)
        if cost is not None:
            cost.elements(out.numel())
        return out
    if isinstance(value, _Dense):
        return value.value
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return type(value)(_as_dense(v, cost) for v in value)
    return value


def changed_span(
    starts: Tensor, length: int, full: int, mode: str, left: int, right: int
) -> Tuple[Tensor, Tensor]:
    """Padded coordinates that change when ``[a, a + length)`` changes, as one span per window.

    Padding copies input values into ``[-left, 0)`` and ``[full, full + right)``: reflect
    mirrors ``x[m]`` to ``-m`` and ``2 * (full - 1) - m``, replicate copies the end values,
    circular wraps ``x[m]`` to ``m - full`` and ``m + full``. A changed box changes those copies
    too; the span is the smallest interval holding the box and every changed copy (all of it
    is recomputed, which is exact).

    Args:
        starts (Tensor): Box starts ``a``, ``(B,)`` int64, ``0 <= a <= full - length``.
        length (int): Box length.
        full (int): Length of the unpadded map.
        mode (str): ``"constant"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
        left (int): Left padding.
        right (int): Right padding.

    Returns:
        (Tensor, Tensor): Span starts and (exclusive) ends, ``(B,)`` each, in padded
        coordinates (``-left <= start``, ``end <= full + right``).
    """
    a, last = starts, starts + length - 1
    lo, hi = a.clone(), last + 1
    if mode == "replicate":
        lo = torch.where(a == 0, torch.full_like(a, -left), lo)
        hi = torch.where(last == full - 1, torch.full_like(a, full + right), hi)
    elif mode == "reflect":
        # x[m], 1 <= m <= left, is copied to -m; x[m], full-1-right <= m <= full-2, to 2(full-1)-m
        top = torch.minimum(last, torch.full_like(a, left))
        lo = torch.where((last >= 1) & (a <= left) & (top >= 1), torch.minimum(lo, -top), lo)
        bottom = torch.maximum(a, torch.full_like(a, full - 1 - right))
        mirrored = 2 * (full - 1) - bottom + 1
        hit = (bottom <= torch.minimum(last, torch.full_like(a, full - 2))) & (right > 0)
        hi = torch.where(hit, torch.maximum(hi, mirrored), hi)
    elif mode == "circular":
        # x[m], m >= full - left, is copied to m - full; x[m], m < right, to m + full
        first = torch.maximum(a, torch.full_like(a, full - left))
        lo = torch.where((last >= full - left) & (left > 0), torch.minimum(lo, first - full), lo)
        end = torch.minimum(last, torch.full_like(a, right - 1)) + full + 1
        hi = torch.where((a <= right - 1) & (right > 0), torch.maximum(hi, end), hi)
    elif mode != "constant":
        raise ValueError(
            f"padding mode {mode!r} is not one of constant, reflect, replicate, circular"
        )
    return lo, hi


def output_span(
    lo: Tensor, hi: Tensor, kernel: int, stride: int, dilation: int, pad: int, out: int
) -> Tuple[Tensor, int]:
    """Output box of a sliding-window op whose padded input changed on ``[lo, hi)``.

    Output ``o`` reads padded inputs ``o * stride - pad + j * dilation``, ``0 <= j < kernel``.

    Returns:
        (Tensor, int): Box starts ``(B,)``, clamped inside ``[0, out - size]``, and the box size
        (the largest over the windows).
    """
    reach = (kernel - 1) * dilation
    first = (-((reach - lo - pad) // stride)).clamp(0, out - 1)  # ceil((lo + pad - reach) / s)
    last = ((hi - 1 + pad) // stride).clamp(0, out - 1)
    size = max(1, min(int((last - first).max()) + 1, out))
    return first.clamp(0, out - size), size


@dataclass
class Moved:
    """A changed activation whose dimensions were rearranged (permuted, split, unsqueezed).

    The batch stays first and the spatial dimensions keep their order, at positions
    ``spatial``; the other dimensions (channels, groups of channels) lie anywhere else. E.g.
    ConvNeXt's channels-last ``(N, H, W, C)`` has ``spatial == (1, 2)``, ShuffleNet's
    ``(N, groups, C // groups, H, W)`` has ``spatial == (3, 4)``.

    Attributes:
        values (Tensor): New values, the clean layout with ``B * N`` rows and the box sizes at
            ``spatial``.
        starts (Tensor): Box starts on the CPU, ``(B, d)`` int64, as in :class:`Patch`.
        size (tuple of int): Box size per spatial dimension.
        clean (Tensor): The clean activation, ``N`` rows.
        spatial (tuple of int): Positions of the spatial dimensions, increasing.
    """

    values: Tensor
    starts: Tensor
    size: Tuple[int, ...]
    clean: Tensor
    spatial: Tuple[int, ...]

    @property
    def full(self) -> Tuple[int, ...]:
        return tuple(self.clean.shape[i] for i in self.spatial)

    @property
    def windows(self) -> int:
        return self.starts.shape[0]


def _spatial(value: Any) -> Tuple[int, ...]:
    """Positions of the spatial dimensions of a :class:`Patch` or :class:`Moved`."""
    if isinstance(value, Moved):
        return value.spatial
    return tuple(range(2, value.clean.dim()))


def _boxed(
    like: Any, values: Tensor, clean: Tensor, spatial: Optional[Tuple[int, ...]] = None
) -> Any:
    """New box values on ``like``'s boxes.

    A :class:`Patch` in the standard layout ``(N, C, *S)``, a :class:`Moved` otherwise.
    """
    spatial = _spatial(like) if spatial is None else spatial
    if spatial == tuple(range(2, clean.dim())):
        return Patch(values, like.starts, like.size, clean)
    return Moved(values, like.starts, like.size, clean, spatial)


def materialise_moved(value: Moved) -> Tensor:
    """The full rearranged maps ``(B * N, ...)`` of every window."""
    clean = resolved(value.clean)
    b, n = value.windows, clean.shape[0]
    out = clean.unsqueeze(0).repeat(b, *([1] * clean.dim()))
    new = value.values.reshape(b, n, *value.values.shape[1:])
    for w, start in enumerate(value.starts.tolist()):
        index: List[Any] = [slice(None)] * clean.dim()
        for pos, s, size in zip(value.spatial, start, value.size):
            index[pos] = slice(s, s + size)
        out[tuple([w, *index])] = new[w]
    return out.reshape(b * n, *clean.shape[1:])


def input_patch(x: Tensor, fill: Tensor, boxes: Sequence[Tuple[slice, ...]]) -> Patch:
    """The input's patch for a chunk of occlusion windows.

    Every window gets a box of the chunk's largest window size over the spatial dimensions (all
    channels), clamped inside the input, holding the input with the window set to the baseline.

    Args:
        x (Tensor): Input ``(N, C, *S)``.
        fill (Tensor): Baseline, broadcast to ``x``'s shape.
        boxes (sequence of tuple of slice): Per window, one slice per non-batch dimension.

    Returns:
        Patch: ``B = len(boxes)`` windows.
    """
    full = x.shape[2:]
    size = tuple(max(box[1 + i].stop - box[1 + i].start for box in boxes) for i in range(len(full)))
    starts = torch.tensor(
        [
            [min(box[1 + i].start, f - n) for i, (f, n) in enumerate(zip(full, size))]
            for box in boxes
        ],
        dtype=torch.long,
    ).reshape(len(boxes), len(full))
    values = torch.empty((len(boxes), *x.shape[:2], *size), dtype=x.dtype, device=x.device)
    for w, (box, start) in enumerate(zip(boxes, starts.tolist())):
        region = tuple(slice(s, s + n) for s, n in zip(start, size))
        values[w] = x[(slice(None), slice(None)) + region]
        window = (box[0],) + tuple(
            slice(sl.start - s, sl.stop - s) for sl, s in zip(box[1:], start)
        )
        values[(w, slice(None)) + tuple(window)] = fill[(slice(None), box[0]) + tuple(box[1:])]
    return Patch(values.reshape(len(boxes) * x.shape[0], *x.shape[1:2], *size), starts, size, x)
