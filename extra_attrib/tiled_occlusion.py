"""TiledOcclusion: occlusion with large windows placed at a fine stride.

Every user-facing rule lives here: argument forms, defaults, validation and documentation. The
algorithm itself is in :mod:`extra_attrib._geometry` (window positions and averaging) and
:mod:`extra_attrib._engine` (batched evaluation).
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Set, Tuple, Union

import torch
from captum.attr import PerturbationAttribution
from captum.log import log_usage
from torch import Tensor

from extra_attrib._call_trial import CallTrial
from extra_attrib._checks import check_bool, check_int, check_optional_int, is_int
from extra_attrib._drilldown import check_refine, drilldown_sweep
from extra_attrib._engine import SweepResult, occlusion_sweep
from extra_attrib._geometry import TileGeometry
from extra_attrib._groups import (
    check_memory_budget,
    example_groups,
    join,
    split_args,
    split_fill,
    split_per_example,
)
from extra_attrib._incremental import (
    EngineChoice,
    central_box,
    choose_engine,
    examples_per_group,
)
from extra_attrib._model_state import model_state_kept
from extra_attrib._plan import SweepPlan, engine_key
from extra_attrib._run_hint import calls_ahead
from extra_attrib._targets import ScoreType, as_target_list, score_function

TensorOrTuple = Union[Tensor, Tuple[Tensor, ...]]
IntOrTuple = Union[int, Tuple[Any, ...]]


class TiledOcclusion(PerturbationAttribution):
    r"""Occlusion with windows of size ``window`` placed at stride ``window / k``.

    Like :class:`captum.attr.Occlusion`, each window of the input is replaced by a baseline and the
    drop of the model's score is credited to the occluded elements. Windows start at every
    multiple of the stride ``t = window / k`` from ``-(k - 1) * t`` on, and are clipped to the
    input, so every element is covered by exactly ``prod(k)`` windows, at the borders too. The
    attribution of an element is the **mean** over the windows covering it of::

        score(x) - score(x with the window set to the baseline)

    So the map has the resolution of the small stride with the robustness of the large window, at
    the cost of ``prod(ceil(s_i / t_i) + k_i - 1)`` forward passes. ``k = 1`` is exactly
    ``Occlusion(sliding_window_shapes=window, strides=window)``. Away from the borders the result
    equals ``Occlusion(sliding_window_shapes=window, strides=window / k)``.

    Positive attributions mark regions whose occlusion *lowers* the score (evidence for the
    target); negative ones, regions whose occlusion raises it.

    Args:
        forward_func (Callable or torch.nn.Module): The model, or any function of the inputs
            (and ``additional_forward_args``) returning one row per example, or returning a dict
            or tuple that ``score`` turns into one row per example.

    Example::

        >>> model = torchvision.models.resnet18().eval()
        >>> x = torch.randn(1, 3, 224, 224)
        >>> tiled = TiledOcclusion(model)
        >>> attr = tiled.attribute(x, target=3, window=(3, 32, 32), k=(1, 4, 4))
        >>> attr.shape
        torch.Size([1, 3, 224, 224])
    """

    def __init__(self, forward_func: Callable[..., Tensor]) -> None:
        """Set up occlusion of ``forward_func`` (see the class's ``Args``)."""
        if not callable(forward_func):
            raise TypeError(
                f"forward_func must be callable (a model or a function), got "
                f"{type(forward_func).__name__}"
            )
        PerturbationAttribution.__init__(self, forward_func)
        #: Forward passes of the last call, the unperturbed one included.
        self.last_evaluations: int = 0
        #: Perturbed copies the last call evaluated.
        self.last_perturbations: int = 0
        #: Windows the last call skipped because they equalled the baseline in every example.
        self.last_skipped: int = 0
        #: Engine of the last call: ``"dense"`` or ``"incremental"``.
        self.last_engine: str = ""
        #: Why the last call used that engine.
        self.last_engine_reason: str = ""
        # Chunk sizes tuned by earlier calls, by what they depend on (see _engine.tuning_key).
        self._chunk_memo: Dict[Hashable, int] = {}
        # Engines measured faster by earlier calls under engine="auto" (see _plan.engine_key).
        self._engine_memo: Dict[Hashable, str] = {}
        # Engine keys whose incremental sweep passed the whole self-check in an earlier call:
        # later calls check the clean output alone (#30).
        self._checked: Set[Hashable] = set()
        # Per example shape, the evaluations (of one example) that calls too short to pay for
        # trying incremental let go; later calls count them (#30).
        self._forgone: Dict[Hashable, float] = {}
        # Per example shape, the whole calls that settle a close race in a long run (#30).
        self._trials: Dict[Hashable, CallTrial] = {}

    @log_usage()
    @torch.no_grad()
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: Any = None,
        k: IntOrTuple = 1,
        window: Optional[IntOrTuple] = None,
        baselines: Union[None, int, float, Tensor, Tuple[Any, ...]] = 0,
        additional_forward_args: Any = None,
        perturbations_per_eval: Optional[int] = None,
        show_progress: bool = False,
        score: ScoreType = "raw",
        refine: Optional[float] = None,
        refine_by: str = "abs",
        engine: str = "auto",
        memory_budget: Optional[int] = None,
    ) -> TensorOrTuple:
        r"""Attribute the target's score to every input element.

        Args:
            inputs (Tensor or tuple of Tensor): Input of shape ``(N, *S)`` with 0 to 4 non-batch
                dimensions (channels count as one, as in Captum; shape ``(N,)`` makes each
                example's scalar one feature, with one window: give ``window=1`` or ``()``,
                or a tuple entry ``()`` for that tensor), or a tuple of such tensors with
                the same ``N`` for a multi-input model; each tensor is occluded on its own, the
                others left intact.
            target (int, tuple, Tensor, list or None, optional): Which output to explain, in
                Captum's forms: an int (class index) or tuple (index into a multi-dimensional
                output) for all examples; a tensor or list with one entry per example. ``None``
                explains the predicted class (argmax of the raw output on the unperturbed input)
                of a model with several outputs per example, and the single output of a model
                with one. Default: None
            k (int or tuple, optional): Number of windows covering each element, per dimension.
                An int applies to every dimension the window does not span entirely (``k = 1``
                there); a tuple gives one entry per non-batch dimension. For tuple inputs, an int
                applies to every tensor, or give a tuple with one entry (int or tuple) per tensor.
                Default: 1
            window (int or tuple): Window size, in the same forms as ``k``. Entries larger than
                their dimension are clipped to it (the window then spans that dimension). After
                clipping, every entry must be divisible by its ``k``: the stride is
                ``window / k``. Required.
            baselines (scalar, Tensor or tuple, optional): Value the occluded window takes: a
                scalar, or a tensor broadcastable to the input (per example ``(N, 1, ..)``, per
                channel ``(C, 1, 1)``, or full ``(N, *S)`` / ``S``). NaN or Inf baselines only
                ever reach the occluded window. For tuple inputs, one per tensor or one scalar
                for all. ``None`` means 0. An integer or bool input takes only baselines its
                dtype holds exactly (``0.5`` on int64, ``-1`` or ``300`` on uint8 raise a
                ValueError rather than being truncated or wrapped). Default: 0
            additional_forward_args (Any, optional): Extra arguments of ``forward_func`` after
                the inputs; tensors with ``N`` rows are repeated along with the perturbed
                batch. Default: None
            perturbations_per_eval (int, optional): Number of perturbed copies of the batch
                evaluated per forward pass. ``None`` chooses: on CPU the first chunks try 1, 2,
                4, ... rows per pass (32, or more for light inputs, and no more than the sweep
                can repay) and the rest of the sweep uses the fastest per perturbation (the best
                batch size depends on model and machine); this object remembers the choice for
                later calls with the same shapes, dtypes, device, tiling and thread count, which
                skip the trials. On GPU about 64 rows per pass. Always within ``memory_budget``
                (256 MiB by default) for the perturbed copies. Give
                a number for bit-for-bit repeatable results (batch composition changes float
                rounding); it is capped at the number of windows and at the same budget.
                Default: None
            show_progress (bool, optional): Show a tqdm progress bar whose total is the number of
                forward passes; ``True`` or ``False`` only. Default: False
            score (str or callable, optional): The quantity that is differenced: ``"raw"`` (the
                model output, as Captum), ``"softmax"`` (probability), ``"log_softmax"``
                (log-probability; ``log P(x) - log P(x_occluded)``, the loss-based occlusion of
                the literature), or a callable ``score(outputs) -> Tensor`` applied to the raw
                output before the target is selected. The callable receives whatever the model
                returns, a dict or tuple too (torchvision's segmentation models return
                ``{"out": ...}``: ``score=lambda o: o["out"][:, :, mask].sum(-1)`` explains
                each class over a region); only its result must be a tensor with one row per
                example. Default: ``"raw"``
            refine (float, optional): Adaptive drill-down: a fraction ``0 < refine <= 1`` of
                the coarse cells (window-sized blocks at stride ``window``) that get the full
                tiled map. A coarse pass evaluates the windows at stride ``window`` (tiled
                positions, reused); per example and input tensor the top
                ``ceil(refine * cells)`` cells by ``refine_by`` (ties: lower row-major index)
                are refined by evaluating every window covering them, so their elements get
                exactly the full value; all other elements keep the coarse value (Occlusion
                with window and stride ``window``). ``1`` gives the full map. With a batch,
                the coarse pass runs on the whole batch and the refinement once per example on
                that example's own windows (``perturbations_per_eval`` then counts copies of
                one example); ``last_perturbations`` counts the coarse pass's batch copies plus
                the refined rows divided by ``N``. See :mod:`extra_attrib._drilldown`.
                Default: None (full map)
            refine_by (str, optional): Ranking of the coarse cells: ``"abs"`` (absolute coarse
                attribution) or ``"positive"`` (its positive part, the evidence for the
                target). Default: ``"abs"``
            engine (str, optional): ``"dense"`` runs one full forward pass per window;
                ``"incremental"`` recomputes only the box of each layer's activation a window
                changes (exact, for CNNs made of convolutions, pooling, BatchNorm, activations,
                add/mul/concat; the rest of the network after a global pool, linear layer, ...
                runs densely) and raises a ValueError naming the first operation it cannot
                handle; ``"auto"``, where the model is supported and passes its self-check,
                times chunks of both engines on the call's own windows and keeps the faster
                (the timed windows count towards the map; the choice is remembered per example
                shape, dtype, device, tiling and thread count, so a batch of another size
                reuses it, and a later call whose shapes passed the whole self-check before
                checks only its clean output against the model). Where the two engines race
                within 1.25x of each other and a long run (``explain_dataset``, the groups of
                a large batch) has enough calls to come, the next four calls alternate the
                engines, timed whole, and the run keeps the faster per example.
                ``last_engine`` and ``last_engine_reason`` tell what ran and why. With
                several inputs, each is occluded with the others clean and gets its own boxes;
                one that is not ``(N, C, *spatial)`` or whose path reaches an operation
                without a rule runs densely in the same call. Incremental
                traces ``forward`` once and runs the traced layers, so Python
                code in ``forward`` (a counter, a log) does not run per pass: use ``"dense"``
                where it must. Default: ``"auto"``
            memory_budget (int, optional): Bytes the engine's working memory may take: the
                perturbed copies of the dense engine and the clean activations the
                incremental engine keeps, each within this budget. Where the incremental
                engine's activations of the whole batch exceed it, the batch runs in groups of
                examples that fit (each group its own clean pass and self-check, the engine
                chosen once for the call; ``NoiseTunnel``'s noisy copies are such a batch), with
                the same result. At least ``2**20`` (1 MiB). Default: None (256 MiB)

        Returns:
            Tensor or tuple of Tensor: Attributions with the type, shapes and device of
            ``inputs``; the dtype of a floating-point input (float64 stays float64), the
            scores' floating dtype for integer inputs.

        Example::

            >>> tiled = TiledOcclusion(model)
            >>> attr = tiled.attribute(images, target=labels, window=16, k=4)
            >>> smooth = NoiseTunnel(tiled).attribute(
            ...     images, nt_type="smoothgrad", nt_samples=8, stdevs=0.1,
            ...     target=labels, window=16, k=4)
        """
        is_tuple = isinstance(inputs, tuple)
        result = self._run(
            inputs,
            [target],
            k,
            window,
            baselines,
            additional_forward_args,
            perturbations_per_eval,
            show_progress,
            score,
            refine,
            refine_by,
            engine,
            memory_budget,
        )
        attributions = tuple(a[0] for a in result)
        return attributions if is_tuple else attributions[0]

    @log_usage()
    @torch.no_grad()
    def attribute_multi(
        self,
        inputs: TensorOrTuple,
        targets: Sequence[Any],
        k: IntOrTuple = 1,
        window: Optional[IntOrTuple] = None,
        baselines: Union[None, int, float, Tensor, Tuple[Any, ...]] = 0,
        additional_forward_args: Any = None,
        perturbations_per_eval: Optional[int] = None,
        show_progress: bool = False,
        score: ScoreType = "raw",
        refine: Optional[float] = None,
        refine_by: str = "abs",
        engine: str = "auto",
        memory_budget: Optional[int] = None,
    ) -> TensorOrTuple:
        r"""Attribute several targets in one sweep over the windows.

        The forward passes already hold every output, so ``T`` targets cost about as much as one.

        Args:
            inputs (Tensor or tuple of Tensor): As in :meth:`attribute`.
            targets (list): Non-empty list; each element any ``target`` form of
                :meth:`attribute` (e.g. ``[281, 282, 285]``, or per-example tensors).
            k (int or tuple, optional): As in :meth:`attribute`. Default: 1
            window (int or tuple): As in :meth:`attribute`. Required.
            baselines (scalar, Tensor or tuple, optional): As in :meth:`attribute`. Default: 0
            additional_forward_args (Any, optional): As in :meth:`attribute`. Default: None
            perturbations_per_eval (int, optional): As in :meth:`attribute`. Default: None
            show_progress (bool, optional): As in :meth:`attribute`. Default: False
            score (str or callable, optional): As in :meth:`attribute`. Default: ``"raw"``
            refine (float, optional): As in :meth:`attribute`; the cells refined for an example
                are the union over the targets of each target's top cells, and every target's
                map is refined on that union (the forward passes hold every target's score, so
                this costs nothing extra); each map is therefore at least as refined as
                ``attribute`` would give it. Default: None (full map)
            refine_by (str, optional): As in :meth:`attribute`. Default: ``"abs"``
            engine (str, optional): As in :meth:`attribute`. Default: ``"auto"``
            memory_budget (int, optional): As in :meth:`attribute`. Default: None (256 MiB)

        Returns:
            Tensor or tuple of Tensor: For each input, shape ``(len(targets), *input.shape)``;
            entry ``[i]`` equals ``attribute(inputs, target=targets[i], ...)``.

        Example::

            >>> top3 = model(x).topk(3, dim=1).indices          # (N, 3)
            >>> maps = tiled.attribute_multi(x, [top3[:, i] for i in range(3)], window=32, k=2)
            >>> maps.shape                                        # (3, N, C, H, W)
        """
        is_tuple = isinstance(inputs, tuple)
        result = self._run(
            inputs,
            as_target_list(targets),
            k,
            window,
            baselines,
            additional_forward_args,
            perturbations_per_eval,
            show_progress,
            score,
            refine,
            refine_by,
            engine,
            memory_budget,
        )
        return tuple(result) if is_tuple else result[0]

    def _run(
        self,
        inputs: TensorOrTuple,
        targets: List[Any],
        k: IntOrTuple,
        window: Optional[IntOrTuple],
        baselines: Any,
        additional_forward_args: Any,
        perturbations_per_eval: Optional[int],
        show_progress: bool,
        score: ScoreType,
        refine: Optional[float] = None,
        refine_by: str = "abs",
        engine: str = "auto",
        memory_budget: Optional[int] = None,
    ) -> List[Tensor]:
        xs = _format_inputs(inputs)
        geometries = resolve_tiling([tuple(x.shape[1:]) for x in xs], window, k)
        fills = _format_baselines(baselines, xs)
        extra = _format_additional_args(additional_forward_args)
        perturbations_per_eval = check_optional_int(
            perturbations_per_eval, "perturbations_per_eval", minimum=1
        )
        check_bool(show_progress, "show_progress")
        score_fn = score_function(score)
        # Inputs of shape (N,) (one scalar feature per example, as Captum allows) go through the
        # engine as (N, 1) with one window; the model still receives them as (N,).
        scalar = [j for j, x in enumerate(xs) if x.dim() == 1]
        forward_func = _scalar_inputs_flattened(self.forward_func, scalar, len(xs))
        forward_func = _failures_blamed_on_rows(forward_func, extra, xs[0].shape[0])
        xs = tuple(x.unsqueeze(1) if j in scalar else x for j, x in enumerate(xs))
        fills = tuple(
            b.unsqueeze(-1) if j in scalar and b.dim() else b for j, b in enumerate(fills)
        )
        if engine not in ("auto", "dense", "incremental"):
            raise ValueError(f"engine={engine!r} must be 'auto', 'dense' or 'incremental'")
        fraction = check_refine(refine, refine_by)
        run_sweep: Callable[..., SweepResult] = (
            occlusion_sweep
            if fraction is None
            else (functools.partial(drilldown_sweep, refine=fraction, refine_by=refine_by))
        )
        _warn_if_training(self.forward_func)
        memory_budget = check_memory_budget(memory_budget)
        with model_state_kept(self.forward_func):
            per_group = self._examples_per_group(
                forward_func, xs, fills, extra, engine, geometries, memory_budget
            )
            sweep = self._grouped(
                per_group,
                forward_func,
                xs,
                fills,
                geometries,
                targets,
                score_fn,
                extra,
                dict(
                    perturbations_per_eval=perturbations_per_eval,
                    show_progress=show_progress,
                    run_sweep=run_sweep,
                    engine=engine,
                    memory_budget=memory_budget,
                ),
            )
        self.last_evaluations = sweep.evaluations
        self.last_perturbations = sweep.perturbations
        self.last_skipped = sweep.skipped
        out = []
        for j, (x, attr) in enumerate(zip(xs, sweep.attributions)):
            dtype = x.dtype if x.dtype.is_floating_point else attr.dtype
            if j in scalar:
                attr = attr.squeeze(-1)
            out.append(attr.to(dtype).clone())
        return out

    def _remembered(self, key: Hashable) -> Optional[str]:
        """The engine measured faster for ``key``'s shapes, at this or any batch size (#30).

        Whole calls that settled a close race outrank any race, of this batch size or another.
        """
        trial = self._trials.get(any_batch(key))
        if trial is not None and not trial.running:
            return trial.kept
        return self._engine_memo.get(key, self._engine_memo.get(any_batch(key)))

    def _examples_per_group(
        self,
        forward_func: Callable[..., Tensor],
        xs: Tuple[Tensor, ...],
        fills: Tuple[Tensor, ...],
        extra: Tuple[Any, ...],
        engine: str,
        geometries: Sequence[TileGeometry],
        memory_budget: Optional[int],
    ) -> int:
        """Examples per sweep: the batch, or groups whose clean activations fit (#30)."""
        n = xs[0].shape[0]
        if engine == "dense" or n == 1:
            return n
        if engine == "auto" and self._remembered(engine_key(xs, geometries, extra)) == "dense":
            return n
        return examples_per_group(forward_func, xs, fills, extra, memory_budget)

    def _grouped(
        self,
        per_group: int,
        forward_func: Callable[..., Tensor],
        xs: Tuple[Tensor, ...],
        fills: Tuple[Tensor, ...],
        geometries: Sequence[TileGeometry],
        targets: List[Any],
        score_fn: Callable[[Any], Tensor],
        extra: Tuple[Any, ...],
        options: Dict[str, Any],
    ) -> Any:
        """One sweep over the batch, or one per group of ``per_group`` examples, joined.

        The first group decides the engine by measurement (it is remembered per shapes); the
        other groups reuse that decision, each with its own clean pass and self-check.
        """
        n = xs[0].shape[0]
        groups = example_groups(n, per_group) if per_group < n else [slice(0, n)]
        parts = []
        for rows in groups:
            size = rows.stop - rows.start
            split = [split_per_example(t, n, rows) for t in targets]
            args = split_args(extra, n, rows, size)
            if args is None or not all(ok for ok, _ in split):
                groups = [slice(0, n)]  # cannot split the call: one sweep, as before grouping
                break
            parts.append(
                (
                    tuple(x[rows] for x in xs),
                    tuple(split_fill(f, x, rows) for f, x in zip(fills, xs)),
                    [t for _, t in split],
                    args,
                )
            )
        if len(groups) == 1:
            return self._sweep(
                forward_func, xs, fills, geometries, targets, score_fn, extra, **options
            )
        results, engines = [], []
        for i, (gx, gfills, gtargets, gargs) in enumerate(parts):
            # The groups still to run share the first one's decision: their savings count.
            repeats = (n - groups[i].start) / gx[0].shape[0]
            results.append(
                self._sweep(
                    forward_func,
                    gx,
                    gfills,
                    geometries,
                    gtargets,
                    score_fn,
                    gargs,
                    **options,
                    repeats=repeats,
                )
            )
            engines.append((self.last_engine, self.last_engine_reason))
        sizes = [r.stop - r.start for r in groups]
        note = (
            f"{n} examples ran in {len(groups)} groups of at most {max(sizes)}, whose clean "
            "activations fit the memory budget"
        )
        others = [
            f"group {i} ran {e} ({why})" for i, (e, why) in enumerate(engines) if e != engines[0][0]
        ]
        self.last_engine = engines[0][0]
        self.last_engine_reason = "; ".join([engines[0][1], note, *others])
        return join(results, sizes)

    def _sweep(
        self,
        forward_func: Callable[..., Tensor],
        xs: Tuple[Tensor, ...],
        fills: Tuple[Tensor, ...],
        geometries: Sequence[TileGeometry],
        targets: List[Any],
        score_fn: Callable[[Any], Tensor],
        extra: Tuple[Any, ...],
        perturbations_per_eval: Optional[int],
        show_progress: bool,
        run_sweep: Callable[..., SweepResult],
        engine: str,
        memory_budget: Optional[int],
        repeats: float = 1.0,
    ) -> SweepResult:
        """One sweep: the engine chosen (or remembered), then run; sets ``last_engine``.

        ``repeats``: sweeps of this call that share the decision, this one included (groups);
        the caller's run may say how many calls are still to come (:mod:`._run_hint`).
        """
        began = time.perf_counter()
        measured = engine_key(xs, geometries, extra)
        run = any_batch(measured)
        remembered = self._remembered(measured)
        if remembered is not None:  # measured on another batch size (a last batch, a group)
            self._engine_memo[measured] = remembered
        trial = self._trials.get(run) if engine == "auto" else None
        timing = trial.next_engine() if trial is not None and trial.running else None
        if timing == "dense" or (timing is None and engine == "auto" and remembered == "dense"):
            # Measured slower before on these shapes: no tracing, self-check or trials.
            choice = EngineChoice(
                "dense",
                "a call timed whole to settle a close race"
                if timing
                else "the faster engine measured by an earlier call with these shapes",
            )
        else:
            choice = choose_engine(
                engine,
                forward_func,
                xs,
                fills,
                extra,
                central_box(geometries[0]),
                geometries,
                memory_budget,
                checked_before=measured in self._checked,
                forgone=self._forgone.get(run, 0.0) / xs[0].shape[0],
                repeats=repeats * calls_ahead(),
                measured_faster=remembered == "incremental" or timing == "incremental",
            )
            if choice.forgone:  # counted per example: batches of any size add up
                self._forgone[run] = self._forgone.get(run, 0.0) + choice.forgone * xs[0].shape[0]
        self.last_engine, self.last_engine_reason = choice.engine, choice.reason
        sweep_args = (forward_func, xs, fills, geometries, targets, score_fn, extra)
        engines: Dict[str, Any] = {"dense": None}
        if choice.engine == "measure" and timing != "incremental":
            engines["incremental"] = choice.factory  # dense first: a tie goes to dense
        elif choice.factory is not None:
            engines = {"incremental": choice.factory}
        plan = SweepPlan(
            engines,
            perturbations_per_eval,
            chunk_memo=self._chunk_memo,
            engine_memo=self._engine_memo,
            notes={"incremental": choice.reason} if choice.factory is not None else {},
            # The self-check's model outputs on its windows count towards the map (#18).
            precomputed=choice.checked,
            memory_budget=memory_budget,
        )
        options: Dict[str, Any] = dict(show_progress=show_progress)
        try:
            sweep: SweepResult = run_sweep(*sweep_args, plan=plan, **options)
            if getattr(sweep, "engine", "") in engines:
                self.last_engine = sweep.engine
                if choice.engine == "measure" and timing is None:
                    self.last_engine_reason = sweep.engine_reason
            elif choice.engine == "measure":  # a drill-down: each of its passes raced
                self.last_engine = "incremental"
        except Exception as error:
            if engine != "auto" or choice.factory is None:
                raise
            # The fast path failed during the sweep (out of memory, an op it mishandles):
            # auto never fails where dense works. The model is restored by the guard.
            first = str(error).splitlines()[0] if str(error) else ""
            self.last_engine = "dense"
            self.last_engine_reason = (
                f"incremental was chosen ({choice.reason}) but raised "
                f"{type(error).__name__} during the sweep ({first}); ran dense"
            )
            plan.engines = {"dense": None}
            sweep = run_sweep(*sweep_args, plan=plan, **options)
        if choice.checked is not None or self.last_engine == "incremental":
            self._checked.add(measured)  # the whole self-check passed: later calls check less
        self._time_call(run, trial, timing, choice, sweep, began, repeats, xs[0].shape[0])
        if measured in self._engine_memo:
            self._engine_memo[run] = self._engine_memo[measured]
        return sweep

    def _time_call(
        self,
        run: Hashable,
        trial: Optional[CallTrial],
        timing: Optional[str],
        choice: EngineChoice,
        sweep: Any,
        began: float,
        repeats: float,
        examples: int,
    ) -> None:
        """Start, feed or end the trial of whole calls that settles a close race (#30).

        Once settled, :meth:`_remembered` answers with the engine the trial kept.
        """
        if trial is not None and timing is not None:
            trial.record(self.last_engine, time.perf_counter() - began, examples)
            self.last_engine_reason += f"; {timing} timed on a whole call after a close race"
        elif trial is not None and trial.verdict:
            self.last_engine_reason += f"; {trial.verdict}"
        elif choice.engine == "measure" and self.last_engine in ("dense", "incremental"):
            started = CallTrial.after_race(
                self.last_engine,
                getattr(sweep, "engine_margin", None),
                repeats * calls_ahead() - 1,
            )
            if started is not None:
                self._trials[run] = started

    def attribute_future(self) -> None:
        r"""Not implemented for TiledOcclusion, as for Captum's Occlusion.

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError("attribute_future is not implemented for TiledOcclusion")


def any_batch(key: Hashable) -> Hashable:
    """An engine key (:func:`engine_key`) without the batch size.

    The engine is decided per example shape, so a run's batches and a batch's groups share one
    decision (#30).
    """
    parts: Tuple[Any, ...] = tuple(key)  # type: ignore[arg-type]
    kind, threads, shapes, tiling, extra = parts
    per_example = tuple((s[1:], *rest) for s, *rest in shapes)
    return (f"{kind} per example", threads, per_example, tiling, extra)


def _scalar_inputs_flattened(
    forward_func: Callable[..., Tensor], scalar: List[int], count: int
) -> Callable[..., Tensor]:
    """``forward_func`` taking the inputs listed in ``scalar`` as ``(B, 1)`` instead of ``(B,)``."""
    if not scalar:
        return forward_func

    def forward(*args: Any) -> Tensor:
        return forward_func(
            *(a.squeeze(1) if j in scalar and j < count else a for j, a in enumerate(args))
        )

    return forward


def _failures_blamed_on_rows(
    forward_func: Callable[..., Tensor], extra: Tuple[Any, ...], n: int
) -> Callable[..., Tensor]:
    """``forward_func`` whose failures name a tensor argument whose rows are not the batch.

    Tensors of ``additional_forward_args`` with ``N`` rows are repeated with each copy of the
    batch; others (a mask, a weight) are passed as they are. A per-example tensor with the wrong
    number of rows is therefore passed unrepeated, and the model fails somewhere inside: say so.
    """
    odd = [
        (i, a)
        for i, a in enumerate(extra)
        if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] != n
    ]
    if not odd:
        return forward_func

    def forward(*args: Any) -> Tensor:
        try:
            return forward_func(*args)
        except Exception as error:
            i, a = odd[0]
            name = f"additional_forward_args[{i}]" if len(extra) > 1 else "additional_forward_args"
            raise ValueError(
                f"the forward function failed ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}) with {name} of shape "
                f"{tuple(a.shape)}: its first dimension {a.shape[0]} is not the batch size {n}, "
                "so it was passed unchanged instead of being repeated with each perturbed copy "
                "of the batch; a per-example tensor needs one row per example"
            ) from error

    # The same computation (only failures are reworded): what the incremental engine traces.
    forward.computes = forward_func  # type: ignore[attr-defined]
    return forward


def resolve_tiling(
    shapes: Sequence[Tuple[int, ...]], window: Optional[IntOrTuple], k: IntOrTuple
) -> List[TileGeometry]:
    """Turn the user's ``window`` and ``k`` into one validated tiling per input tensor.

    Args:
        shapes (sequence of tuple of int): Non-batch shape of each input tensor.
        window (int or tuple): As documented in :meth:`TiledOcclusion.attribute`.
        k (int or tuple): As documented in :meth:`TiledOcclusion.attribute`.

    Returns:
        list of TileGeometry: One per input tensor.
    """
    if window is None:
        raise TypeError("window is required: the occlusion window size, an int or a tuple")
    windows = _per_tensor(window, len(shapes), "window")
    ks = _per_tensor(k, len(shapes), "k")
    geometries = []
    for j, (shape, w_spec, k_spec) in enumerate(zip(shapes, windows, ks)):
        suffix = f"[{j}]" if len(shapes) > 1 else ""
        w = _per_dim(w_spec, shape, f"window{suffix}")
        w = tuple(min(wi, si) for wi, si in zip(w, shape))
        if isinstance(k_spec, tuple):
            kk = _per_dim(k_spec, shape, f"k{suffix}")
        else:
            k_int = check_int(k_spec, f"k{suffix}", minimum=1)
            kk = tuple(1 if wi >= si else k_int for wi, si in zip(w, shape))
        for i, (wi, ki) in enumerate(zip(w, kk)):
            if wi % ki:
                raise ValueError(
                    f"window{suffix}[{i}]={wi} (after clipping to the input size {shape[i]}) is "
                    f"not divisible by k{suffix}[{i}]={ki}: the stride window/k must be a whole "
                    "number"
                )
        if not shape:  # inputs of shape (N,): one window over the example's single value
            shape, w, kk = (1,), (1,), (1,)
        geometries.append(TileGeometry(shape, w, kk))
    return geometries


def _per_tensor(spec: Any, count: int, name: str) -> List[Any]:
    if count == 1:
        return [spec]
    if is_int(spec):
        return [spec] * count
    if isinstance(spec, tuple) and len(spec) == count:
        return list(spec)
    raise ValueError(
        f"{name}={spec!r} does not fit {count} input tensors: give an int for all of them, or a "
        f"tuple with one entry (int or tuple) per input tensor"
    )


def _per_dim(spec: Any, shape: Tuple[int, ...], name: str) -> Tuple[int, ...]:
    if is_int(spec):
        value = check_int(spec, name, minimum=1)
        return tuple(value for _ in shape)
    if not isinstance(spec, tuple):
        raise TypeError(f"{name}={spec!r} must be an int or a tuple of ints")
    if len(spec) != len(shape):
        raise ValueError(
            f"{name}={spec!r} has {len(spec)} entries but the input has {len(shape)} non-batch "
            f"dimensions {shape}: give one entry per non-batch dimension"
        )
    return tuple(check_int(v, f"{name}[{i}]", minimum=1) for i, v in enumerate(spec))


def _format_inputs(inputs: TensorOrTuple) -> Tuple[Tensor, ...]:
    xs = inputs if isinstance(inputs, tuple) else (inputs,)
    if len(xs) == 0:
        raise ValueError("inputs=() is empty: give a tensor or a tuple of tensors")
    for j, x in enumerate(xs):
        name = f"inputs[{j}]" if isinstance(inputs, tuple) else "inputs"
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
        if not 1 <= x.dim() <= 5:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}: TiledOcclusion needs a batch dimension and "
                "0 to 4 more dimensions"
            )
        if x.numel() == 0:
            raise ValueError(f"{name} has shape {tuple(x.shape)}: it is empty")
        if x.is_meta:
            raise ValueError(
                f"{name} is on the meta device, which holds shapes but no values: give a "
                "tensor with values (on the model's device)"
            )
        if x.shape[0] != xs[0].shape[0]:
            raise ValueError(
                f"{name} has batch size {x.shape[0]} but inputs[0] has {xs[0].shape[0]}: all "
                "input tensors must have the same batch size"
            )
    return tuple(x.detach() for x in xs)


def _format_baselines(baselines: Any, xs: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
    if baselines is None:
        baselines = 0
    if isinstance(baselines, tuple):
        if len(baselines) != len(xs):
            raise ValueError(
                f"baselines is a tuple of {len(baselines)} for {len(xs)} input tensors: give one "
                "baseline per input tensor, or one scalar for all"
            )
        specs = list(baselines)
    else:
        specs = [baselines] * len(xs)
    out = []
    for j, (b, x) in enumerate(zip(specs, xs)):
        name = f"baselines[{j}]" if len(xs) > 1 else "baselines"
        if isinstance(b, (int, float)) and not isinstance(b, bool):
            try:
                value = torch.tensor(b, dtype=torch.float64 if isinstance(b, float) else None)
            except (OverflowError, RuntimeError):
                raise ValueError(
                    f"{name}={b!r} cannot be represented in the input's dtype {x.dtype}"
                ) from None
            out.append(_exactly_in_dtype(value, x.dtype, name).to(x.device))
            continue
        if not isinstance(b, Tensor):
            raise TypeError(f"{name} must be a number or a Tensor, got {type(b).__name__}")
        try:
            shape = torch.broadcast_shapes(b.shape, x.shape)
        except RuntimeError:
            shape = None
        if shape != x.shape:
            raise ValueError(
                f"{name} has shape {tuple(b.shape)}, which does not broadcast to the input shape "
                f"{tuple(x.shape)}"
            )
        out.append(_exactly_in_dtype(b.detach(), x.dtype, name).to(x.device))
    return tuple(out)


def _exactly_in_dtype(b: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """``b`` converted to the input's ``dtype``, or a ValueError if that changes a value.

    Integer and bool inputs take only baselines they can hold exactly (``0.5`` on int64 or
    ``-1``/``300`` on uint8 raise); floating inputs round as usual but may not overflow to Inf.
    """
    converted = b.to(dtype)
    if dtype.is_floating_point or dtype.is_complex:
        bad = torch.isinf(converted) & torch.isfinite(b)
    else:
        bad = converted.to(b.dtype) != b
    if bool(bad.any()):
        value = b[bad][0].item() if b.dim() else b.item()
        rule = (
            f"integers in [{torch.iinfo(dtype).min}, {torch.iinfo(dtype).max}]"
            if dtype != torch.bool and not dtype.is_floating_point and not dtype.is_complex
            else ("0 or 1" if dtype == torch.bool else "finite values of that dtype")
        )
        raise ValueError(
            f"{name} holds {value!r}, which the input's dtype {dtype} cannot represent (it takes "
            f"{rule}); the value would change silently: give a baseline in that range, or "
            "convert the input to a floating dtype"
        )
    return converted


def _format_additional_args(args: Any) -> Tuple[Any, ...]:
    if args is None:
        return ()
    return args if isinstance(args, tuple) else (args,)


_STOCHASTIC_OR_BATCH = (
    torch.nn.modules.dropout._DropoutNd,
    torch.nn.modules.batchnorm._NormBase,
)


def _warn_if_training(forward_func: Callable[..., Any]) -> None:
    if isinstance(forward_func, torch.nn.Module) and any(
        m.training and isinstance(m, _STOCHASTIC_OR_BATCH) for m in forward_func.modules()
    ):
        warnings.warn(
            "the model is in training mode: dropout and batch statistics make occlusion "
            "differences noisy; call model.eval() first (buffers are restored afterwards)",
            stacklevel=5,
        )
