"""Tracing and planning.

The model traced with torch.fx (without side effects), each node classified into a rule, the
clean and patched runs, and the traced programs cached under a fingerprint of everything the
trace depends on.
"""

from __future__ import annotations

import math
import operator
import os
import traceback
import weakref
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Hashable,
    List,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
    cast,
)

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from extra_attrib._incremental._aliasing import observable_in_place_write
from extra_attrib._incremental._boxes import Moved, Patch, _as_dense, _Dense
from extra_attrib._incremental._keep import CleanStore, resolved
from extra_attrib._incremental._ops import (
    _AVGPOOL_MODULES,
    _BATCHNORM_MODULES,
    _BINARY_FUNCTIONS,
    _BINARY_METHODS,
    _CONSTPAD_MODULES,
    _CONV_FUNCTIONS,
    _CONV_MODULES,
    _DECONV_MODULES,
    _DENSE_FUNCTIONS,
    _DENSE_METHODS,
    _DENSE_MODULES,
    _DROPOUT_FUNCTIONS,
    _DROPOUT_MODULES,
    _LOCAL_MODULES,
    _MAXPOOL_MODULES,
    _OUT_OF_PLACE,
    _POINTWISE_FUNCTIONS,
    _POINTWISE_METHODS,
    _POINTWISE_MODULES,
    _REARRANGE_FUNCTIONS,
    _REARRANGE_METHODS,
    _SCALAR_FUNCTIONS,
    UnsupportedModel,
    _avg_pool_is_local,
    _conv_info,
    _Cost,
    _dims,
    _is_meta,
    _macs,
    _Step,
    _tup,
)
from extra_attrib._incremental._rules import (
    _binary,
    _cat,
    _conv,
    _pad,
    _pointwise,
    _pool,
    _run_dense,
    _size,
)
from extra_attrib._incremental._rules_moved import (
    _channel,
    _deconv,
    _expand_as,
    _getitem,
    _rearrange,
    _repeat,
    _split,
    _upsample,
)

if TYPE_CHECKING:
    from extra_attrib._incremental._ops import _Env


#: A patch whose box covers at least this fraction of its map is materialised: from there on the
#: graph runs densely (gathering a box that is nearly the whole map costs more than it saves).
DENSE_FRACTION = 0.6


class IncrementalProgram:
    """A model traced for incremental evaluation at one set of input shapes.

    A model of several tensors (``forward(image, mask)``, an image and a per-example vector,
    tensor ``additional_forward_args``) has one placeholder each. Each swept input gets its own
    boxes: its patch starts at its own placeholder while the activations that depend only on the
    other inputs are the clean run's (#20). An input whose path reaches an operation the engine
    does not know, or that is not ``(N, C, *spatial)`` floating point, is not incremental
    (:attr:`declined`); the caller sweeps it densely through the model.

    Args:
        model (callable): The model (an ``nn.Module`` or a traceable function of tensors).
        example (Tensor or tuple of Tensor): The tensors the model is called with, of the shapes
            that will be explained: ``(N, C, *S)`` for an input to sweep incrementally.
        batched (sequence of bool, optional): Per tensor of ``example``, whether it carries the
            batch (repeated with each perturbed copy, as an input is); the others are constants.
            Default: None (all of them)

    Raises:
        UnsupportedModel: The model cannot be traced, takes another number of tensors, no
            tensor can be swept incrementally, or (for one tensor) it has an operation this
            module does not know; the message names it and where it sits.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        example: Any,
        batched: Optional[Sequence[bool]] = None,
    ) -> None:
        examples: Tuple[Tensor, ...] = (example,) if isinstance(example, Tensor) else tuple(example)
        self.batched = [True] * len(examples) if batched is None else list(batched)
        if len(examples) == 1 and examples[0].dim() < 3:
            raise UnsupportedModel(_shape_reason(examples[0]))
        _check_eval_mode(model)
        try:
            self.graph_module = _trace_without_side_effects(model)
        except Exception as error:  # fx raises many types for untraceable code
            raise UnsupportedModel(
                f"torch.fx cannot trace the model ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''})"
            ) from error
        self.placeholders = [n for n in self.graph_module.graph.nodes if n.op == "placeholder"]
        if len(self.placeholders) != len(examples):
            raise UnsupportedModel(
                f"the traced model takes {len(self.placeholders)} inputs, the call gives "
                f"{len(examples)} tensors; incremental occlusion needs one placeholder per "
                "tensor"
            )
        #: Why an operation cannot run incrementally, by node (where a node's rule failed).
        self.unknown: Dict[fx.Node, str] = {}
        self.steps = self._plan()
        if len(examples) == 1 and self.unknown:
            raise UnsupportedModel(next(iter(self.unknown.values())))
        #: The cost model's predicted gains, by input shape, dtype and window box: they depend
        #: on the geometry only, so a later call need not run the clean pass to know them.
        self.gains: Dict[Hashable, float] = {}
        written = observable_in_place_write(self.graph_module.graph, self._module_of)
        if written:
            raise UnsupportedModel(written)
        #: Per tensor: why it cannot be swept incrementally ('' where it can).
        self.declined = [self._declined(i, x) for i, x in enumerate(examples)]
        if all(self.declined):
            raise UnsupportedModel(
                "no input can be swept incrementally: "
                + "; ".join(f"input {i}: {why}" for i, why in enumerate(self.declined))
            )

    def _declined(self, i: int, x: Tensor) -> str:
        if not self.batched[i]:
            return "a constant argument (not one row per example)"
        if x.dim() < 3 or x.dim() > 5:
            return _shape_reason(x)
        if not x.dtype.is_floating_point:
            return f"dtype {x.dtype}; incremental occlusion needs a floating-point input"
        for node, why in self.unknown.items():
            if node in self.reach[i]:
                return why
        return ""

    def _module_of(self, node: fx.Node) -> Optional[nn.Module]:
        return (
            self.graph_module.get_submodule(str(node.target)) if node.op == "call_module" else None
        )

    # -- planning ---------------------------------------------------------------------------

    def _plan(self) -> List[_Step]:
        gm = self.graph_module
        nodes = list(gm.graph.nodes)
        dynamic = {p for p, batched in zip(self.placeholders, self.batched) if batched}
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
                steps.append(_Step(node, "input" if node in dynamic else "static", free))
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
            try:
                steps.append(self._classify_more(node, free) or self._classify(node, free))
            except UnsupportedModel as error:
                # Only the inputs whose path reaches it are declined (several inputs, #20).
                self.unknown[node] = str(error)
                steps.append(_Step(node, "unknown", free))
        # Per input, the nodes its changes reach; the others keep their clean values in its
        # sweep (they depend on the other inputs only).
        self.reach: List[Set[fx.Node]] = []
        for placeholder in self.placeholders:
            reach: Set[fx.Node] = {placeholder} if placeholder in dynamic else set()
            for step in steps:
                if step.kind not in ("static", "output") and any(
                    a in reach for a in step.node.all_input_nodes
                ):
                    reach.add(step.node)
            self.reach.append(reach)
        #: The nodes whose values carry the batch (the others are constants).
        self.dynamic = dynamic
        # Nodes a patch can reach: the inputs, and any node with such an input that does not
        # always run densely; and the clean values a node reached by one input reads from the
        # others. The others hold full values only; their clean activations are not needed by
        # a patched run (see prune).
        self.patchable = set(self.placeholders)
        for step in steps:
            if step.kind not in ("static", "input", "output", "dense") and any(
                a in self.patchable for a in step.node.all_input_nodes
            ):
                self.patchable.add(step.node)
        output = steps[-1].node
        for reach in self.reach:
            for node in [*reach, output]:
                self.patchable.update(
                    a for a in node.all_input_nodes if a not in reach and a in dynamic
                )
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

    def run_clean(self, *xs: Tensor, store: Optional[CleanStore] = None) -> _Env:
        """Run the graph on the clean inputs (one per placeholder), keeping every node's value.

        With a ``store``, a node it may recompute is replaced by its placeholder after its last
        use in the clean run (:mod:`extra_attrib._incremental._keep`), so the run never holds
        more than the kept activations and those still in use.
        """
        if len(xs) != len(self.placeholders):
            raise ValueError(
                f"xs has {len(xs)} tensors; the traced model takes {len(self.placeholders)} "
                "(the inputs, then the tensor extra arguments)"
            )
        env: _Env = {}
        values = dict(zip(self.placeholders, xs))
        for step in self.steps:
            node = step.node
            if node.op == "placeholder":
                env[node] = values[node]
            elif node.op == "output":
                env[node] = fx.node.map_arg(node.args[0], lambda a: env[a])
            else:
                args = fx.node.map_arg(node.args, lambda a: env[a])
                kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
                env[node] = self._call(step, args, kwargs)
            if store is not None:
                for v in step.free:
                    env[v] = store.placeholder(v, env[v])
        if store is not None:
            store.env = env
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
            if step.kind == "static" or not isinstance(value, Tensor) or value.is_meta:
                continue  # a placeholder holds no memory
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

    def run_patched(
        self, clean: _Env, patch: Patch, cost: Optional[_Cost] = None, index: int = 0
    ) -> Any:
        """Run the graph for a chunk of windows whose input ``index`` differs by ``patch``.

        The other inputs are clean: nodes that depend on them only keep their clean values,
        which a node reached by ``patch`` reads on its boxes (:func:`_lifted`).

        Returns:
            The model output for the ``B * N`` rows, window-major.
        """
        if self.declined[index]:
            why = self.declined[index]
            raise UnsupportedModel(f"input {index} cannot run incrementally: {why}")
        env: _Env = {}
        b = patch.windows
        reach = self.reach[index]
        n = patch.clean.shape[0]
        for step in self.steps:
            node = step.node
            if step.kind == "static" or (node not in reach and step.kind != "output"):
                env[node] = clean[node]
                continue
            if step.kind == "input":
                env[node] = patch
            elif step.kind == "output":
                outer = [a for a in node.all_input_nodes if a not in reach and a in self.dynamic]
                for a in outer:
                    env[a] = _lifted(clean[a], [], b, n)
                return fx.node.map_arg(node.args[0], lambda a: _as_dense(env[a], cost))
            else:
                # The other inputs' values (constants and shape facts stay as they are).
                outer = [a for a in node.all_input_nodes if a not in reach and a in self.dynamic]
                if outer:
                    changed = [env[a] for a in node.all_input_nodes if a in reach]
                    for a in outer:
                        env[a] = _lifted(clean[a], changed, b, n, step.kind == "binary")
                out = _HANDLERS[step.kind](self, step, env, clean[node], b, cost)
                if cost is not None:
                    cost.node(step.kind, b)
                for a in outer:
                    env[a] = clean[a]
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
            total.node(step.kind, 1, dense=True)
            if isinstance(value, Tensor):
                total.macs(_macs(self, step, clean, value))
                total.elements(value.numel())
        return total.total * windows


def _shape_reason(x: Tensor) -> str:
    return (
        f"the input has shape {tuple(x.shape)}: incremental occlusion needs "
        "(N, C, *spatial) with 1 to 3 spatial dimensions"
    )


def _lifted(value: Any, changed: Sequence[Any], b: int, n: int, broadcast: bool = False) -> Any:
    """A clean value of the other inputs as the ``B`` windows of a chunk see it.

    Every perturbed copy of the batch holds the same clean value, as the dense engine repeats
    an input it does not occlude. On the boxes of a changed operand of the same layout, a
    :class:`Patch` of those boxes holding the clean values (so a sum or a concatenation stays
    a box), also for an operand of a ``broadcast`` op (add, mul, ...) with one element per
    example (and channel) broadcast over space; otherwise the full value repeated for the ``B``
    copies. A value without ``N`` rows (a shape, a constant) is left as it is.
    """
    if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] != n:
        return value
    value = resolved(value)
    for other in changed:
        if not isinstance(other, Patch) or value.dim() != other.clean.dim():
            continue
        if tuple(value.shape[2:]) == other.full:
            boxes = [
                value[
                    (slice(None), slice(None), *(slice(s, s + k) for s, k in zip(st, other.size)))
                ]
                for st in other.starts.tolist()
            ]
            values = torch.stack(boxes).reshape(b * n, *value.shape[1:2], *other.size)
            return Patch(values, other.starts, other.size, value)
        channels = other.clean.shape[1]
        if broadcast and value.shape[1] in (1, channels) and all(s == 1 for s in value.shape[2:]):
            # An operand of add/mul/... with one value per example (and channel) broadcast
            # over space (a gate or shift computed from a vector, FiLM): on any box it is
            # itself, so the sum or product stays a box.
            full = value.expand(n, channels, *other.full)
            rows = value.repeat(b, *([1] * (value.dim() - 1)))
            return Patch(rows.expand(-1, channels, *other.size), other.starts, other.size, full)
    return _Dense(value.repeat(b, *([1] * (value.dim() - 1))))


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


#: Per model, per shapes: the fingerprint and the program, or why the model cannot be traced.
_PROGRAMS: weakref.WeakKeyDictionary[
    Any, Dict[Tuple[Any, ...], Tuple[Tuple[Any, ...], Union[IncrementalProgram, str]]]
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


#: Frames in torch's own files are not the model's code.
_TORCH_DIR = os.path.dirname(torch.__file__)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, recording each node's stack trace without the imports fx's costs.

    fx's own recording (``record_stack_traces``) summarises stacks through
    ``torch._C._profiler`` and filters them with ``symbolic_shapes.uninteresting_files()``;
    together their first use imports torch._dynamo, inductor and export, about 1.9 s of a fresh
    process's first trace (#30). This records the same frames, from the first ``forward`` on,
    with Python's ``traceback``, leaving out the frames in torch's own files;
    :mod:`extra_attrib._aliasing` reads only the model's frames.
    """

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        if not node.stack_trace:
            frames = traceback.extract_stack()
            first = next((i for i, f in enumerate(frames) if f.name == "forward"), len(frames))
            kept = [f for f in frames[first:] if not f.filename.startswith(_TORCH_DIR)]
            if kept:
                summary = traceback.StackSummary.from_list(kept)
                node.stack_trace = "".join(summary.format()).strip()
        return node


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
        tracer = _Tracer()
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


def program_for(
    model: Callable[..., Tensor], x: Any, batched: Optional[Sequence[bool]] = None
) -> IncrementalProgram:
    """The traced program of ``model`` for tensors shaped like ``x``, cached per model and shape.

    ``x`` is one tensor or a tuple of them (several inputs, tensor extra arguments); the cache
    key holds every tensor's shape, dtype and device, which of them carry the batch
    (``batched``, as in :class:`IncrementalProgram`) and :func:`model_fingerprint`: replacing a
    layer, reassigning a parameter or changing a module's setting retraces. The engine's
    self-check covers what no key can see.

    Raises:
        UnsupportedModel: As :class:`IncrementalProgram`.
    """
    _check_eval_mode(model)
    xs: Tuple[Tensor, ...] = (x,) if isinstance(x, Tensor) else tuple(x)
    flags = tuple([True] * len(xs) if batched is None else batched)
    shape: Tuple[Any, ...] = (
        tuple((tuple(t.shape), t.dtype, t.device) for t in xs),
        flags,
    )
    fingerprint = model_fingerprint(model)
    try:
        cache = _PROGRAMS.setdefault(model, {})
    except TypeError:  # not weak-referenceable: trace every time
        return IncrementalProgram(model, xs, flags)
    cached = cache.get(shape)
    if cached is None or cached[0] != fingerprint:
        try:
            cached = cache[shape] = (fingerprint, IncrementalProgram(model, xs, flags))
        except UnsupportedModel as error:
            # Remembered too: tracing again would fail again, costing the trace (and its side
            # effects on the model's closures) on every call (#30).
            cache[shape] = (fingerprint, str(error))
            raise
    if isinstance(cached[1], str):
        raise UnsupportedModel(cached[1])
    return cached[1]
