"""Rules for the operations of today's CNNs (#20).

Rearranged patches (channels last, channel shuffle, split along channels), per-channel
broadcasts, transposed convolutions and integer upsampling.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from extra_attrib._incremental._boxes import Moved, Patch, _boxed, _Dense, _spatial, gather
from extra_attrib._incremental._ops import _tup
from extra_attrib._incremental._rules import _args, _local_to, _run_dense

if TYPE_CHECKING:
    from extra_attrib._incremental._ops import _Cost, _Env, _Step
    from extra_attrib._incremental._program import IncrementalProgram


def _channel(
    program: IncrementalProgram, step: _Step, env: _Env, clean: Any, b: int, cost: Optional[_Cost]
) -> Any:
    """An op over non-spatial dimensions only, pointwise in space.

    Eval ``F.batch_norm`` (over dimension 1, as timm's norm-activation layers call it),
    ``LayerNorm`` and ``Linear`` over trailing dimensions that are not spatial (ConvNeXt's
    channels-last norm and MLP).
    """
    args, kwargs = _args(step, env)
    x = args[0] if args else None
    if not isinstance(x, (Patch, Moved)) or not isinstance(clean, Tensor):
        return _run_dense(program, step, env, clean, b, cost)
    if any(isinstance(a, (Patch, Moved, _Dense)) for a in list(args[1:]) + list(kwargs.values())):
        return _run_dense(program, step, env, clean, b, cost)
    ndim = x.clean.dim()
    if step.info == "channel":
        dims = {1}
    else:
        count = step.info
        if count == "layer_norm":
            shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
            if not isinstance(shape, (tuple, list)):
                return _run_dense(program, step, env, clean, b, cost)
            count = len(shape)
        dims = set(range(ndim - count, ndim))
    if 0 in dims or dims & set(_spatial(x)) or clean.dim() != ndim:
        return _run_dense(program, step, env, clean, b, cost)
    out = program._call(step, (x.values, *args[1:]), kwargs)
    if cost is not None:
        cost.elements(x.values.numel() + out.numel())
        if step.module is not None and isinstance(step.module, nn.Linear):
            cost.macs(out.numel() * step.module.in_features)
    return _boxed(x, out, clean)


def _rearrange(
    program: IncrementalProgram, step: _Step, env: _Env, clean: Any, b: int, cost: Optional[_Cost]
) -> Any:
    """Permute / transpose / unsqueeze / view / reshape / flatten / unflatten of a patch.

    Local when the batch stays first and the spatial dimensions keep their order; a view
    or reshape must also keep the spatial dimensions last and whole (it regroups the
    channels only, as ShuffleNet's channel shuffle does). Otherwise the op runs densely.
    """
    args, kwargs = _args(step, env)
    x = args[0] if args else None
    if not isinstance(x, (Patch, Moved)) or not isinstance(clean, Tensor):
        return _run_dense(program, step, env, clean, b, cost)
    name = step.info
    ndim, spatial = x.clean.dim(), _spatial(x)
    rest = list(args[1:])
    try:
        if name == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            dims = list(kwargs.get("dims", dims))
            if sorted(d % ndim for d in dims) != list(range(ndim)):
                return _run_dense(program, step, env, clean, b, cost)
            order = [d % ndim for d in dims]
        elif name == "transpose":
            first, second = (int(d) % ndim for d in (rest + list(kwargs.values()))[:2])
            order = list(range(ndim))
            order[first], order[second] = order[second], order[first]
        elif name == "unsqueeze":
            dim = int((rest + list(kwargs.values()))[0]) % (ndim + 1)
            if dim == 0:
                return _run_dense(program, step, env, clean, b, cost)
            new = tuple(s + (s >= dim) for s in spatial)
            values = program._call(step, (x.values, *args[1:]), kwargs)
            return _boxed(x, values, clean, new)
        else:  # view, reshape, flatten, unflatten: regroup the dimensions before the spatial
            d = len(spatial)
            if (
                spatial != tuple(range(ndim - d, ndim))
                or clean.dim() < d + 2
                or clean.shape[0] != x.clean.shape[0]
                or tuple(clean.shape[clean.dim() - d :]) != x.full
                or clean.numel() != x.clean.numel()
            ):
                return _run_dense(program, step, env, clean, b, cost)
            middle = tuple(clean.shape[1 : clean.dim() - d])
            values = x.values.reshape(x.values.shape[0], *middle, *x.size)
            return _boxed(x, values, clean, tuple(range(clean.dim() - d, clean.dim())))
    except (TypeError, ValueError, IndexError):
        return _run_dense(program, step, env, clean, b, cost)
    if order[0] != 0:
        return _run_dense(program, step, env, clean, b, cost)
    new = tuple(order.index(s) for s in spatial)
    if list(new) != sorted(new):
        return _run_dense(program, step, env, clean, b, cost)
    values = program._call(step, (x.values, *args[1:]), kwargs)
    return _boxed(x, values, clean, new)


def _split(
    program: IncrementalProgram, step: _Step, env: _Env, clean: Any, b: int, cost: Optional[_Cost]
) -> Any:
    """Split / chunk / tensor_split along a non-spatial dimension (res2net, GhostNet, CSP).

    The result is a tuple of patches on the same boxes.
    """
    args, kwargs = _args(step, env)
    x = args[0] if args else None
    if not isinstance(x, (Patch, Moved)) or not isinstance(clean, (tuple, list)):
        return _run_dense(program, step, env, clean, b, cost)
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    if not isinstance(dim, int):
        return _run_dense(program, step, env, clean, b, cost)
    dim %= x.clean.dim()
    if dim == 0 or dim in _spatial(x):
        return _run_dense(program, step, env, clean, b, cost)
    parts = program._call(step, (x.values, *args[1:]), kwargs)
    return tuple(_boxed(x, p, c) for p, c in zip(parts, clean))


def _getitem(
    program: IncrementalProgram, step: _Step, env: _Env, clean: Any, b: int, cost: Optional[_Cost]
) -> Any:
    """Indexing: ``parts[i]`` of a tuple (of patches, or a shape).

    Or basic slicing of a patch along non-spatial dimensions only (``x[:, :c]``).
    """
    args, _ = _args(step, env)
    container, index = args
    if isinstance(container, (tuple, list)) and isinstance(index, int):
        return container[index]  # an element: a patch, a size, anything
    if isinstance(container, (Patch, Moved)) and isinstance(clean, Tensor):
        items = list(index) if isinstance(index, tuple) else [index]
        ndim = container.clean.dim()
        if items and items[-1] is Ellipsis:
            items = items[:-1] + [slice(None)] * (ndim - len(items) + 1)
        if len(items) <= ndim and all(isinstance(i, slice) for i in items):
            keep = {0, *_spatial(container)}
            if all(i == slice(None) for p, i in enumerate(items) if p in keep):
                return _boxed(container, container.values[tuple(items)], clean)
    return _run_dense(program, step, env, clean, b, cost)


def _expand_as(
    program: IncrementalProgram, step: _Step, env: _Env, clean: Any, b: int, cost: Optional[_Cost]
) -> Any:
    """``a.expand_as(x)`` with ``x`` a patch.

    A per-channel static ``a`` becomes a patch of ``x``'s boxes; a dense ``a`` (an attention
    gate, as in ECA) is expanded to the full shape without materialising ``x``.
    """
    args, _ = _args(step, env)
    a, target = args
    if not isinstance(target, (Patch, Moved)) or not isinstance(clean, Tensor):
        return _run_dense(program, step, env, clean, b, cost)
    full = (target.clean.shape[0] * target.windows, *target.clean.shape[1:])
    if isinstance(a, _Dense) and isinstance(a.value, Tensor):
        return _Dense(a.value.expand(full))
    if isinstance(a, Tensor) and _local_to(a, target.clean.dim(), _spatial(target)):
        return _boxed(target, a.expand_as(target.values), clean)
    return _run_dense(program, step, env, clean, b, cost)


def _repeat(
    program: IncrementalProgram, step: _Step, env: _Env, clean: Any, b: int, cost: Optional[_Cost]
) -> Any:
    """``x.repeat(...)`` of a patch along non-spatial dimensions only (MONAI's VNet)."""
    args, kwargs = _args(step, env)
    x = args[0] if args else None
    sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
    if (
        not isinstance(x, (Patch, Moved))
        or kwargs
        or not isinstance(clean, Tensor)
        or len(sizes) != x.clean.dim()
        or not all(isinstance(s, int) for s in sizes)
        or any(sizes[i] != 1 for i in (0, *_spatial(x)))
    ):
        return _run_dense(program, step, env, clean, b, cost)
    return _boxed(x, x.values.repeat(*sizes), clean)


def _crop(values: Tensor, offsets: Tensor, size: Sequence[int], n: int) -> Tensor:
    """Per window, the box at ``offsets`` (``(B, d)``, CPU) of ``values`` ``(B * N, C, *T)``."""
    b = offsets.shape[0]
    out = values.reshape(b, -1, *values.shape[2:])
    for i, length in enumerate(size):
        index = (offsets[:, i : i + 1] + torch.arange(length)).to(values.device)
        shape = [b] + [1] * (out.dim() - 1)
        shape[2 + i] = length
        target = list(out.shape)
        target[2 + i] = length
        out = out.gather(2 + i, index.view(shape).expand(target))
    return out.reshape(b * n, -1, *size)


def _deconv(
    program: IncrementalProgram, step: _Step, env: _Env, clean: Any, b: int, cost: Optional[_Cost]
) -> Any:
    """Transposed convolution (U-Net decoders).

    Output ``o`` reads input ``i`` where ``o = i * stride - pad + j * dilation``: the box of
    changed inputs ``[a, a + L)`` changes the outputs from ``a * stride - pad`` to
    ``(a + L - 1) * stride - pad + reach``. The input context is gathered (zero outside the
    map: a missing input adds nothing), run without padding, and each window's box is cropped
    from the result.
    """
    m: Any = step.module
    x = env[step.node.args[0]]
    if not isinstance(x, Patch) or len(step.node.args) != 1 or step.node.kwargs:
        return _run_dense(program, step, env, clean, b, cost)
    d = len(x.full)
    kernel, stride = _tup(m.kernel_size, d), _tup(m.stride, d)
    pad, dilation = _tup(m.padding, d), _tup(m.dilation, d)
    starts, sizes, ctx_starts, ctx_sizes, offsets = [], [], [], [], []
    for i, out_len in enumerate(clean.shape[2:]):
        k, s, p, dl = kernel[i], stride[i], pad[i], dilation[i]
        reach = (k - 1) * dl
        size = min((x.size[i] - 1) * s + reach + 1, out_len)
        lo = (x.starts[:, i] * s - p).clamp(0, out_len - size)
        first = torch.div(lo + p - reach, s, rounding_mode="floor")
        starts.append(lo)
        sizes.append(size)
        ctx_starts.append(first)
        ctx_sizes.append(-(-(size + reach + s - 1) // s))  # every input of the box's outputs
        offsets.append(lo + p - first * s)
    context = gather(x, torch.stack(ctx_starts, 1), tuple(ctx_sizes), "constant", 0.0)
    deconv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[d - 1]
    full = deconv(context, m.weight, m.bias, stride, 0, 0, m.groups, dilation)
    out = _crop(full, torch.stack(offsets, 1), sizes, x.clean.shape[0])
    if cost is not None:
        cost.elements(2 * context.numel() + 2 * full.numel())
        cost.macs(full.numel() * m.weight.shape[0] // max(m.groups, 1) * math.prod(kernel))
    return Patch(out, torch.stack(starts, 1), tuple(sizes), clean)


def _upsample(
    program: IncrementalProgram, step: _Step, env: _Env, clean: Any, b: int, cost: Optional[_Cost]
) -> Any:
    """Upsampling by an integer factor per dimension.

    ``nearest`` (power-of-two factors, whose
    source index ``floor(o / s)`` is exact in floating point) or ``linear`` / ``bilinear`` /
    ``trilinear`` without ``align_corners``. Output ``o`` reads inputs near
    ``(o + 0.5) / s - 0.5``; the context gets one input of margin per side, replicated at the
    map's borders as the op's clamping does, so every output of the box is exact.
    """
    args, kwargs = _args(step, env)
    x = args[0] if args else None
    if not isinstance(x, Patch) or not isinstance(clean, Tensor):
        return _run_dense(program, step, env, clean, b, cost)
    if step.module is not None:
        m: Any = step.module
        mode, corners, factor, antialias = m.mode, m.align_corners, m.scale_factor, False
        if len(args) != 1 or kwargs:
            return _run_dense(program, step, env, clean, b, cost)
    else:
        names = ("input", "size", "scale_factor", "mode", "align_corners")
        values = dict(zip(names, args))
        values.update(kwargs)
        mode, corners = values.get("mode", "nearest"), values.get("align_corners")
        factor, antialias = values.get("scale_factor"), values.get("antialias", False)
    d = len(x.full)
    scales = [o // i for o, i in zip(clean.shape[2:], x.full)]
    linear = mode in ("linear", "bilinear", "trilinear")
    if (
        clean.shape[:2] != x.clean.shape[:2]
        or any(o != s * i for o, s, i in zip(clean.shape[2:], scales, x.full))
        or antialias
        or corners
        or not (linear or (mode == "nearest" and all(s & (s - 1) == 0 for s in scales)))
    ):
        return _run_dense(program, step, env, clean, b, cost)
    if factor is not None and any(float(f) != s for f, s in zip(_tup(factor, d), scales)):
        return _run_dense(program, step, env, clean, b, cost)
    margin = 1 if linear else 0
    starts, sizes, ctx_starts, ctx_sizes = [], [], [], []
    for i, (s, out_len) in enumerate(zip(scales, clean.shape[2:])):
        size = min((x.size[i] + 2 * margin) * s, out_len)  # a multiple of s, as out_len is
        lo = ((x.starts[:, i] - margin) * s).clamp(0, out_len - size)
        starts.append(lo)
        sizes.append(size)
        ctx_starts.append(torch.div(lo, s, rounding_mode="floor") - margin)
        ctx_sizes.append(size // s + 2 * margin)
    context = gather(x, torch.stack(ctx_starts, 1), tuple(ctx_sizes), "replicate")
    full = F.interpolate(context, scale_factor=tuple(float(s) for s in scales), mode=mode)
    crop = tuple(slice(margin * s, margin * s + n) for s, n in zip(scales, sizes))
    out = full[(slice(None), slice(None)) + crop]
    if cost is not None:
        cost.elements(2 * context.numel() + 2 * full.numel())
    return Patch(out, torch.stack(starts, 1), tuple(sizes), clean)
