"""One rule per operation of a classic CNN.

How a changed box passes through pointwise ops, convolution, pooling, padding, add/mul and
concatenation; :func:`_run_dense` where a node mixes the whole map.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from extra_attrib._incremental._boxes import (
    Moved,
    Patch,
    _as_dense,
    _boxed,
    _Dense,
    _spatial,
    changed_span,
    gather,
    output_span,
)
from extra_attrib._incremental._ops import _functional_conv_args, _macs, _tup

if TYPE_CHECKING:
    from extra_attrib._incremental._ops import _Cost, _Env, _Step
    from extra_attrib._incremental._program import IncrementalProgram


def _args(step: _Step, env: _Env) -> Tuple[Any, Dict[str, Any]]:
    args = fx.node.map_arg(step.node.args, lambda a: env[a])
    kwargs = fx.node.map_arg(step.node.kwargs, lambda a: env[a])
    return args, kwargs


def _run_dense(
    program: IncrementalProgram, step: _Step, env: _Env, clean: Any, b: int, cost: Optional[_Cost]
) -> _Dense:
    args, kwargs = _args(step, env)
    args = fx.node.map_aggregate(args, lambda a: _as_dense(a, cost))
    kwargs = fx.node.map_aggregate(kwargs, lambda a: _as_dense(a, cost))
    out = program._call(step, args, kwargs)
    if cost is not None and isinstance(out, Tensor):
        cost.macs(_macs(program, step, env, out))
        cost.elements(out.numel())
    return _Dense(out)


def _patch_like(value: Patch, new: Tensor, clean: Tensor) -> Patch:
    return Patch(new, value.starts, value.size, clean)


def _pointwise(
    program: IncrementalProgram, step: _Step, env: _Env, clean: Any, b: int, cost: Optional[_Cost]
) -> Any:
    args, kwargs = _args(step, env)
    first = args[0] if args else None
    rest = list(args[1:]) + list(kwargs.values())
    if not isinstance(first, (Patch, Moved)) or any(
        isinstance(a, (Patch, Moved, _Dense))
        or (isinstance(a, Tensor) and not _local_to(a, first.clean.dim(), _spatial(first)))
        for a in rest
    ):
        return _run_dense(program, step, env, clean, b, cost)
    if not isinstance(clean, Tensor) or clean.shape != first.clean.shape:
        return _run_dense(program, step, env, clean, b, cost)  # e.g. a shape change
    out = program._call(step, (first.values, *args[1:]), kwargs)
    if cost is not None:
        cost.elements(out.numel())
    if isinstance(first, Moved):
        return _boxed(first, out, clean)
    return _patch_like(first, out, clean)


def _conv(
    program: IncrementalProgram, step: _Step, env: _Env, clean: Any, b: int, cost: Optional[_Cost]
) -> Any:
    weight: Any  # module attributes (typed Tensor | Module by torch) or nodes' values
    bias: Any
    if step.module is not None:
        kernel, stride, pad, dilation, mode, groups, right = step.info
        x = env[step.node.args[0]]
        weight, bias = step.module.weight, step.module.bias
        if step.node.kwargs or len(step.node.args) != 1:
            return _run_dense(program, step, env, clean, b, cost)
    else:
        values = _functional_conv_args(step.node, env)
        x, weight, bias = values["input"], values["weight"], values.get("bias")
        if isinstance(weight, (Patch, _Dense)) or isinstance(bias, (Patch, _Dense)):
            return _run_dense(program, step, env, clean, b, cost)
        d = step.info
        padding = values.get("padding", 0)
        if isinstance(padding, str):
            return _run_dense(program, step, env, clean, b, cost)
        kernel = tuple(weight.shape[2:])
        stride = _tup(values.get("stride", 1), d)
        pad = _tup(padding, d)
        dilation = _tup(values.get("dilation", 1), d)
        mode, groups, right = "constant", values.get("groups", 1), pad
    if not isinstance(x, Patch):
        return _run_dense(program, step, env, clean, b, cost)
    starts, size, ctx_starts, ctx_size = _sliding_boxes(
        x, clean, kernel, stride, pad, dilation, mode, right
    )
    context = gather(x, ctx_starts, ctx_size, mode, 0.0)
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(kernel) - 1]
    out = conv(context, weight, bias, stride, 0, dilation, groups)
    if cost is not None:
        cost.elements(2 * context.numel() + out.numel())
        cost.macs(out.numel() * weight[0].numel())
    return Patch(out, starts, size, clean)


def _sliding_boxes(
    x: Patch,
    clean: Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    pad: Sequence[int],
    dilation: Sequence[int],
    mode: str = "constant",
    right: Optional[Sequence[int]] = None,
) -> Tuple[Tensor, Tuple[int, ...], Tensor, Tuple[int, ...]]:
    """Output box and input context box of a sliding-window op.

    ``pad`` is the left padding per dimension, ``right`` the right one (default: ``pad``);
    with ``mode`` other than constant the padded copies of changed values count as changed.
    """
    right = pad if right is None else right
    starts, sizes, ctx_starts, ctx_sizes = [], [], [], []
    for i, out_len in enumerate(clean.shape[2:]):
        lo, hi = changed_span(x.starts[:, i], x.size[i], x.full[i], mode, pad[i], right[i])
        s, n = output_span(lo, hi, kernel[i], stride[i], dilation[i], pad[i], out_len)
        starts.append(s)
        sizes.append(n)
        ctx_starts.append(s * stride[i] - pad[i])
        ctx_sizes.append((n - 1) * stride[i] + (kernel[i] - 1) * dilation[i] + 1)
    return (torch.stack(starts, 1), tuple(sizes), torch.stack(ctx_starts, 1), tuple(ctx_sizes))


def _pool(
    program: IncrementalProgram, step: _Step, env: _Env, clean: Any, b: int, cost: Optional[_Cost]
) -> Any:
    x = env[step.node.args[0]]
    if not isinstance(x, Patch) or len(step.node.args) != 1 or step.node.kwargs:
        return _run_dense(program, step, env, clean, b, cost)
    kernel, stride, pad, dilation, kind = step.info
    starts, size, ctx_starts, ctx_size = _sliding_boxes(x, clean, kernel, stride, pad, dilation)
    d = len(kernel)
    m: Any = step.module  # an AvgPool module when kind == "avg"
    if kind == "max":
        context = gather(x, ctx_starts, ctx_size, "constant", -math.inf)
        out = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[d - 1](
            context, kernel, stride, 0, dilation
        )
    else:
        context = gather(x, ctx_starts, ctx_size, "constant", 0.0)
        if d == 1:
            out = F.avg_pool1d(context, kernel, stride, 0)
        else:
            out = (F.avg_pool2d, F.avg_pool3d)[d - 2](
                context, kernel, stride, 0, divisor_override=m.divisor_override
            )
    if cost is not None:
        cost.elements(2 * context.numel() + out.numel())
    return Patch(out, starts, size, clean)


def _pad(
    program: IncrementalProgram, step: _Step, env: _Env, clean: Any, b: int, cost: Optional[_Cost]
) -> Any:
    x = env[step.node.args[0]]
    if not isinstance(x, Patch):
        return _run_dense(program, step, env, clean, b, cost)
    pads = step.info  # F.pad order: last dimension first, (left, right) pairs
    d = len(x.full)
    left = [0] * d
    for j in range(len(pads) // 2):
        if d - 1 - j < 0:
            return _run_dense(program, step, env, clean, b, cost)
        left[d - 1 - j] = pads[2 * j]
    if len(pads) // 2 > d:
        return _run_dense(program, step, env, clean, b, cost)
    # A copy, not a view: later in-place ops must not reach the unpadded activation.
    return Patch(x.values.clone(), x.starts + torch.tensor(left), x.size, clean)


def _union(values: Sequence[Patch], full: Tuple[int, ...]) -> Tuple[Tensor, Tuple[int, ...]]:
    """Smallest fixed-size box per window containing every operand's box."""
    lo = torch.stack([v.starts for v in values]).amin(0)
    hi = torch.stack([v.starts + torch.tensor(v.size) for v in values]).amax(0)
    size = tuple(min(int(s), f) for s, f in zip((hi - lo).amax(0).tolist(), full))
    return torch.minimum(lo, torch.tensor(full) - torch.tensor(size)), size


def _local_operand(value: Any, ndim: int) -> bool:
    """A static operand that broadcasts the same way onto a box as onto the full map."""
    if not isinstance(value, Tensor):
        return isinstance(value, (int, float, bool))
    if value.dim() > ndim:
        return False
    shape = (1,) * (ndim - value.dim()) + tuple(value.shape)
    return shape[0] == 1 and all(s == 1 for s in shape[2:])


def _binary(
    program: IncrementalProgram, step: _Step, env: _Env, clean: Any, b: int, cost: Optional[_Cost]
) -> Any:
    args, _ = _args(step, env)
    if len(args) != 2 or not isinstance(clean, Tensor) or any(isinstance(a, _Dense) for a in args):
        return _run_dense(program, step, env, clean, b, cost)
    if any(isinstance(a, Moved) for a in args):
        return _binary_moved(program, step, env, clean, b, cost)
    fn = step.info
    patches = [a for a in args if isinstance(a, Patch)]
    if any(p.clean.shape != clean.shape for p in patches):
        return _run_dense(program, step, env, clean, b, cost)  # broadcasting between maps
    if len(patches) == 1:
        other = args[1] if isinstance(args[0], Patch) else args[0]
        if not _local_operand(other, clean.dim()):
            return _run_dense(program, step, env, clean, b, cost)
        p = patches[0]
        out = fn(p.values, other) if args[0] is p else fn(other, p.values)
        if cost is not None:
            cost.elements(out.numel())
        return Patch(out, p.starts, p.size, clean)
    first, second = patches
    if first.size == second.size and torch.equal(first.starts, second.starts):
        starts, size = first.starts, first.size
        a, c = first.values, second.values
    else:
        starts, size = _union(patches, tuple(clean.shape[2:]))
        a, c = gather(first, starts, size), gather(second, starts, size)
    out = fn(a, c)
    if cost is not None:
        cost.elements(3 * out.numel())
    return Patch(out, starts, size, clean)


def _cat(
    program: IncrementalProgram, step: _Step, env: _Env, clean: Any, b: int, cost: Optional[_Cost]
) -> Any:
    node = step.node
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(clean, Tensor):
        return _run_dense(program, step, env, clean, b, cost)
    values = [env[t] if isinstance(t, fx.Node) else t for t in tensors]
    if dim not in (1, 1 - clean.dim()) or not all(isinstance(v, Patch) for v in values):
        return _run_dense(program, step, env, clean, b, cost)
    if all(v.size == values[0].size and torch.equal(v.starts, values[0].starts) for v in values):
        starts, size = values[0].starts, values[0].size
        parts = [v.values for v in values]
    else:
        starts, size = _union(values, tuple(clean.shape[2:]))
        parts = [gather(v, starts, size) for v in values]
    out = torch.cat(parts, 1)
    if cost is not None:
        cost.elements(2 * out.numel())
    return Patch(out, starts, size, clean)


def _size(
    program: IncrementalProgram, step: _Step, env: _Env, clean: Any, b: int, cost: Optional[_Cost]
) -> Any:
    """``x.size()`` / ``x.shape`` of a patch: the clean sizes with ``B`` times the rows."""
    x = env[step.node.args[0]]
    if not isinstance(x, (Patch, Moved)):
        return _run_dense(program, step, env, clean, b, cost)
    shape = torch.Size((x.clean.shape[0] * b, *x.clean.shape[1:]))
    if step.node.op == "call_function":  # getattr(x, "shape")
        return shape
    args = step.node.args[1:] + tuple(step.node.kwargs.values())
    if not args:
        return shape
    dim: Any = args[0]  # an int: x.size(dim)
    return shape[dim]


def _local_to(value: Any, ndim: int, spatial: Sequence[int]) -> bool:
    """A static operand that broadcasts alike onto a box and onto the full map.

    Size 1 along the batch and the spatial dimensions (:func:`_local_operand` for any layout).
    """
    if not isinstance(value, Tensor):
        return isinstance(value, (int, float, bool))
    if value.dim() > ndim:
        return False
    shape = (1,) * (ndim - value.dim()) + tuple(value.shape)
    return shape[0] == 1 and all(shape[i] == 1 for i in spatial)


def _binary_moved(
    program: IncrementalProgram, step: _Step, env: _Env, clean: Any, b: int, cost: Optional[_Cost]
) -> Any:
    """Add/sub/mul/div where an operand is a :class:`Moved`.

    With a local operand, or with a second patch on the same boxes and layout; anything else
    runs densely.
    """
    args, _ = _args(step, env)
    fn = step.info
    first, second = args
    patches = [a for a in args if isinstance(a, (Patch, Moved))]
    if len(patches) == 1:
        p = patches[0]
        other = second if first is p else first
        if p.clean.shape != clean.shape or not _local_to(other, clean.dim(), _spatial(p)):
            return _run_dense(program, step, env, clean, b, cost)
        out = fn(p.values, other) if first is p else fn(other, p.values)
    else:
        if not (
            isinstance(first, Moved)
            and isinstance(second, Moved)
            and first.spatial == second.spatial
            and first.size == second.size
            and first.clean.shape == second.clean.shape == clean.shape
            and torch.equal(first.starts, second.starts)
        ):
            return _run_dense(program, step, env, clean, b, cost)
        p = first
        out = fn(first.values, second.values)
    if cost is not None:
        cost.elements(out.numel())
    return _boxed(p, out, clean)
