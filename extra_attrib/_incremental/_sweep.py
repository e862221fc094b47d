"""The evaluator the sweep calls, and the choice between engines.

What the incremental engine declines, the memory budget of the clean activations, and the
self-check against the real model before a sweep uses a trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, fx, nn

from extra_attrib._engine import BUFFER_BUDGET_BYTES
from extra_attrib._geometry import TileGeometry, perturbation_boxes
from extra_attrib._incremental._boxes import input_patch
from extra_attrib._incremental._ops import UnsupportedModel, _Cost
from extra_attrib._incremental._program import program_for
from extra_attrib._incremental._verify import (
    VerificationFailed,
    check_windows,
    verify_incremental,
)
from extra_attrib._plan import PrecomputedWindows
from extra_attrib._targets import check_output

if TYPE_CHECKING:
    from extra_attrib._incremental._program import IncrementalProgram


#: ``engine="auto"`` skips timing incremental when the cost model predicts less than this
#: speed-up: the model over-predicts (31 of 32 zoo models at 96², by up to 2.4x), so below 1
#: incremental is hopeless. Above it, the sweep times both engines and keeps the faster (#20).
MIN_PREDICTED_GAIN = 1.0
#: ``engine="auto"`` also skips incremental where the sweep is too short to pay for trying it:
#: the self-check runs its ``W`` windows (and the clean pass) incrementally as well, which is
#: wasted where dense wins. Unless the cost model's best case saves at least this many times
#: those ``W + 1`` evaluations over the tiling's windows, dense runs without a check or race:
#: on a 49-window call at 64² (ResNet18, DenseNet121, AlexNet) trying cost 30-40 % of a dense
#: call for an engine that lost anyway (#20).
TRY_PAYBACK = 2.0


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

    def run(self, j: int, boxes: List[Tuple[slice, ...]]) -> Any:
        """Model outputs ``(len(boxes) * N, ...)`` with the input occluded at ``boxes``."""
        with torch.no_grad():
            out = self.program.run_patched(self.clean, input_patch(self.x, self.fill, boxes))
        # As the dense engine checks them: a model mixing rows would give a silent wrong map. A
        # dict or tuple output is checked after ``score``, as the dense engine does.
        if isinstance(out, Tensor):
            check_output(out, len(boxes) * self.x.shape[0])
        return out

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
        checked (PrecomputedWindows or None): The real model's outputs on the self-check's
            windows, where it ran the whole batch: the sweep reuses them (#18, #20).
    """

    engine: str
    reason: str
    factory: Optional[Callable[..., Any]] = None
    checked: Optional[PrecomputedWindows] = None


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
    sweep: Optional[IncrementalSweep] = None
    try:
        program = _supported_program(forward_func, inputs, additional_forward_args)
        if engine == "auto" and center_box is not None:
            x = inputs[0]
            box = tuple((b.start, b.stop, b.step) for b in center_box)  # slices: unhashable
            known = (tuple(x.shape), x.dtype, tuple(baselines[0].shape), box)
            if known not in program.gains:
                sweep = _budgeted_sweep(program, inputs, baselines)
                program.gains[known] = sweep.predicted_gain(center_box)
            gain = program.gains[known]
        if gain < MIN_PREDICTED_GAIN:  # dense anyway: no need to check incremental
            return EngineChoice(
                "dense",
                f"the cost model predicts incremental at {gain:.2f}x dense, below the "
                f"{MIN_PREDICTED_GAIN}x threshold",
            )
        if engine == "auto" and center_box is not None and geometry is not None:
            windows = geometry.num_perturbations
            saving = windows * (1.0 - 1.0 / gain)
            trying = len(check_windows(geometry)) + 1
            if saving < TRY_PAYBACK * trying:
                return EngineChoice(
                    "dense",
                    f"too few windows to pay for trying incremental: at the cost model's "
                    f"{gain:.2f}x it would save {saving:.1f} of {windows} window evaluations, "
                    f"under {TRY_PAYBACK:g}x the {trying} that its self-check costs",
                )
        if sweep is None:
            sweep = _budgeted_sweep(program, inputs, baselines)
        verified = "not verified (no tiling given)"
        kept: List[PrecomputedWindows] = []
        if geometry is not None:
            verified = verify_incremental(
                forward_func,
                inputs[0],
                baselines[0],
                geometry,
                sweep.clean_output,
                lambda boxes: sweep.run(0, boxes),
                keep=kept,
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

    checked = kept[0] if kept else None
    if engine == "incremental":
        return EngineChoice(
            "incremental", f"engine='incremental' was requested; {verified}", factory, checked
        )
    # The cost model only ranks: the sweep times both engines on its own windows (#20).
    return EngineChoice(
        "measure",
        f"the cost model predicts {gain:.2f}x; incremental's self-check: {verified}",
        factory,
        checked,
    )


#: The clean activations an incremental sweep keeps may take at most this many bytes: the same
#: budget as the dense engine's perturbation buffers.
ACTIVATION_BUDGET_BYTES = BUFFER_BUDGET_BYTES


def _supported_program(
    forward_func: Callable[..., Tensor],
    inputs: Tuple[Tensor, ...],
    additional_forward_args: Tuple[Any, ...],
) -> IncrementalProgram:
    """The traced program of a model and call that incremental can run (no clean pass yet).

    Raises:
        UnsupportedModel: The model or the call cannot run incrementally.
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
    return program_for(forward_func, x)


def _budgeted_sweep(
    program: IncrementalProgram, inputs: Tuple[Tensor, ...], baselines: Tuple[Tensor, ...]
) -> IncrementalSweep:
    """The evaluator (its clean pass run) where the clean activations fit the budget.

    Raises:
        UnsupportedModel: The clean activations exceed :data:`ACTIVATION_BUDGET_BYTES`.
    """
    x = inputs[0]
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
