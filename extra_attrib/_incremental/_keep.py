"""Which clean activations a sweep keeps, and recomputing the others when a box reads them.

A patched run reads a node's clean activation only where a box needs the values around it: a
convolution's or pooling's context, the union box of an add or a concatenation, a full map
materialised. A node whose every user only transforms its box values (a pointwise op, an
eval BatchNorm, a 1x1 convolution) is never read there, yet keeping it cost most of the
memory: ResNet-152 at 224² keeps 304 MiB, of which patched runs read 71 (#20).

The guess of what is read is only a guess (a box covering most of its map is materialised at
any node, from that node's clean values), so a node not kept is replaced by a *placeholder*: a
tensor on the ``meta`` device with the activation's shape, dtype and strides, which the rules
may inspect but not read. Reading goes through :func:`resolved`, which recomputes the
activation from its inputs' clean values with the same operation as the clean run, and keeps
it from then on while the kept activations stay within the budget (else it is recomputed at
each read). A placeholder that reached arithmetic unresolved would raise (meta and CPU tensors
do not mix), never give a wrong number.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Set

from torch import Tensor, fx

if TYPE_CHECKING:
    from extra_attrib._incremental._ops import _Env, _Step
    from extra_attrib._incremental._program import IncrementalProgram

#: Node kinds whose value is a new tensor worth recomputing rather than keeping.
_COMPUTED = ("pointwise", "channel", "conv", "binary", "cat", "pool", "deconv", "upsample")
#: The attribute that marks a placeholder: ``(store, node)``.
_SOURCE = "_extra_attrib_source"


def _reads_box_only(user: _Step, node: fx.Node, dynamic: Set[fx.Node]) -> bool:
    """Whether ``user`` reads ``node`` only on its own box (never the clean values around it)."""
    args = user.node.args
    if not args or args[0] is not node or node in args[1:] or node in user.node.kwargs.values():
        return False
    if user.kind in ("pointwise", "channel"):
        # a second changed operand would make the rule run densely, materialising both
        return not any(a in dynamic for a in user.node.all_input_nodes if a is not node)
    if user.kind == "conv" and user.module is not None and len(args) == 1:
        kernel, stride, pad = user.info[:3]
        right = user.info[6]
        return (
            all(k == 1 for k in kernel) and all(s == 1 for s in stride) and not any((*pad, *right))
        )
    return user.kind == "size"


def evictable(program: IncrementalProgram) -> Set[fx.Node]:
    """Nodes whose clean activations a patched run reads only through a placeholder.

    A node computed by a rule (:data:`_COMPUTED`), reached by every swept input, not read by
    the output, whose changed inputs are all kept or evictable, and whose every user reads its
    box only (:func:`_reads_box_only`).
    """
    users: Dict[fx.Node, list] = {}
    for step in program.steps:
        for a in step.node.all_input_nodes:
            users.setdefault(a, []).append(step)
    swept = [r for r, why in zip(program.reach, program.declined) if not why]
    out: Set[fx.Node] = set()
    for step in program.steps:
        node = step.node
        if (
            step.kind not in _COMPUTED
            or node not in program.patchable
            or not all(node in reach for reach in swept)
            or not all(a in program.patchable for a in node.all_input_nodes if a in program.dynamic)
        ):
            continue
        mine = users.get(node, [])
        dynamic = program.dynamic
        if mine and all(u.kind != "output" and _reads_box_only(u, node, dynamic) for u in mine):
            out.add(node)
    return out


class CleanStore:
    """The clean activations of a sweep, some of them placeholders recomputed when read.

    Args:
        program (IncrementalProgram): The traced program whose clean run this stores.
        budget_bytes (int): Most bytes the kept activations may take, recomputed ones included.
    """

    def __init__(self, program: IncrementalProgram, budget_bytes: int) -> None:
        self.program = program
        self.budget_bytes = budget_bytes
        self.evictable = evictable(program)
        self.env: _Env = {}
        #: Bytes of the activations kept (set by the sweep once the clean run is pruned).
        self.kept_bytes = 0
        #: Nodes recomputed at a read, and how often (recomputed again where over the budget).
        self.recomputed: Dict[fx.Node, int] = {}
        self._steps = {s.node: s for s in program.steps}

    def placeholder(self, node: fx.Node, value: Any) -> Any:
        """``value`` as the sweep keeps it: itself, or a placeholder if ``node`` is evictable."""
        if node not in self.evictable or not isinstance(value, Tensor) or value.is_meta:
            return value
        stand_in = value.new_empty_strided(value.shape, value.stride(), device="meta")
        setattr(stand_in, _SOURCE, (self, node))
        return stand_in

    def resolve(self, node: fx.Node) -> Tensor:
        """The clean activation of ``node``, recomputed from its inputs if it is not kept."""
        value = self.env.get(node)
        if isinstance(value, Tensor) and not value.is_meta:
            return value
        step = self._steps[node]
        args = fx.node.map_arg(node.args, self._value)
        kwargs = fx.node.map_arg(node.kwargs, self._value)
        out = self.program._call(step, args, kwargs)
        self.recomputed[node] = self.recomputed.get(node, 0) + 1
        size = out.untyped_storage().nbytes()
        if self.kept_bytes + size <= self.budget_bytes:
            self.env[node] = out
            self.kept_bytes += size
        return out

    def _value(self, node: fx.Node) -> Any:
        value = self.env[node]
        return resolved(value)


def resolved(value: Any) -> Any:
    """``value``, or the activation a placeholder stands for (recomputed if not kept)."""
    source = getattr(value, _SOURCE, None) if isinstance(value, Tensor) else None
    if source is None:
        return value
    store, node = source
    return store.resolve(node)
