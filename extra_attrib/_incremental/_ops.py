"""What each operation is.

The tables that sort fx nodes into rules, the plan's step and cost records, and facts about layers
(kernel, stride, padding, multiply-adds).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from extra_attrib._incremental._boxes import _Dense

if TYPE_CHECKING:
    from extra_attrib._incremental._program import IncrementalProgram


#: Values of the nodes run so far, keyed by ``fx.Node``. The key type is ``Any`` because fx types
#: a node's ``args`` entries as its broad ``Argument`` union, even where they are nodes.
_Env = Dict[Any, Any]


#: Cost, in multiply-adds, charged per element an op reads or writes outside convolutions and
#: linear layers (memory-bound work: gathers, BatchNorm, activations).
ELEMENT_COST = 8.0
#: Cost, in the same units, of running one node of the graph for one window, besides its
#: arithmetic: the framework's fixed cost per operation (``DENSE_NODE_COST``, a dense forward
#: pass) and that plus the incremental engine's host work per node (boxes, gathers, bookkeeping;
#: ``INCREMENTAL_NODE_COST``). Nodes of :data:`VIEW_KINDS` run no kernel and cost nothing.
#: Without these costs the model predicted 1.04-1.46x on 23 CNNs at 64² that measured 0.56-1.15x
#: (median over-prediction 1.28x over 46 model-size pairs); with them the median is 1.00x. Fitted
#: on one CPU thread, chunks of 4 windows, to per-window times of 23 torchvision and timm CNNs at
#: 64² and 224² (``python -m benchmarks.cost_model``, #20); with faster arithmetic (more threads,
#: an accelerator) the true per-node share is larger, so the model errs towards trying
#: incremental, and the race's measurement decides.
DENSE_NODE_COST = 3.8e5
INCREMENTAL_NODE_COST = 7.0e5
#: Kinds of node that only re-describe a tensor (shapes, views, splits, picking an output).
VIEW_KINDS = frozenset({"size", "rearrange", "split", "getitem"})


class UnsupportedModel(ValueError):
    """The model cannot run incrementally; the message names the reason and where."""


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


@dataclass
class _Step:
    node: fx.Node
    kind: str  # static | input | pointwise | conv | pool | pad | binary | cat | size | dense
    free: List[fx.Node]
    module: Optional[nn.Module] = None
    info: Any = None


class _Cost:
    """Multiply-adds, :data:`ELEMENT_COST` per element moved and a fixed cost per node run."""

    def __init__(self) -> None:
        self.total = 0.0

    def macs(self, value: float) -> None:
        self.total += value

    def elements(self, count: float) -> None:
        self.total += ELEMENT_COST * count

    def node(self, kind: str, windows: float, dense: bool = False) -> None:
        """A node of ``kind`` run for ``windows`` windows (nothing for :data:`VIEW_KINDS`)."""
        if kind not in VIEW_KINDS:
            self.total += windows * (DENSE_NODE_COST if dense else INCREMENTAL_NODE_COST)


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
