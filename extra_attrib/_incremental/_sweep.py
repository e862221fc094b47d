"""The evaluator the sweep calls, and the choice between engines.

What the incremental engine declines, the memory budget of the clean activations, and the
self-check against the real model before a sweep uses a trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence, Tuple, Union, cast

import torch
from torch import Tensor, fx, nn

from extra_attrib._engine import BUFFER_BUDGET_BYTES
from extra_attrib._geometry import TileGeometry, perturbation_boxes
from extra_attrib._incremental._boxes import input_patch
from extra_attrib._incremental._keep import CleanStore
from extra_attrib._incremental._ops import UnsupportedModel, _Cost
from extra_attrib._incremental._program import program_for
from extra_attrib._incremental._verify import (
    VerificationFailed,
    check_windows,
    verify_clean,
    verify_incremental,
)
from extra_attrib._plan import PrecomputedWindows
from extra_attrib._targets import check_output

if TYPE_CHECKING:
    from extra_attrib._incremental._program import IncrementalProgram


#: ``engine="auto"`` skips timing incremental when the cost model predicts less than this
#: speed-up. Above it, the sweep times both engines and keeps the faster (#20).
MIN_PREDICTED_GAIN = 1.0
#: ``engine="auto"`` also skips incremental where the sweep is too short to pay for trying it:
#: its clean pass and the self-check's ``W`` windows run incrementally as well (fixed costs,
#: counted by :func:`_payback` in evaluations of the batch). Unless the cost model's predicted
#: gain saves at least this many times those costs over the windows the sweep still
#: evaluates, dense runs without a check or race. The model counts a fixed cost per node run
#: (``INCREMENTAL_NODE_COST`` in ``_ops``), so its predictions are about right at small inputs
#: too (a median 1.00x of the measured gain over 23 CNNs at 64² and 224², 0.68-1.63x), and the
#: rule asks for the break-even, not a margin. With FLOPs alone, which over-predicted small
#: inputs, it asked for twice, and a 49-window ConvNeXt-Tiny call at 224² ran dense at 0.84x of
#: forced incremental (#20).
TRY_PAYBACK = 1.0


class IncrementalSweep:
    """Drop-in for the dense engine's evaluator: model outputs for chunks of windows.

    Implements the evaluator interface of :class:`extra_attrib._engine.DenseEvaluator`
    (``evaluate`` and ``finish``). With several inputs, each swept input gets its own boxes and
    the others stay clean (#20); an input the program declines (not spatial, or its path
    reaches an operation the engine does not know) is swept by the dense engine, through the
    model itself.

    Args:
        program (IncrementalProgram): The traced model.
        inputs (tuple of Tensor): The inputs, ``(N, C, *S)`` for each incremental one.
        baselines (tuple of Tensor): One per input, broadcastable to it.
        geometry (TileGeometry or sequence of TileGeometry, optional): The tiling of each input
            (one for a single input), needed by :meth:`evaluate`. Default: None
        forward_func (callable, optional): The model, for the inputs swept densely.
            Default: None (every input must be incremental)
        additional_forward_args (tuple, optional): Extra tensor arguments of the model, clean
            constants for the program. Default: ``()``
        capacity (int, optional): Windows per chunk at most, for the dense engine's buffers.
            Default: None (64)
        budget (int, optional): Most bytes the kept clean activations may take. Default: None
            (:data:`ACTIVATION_BUDGET_BYTES`)
    """

    def __init__(
        self,
        program: IncrementalProgram,
        inputs: Tuple[Tensor, ...],
        baselines: Tuple[Tensor, ...],
        geometry: Union[None, TileGeometry, Sequence[TileGeometry]] = None,
        forward_func: Optional[Callable[..., Any]] = None,
        additional_forward_args: Tuple[Any, ...] = (),
        capacity: Optional[int] = None,
        budget: Optional[int] = None,
    ) -> None:
        self.program = program
        self.inputs = tuple(inputs)
        self.baselines = tuple(baselines)
        self.fills = [b.expand_as(x) for x, b in zip(inputs, baselines)]
        self.args = tuple(additional_forward_args)
        self.geometries: Optional[List[TileGeometry]] = None
        self.geometry = geometry  # the setter takes one tiling or one per input
        self.forward_func = forward_func
        self.capacity = capacity
        self._dense: Any = None
        first = next(j for j, why in enumerate(program.declined[: len(inputs)]) if not why)
        #: The first input swept incrementally, and its baseline.
        self.x, self.fill = inputs[first], self.fills[first]
        #: The clean activations a patched run reads are kept, the others recomputed on a read.
        self.store = CleanStore(program, activation_budget(budget))
        with torch.no_grad():
            self.clean = program.run_clean(
                *(x.clone() for x in inputs), *(_clone(a) for a in self.args), store=self.store
            )
        #: The traced program's output on the clean input, for the self-check.
        self.clean_output = program.output_of(self.clean)
        #: Cost of one dense forward pass, from the cost model (counted before pruning).
        self.dense_cost = program.dense_cost(self.clean, 1)
        #: Bytes of the clean activations the sweep keeps.
        self.activation_bytes = program.prune(self.clean)
        self.store.kept_bytes = self.activation_bytes

    @property
    def geometry(self) -> Optional[TileGeometry]:
        """The tiling of the first input (None before it is known)."""
        return None if self.geometries is None else self.geometries[0]

    @geometry.setter
    def geometry(self, value: Union[None, TileGeometry, Sequence[TileGeometry]]) -> None:
        if value is None or isinstance(value, TileGeometry):
            self.geometries = None if value is None else [value]
        else:
            self.geometries = list(value)

    def incremental(self, j: int) -> bool:
        """Whether input ``j`` is swept incrementally (else densely, through the model)."""
        return not self.program.declined[j]

    def evaluate(self, j: int, windows: Sequence[int], windows_on_device: Tensor) -> Any:
        """Model outputs ``(len(windows) * N, ...)`` with input ``j`` occluded at ``windows``.

        ``windows`` are flat window indices of input ``j``'s tiling.
        """
        if self.geometries is None:
            raise RuntimeError("IncrementalSweep.evaluate needs the geometry")
        if not self.incremental(j):
            return self._dense_engine().evaluate(j, windows, windows_on_device)
        return self.run(j, perturbation_boxes(self.geometries[j], windows))

    def _dense_engine(self) -> Any:
        if self._dense is None:
            if self.forward_func is None or self.geometries is None:
                raise RuntimeError(
                    "IncrementalSweep needs forward_func for the inputs it sweeps densely"
                )
            from extra_attrib._engine import DenseEvaluator

            self._dense = DenseEvaluator(
                self.forward_func,
                self.inputs,
                self.baselines,
                self.geometries,
                self.args,
                self.capacity or 64,
            )
        return self._dense

    def finish(self, j: int) -> bool:
        """True unless a densely swept input's copies were corrupted by the model.

        The incremental inputs keep no perturbed copies a model could corrupt.
        """
        return True if self._dense is None else bool(self._dense.finish(j))

    def run(self, j: int, boxes: List[Tuple[slice, ...]]) -> Any:
        """Model outputs ``(len(boxes) * N, ...)`` with input ``j`` occluded at ``boxes``."""
        x = self.inputs[j]
        with torch.no_grad():
            patch = input_patch(x, self.fills[j], boxes)
            out = self.program.run_patched(self.clean, patch, index=j)
        # As the dense engine checks them: a model mixing rows would give a silent wrong map. A
        # dict or tuple output is checked after ``score``, as the dense engine does.
        if isinstance(out, Tensor):
            check_output(out, len(boxes) * x.shape[0])
        return out

    def reset(self, j: int) -> None:
        """Nothing to restore: the evaluator keeps no perturbed copies."""

    def predicted_gain(self, box: Tuple[slice, ...], j: int = 0) -> float:
        """Dense cost over incremental cost of one window of input ``j`` at ``box``.

        From the cost model; 1 for an input swept densely.
        """
        if not self.incremental(j):
            return 1.0
        cost = _Cost()
        with torch.no_grad():
            patch = input_patch(self.inputs[j], self.fills[j], [box])
            self.program.run_patched(self.clean, patch, cost, index=j)
        return self.dense_cost / max(cost.total, 1.0)


def _clone(value: Any) -> Any:
    return value.clone() if isinstance(value, Tensor) else value


@dataclass
class EngineChoice:
    """Which engine a call uses and why.

    Attributes:
        engine (str): ``"dense"``, ``"incremental"``, or ``"measure"``: both are possible and
            the sweep times them (the factory is incremental's).
        reason (str): Why, in words.
        factory (callable or None): For incremental, builds the evaluator the sweep calls
            (same signature as the dense engine's ``DenseEvaluator``).
        checked (PrecomputedWindows, tuple of them, or None): The real model's outputs on
            the self-check's windows, where it ran the whole batch: the sweep reuses them
            (#18, #20). A tuple, one per input checked, for a model of several inputs.
    """

    engine: str
    reason: str
    factory: Optional[Callable[..., Any]] = None
    checked: Union[None, PrecomputedWindows, Tuple[PrecomputedWindows, ...]] = None
    #: Where the sweep was too short to pay for trying incremental: the evaluations of the
    #: batch that incremental would have saved, at the predicted gain (#30).
    forgone: float = 0.0


def choose_engine(
    engine: str,
    forward_func: Callable[..., Tensor],
    inputs: Tuple[Tensor, ...],
    baselines: Tuple[Tensor, ...],
    additional_forward_args: Tuple[Any, ...],
    center_box: Optional[Tuple[slice, ...]] = None,
    geometry: Union[None, TileGeometry, Sequence[TileGeometry]] = None,
    budget: Optional[int] = None,
    checked_before: bool = False,
    forgone: float = 0.0,
    repeats: float = 1.0,
    measured_faster: bool = False,
) -> EngineChoice:
    """Decide between the dense and the incremental engine.

    Incremental must first pass every check: a supported model (:func:`declined_model`,
    :class:`IncrementalProgram`), clean activations within :data:`ACTIVATION_BUDGET_BYTES`, and,
    given ``geometry``, the self-check against the real model
    (:func:`extra_attrib._verify.verify_incremental`) on every input swept incrementally. Under
    ``"auto"``, a failed check or any exception while tracing, planning or checking chooses
    dense, with the reason; a forced ``"incremental"`` raises a ValueError instead.

    With several inputs (#20), each is swept with the others clean: an input whose path the
    engine knows gets its own boxes, any other (a vector, an input reaching an unknown
    operation) is swept densely through the model by the same evaluator; the reason names them.

    Args:
        engine (str): ``"auto"``, ``"dense"`` or ``"incremental"``.
        forward_func (callable): The model.
        inputs (tuple of Tensor): As given to the sweep.
        baselines (tuple of Tensor): As given to the sweep.
        additional_forward_args (tuple): Extra model arguments: tensors only, which stay clean
            (repeated with each copy where they have ``N`` rows, as the dense engine does).
        center_box (tuple of slice, optional): A typical window of the first input (one slice
            per non-batch dimension) for the cost model; with the tilings of every input given,
            each input's centre window is used instead. Default: None (no cost check;
            incremental if possible)
        geometry (TileGeometry or sequence of TileGeometry, optional): The tiling of each input
            (of ``inputs[0]`` alone for one input), for the self-check on its corner and centre
            windows. Default: None (no self-check)
        budget (int, optional): Most bytes the clean activations of the batch may take.
            Default: None (:data:`ACTIVATION_BUDGET_BYTES`)
        checked_before (bool, optional): An earlier call with these shapes and tiling chose
            incremental by measurement (a later batch of a run, a later group of a batch).
            Where the traced program passed the whole self-check for them, only its clean
            output is checked against the model (:func:`verify_clean`). Default: False
        forgone (float, optional): What earlier calls with these shapes, each too short to
            pay for trying incremental, would have saved, in evaluations of this batch. It
            counts with this call's saving against the fixed costs: a run of short calls tries
            incremental once the savings it let go would have paid for trying (as renting
            stops once the rent paid would have bought). Default: 0
        repeats (float, optional): Sweeps that will share this decision, this one included
            (the later groups of a batch; the later batches of a run that said how long it is,
            :mod:`extra_attrib._run_hint`). The fixed costs are paid once and each sweep saves
            as much as this one, so their savings count against them. Default: 1
        measured_faster (bool, optional): An earlier sweep with these example shapes measured
            incremental faster (an earlier group of the batch, batch of the run): the payback
            rule is not asked again, as what it weighs has been paid and measured. Default: False

    Returns:
        EngineChoice: The engine, the reason and, for incremental, the evaluator factory.

    Raises:
        ValueError: ``engine="incremental"`` and the model cannot run incrementally, or the
            self-check disagrees with the model.
    """
    if engine == "dense":
        return EngineChoice("dense", "engine='dense' was requested")
    gain = math.inf
    geometries: Optional[List[TileGeometry]] = None
    if geometry is not None:
        geometries = [geometry] if isinstance(geometry, TileGeometry) else list(geometry)
    sweep: Optional[IncrementalSweep] = None
    try:
        program = _supported_program(forward_func, inputs, additional_forward_args)
        if engine == "auto" and (geometries is not None or center_box is not None):
            # The prediction depends on shapes and geometry only: remembered with the trace,
            # so a later call decides without a clean pass.
            known = _gain_key(inputs, baselines, geometries, center_box)
            if known not in program.gains:
                sweep = _budgeted_sweep(program, inputs, baselines, additional_forward_args, budget)
                if geometries is not None and len(geometries) == len(inputs):
                    program.gains[known] = _predicted_gain(sweep, geometries)
                else:
                    program.gains[known] = sweep.predicted_gain(cast(Any, center_box))
            gain = program.gains[known]
        if gain < MIN_PREDICTED_GAIN:  # dense anyway: no need to check incremental
            return EngineChoice(
                "dense",
                f"the cost model predicts incremental at {gain:.2f}x dense, below the "
                f"{MIN_PREDICTED_GAIN}x threshold",
            )
        if (
            engine == "auto"
            and geometries is not None
            and center_box is not None
            and not measured_faster
        ):
            saving, trying, windows = _payback(inputs, geometries, gain, budget)
            if saving * max(repeats, 1.0) + forgone < TRY_PAYBACK * trying:
                earlier = f" (and {forgone:.1f} by earlier calls)" if forgone else ""
                if repeats > 1.0:
                    earlier = f" ({saving * repeats:.1f} over {repeats:.3g} sweeps like it)" + (
                        f" and {forgone:.1f} by earlier calls" if forgone else ""
                    )
                return EngineChoice(
                    "dense",
                    f"too few windows to pay for trying incremental: at the cost model's "
                    f"{gain:.2f}x it would save {saving:.1f} of {windows} window evaluations"
                    f"{earlier}, under {TRY_PAYBACK:g}x the {trying:.1f} that its fixed costs "
                    "take (its clean pass and the self-check's incremental windows)",
                    forgone=saving,
                )
        if sweep is None:
            sweep = _budgeted_sweep(program, inputs, baselines, additional_forward_args, budget)
        verified = "not verified (no tiling given)"
        kept: List[PrecomputedWindows] = []
        passed = ("verified", _gain_key(inputs, baselines, geometries, center_box))
        if (
            checked_before
            and geometries is not None
            and len(inputs) == 1
            and not additional_forward_args
            and passed in program.gains
        ):
            verified = verify_clean(
                forward_func, inputs[0], baselines[0], geometries[0], sweep.clean_output, kept
            )
        elif geometries is not None:
            verified = _verify_inputs(
                sweep,
                forward_func,
                inputs,
                baselines,
                geometries,
                additional_forward_args,
                kept,
                activation_budget(budget),
            )
            program.gains[passed] = 1.0
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
        sweep_forward: Any,
        sweep_inputs: Tuple[Tensor, ...],
        sweep_baselines: Tuple[Tensor, ...],
        geometries: Sequence[TileGeometry],
        sweep_args: Tuple[Any, ...] = (),
        capacity: Optional[int] = None,
        *_: Any,
    ) -> IncrementalSweep:
        # The probe's evaluator when the sweep is over the same batch; a new one (and a clean
        # pass) for another batch, e.g. one example of a drill-down refinement.
        if _same_call(sweep_inputs, sweep_baselines, sweep_args, sweep):
            sweep.geometry = list(geometries)
            sweep.forward_func, sweep.capacity = sweep_forward, capacity
            return sweep
        return IncrementalSweep(
            program_for(
                traced_model(forward_func),
                (*sweep_inputs, *sweep_args),
                _batched(sweep_inputs, sweep_args),
            ),
            sweep_inputs,
            sweep_baselines,
            list(geometries),
            sweep_forward,
            sweep_args,
            capacity,
            budget,
        )

    checked: Union[None, PrecomputedWindows, Tuple[PrecomputedWindows, ...]] = None
    if len(kept) == 1 and len(inputs) == 1:
        checked = kept[0]
    elif kept:
        checked = tuple(kept)
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


def _same_call(
    inputs: Sequence[Tensor], baselines: Sequence[Tensor], args: Sequence[Any], sweep: Any
) -> bool:
    return (
        len(inputs) == len(sweep.inputs)
        and all(a is b for a, b in zip(inputs, sweep.inputs))
        and all(a is b for a, b in zip(baselines, sweep.baselines))
        and len(args) == len(sweep.args)
        and all(a is b for a, b in zip(args, sweep.args))
    )


def _batched(inputs: Sequence[Tensor], args: Sequence[Any]) -> List[bool]:
    """Which tensors carry the batch: the inputs, and the arguments with ``N`` rows."""
    n = inputs[0].shape[0]
    return [True] * len(inputs) + [a.dim() > 0 and a.shape[0] == n for a in args]


def _payback(
    inputs: Sequence[Tensor],
    geometries: Sequence[TileGeometry],
    gain: float,
    budget: Optional[int],
) -> Tuple[float, float, int]:
    """What trying incremental would save and cost, in evaluations of the batch (#30).

    Against a dense sweep (a clean pass and every window), trying incremental costs, per input:
    its clean pass (about one evaluation), the self-check's ``W`` windows run incrementally
    (``W / gain``), and the check's model pass of ``1 + W`` copies, which is free where the
    sweep reuses it (its clean copy and windows count towards the map) and ``W`` evaluations
    where it ran only the first examples. What incremental saves is ``1 - 1 / gain`` of each
    window the sweep still evaluates. Tracing is paid before the cost model exists; it is not
    counted (the first trace of ResNet-50 takes about 0.2 s).

    Returns:
        tuple: ``(saving, cost, windows)``.
    """
    saving = cost = 0.0
    windows = 0
    for x, g in zip(inputs, geometries):
        checked = len(check_windows(g))
        windows += g.num_perturbations
        saving += max(g.num_perturbations - checked, 0) * (1.0 - 1.0 / gain)
        cost += 1.0 + checked / gain
        copies = (1 + checked) * x[0].numel() * x.element_size()
        if activation_budget(budget) // max(copies, 1) < x.shape[0]:
            cost += checked  # the check's windows are not reused
    return saving, cost, windows


def _predicted_gain(sweep: IncrementalSweep, geometries: Sequence[TileGeometry]) -> float:
    """Dense cost over incremental cost of the whole sweep, each input at its centre window."""
    dense = incremental = 0.0
    for j, g in enumerate(geometries):
        dense += g.num_perturbations
        incremental += g.num_perturbations / sweep.predicted_gain(central_box(g), j)
    return dense / max(incremental, 1e-30)


def _verify_inputs(
    sweep: IncrementalSweep,
    forward_func: Callable[..., Any],
    inputs: Tuple[Tensor, ...],
    baselines: Tuple[Tensor, ...],
    geometries: Sequence[TileGeometry],
    args: Tuple[Any, ...],
    kept: List[PrecomputedWindows],
    budget_bytes: int,
) -> str:
    """The self-check of every input swept incrementally; words for the engine's reason."""
    if len(inputs) == 1 and not args:
        return verify_incremental(
            forward_func,
            inputs[0],
            baselines[0],
            geometries[0],
            sweep.clean_output,
            lambda boxes: sweep.run(0, boxes),
            budget_bytes,
            keep=kept,
        )
    said = []
    for j, (x, b, g) in enumerate(zip(inputs, baselines, geometries)):
        if not sweep.incremental(j):
            said.append(f"input {j} runs dense ({sweep.program.declined[j]})")
            continue
        try:
            words = verify_incremental(
                _others_clean(forward_func, inputs, args, j, 1 + len(check_windows(g))),
                x,
                b,
                g,
                sweep.clean_output,
                lambda boxes, j=j: sweep.run(j, boxes),  # type: ignore[misc]
                budget_bytes,
                keep=kept,
                index=j,
                context=(*inputs, *args),
                passes=False,  # the other inputs are repeated for all the copies at once
            )
        except VerificationFailed as error:
            raise VerificationFailed(f"input {j}: {error}") from error
        said.append(f"input {j} {words}")
    return "; ".join(said)


def _others_clean(
    forward_func: Callable[..., Any],
    inputs: Tuple[Tensor, ...],
    args: Tuple[Any, ...],
    j: int,
    copies: int,
) -> Callable[[Tensor], Any]:
    """The model as a function of input ``j``'s ``copies`` occluded copies of the first rows.

    The other inputs (and the tensor arguments with ``N`` rows) are the same first rows,
    clean, repeated for each copy, as the dense engine repeats them.
    """
    n = inputs[0].shape[0]

    def call(batch: Tensor) -> Any:
        m = batch.shape[0] // copies

        def repeated(t: Any) -> Any:
            if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n:
                return t[:m].repeat(copies, *([1] * (t.dim() - 1)))
            return t

        given = [batch if k == j else repeated(x) for k, x in enumerate(inputs)]
        return forward_func(*given, *(repeated(a) for a in args))

    return call


#: The clean activations an incremental sweep keeps may take at most this many bytes: the same
#: budget as the dense engine's perturbation buffers.
ACTIVATION_BUDGET_BYTES = BUFFER_BUDGET_BYTES


def _gain_key(
    inputs: Sequence[Tensor],
    baselines: Sequence[Tensor],
    geometries: Optional[Sequence[TileGeometry]],
    center_box: Optional[Tuple[slice, ...]],
) -> Tuple[Any, ...]:
    """What the cost model's prediction depends on: shapes, dtypes and windows."""

    def box(b: Tuple[slice, ...]) -> Tuple[Any, ...]:  # slices are unhashable before 3.12
        return tuple((s.start, s.stop, s.step) for s in b)

    tilings = tuple((g.num_perturbations, box(central_box(g))) for g in (geometries or ()))
    return (
        tuple((tuple(x.shape), x.dtype) for x in inputs),
        tuple(tuple(b.shape) for b in baselines),
        tilings,
        box(center_box) if center_box is not None else None,
    )


def _supported_program(
    forward_func: Callable[..., Tensor],
    inputs: Tuple[Tensor, ...],
    additional_forward_args: Tuple[Any, ...],
) -> IncrementalProgram:
    """The traced program of a model and call that incremental can run (no clean pass yet).

    Raises:
        UnsupportedModel: The model or the call cannot run incrementally.
    """
    for i, a in enumerate(additional_forward_args):
        if not isinstance(a, Tensor):
            raise UnsupportedModel(
                f"additional_forward_args[{i}] is a {type(a).__name__}: incremental occlusion "
                "traces tensor arguments only (a Python value could steer the model's code)"
            )
    x = inputs[0]
    if len(inputs) == 1 and not x.dtype.is_floating_point:
        raise UnsupportedModel(
            f"the input has dtype {x.dtype}; incremental occlusion needs a floating-point input"
        )
    declined = declined_model(traced_model(forward_func))
    if declined:
        raise UnsupportedModel(declined)
    tensors = (*inputs, *additional_forward_args)
    batched = _batched(inputs, additional_forward_args)
    program = program_for(traced_model(forward_func), tensors, batched)
    if all(program.declined[: len(inputs)]):  # the extra arguments are never occluded
        raise UnsupportedModel(
            "no input can be swept incrementally: "
            + "; ".join(
                f"input {i}: {why}" for i, why in enumerate(program.declined[: len(inputs)])
            )
        )
    return program


def _budgeted_sweep(
    program: IncrementalProgram,
    inputs: Tuple[Tensor, ...],
    baselines: Tuple[Tensor, ...],
    additional_forward_args: Tuple[Any, ...],
    budget: Optional[int] = None,
) -> IncrementalSweep:
    """The evaluator (its clean pass run) where the clean activations fit the budget.

    Raises:
        UnsupportedModel: The clean activations exceed ``budget`` (default
            :data:`ACTIVATION_BUDGET_BYTES`).
    """
    n = inputs[0].shape[0]
    if n > 1:
        # One example first: the activations of the whole batch are counted before they exist.
        per_example = _example_bytes(program, inputs, baselines, additional_forward_args)
        _check_budget(per_example * n, n, budget)
    sweep = IncrementalSweep(
        program,
        inputs,
        baselines,
        additional_forward_args=additional_forward_args,
        budget=budget,
    )
    _check_budget(sweep.activation_bytes, n, budget)
    return sweep


def _example_bytes(
    program: IncrementalProgram,
    inputs: Tuple[Tensor, ...],
    baselines: Tuple[Tensor, ...],
    additional_forward_args: Tuple[Any, ...],
) -> int:
    """Bytes of the clean activations a sweep keeps per example, from a pass of the first one.

    Remembered with the program (it depends on shapes only), so a call that runs its batch in
    groups measures it once.
    """
    key = ("example bytes", tuple((tuple(x.shape[1:]), x.dtype) for x in inputs))
    if key not in program.gains:
        tensors = (*inputs, *additional_forward_args)
        batched = _batched(inputs, additional_forward_args)
        first = tuple(t[:1] if rows else t for t, rows in zip(tensors, batched))
        fills = tuple(b.expand_as(t)[:1] for b, t in zip(baselines, inputs))
        probe = IncrementalSweep(
            program, first[: len(inputs)], fills, additional_forward_args=first[len(inputs) :]
        )
        program.gains[key] = float(probe.activation_bytes)
    return int(program.gains[key])


def examples_per_group(
    forward_func: Callable[..., Tensor],
    inputs: Tuple[Tensor, ...],
    baselines: Tuple[Tensor, ...],
    additional_forward_args: Tuple[Any, ...],
    budget: Optional[int] = None,
) -> int:
    """Most examples whose clean activations fit the budget together (#30).

    The incremental engine keeps the clean activations of every example it sweeps; a batch
    whose activations exceed the budget runs in groups of this many examples, each group its
    own clean pass and sweep. Counted on one example before any batch's activations exist.

    Args:
        forward_func (callable): The model.
        inputs (tuple of Tensor): The call's inputs, ``N`` examples.
        baselines (tuple of Tensor): One per input.
        additional_forward_args (tuple): Extra model arguments.
        budget (int, optional): Bytes. Default: None (:data:`ACTIVATION_BUDGET_BYTES`)

    Returns:
        int: Between 1 and ``N``; ``N`` also where incremental cannot run at all (the engine's
        choice then says why).
    """
    n = inputs[0].shape[0]
    if n == 1:
        return 1
    try:
        program = _supported_program(forward_func, inputs, additional_forward_args)
        with torch.no_grad():
            per_example = _example_bytes(program, inputs, baselines, additional_forward_args)
    except Exception:  # the engine's choice meets the same failure and reports it
        return n
    return max(1, min(n, activation_budget(budget) // max(per_example, 1)))


def activation_budget(budget: Optional[int] = None) -> int:
    """``budget``, or :data:`ACTIVATION_BUDGET_BYTES` (read now: tests may change it)."""
    return ACTIVATION_BUDGET_BYTES if budget is None else budget


def traced_model(forward_func: Callable[..., Any]) -> Callable[..., Any]:
    """What the engine traces for ``forward_func``: the model a package wrapper calls.

    A wrapper that computes the same as the model and only rewords its failures names it in
    ``computes``; anything else is traced as it is. The self-check calls ``forward_func``.
    """
    return getattr(forward_func, "computes", forward_func)


def _check_budget(activation_bytes: int, n: int, budget: Optional[int] = None) -> None:
    limit = activation_budget(budget)
    if activation_bytes > limit:
        raise UnsupportedModel(
            f"the clean activations of the batch of {n} would take "
            f"{activation_bytes / 2**20:.0f} MiB, over the {limit / 2**20:.0f} MiB budget "
            "(memory_budget=; a larger batch runs in groups that fit it)"
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
