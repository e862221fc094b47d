"""Exact incremental occlusion for CNNs (Krypton-style), 1D to 3D.

An occlusion window changes only a box of each convolution's output. This module traces the model
once with :mod:`torch.fx`, runs the clean input once keeping every node's activation, and then, for
a chunk of ``B`` windows, propagates per node only the changed box of each window, all windows of
the chunk batched together:

- A changed activation is a :class:`Patch`: the clean activation (stored once, ``N`` examples), a
  fixed-size box of new values per window ``(B * N, C, *size)`` and each box's start ``(B, d)``.
  Boxes have one size per node and chunk (starts are clamped so the box stays inside the map;
  recomputing some unchanged values is still exact), so a chunk is one batched tensor.
- The one primitive is :func:`gather`: the values of the patched map at per-window absolute
  coordinates, the patch inside its box and the clean activation elsewhere, with out-of-range
  coordinates mapped per padding mode (constant fill, reflect, replicate, circular).
- Convolution and max/avg pooling gather the input context of their output box and run with
  padding 0; pointwise ops (eval BatchNorm, activations, eval Dropout) keep the box; constant
  padding shifts it; add/sub/mul/div and channel concat gather every operand on the union box.
- Today's CNNs (#20): transposed convolutions and integer upsampling gather their input context
  and crop each window's output box; eval ``F.batch_norm`` and LayerNorm / Linear over
  non-spatial dimensions are pointwise in space; a :class:`Moved` is a patch seen through
  permutes, transposes, views and unsqueezes that keep the batch first and the spatial
  dimensions in order (channels last, channel shuffle), split / chunk / sliced along channels;
  shape facts (``x.ndim``, ``x.dtype``) and the checks built on them are static.
- Ops that mix the whole map (global pooling, Linear over space, flatten, normalisation over
  space, ...) and boxes covering most of their map switch to dense: full patched maps
  ``(B * N, ...)`` are materialised and the rest of the graph runs as in the model.
- Any other op (attention modules, einsum, ...) makes the model unsupported: the caller falls
  back to the dense engine (``engine="auto"``) or raises (``engine="incremental"``).

The result equals the dense engine up to float rounding: the same ops on the same values. The
trace is a copy of the model's arithmetic, so :func:`choose_engine` checks it against the real
model on every call before a sweep uses it (:mod:`extra_attrib._verify`), and refuses in-place
writes that a later node would observe (:mod:`extra_attrib._aliasing`).
"""

from __future__ import annotations

import math
import operator
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from extra_attrib._aliasing import observable_in_place_write
from extra_attrib._engine import BUFFER_BUDGET_BYTES
from extra_attrib._geometry import TileGeometry, perturbation_boxes
from extra_attrib._targets import check_output
from extra_attrib._verify import VerificationFailed, verify_incremental

#: Values of the nodes run so far, keyed by ``fx.Node``. The key type is ``Any`` because fx types
#: a node's ``args`` entries as its broad ``Argument`` union, even where they are nodes.
_Env = Dict[Any, Any]

#: A patch whose box covers at least this fraction of its map is materialised: from there on the
#: graph runs densely (gathering a box that is nearly the whole map costs more than it saves).
DENSE_FRACTION = 0.6
#: ``engine="auto"`` skips timing incremental when the cost model predicts less than this
#: speed-up: the model over-predicts (31 of 32 zoo models at 96², by up to 2.4x), so below 1
#: incremental is hopeless. Above it, the sweep times both engines and keeps the faster (#20).
MIN_PREDICTED_GAIN = 1.0
#: Cost, in multiply-adds, charged per element an op reads or writes outside convolutions and
#: linear layers (memory-bound work: gathers, BatchNorm, activations).
ELEMENT_COST = 8.0


class UnsupportedModel(ValueError):
    """The model cannot run incrementally; the message names the reason and where."""


# --------------------------------------------------------------------------------------------
# Operation tables
# --------------------------------------------------------------------------------------------

_POINTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.PReLU,
    nn.Identity,
)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AVGPOOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_CONSTPAD_MODULES = (
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
)
_BATCHNORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Modules whose rules compute what torch's class computes (their forward must be torch's).
_LOCAL_MODULES = (
    *_POINTWISE_MODULES,
    *_DROPOUT_MODULES,
    *_CONV_MODULES,
    *_MAXPOOL_MODULES,
    *_AVGPOOL_MODULES,
    *_CONSTPAD_MODULES,
    *_BATCHNORM_MODULES,
)
#: Modules that mix the whole map (or that this module does not compute locally): run densely.
_DENSE_MODULES = (
    nn.Linear,
    nn.Flatten,
    nn.Unflatten,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LocalResponseNorm,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Softmax2d,
    nn.Upsample,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
    nn.CircularPad1d,
    nn.CircularPad2d,
    nn.CircularPad3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    *_CONSTPAD_MODULES,
)
#: Out-of-place functional forms of in-place capable activation modules.
# The module is ``Any``: torch types every attribute of an nn.Module as ``Tensor | Module``.
_OUT_OF_PLACE: Dict[type, Callable[[Any, Tensor], Tensor]] = {
    nn.ReLU: lambda m, x: F.relu(x),
    nn.ReLU6: lambda m, x: F.relu6(x),
    nn.LeakyReLU: lambda m, x: F.leaky_relu(x, m.negative_slope),
    nn.ELU: lambda m, x: F.elu(x, m.alpha),
    nn.SELU: lambda m, x: F.selu(x),
    nn.CELU: lambda m, x: F.celu(x, m.alpha),
    nn.SiLU: lambda m, x: F.silu(x),
    nn.Mish: lambda m, x: F.mish(x),
    nn.Hardswish: lambda m, x: F.hardswish(x),
    nn.Hardsigmoid: lambda m, x: F.hardsigmoid(x),
    nn.Hardtanh: lambda m, x: F.hardtanh(x, m.min_val, m.max_val),
}

_POINTWISE_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    F.softplus,
    torch.clamp,
    torch.clip,
    torch.abs,
    torch.exp,
    torch.neg,
    torch.square,
    torch.sqrt,
    torch.rsqrt,
}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
_POINTWISE_METHODS = {
    "relu",
    "sigmoid",
    "tanh",
    "clamp",
    "clip",
    "abs",
    "exp",
    "neg",
    "square",
    "sqrt",
    "rsqrt",
    "contiguous",
    "float",
    "double",
    "half",
    "to",
}
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_BINARY_FUNCTIONS = {
    operator.add: operator.add,
    operator.sub: operator.sub,
    operator.mul: operator.mul,
    operator.truediv: operator.truediv,
    torch.add: operator.add,
    torch.sub: operator.sub,
    torch.mul: operator.mul,
    torch.div: operator.truediv,
}
_BINARY_METHODS = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "div": operator.truediv,
}
_DENSE_FUNCTIONS = {
    torch.flatten,
    torch.mean,
    torch.sum,
    torch.amax,
    torch.amin,
    torch.softmax,
    F.softmax,
    F.log_softmax,
    torch.log_softmax,
    F.linear,
    F.interpolate,
    operator.getitem,
    torch.squeeze,
    torch.unsqueeze,
    torch.stack,
    F.layer_norm,
    F.group_norm,
    F.batch_norm,
    F.pad,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    torch.cat,
    getattr,
    operator.floordiv,
    torch.max,
    torch.min,
}
_DENSE_METHODS = {
    "view",
    "reshape",
    "flatten",
    "mean",
    "sum",
    "amax",
    "amin",
    "max",
    "min",
    "softmax",
    "log_softmax",
    "squeeze",
    "unsqueeze",
    "dim",
    "size",
}

_DECONV_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: Rearrangements of a tensor's dimensions (kept local when they leave the batch first and the
#: spatial dimensions in order): function -> the method name the handler dispatches on.
_REARRANGE_FUNCTIONS: Dict[Any, str] = {
    torch.permute: "permute",
    torch.transpose: "transpose",
    torch.unsqueeze: "unsqueeze",
    torch.reshape: "reshape",
    torch.flatten: "flatten",
}
_REARRANGE_METHODS = {
    "permute",
    "transpose",
    "unsqueeze",
    "view",
    "reshape",
    "flatten",
    "unflatten",
}
#: Arithmetic on Python values (sizes, flags) and shape assertions: run as written.
_SCALAR_FUNCTIONS = {
    operator.eq,
    operator.ne,
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
    operator.not_,
    operator.and_,
    operator.or_,
    operator.truth,
    torch._assert,
}
#: Attributes (and methods) of a tensor that a window cannot change: static in the graph.
_META_ATTRIBUTES = {"ndim", "dtype", "device", "is_cuda", "layout"}
_META_METHODS = {"dim", "ndimension", "is_floating_point", "is_complex"}


def _is_meta(node: fx.Node) -> bool:
    """``x.ndim``, ``x.dim()``, ``x.dtype``, ...: the same for the clean and any perturbed input."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        return node.args[1] in _META_ATTRIBUTES
    return node.op == "call_method" and node.target in _META_METHODS


# --------------------------------------------------------------------------------------------
# Values flowing through the incremental graph
# --------------------------------------------------------------------------------------------


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
        activation elsewhere.
    """
    clean = value.clean
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


def materialise(value: Patch) -> Tensor:
    """The full patched maps ``(B * N, C, *full)`` of every window."""
    clean = value.clean
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


# --------------------------------------------------------------------------------------------
# The traced program
# --------------------------------------------------------------------------------------------


@dataclass
class _Step:
    node: fx.Node
    kind: str  # static | input | pointwise | conv | pool | pad | binary | cat | size | dense
    free: List[fx.Node]
    module: Optional[nn.Module] = None
    info: Any = None


class _Cost:
    """Multiply-adds plus :data:`ELEMENT_COST` per element moved, accumulated while counting."""

    def __init__(self) -> None:
        self.total = 0.0

    def macs(self, value: float) -> None:
        self.total += value

    def elements(self, count: float) -> None:
        self.total += ELEMENT_COST * count


class IncrementalProgram:
    """A model traced for incremental evaluation at one input shape.

    Args:
        model (callable): The model (an ``nn.Module`` or a traceable function of one tensor).
        example (Tensor): An input ``(N, C, *S)`` of the shape that will be explained.

    Raises:
        UnsupportedModel: The model cannot be traced, or has an operation this module does not
            know; the message names it and where it sits.
    """

    def __init__(self, model: Callable[..., Tensor], example: Tensor) -> None:
        if example.dim() < 3:
            raise UnsupportedModel(
                f"the input has shape {tuple(example.shape)}: incremental occlusion needs "
                "(N, C, *spatial) with 1 to 3 spatial dimensions"
            )
        _check_eval_mode(model)
        try:
            self.graph_module = _trace_without_side_effects(model)
        except Exception as error:  # fx raises many types for untraceable code
            raise UnsupportedModel(
                f"torch.fx cannot trace the model ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''})"
            ) from error
        self.placeholders = [n for n in self.graph_module.graph.nodes if n.op == "placeholder"]
        if len(self.placeholders) != 1:
            raise UnsupportedModel(
                f"the traced model takes {len(self.placeholders)} inputs; incremental occlusion "
                "handles models of one input tensor"
            )
        self.steps = self._plan()
        written = observable_in_place_write(self.graph_module.graph, self._module_of)
        if written:
            raise UnsupportedModel(written)

    def _module_of(self, node: fx.Node) -> Optional[nn.Module]:
        return (
            self.graph_module.get_submodule(str(node.target)) if node.op == "call_module" else None
        )

    # -- planning ---------------------------------------------------------------------------

    def _plan(self) -> List[_Step]:
        gm = self.graph_module
        nodes = list(gm.graph.nodes)
        dynamic = set(self.placeholders)
        last_use: Dict[fx.Node, fx.Node] = {}
        for node in nodes:
            for arg in node.all_input_nodes:
                last_use[arg] = node
        frees: Dict[fx.Node, List[fx.Node]] = {}
        for value, user in last_use.items():
            frees.setdefault(user, []).append(value)
        steps = []
        for node in nodes:
            free = [v for v in frees.get(node, []) if v in dynamic]
            if node.op == "placeholder":
                steps.append(_Step(node, "input", free))
                continue
            if node.op == "output":
                steps.append(_Step(node, "output", free))
                continue
            if not any(a in dynamic for a in node.all_input_nodes) or _is_meta(node):
                # A meta fact (x.ndim, x.dtype, ...) is the same for every window: evaluated
                # once on the clean activations, like shape checks built on it.
                steps.append(_Step(node, "static", free))
                continue
            dynamic.add(node)
            steps.append(self._classify_more(node, free) or self._classify(node, free))
        # Nodes a patch can reach: the input, and any node with such an input that does not
        # always run densely. The others hold full values only; their clean activations are
        # not needed by a patched run (see prune).
        self.patchable = set(self.placeholders)
        for step in steps:
            if step.kind not in ("static", "input", "output", "dense") and any(
                a in self.patchable for a in step.node.all_input_nodes
            ):
                self.patchable.add(step.node)
        return steps

    def _where(self, node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack")
        if node.op == "call_module":
            return f"module {node.target!r} (node {node.name!r})"
        if stack:
            return f"node {node.name!r} in module {list(stack)[-1]!r}"
        return f"node {node.name!r}"

    def _classify(self, node: fx.Node, free: List[fx.Node]) -> _Step:
        gm = self.graph_module
        if node.op == "call_module":
            m = gm.get_submodule(str(node.target))
            own = _own_forward(m) if isinstance(m, _LOCAL_MODULES) else ""
            if own:
                raise UnsupportedModel(f"{own} at {self._where(node)}")
            if isinstance(m, _BATCHNORM_MODULES) and (
                m.training or not m.track_running_stats or m.running_mean is None
            ):
                raise UnsupportedModel(
                    f"{type(m).__name__} without running statistics (or in training mode) at "
                    f"{self._where(node)} normalises with the statistics of the batch, which "
                    "mixes the occluded copies"
                )
            if isinstance(m, _DROPOUT_MODULES) or isinstance(m, _POINTWISE_MODULES):
                return _Step(node, "pointwise", free, m)
            if isinstance(m, _BATCHNORM_MODULES):
                return _Step(node, "pointwise", free, m)
            if isinstance(m, _CONV_MODULES):
                return _Step(node, "conv", free, m, _conv_info(m))
            if isinstance(m, _MAXPOOL_MODULES) and not m.return_indices:
                d = _dims(m)
                info = (
                    _tup(m.kernel_size, d),
                    _tup(m.stride or m.kernel_size, d),
                    _tup(m.padding, d),
                    _tup(m.dilation, d),
                    "max",
                )
                return _Step(node, "pool", free, m, info)
            if isinstance(m, _AVGPOOL_MODULES) and _avg_pool_is_local(m):
                d = _dims(m)
                info = (
                    _tup(m.kernel_size, d),
                    _tup(m.stride or m.kernel_size, d),
                    _tup(m.padding, d),
                    (1,) * d,
                    "avg",
                )
                return _Step(node, "pool", free, m, info)
            if isinstance(m, _CONSTPAD_MODULES) and min(m.padding) >= 0:
                return _Step(node, "pad", free, m, tuple(m.padding))
            if isinstance(m, _DENSE_MODULES):
                return _Step(node, "dense", free, m)
            raise UnsupportedModel(
                f"incremental occlusion does not know {type(m).__name__} at {self._where(node)}"
            )
        if node.op == "call_function":
            target = node.target
            if target in _CONV_FUNCTIONS:
                return _Step(node, "conv", free, None, _CONV_FUNCTIONS[target])
            if target in _DROPOUT_FUNCTIONS:
                default = target is not F.alpha_dropout  # torch's defaults for `training`
                training = (
                    node.args[2] if len(node.args) > 2 else node.kwargs.get("training", default)
                )
                if training is not False:
                    raise UnsupportedModel(
                        f"dropout in training mode (or with a traced training flag) at "
                        f"{self._where(node)}"
                    )
                return _Step(node, "pointwise", free)
            if target in _POINTWISE_FUNCTIONS:
                return _Step(node, "pointwise", free)
            if target is F.batch_norm and _batch_statistics(node):
                raise UnsupportedModel(
                    f"batch_norm with batch statistics at {self._where(node)} mixes the "
                    "occluded copies"
                )
            if target in _BINARY_FUNCTIONS and not node.kwargs:
                return _Step(node, "binary", free, None, _BINARY_FUNCTIONS[target])
            if target is torch.cat:
                return _Step(node, "cat", free)
            if target is getattr and len(node.args) > 1 and node.args[1] == "shape":
                return _Step(node, "size", free)
            if target in _DENSE_FUNCTIONS or target in _BINARY_FUNCTIONS:
                return _Step(node, "dense", free)
            name = getattr(target, "__name__", str(target))
            raise UnsupportedModel(
                f"incremental occlusion does not know the function {name} at {self._where(node)}"
            )
        if node.op == "call_method":
            if node.target in _POINTWISE_METHODS:
                return _Step(node, "pointwise", free)
            if node.target in _BINARY_METHODS and not node.kwargs:
                return _Step(node, "binary", free, None, _BINARY_METHODS[node.target])
            if node.target == "size":
                return _Step(node, "size", free)
            if node.target in _DENSE_METHODS:
                return _Step(node, "dense", free)
            raise UnsupportedModel(
                f"incremental occlusion does not know the method .{node.target}() at "
                f"{self._where(node)}"
            )
        raise UnsupportedModel(
            f"incremental occlusion does not know {node.op} at {self._where(node)}"
        )

    def _classify_more(self, node: fx.Node, free: List[fx.Node]) -> Optional[_Step]:
        """Operations of the layers in use today (issue #20), checked before the older tables.

        Returns None where the older tables decide.
        """
        if node.op == "call_module":
            m = self.graph_module.get_submodule(str(node.target))
            if isinstance(m, _DECONV_MODULES) and m.padding_mode == "zeros":
                return _Step(node, "deconv", free, m)
            if isinstance(m, nn.Upsample):
                return _Step(node, "upsample", free, m)
            if isinstance(m, nn.LayerNorm):
                return _Step(node, "channel", free, m, len(m.normalized_shape))
            if isinstance(m, nn.Linear):
                return _Step(node, "channel", free, m, 1)
            return None
        target = node.target
        if node.op == "call_function":
            if target is F.batch_norm:
                training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training")
                stats = node.args[1] if len(node.args) > 1 else node.kwargs.get("running_mean")
                if training is False and stats is not None:  # eval: a per-channel affine map
                    return _Step(node, "channel", free, None, "channel")
                return None
            if target is F.layer_norm:
                return _Step(node, "channel", free, None, "layer_norm")
            if target is F.linear:
                return _Step(node, "channel", free, None, 1)
            if getattr(target, "__name__", "") == "stochastic_depth" and str(
                getattr(target, "__module__", "")
            ).startswith("torchvision"):
                training = node.args[3] if len(node.args) > 3 else node.kwargs.get("training", True)
                if training is False:  # an identity in eval
                    return _Step(node, "pointwise", free)
                raise UnsupportedModel(
                    f"stochastic_depth in training mode (or with a traced training flag) at "
                    f"{self._where(node)}"
                )
            if target is F.interpolate:
                return _Step(node, "upsample", free)
            if target in _REARRANGE_FUNCTIONS:
                return _Step(node, "rearrange", free, None, _REARRANGE_FUNCTIONS[target])
            if target in (torch.split, torch.chunk, torch.tensor_split):
                return _Step(node, "split", free)
            if target is operator.getitem:
                return _Step(node, "getitem", free)
            if target in _SCALAR_FUNCTIONS:
                return _Step(node, "dense", free)
            return None
        if node.op == "call_method":
            if target in _REARRANGE_METHODS:
                return _Step(node, "rearrange", free, None, target)
            if target in ("split", "chunk", "tensor_split"):
                return _Step(node, "split", free)
            if target == "expand_as":
                return _Step(node, "expand_as", free)
            if target == "repeat":
                return _Step(node, "repeat", free)
        return None

    # -- running ----------------------------------------------------------------------------

    def run_clean(self, x: Tensor) -> _Env:
        """Run the graph on the clean input, keeping every node's value."""
        env: _Env = {}
        for step in self.steps:
            node = step.node
            if node.op == "placeholder":
                env[node] = x
            elif node.op == "output":
                env[node] = fx.node.map_arg(node.args[0], lambda a: env[a])
            else:
                args = fx.node.map_arg(node.args, lambda a: env[a])
                kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
                env[node] = self._call(step, args, kwargs)
        return env

    def output_of(self, env: _Env) -> Any:
        """The program's output in a clean run's ``env``."""
        return env[self.steps[-1].node]

    def prune(self, env: _Env) -> int:
        """Drop from a clean run's ``env`` what no patched run reads; return the bytes kept.

        A node that only ever carries full (dense) values downstream of a global pool, a
        linear layer, ... never needs its clean activation: a patch cannot reach it. The
        program's output is dropped too (the sweep's outputs are its own).
        """
        for step in self.steps:
            if step.kind not in ("static", "input") and step.node not in self.patchable:
                env[step.node] = None
        seen, total = set(), 0
        for step in self.steps:
            value = env.get(step.node)
            if step.kind == "static" or not isinstance(value, Tensor):
                continue
            key = (value.untyped_storage().data_ptr(), value.device)
            if key not in seen:
                seen.add(key)
                total += value.untyped_storage().nbytes()
        return total

    def _call(self, step: _Step, args: Any, kwargs: Any) -> Any:
        """Run a node as the model does, but never in place (stored activations stay intact)."""
        node = step.node
        if node.op == "get_attr":
            value: Any = self.graph_module
            for part in str(node.target).split("."):
                value = getattr(value, part)
            return value
        if node.op == "call_module":
            m = (
                step.module
                if step.module is not None
                else self.graph_module.get_submodule(str(node.target))
            )
            if getattr(m, "inplace", False):
                if type(m) in _OUT_OF_PLACE and not kwargs and len(args) == 1:
                    return _OUT_OF_PLACE[type(m)](m, args[0])
                if isinstance(m, _DROPOUT_MODULES) and not m.training:
                    return args[0]
                args = (args[0].clone(), *args[1:])
            return m(*args, **kwargs)
        if node.op == "call_function":
            if kwargs.get("inplace"):
                kwargs = {**kwargs, "inplace": False}
            return cast(Callable[..., Any], node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        raise RuntimeError(f"unexpected node {node.op}")  # pragma: no cover

    def run_patched(self, clean: _Env, patch: Patch, cost: Optional[_Cost] = None) -> Any:
        """Run the graph for a chunk of windows whose input differs from ``clean`` by ``patch``.

        Returns:
            The model output for the ``B * N`` rows, window-major.
        """
        env: _Env = {}
        b = patch.windows
        for step in self.steps:
            node = step.node
            if step.kind == "static":
                env[node] = clean[node]
                continue
            if step.kind == "input":
                env[node] = patch
            elif step.kind == "output":
                return fx.node.map_arg(node.args[0], lambda a: _as_dense(env[a], cost))
            else:
                out = _HANDLERS[step.kind](self, step, env, clean[node], b, cost)
                if isinstance(out, (Patch, Moved)) and (
                    math.prod(out.size) >= DENSE_FRACTION * math.prod(out.full)
                ):
                    out = _Dense(_as_dense(out))
                    if cost is not None:
                        cost.elements(out.value.numel())
                env[node] = out
            for v in step.free:
                env.pop(v, None)
        raise RuntimeError("the traced graph has no output")  # pragma: no cover

    def dense_cost(self, clean: _Env, windows: int) -> float:
        """Cost (in :class:`_Cost` units) of ``windows`` dense forward passes."""
        total = _Cost()
        for step in self.steps:
            if step.kind in ("static", "input", "output"):
                continue
            value = clean[step.node]
            if isinstance(value, Tensor):
                total.macs(_macs(self, step, clean, value))
                total.elements(value.numel())
        return total.total * windows


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


def _own_forward(m: nn.Module) -> str:
    """Why a leaf module's ``forward`` is not the one its class's rules assume ('' if it is).

    The rules for a layer (``Conv2d``, ``ReLU``, ...) compute what torch's class computes; a
    subclass that overrides ``forward`` (``torch.ao.nn.qat.Conv2d`` fake-quantises its weight)
    or a ``forward`` patched onto the instance computes something else.
    """
    if "forward" in m.__dict__:
        return f"a forward patched onto the {type(m).__name__} instance"
    forward = type(m).forward
    for base in type(m).__mro__:
        if base.__module__.startswith("torch.nn.modules") and "forward" in vars(base):
            if vars(base)["forward"] is not forward:
                return (
                    f"{type(m).__name__} overrides the forward of {base.__name__} "
                    f"({type(m).__module__})"
                )
            return ""
    return ""


def _batch_statistics(node: fx.Node) -> bool:
    """Whether an ``F.batch_norm`` node normalises with the batch's own statistics."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training")
    values = dict(zip(names, node.args))
    values.update(node.kwargs)
    return values.get("training", False) is not False or values.get("running_mean") is None


def _dims(m: nn.Module) -> int:
    return int(type(m).__name__[-2])


def _tup(value: Any, d: int) -> Tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * d


def _avg_pool_is_local(m: nn.Module) -> bool:
    """Average pooling with a constant divisor: no ceil mode, and padding counted (or none)."""
    d = _dims(m)
    padded = any(p > 0 for p in _tup(m.padding, d))
    include = getattr(m, "count_include_pad", True)
    return not m.ceil_mode and (include or not padded)


def _conv_info(m: Any) -> Tuple[Any, ...]:
    """``(kernel, stride, left pads, dilation, mode, groups, right pads)`` of a conv module.

    ``padding="same"`` pads ``total // 2`` on the left and the rest on the right, as torch
    does (``_reversed_padding_repeated_twice``): an even kernel pads one more on the right.
    """
    d = _dims(m)
    kernel = tuple(m.kernel_size)
    dilation = tuple(m.dilation)
    if isinstance(m.padding, str):
        if m.padding == "valid":
            pad = right = (0,) * d
        else:
            total = tuple(dl * (k - 1) for k, dl in zip(kernel, dilation))
            pad = tuple(t // 2 for t in total)
            right = tuple(t - t // 2 for t in total)
    else:
        pad = right = tuple(m.padding)
    mode = {"zeros": "constant"}.get(m.padding_mode, m.padding_mode)
    return kernel, tuple(m.stride), pad, dilation, mode, m.groups, right


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _functional_conv_args(node: fx.Node, env: _Env) -> Dict[str, Any]:
    values = dict(zip(_CONV_ARGS, node.args))
    values.update(node.kwargs)
    return {k: (env[v] if isinstance(v, fx.Node) else v) for k, v in values.items()}


def _macs(program: IncrementalProgram, step: _Step, env: _Env, out: Tensor) -> float:
    """Multiply-adds of a conv or linear node producing ``out`` (0 for other nodes)."""
    node = step.node
    if step.kind == "conv":
        weight: Any  # a module attribute (typed Tensor | Module by torch) or a node's value
        if step.module is not None:
            weight = step.module.weight
        else:
            weight = _functional_conv_args(node, env)["weight"]
            if isinstance(weight, _Dense):
                weight = weight.value
        return out.numel() * weight[0].numel()
    if step.module is not None and isinstance(step.module, nn.Linear):
        return out.numel() * step.module.in_features
    return 0.0


# --------------------------------------------------------------------------------------------
# Handlers: one per kind of node, (program, step, env, clean value, B, cost) -> value
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Rearranged patches, and the operations of today's CNNs (issue #20)
# --------------------------------------------------------------------------------------------


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
    clean = value.clean
    b, n = value.windows, clean.shape[0]
    out = clean.unsqueeze(0).repeat(b, *([1] * clean.dim()))
    new = value.values.reshape(b, n, *value.values.shape[1:])
    for w, start in enumerate(value.starts.tolist()):
        index: List[Any] = [slice(None)] * clean.dim()
        for pos, s, size in zip(value.spatial, start, value.size):
            index[pos] = slice(s, s + size)
        out[tuple([w, *index])] = new[w]
    return out.reshape(b * n, *clean.shape[1:])


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


_HANDLERS: Dict[str, Callable[..., Any]] = {
    "pointwise": _pointwise,
    "conv": _conv,
    "pool": _pool,
    "pad": _pad,
    "binary": _binary,
    "cat": _cat,
    "size": _size,
    "dense": _run_dense,
    "channel": _channel,
    "rearrange": _rearrange,
    "split": _split,
    "getitem": _getitem,
    "expand_as": _expand_as,
    "repeat": _repeat,
    "deconv": _deconv,
    "upsample": _upsample,
}


# --------------------------------------------------------------------------------------------
# The evaluator the engine calls, and the choice between engines
# --------------------------------------------------------------------------------------------

_PROGRAMS: weakref.WeakKeyDictionary[
    Any, Dict[Tuple[Any, ...], Tuple[Tuple[Any, ...], IncrementalProgram]]
] = weakref.WeakKeyDictionary()


def _check_eval_mode(model: Callable[..., Tensor]) -> None:
    if not isinstance(model, nn.Module):
        return
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        raise UnsupportedModel(
            "a global forward hook is registered: a traced graph would bypass it"
        )
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            raise UnsupportedModel(
                f"module {name or type(m).__name__!r} has a forward hook: a traced graph "
                "would bypass it"
            )
        if m.training and isinstance(
            m, (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)
        ):
            raise UnsupportedModel(
                f"module {name!r} ({type(m).__name__}) is in training mode: its output "
                "depends on the whole batch or on chance; call model.eval()"
            )


def _trace_without_side_effects(model: Callable[..., Tensor]) -> fx.GraphModule:
    """``fx.symbolic_trace(model)`` with stack traces, leaving no trace in the model.

    Whatever the traced forward code assigned to the modules' attributes is put back, and lists,
    dicts and sets held in attributes get their contents back (a cache, a recorded input or a
    list it appends to would otherwise keep an fx Proxy). Parameters and buffers are the
    model-state guard's business. Stack traces let :mod:`extra_attrib._aliasing` see augmented
    assignments (``y += f(x)``), which fx records as out-of-place operations.
    """
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    saved = [(m, dict(m.__dict__)) for m in modules]
    contents = [
        (value, list(value) if isinstance(value, list) else value.copy())
        for _, attributes in saved
        for value in attributes.values()
        if type(value) in (list, dict, set)
    ]
    try:
        tracer = fx.Tracer()
        tracer.record_stack_traces = True
        graph = tracer.trace(model)
        name = type(model).__name__ if isinstance(model, nn.Module) else "traced"
        return fx.GraphModule(tracer.root, graph, name)
    finally:
        for m, attributes in saved:
            for key in [n for n in m.__dict__ if n not in attributes]:
                del m.__dict__[key]
            m.__dict__.update(attributes)
        for container, content in contents:
            if isinstance(container, list):
                container[:] = content
            else:  # no comparison: values may be tensors or proxies
                container.clear()
                container.update(content)


_SIMPLE = (int, float, bool, str, type(None), torch.dtype, torch.device)
#: Module attributes the cache key leaves out: hooks (checked on every call) and fx's own marks.
_UNKEYED = ("_forward_", "_backward_", "_state_dict_", "_load_state_dict_", "_non_persistent")


def model_fingerprint(model: Any) -> Tuple[Any, ...]:
    """What a traced program of ``model`` depends on, for the program cache's key.

    Per submodule: its identity and class, its training flag, the identity of every parameter,
    buffer and child under its name, and every other attribute: plain values (numbers, strings,
    tuples of them) by value, anything else (tensors, functions, an instance-patched
    ``forward``) by identity. A reassigned parameter, a changed ``padding``, a new
    ``self.temperature`` or ``load_state_dict(..., assign=True)`` thus retraces.

    Args:
        model (Any): The model; a non-module callable gives an empty fingerprint.

    Returns:
        tuple: Hashable.
    """
    if not isinstance(model, nn.Module):
        return ()
    parts: List[Any] = []
    for m in model.modules():
        entries: List[Any] = [id(m), type(m), m.training]
        for name, value in m.__dict__.items():
            if name.startswith(_UNKEYED) or name == "training":
                continue
            if name in ("_parameters", "_buffers", "_modules"):
                entries.append((name, tuple((k, id(v)) for k, v in value.items())))
            else:
                entries.append((name, _attribute_key(value)))
        parts.append(tuple(entries))
    return tuple(parts)


def _attribute_key(value: Any) -> Any:
    if isinstance(value, _SIMPLE):
        return (type(value), value)
    if isinstance(value, (tuple, list)) and all(isinstance(v, _SIMPLE) for v in value):
        return (type(value), tuple(value))
    return ("id", id(value))


def program_for(model: Callable[..., Tensor], x: Tensor) -> IncrementalProgram:
    """The traced program of ``model`` for inputs shaped like ``x``, cached per model and shape.

    The cache key holds :func:`model_fingerprint`: replacing a layer, reassigning a parameter or
    changing a module's setting retraces. The engine's self-check covers what no key can see.

    Raises:
        UnsupportedModel: As :class:`IncrementalProgram`.
    """
    _check_eval_mode(model)
    shape: Tuple[Any, ...] = (tuple(x.shape), x.dtype, x.device)
    fingerprint = model_fingerprint(model)
    try:
        cache = _PROGRAMS.setdefault(model, {})
    except TypeError:  # not weak-referenceable: trace every time
        return IncrementalProgram(model, x)
    cached = cache.get(shape)
    if cached is None or cached[0] != fingerprint:
        cached = cache[shape] = (fingerprint, IncrementalProgram(model, x))
    return cached[1]


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


class IncrementalSweep:
    """Drop-in for the dense engine's evaluator: model outputs for chunks of windows.

    Implements the evaluator interface of :class:`extra_attrib._engine.DenseEvaluator`
    (``evaluate`` and ``finish``).

    Args:
        program (IncrementalProgram): The traced model.
        inputs (tuple of Tensor): One input ``(N, C, *S)``.
        baselines (tuple of Tensor): Its baseline, broadcastable to it.
        geometry (TileGeometry, optional): Its tiling, needed by :meth:`evaluate`.
            Default: None
    """

    def __init__(
        self,
        program: IncrementalProgram,
        inputs: Tuple[Tensor, ...],
        baselines: Tuple[Tensor, ...],
        geometry: Optional[TileGeometry] = None,
    ) -> None:
        (x,), (b,) = inputs, baselines
        self.program = program
        self.x = x
        self.fill = b.expand_as(x)
        self.geometry = geometry
        with torch.no_grad():
            self.clean = program.run_clean(x.clone())
        #: The traced program's output on the clean input, for the self-check.
        self.clean_output = program.output_of(self.clean)
        #: Cost of one dense forward pass, from the cost model (counted before pruning).
        self.dense_cost = program.dense_cost(self.clean, 1)
        #: Bytes of the clean activations the sweep keeps.
        self.activation_bytes = program.prune(self.clean)

    def evaluate(self, j: int, windows: Sequence[int], windows_on_device: Tensor) -> Tensor:
        """Model outputs ``(len(windows) * N, ...)`` with the input occluded at ``windows``.

        ``windows`` are flat window indices of :attr:`geometry`.
        """
        if self.geometry is None:
            raise RuntimeError("IncrementalSweep.evaluate needs the geometry")
        return self.run(j, perturbation_boxes(self.geometry, windows))

    def finish(self, j: int) -> bool:
        """Always True: the evaluator keeps no perturbed copies a model could corrupt."""
        return True

    def run(self, j: int, boxes: List[Tuple[slice, ...]]) -> Tensor:
        """Model outputs ``(len(boxes) * N, ...)`` with the input occluded at ``boxes``."""
        with torch.no_grad():
            out = self.program.run_patched(self.clean, input_patch(self.x, self.fill, boxes))
        # As the dense engine checks them: a model mixing rows would give a silent wrong map.
        return check_output(out, len(boxes) * self.x.shape[0])

    def reset(self, j: int) -> None:
        """Nothing to restore: the evaluator keeps no perturbed copies."""

    def predicted_gain(self, box: Tuple[slice, ...]) -> float:
        """Dense cost over incremental cost of one window at ``box`` (from the cost model)."""
        cost = _Cost()
        with torch.no_grad():
            self.program.run_patched(self.clean, input_patch(self.x, self.fill, [box]), cost)
        return self.dense_cost / max(cost.total, 1.0)


@dataclass
class EngineChoice:
    """Which engine a call uses and why.

    Attributes:
        engine (str): ``"dense"``, ``"incremental"``, or ``"measure"``: both are possible and
            the sweep times them (the factory is incremental's).
        reason (str): Why, in words.
        factory (callable or None): For incremental, builds the evaluator the sweep calls
            (same signature as the dense engine's ``DenseEvaluator``).
    """

    engine: str
    reason: str
    factory: Optional[Callable[..., Any]] = None


def choose_engine(
    engine: str,
    forward_func: Callable[..., Tensor],
    inputs: Tuple[Tensor, ...],
    baselines: Tuple[Tensor, ...],
    additional_forward_args: Tuple[Any, ...],
    center_box: Optional[Tuple[slice, ...]] = None,
    geometry: Optional[TileGeometry] = None,
) -> EngineChoice:
    """Decide between the dense and the incremental engine.

    Incremental must first pass every check: a supported model (:func:`declined_model`,
    :class:`IncrementalProgram`), clean activations within :data:`ACTIVATION_BUDGET_BYTES`, and,
    given ``geometry``, the self-check against the real model
    (:func:`extra_attrib._verify.verify_incremental`). Under ``"auto"``, a failed check or any
    exception while tracing, planning or checking chooses dense, with the reason; a forced
    ``"incremental"`` raises a ValueError instead.

    Args:
        engine (str): ``"auto"``, ``"dense"`` or ``"incremental"``.
        forward_func (callable): The model.
        inputs (tuple of Tensor): As given to the sweep.
        baselines (tuple of Tensor): As given to the sweep.
        additional_forward_args (tuple): Extra model arguments (incremental needs none).
        center_box (tuple of slice, optional): A typical window (one slice per non-batch
            dimension) for the cost model. Default: None (no cost check; incremental if possible)
        geometry (TileGeometry, optional): The tiling of ``inputs[0]``, for the self-check on
            its corner and centre windows. Default: None (no self-check)

    Returns:
        EngineChoice: The engine, the reason and, for incremental, the evaluator factory.

    Raises:
        ValueError: ``engine="incremental"`` and the model cannot run incrementally, or the
            self-check disagrees with the model.
    """
    if engine == "dense":
        return EngineChoice("dense", "engine='dense' was requested")
    gain = math.inf
    try:
        sweep = _checked_sweep(forward_func, inputs, baselines, additional_forward_args)
        if engine == "auto" and center_box is not None:
            gain = sweep.predicted_gain(center_box)
        if gain < MIN_PREDICTED_GAIN:  # dense anyway: no need to check incremental
            return EngineChoice(
                "dense",
                f"the cost model predicts incremental at {gain:.2f}x dense, below the "
                f"{MIN_PREDICTED_GAIN}x threshold",
            )
        verified = "not verified (no tiling given)"
        if geometry is not None:
            verified = verify_incremental(
                forward_func,
                inputs[0],
                baselines[0],
                geometry,
                sweep.clean_output,
                lambda boxes: sweep.run(0, boxes),
            )
    except Exception as error:  # any failure of the fast path: dense works without it
        if isinstance(error, VerificationFailed):
            why = f"the self-check against the model failed: {error}"
        elif isinstance(error, UnsupportedModel):
            why = str(error)
        else:
            first = str(error).splitlines()[0] if str(error) else ""
            why = f"tracing, planning or checking raised {type(error).__name__}: {first}"
        if engine == "incremental":
            raise ValueError(f"engine='incremental' cannot run this model: {why}") from error
        return EngineChoice("dense", f"incremental is not possible: {why}")

    def factory(
        _forward_func: Any,
        sweep_inputs: Tuple[Tensor, ...],
        sweep_baselines: Tuple[Tensor, ...],
        geometries: Sequence[TileGeometry],
        *_: Any,
    ) -> IncrementalSweep:
        # The probe's evaluator when the sweep is over the same batch; a new one (and a clean
        # pass) for another batch, e.g. one example of a drill-down refinement.
        if sweep_inputs[0] is inputs[0] and sweep_baselines[0] is baselines[0]:
            sweep.geometry = geometries[0]
            return sweep
        return IncrementalSweep(
            program_for(forward_func, sweep_inputs[0]), sweep_inputs, sweep_baselines, geometries[0]
        )

    if engine == "incremental":
        return EngineChoice(
            "incremental", f"engine='incremental' was requested; {verified}", factory
        )
    # The cost model only ranks: the sweep times both engines on its own windows (#20).
    return EngineChoice(
        "measure",
        f"the cost model predicts {gain:.2f}x; incremental's self-check: {verified}",
        factory,
    )


#: The clean activations an incremental sweep keeps may take at most this many bytes: the same
#: budget as the dense engine's perturbation buffers.
ACTIVATION_BUDGET_BYTES = BUFFER_BUDGET_BYTES


def _checked_sweep(
    forward_func: Callable[..., Tensor],
    inputs: Tuple[Tensor, ...],
    baselines: Tuple[Tensor, ...],
    additional_forward_args: Tuple[Any, ...],
) -> IncrementalSweep:
    """An incremental evaluator for a supported model whose activations fit the budget.

    Raises:
        UnsupportedModel: The model or the call cannot run incrementally, or its clean
            activations exceed :data:`ACTIVATION_BUDGET_BYTES`.
    """
    if len(inputs) != 1:
        raise UnsupportedModel(f"incremental occlusion handles one input tensor, got {len(inputs)}")
    if additional_forward_args:
        raise UnsupportedModel(
            "incremental occlusion does not take additional_forward_args (the traced model "
            "has one input)"
        )
    x = inputs[0]
    if not x.dtype.is_floating_point:
        raise UnsupportedModel(
            f"the input has dtype {x.dtype}; incremental occlusion needs a floating-point input"
        )
    declined = declined_model(forward_func)
    if declined:
        raise UnsupportedModel(declined)
    program = program_for(forward_func, x)
    if x.shape[0] > 1:
        # One example first: the activations of the whole batch are counted before they exist.
        fill = baselines[0].expand_as(x)[:1]
        probe = IncrementalSweep(program, (x[:1],), (fill,))
        _check_budget(probe.activation_bytes * x.shape[0], x.shape[0])
        del probe
    sweep = IncrementalSweep(program, inputs, baselines)
    _check_budget(sweep.activation_bytes, x.shape[0])
    return sweep


def _check_budget(activation_bytes: int, n: int) -> None:
    if activation_bytes > ACTIVATION_BUDGET_BYTES:
        raise UnsupportedModel(
            f"the clean activations of the batch of {n} would take "
            f"{activation_bytes / 2**20:.0f} MiB, over the "
            f"{ACTIVATION_BUDGET_BYTES / 2**20:.0f} MiB budget (explain fewer examples per call "
            "for incremental)"
        )


def declined_model(model: Any) -> str:
    """Why a compiled or exported model runs densely ('' for a model incremental may trace).

    TorchScript, ``torch.compile`` and ``torch.export`` hand over a compiled graph, not the
    Python ``forward`` that torch.fx reads; the dense engine calls them as they are.
    """
    owner = getattr(model, "__self__", None)
    module = owner if isinstance(owner, nn.Module) else model
    if isinstance(module, torch.jit.ScriptModule) or isinstance(model, torch.jit.ScriptFunction):
        return (
            "the model is TorchScript (torch.jit.script or torch.jit.trace): incremental "
            "needs the Python forward of an eager module"
        )
    if type(module).__name__ == "OptimizedModule" or hasattr(model, "_torchdynamo_orig_callable"):
        return (
            "the model is compiled with torch.compile: incremental needs the eager module "
            "(pass model._orig_mod to use it)"
        )
    if isinstance(module, fx.GraphModule) and any(
        isinstance(node.target, torch._ops.OpOverload) for node in module.graph.nodes
    ):
        return (
            "the model is a graph of ATen operators (torch.export or another graph capture): "
            "incremental needs the eager module"
        )
    return ""


def central_box(geometry: TileGeometry) -> Tuple[slice, ...]:
    """The window in the middle of the grid: the typical (largest) box, for the cost model."""
    flat = 0
    for n in geometry.grid:
        flat = flat * n + n // 2
    return perturbation_boxes(geometry, [flat])[0]
