"""In-place writes in a traced graph: which ones change a value that is read again.

The incremental engine runs every node out of place, so that stored clean activations stay
intact. That is the model's arithmetic only when no in-place write is observable: the written
tensor (or a view of it, or the tensor it views) must not be read after the write, except through
the write's own result. :func:`observable_in_place_write` finds the first write that breaks this
rule, so the engine can refuse the model and name the node.

In-place writes it sees: modules with ``inplace=True`` (``nn.ReLU(inplace=True)``), functions
called with ``inplace=True`` (``F.relu(y, inplace=True)``), methods ending in ``_`` (``y.add_``),
and augmented assignments (``y += f(x)``), which torch.fx records as an out-of-place ``add``: for
those it reads the source line of the node, from fx's stack trace. A write it cannot see (source
unavailable) is left to the engine's self-check against the model.
"""

from __future__ import annotations

import inspect
import linecache
import operator
import os
import re
from typing import Any, Callable, Dict, List, Optional, Set, cast

import torch
from torch import fx, nn

#: Operations whose result may share memory with their first argument.
_VIEW_METHODS = {
    "view",
    "view_as",
    "reshape",
    "reshape_as",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "contiguous",
    "permute",
    "transpose",
    "t",
    "expand",
    "expand_as",
    "narrow",
    "select",
    "chunk",
    "split",
    "unbind",
    "detach",
    "to",
    "type",
    "float",
    "double",
    "half",
    "movedim",
    "swapaxes",
    "as_strided",
    "__getitem__",
}
_VIEW_FUNCTIONS: Set[Any] = {
    operator.getitem,
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    torch.permute,
    torch.transpose,
    torch.narrow,
    torch.chunk,
    torch.split,
    torch.unbind,
    torch.movedim,
    torch.detach,
    torch.nn.functional.dropout,
    torch.nn.functional.dropout1d,
    torch.nn.functional.dropout2d,
    torch.nn.functional.dropout3d,
    torch.nn.functional.alpha_dropout,
}
_DROPOUT_FUNCTIONS: Set[Any] = {
    torch.nn.functional.dropout,
    torch.nn.functional.dropout1d,
    torch.nn.functional.dropout2d,
    torch.nn.functional.dropout3d,
    torch.nn.functional.alpha_dropout,
}
_VIEW_MODULES = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
_AUGMENTED_TARGETS: Set[Any] = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.floordiv,
    operator.mod,
    operator.pow,
    operator.matmul,
    operator.and_,
    operator.or_,
    operator.xor,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
}
_AUGMENTED = re.compile(r"(?<![=!<>+\-*/%@&|^])(\+|-|\*|/|//|%|\*\*|@|&|\||\^)=(?!=)")
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_TORCH_DIR = os.path.dirname(torch.__file__)


def observable_in_place_write(
    graph: fx.Graph, module_of: Callable[[fx.Node], Optional[nn.Module]]
) -> Optional[str]:
    """The first in-place write whose effect a later node would read, described; else None.

    Args:
        graph (fx.Graph): A traced graph (with stack traces for augmented assignments).
        module_of (callable): The module a ``call_module`` node calls.

    Returns:
        str or None: e.g. ``"ReLU(inplace=True) at node 'relu' writes into 'conv', which node
        'add' reads afterwards"``.
    """
    nodes = list(graph.nodes)
    order = {node: i for i, node in enumerate(nodes)}
    aliases = _alias_classes(nodes, module_of)
    for node in nodes:
        written = _written_input(node, module_of)
        if written is None:
            continue
        skip = _views_of(node, module_of)
        for alias in aliases.get(written, {written}):
            if alias in skip:
                continue
            for user in alias.users:
                if user not in skip and order[user] > order[node]:
                    what = _describe(node, module_of)
                    return (
                        f"{what} at node {node.name!r} writes into {written.name!r} in place, "
                        f"which node {user.name!r} reads afterwards; the traced graph runs it "
                        "out of place (use an out-of-place op there, or engine='dense')"
                    )
    return None


def _views_of(node: fx.Node, module_of: Callable[[fx.Node], Optional[nn.Module]]) -> Set[fx.Node]:
    """The in-place node's own result and its views: reading them after the write is fine."""
    seen, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            if user not in seen and _is_view(user, module_of):
                seen.add(user)
                todo.append(user)
    return seen


def _alias_classes(
    nodes: List[fx.Node], module_of: Callable[[fx.Node], Optional[nn.Module]]
) -> Dict[fx.Node, Set[fx.Node]]:
    """Per node, every node that may share its memory (joined through view-like ops)."""
    parent: Dict[fx.Node, fx.Node] = {}

    def find(n: fx.Node) -> fx.Node:
        while parent.get(n, n) is not n:
            n = parent[n]
        return n

    for node in nodes:
        if _is_view(node, module_of) and node.args and isinstance(node.args[0], fx.Node):
            parent[find(node)] = find(node.args[0])
    classes: Dict[fx.Node, Set[fx.Node]] = {}
    for node in nodes:
        classes.setdefault(find(node), set()).add(node)
    return {node: classes[find(node)] for node in nodes}


def _is_view(node: fx.Node, module_of: Callable[[fx.Node], Optional[nn.Module]]) -> bool:
    if node.op == "call_method":
        return str(node.target) in _VIEW_METHODS
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS
    if node.op == "call_module":
        return isinstance(module_of(node), _VIEW_MODULES)
    return False


def _written_input(
    node: fx.Node, module_of: Callable[[fx.Node], Optional[nn.Module]]
) -> Optional[fx.Node]:
    """The node an in-place ``node`` writes into, or None."""
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node):
        return None
    if node.op == "call_module":
        m = module_of(node)
        if isinstance(m, nn.modules.dropout._DropoutNd) and not m.training:
            return None  # eval dropout returns its input untouched
        return first if getattr(m, "inplace", False) is True else None
    if node.op == "call_method":
        name = str(node.target)
        return first if name.endswith("_") and not name.startswith("__") else None
    if node.op != "call_function":
        return None
    if _inplace_argument(node):
        return None if _is_eval_dropout(node) else first
    if node.target in _AUGMENTED_TARGETS and _augmented_assignment(node):
        return first
    name = getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.startswith("__") and name not in ("and_", "or_"):
        return first
    return None


def _inplace_argument(node: fx.Node) -> bool:
    target = node.target
    if node.kwargs.get("inplace") is True:
        return True
    if not callable(target):
        return False
    try:
        bound = inspect.signature(target).bind_partial(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("inplace") is True


def _is_eval_dropout(node: fx.Node) -> bool:
    if node.target not in _DROPOUT_FUNCTIONS:
        return False
    try:
        bound = inspect.signature(cast(Callable[..., Any], node.target)).bind_partial(
            *node.args, **node.kwargs
        )
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("training", True) is False


def _augmented_assignment(node: fx.Node) -> bool:
    """Whether the source line that made ``node`` is an augmented assignment (``y += ...``)."""
    trace = node.meta.get("stack_trace") or ""
    for path, line in _FRAME.findall(trace):
        if path.startswith(_TORCH_DIR):
            continue
        text = linecache.getline(path, int(line)).split("#")[0]
        return bool(_AUGMENTED.search(text))
    return False


def _describe(node: fx.Node, module_of: Callable[[fx.Node], Optional[nn.Module]]) -> str:
    if node.op == "call_module":
        return f"{type(module_of(node)).__name__}(inplace=True)"
    if node.op == "call_method":
        return f".{node.target}()"
    name = getattr(node.target, "__name__", str(node.target))
    if node.target in _AUGMENTED_TARGETS and not _inplace_argument(node):
        return f"an augmented assignment ({name})"
    return f"{name}(inplace=True)"
