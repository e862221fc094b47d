"""Chunked, memory-bounded evaluation of occlusion perturbations.

The engine keeps a persistent batch buffer of ``B`` copies of each input. Each chunk of ``B``
perturbations is built with a fixed number of tensor operations, whatever ``B`` (see
:class:`DenseEvaluator`): either the previous windows are restored and the new ones filled with
the baseline by index (window-sized writes, for inputs much larger than a window), or every copy
is rewritten under a window mask with one ``torch.where`` (for windows that are a large part of
the input). Windows whose box already equals the baseline in every example cannot change the
output; they get a zero difference without a forward pass.

A model that writes into its input: an in-place write is seen through the buffer's version
counter and handled; a write that bypasses it (``x.data``, numpy) is caught by a check of every
copy once per input and the input is swept again, except a write that a later window of the
same copy happens to overwrite (:class:`DenseEvaluator` explains); such models should clone
their input.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from extra_attrib._geometry import (
    TileGeometry,
    accumulate,
    box_any,
    perturbation_boxes,
    window_mask_rows,
    window_masks,
    window_offsets,
    window_positions,
)
from extra_attrib._plan import (
    EngineRace,
    PrecomputedWindows,
    SweepPlan,
    engine_key,
    synchronize,
    trial_size,
)
from extra_attrib._targets import check_output, describe_score, resolve_targets, select

#: Memory the perturbation buffers may take, in bytes, when the chunk size is chosen automatically.
BUFFER_BUDGET_BYTES = 256 * 2**20
#: Rows per forward pass on accelerators when the chunk size is chosen automatically.
ACCELERATOR_ROWS = 64
#: Rows per forward pass tried, in this order, while tuning the chunk size on CPU. Not 1: for a
#: single row, PyTorch's CPU convolution leaves oneDNN for its native kernels wherever the
#: map is small (a 3x3 kernel, fewer than about 20k elements in the first dimensions), which
#: is every box of the incremental engine and the deep layers of a small input. Measured per
#: window, one thread: a 3D U-Net 3.5x slower at 1 row than at 2 on both engines, ResNet18 and
#: DenseNet121 at 64² 1.1-1.25x; one row was never the fastest (#20).
CPU_CANDIDATE_ROWS = (2, 4, 8, 16, 32)
#: Past :data:`CPU_CANDIDATE_ROWS`, tuning goes on doubling the rows while one pass holds at most
#: this many input elements: light inputs (tabular rows, short series) run fastest in large batches,
#: where the fixed cost of a forward pass is spread over many rows.
LIGHT_PASS_ELEMENTS = 2**20
#: Tuning stops at the first candidate this much slower per perturbation than the best so far.
TUNING_STOP = 1.15
#: Of the candidates within this factor of the fastest per perturbation, the largest is kept:
#: fewer forward passes and less host work per perturbation, and timings that close are noise.
PREFER_LARGER = 1.05
#: Timed chunks per candidate; the fastest counts.
TRIALS_PER_CANDIDATE = 2
#: A candidate is tried only if the sweep has at least this many times its trials' perturbations
#: left after them: on a short sweep, trials of a large size would be most of the work and could
#: not pay for themselves.
TRIAL_PAYBACK = 1
#: Flat window offsets of every window are tabulated once per input when the table takes at most
#: this many bytes and a quarter of the perturbation buffers; otherwise each chunk sums them from
#: per-dimension tables (a few more operations per chunk).
OFFSET_TABLE_BYTES = 64 * 2**20
#: Window mask tables of the rebuild mode (one bool per window position and element, per
#: dimension) are kept when they take at most this many bytes or a sixteenth of an example's
#: elements; longer dimensions get each chunk's rows filled by slices instead.
MASK_TABLE_BYTES = 2**20
#: Elements compared at once by :func:`changed_windows` (at least one example).
ROWS_COMPARED_ELEMENTS = 2**20
#: Build rule of :class:`DenseEvaluator`: a window's elements are written by index (gather +
#: scatter, for the restore and for the baseline) at about this many times the cost of one
#: element of a dense masked rebuild of the whole copy. Measured on one CPU thread: 1-4 ns per
#: element for both ``torch.where`` and ``scatter_``; GPUs are the same within a small factor.
PATCH_ELEMENT_COST = 4
#: On CPU, windows of at least this many elements (all examples together) are written with
#: one slice copy per slot instead: about 25 us of host work per perturbation, but a plain copy
#: is several times faster per element than a gather + scatter, which wins from here on.
SLICE_MIN_ELEMENTS = 8192


@dataclass
class SweepResult:
    """What a sweep returns.

    Attributes:
        attributions (list of Tensor): Per input, shape ``(T, N, *S)``.
        evaluations (int): Forward passes run, the unperturbed one included.
        perturbations (int): Perturbed copies evaluated.
        skipped (int): Windows skipped because they could not change the input.
        differences (list of Tensor, optional): With ``return_differences``, per input the
            score difference of every window, shape ``(T, N, J_1, ..., J_d)``; windows not
            evaluated hold ``score(x) - score(x)``. Otherwise None.
        targets (Tensor, optional): The flat target indices resolved on the unperturbed
            output, shape ``(N, T)``, as :func:`resolve_targets` gives them.
        engine (str): The engine that evaluated the sweep after any race (the plan's name).
        engine_reason (str): Why that engine: measured, remembered, or the only candidate.
        reused (int): Of the ``perturbations``, windows not evaluated by the sweep: their model
            outputs came with the plan (:attr:`SweepPlan.precomputed`, the self-check's).
        engine_margin (float, optional): Where engines raced in this sweep, the nearest
            loser's time per window over the winner's (:attr:`EngineRace.margin`); else None.
    """

    attributions: List[Tensor]
    evaluations: int
    perturbations: int
    skipped: int
    differences: Optional[List[Tensor]] = None
    targets: Optional[Tensor] = None
    engine: str = "dense"
    engine_reason: str = ""
    reused: int = 0
    engine_margin: Optional[float] = None


def memory_bound(inputs: Sequence[Tensor], budget: Optional[int] = None) -> int:
    """Most perturbed copies of the batch that fit the buffer budget (at least 1).

    A copy counts the batch of every input plus one byte per element of one example for the
    window mask a rebuilt chunk needs (see :class:`DenseEvaluator`). ``budget`` in bytes,
    default :data:`BUFFER_BUDGET_BYTES`.
    """
    limit = BUFFER_BUDGET_BYTES if budget is None else budget
    bytes_per_copy = sum(x.numel() * x.element_size() + x[0].numel() for x in inputs)
    return max(1, limit // max(bytes_per_copy, 1))


def _cpu_rows(inputs: Sequence[Tensor]) -> List[int]:
    """Rows per pass to try on CPU.

    :data:`CPU_CANDIDATE_ROWS`, then doublings while a pass holds at most
    :data:`LIGHT_PASS_ELEMENTS` input elements.
    """
    per_row = sum(math.prod(x.shape[1:]) for x in inputs)
    rows = list(CPU_CANDIDATE_ROWS)
    while rows[-1] * 2 * per_row <= LIGHT_PASS_ELEMENTS:
        rows.append(rows[-1] * 2)
    return rows


def without_single_tail(size: int, left: int, rows: int, capacity: int) -> int:
    """Windows of the next chunk: ``size``, or one more where that would leave one window.

    A last chunk of a single row (one window of a one-example batch) runs at PyTorch's slow
    single-row speed (see :data:`CPU_CANDIDATE_ROWS`), so it joins the chunk before it where
    ``capacity`` allows.

    Args:
        size (int): The planner's size for the next chunk.
        left (int): Windows not yet evaluated, this chunk's included.
        rows (int): Examples in the batch: rows per window.
        capacity (int): Most windows a chunk may hold.

    Returns:
        int: The size to run.
    """
    if rows == 1 and left - size == 1 and size < capacity:
        return size + 1
    return size


class ChunkPlanner:
    """Chooses how many perturbations go through the model per forward pass.

    A fixed ``chunk_size`` is used as given. Otherwise, on an accelerator, about
    :data:`ACCELERATOR_ROWS` rows per pass; on CPU, where the best batch depends on the model and
    the machine (per-example time often grows past 4-16 rows), the first chunks of the sweep try
    the candidates of :func:`_cpu_rows` in increasing order, :data:`TRIALS_PER_CANDIDATE` timed
    chunks each, until one is clearly slower (:data:`TUNING_STOP`) than the best so far, or its
    trials would leave less of the sweep than they take (:data:`TRIAL_PAYBACK`). The rest of the
    sweep uses the largest size within :data:`PREFER_LARGER` of the fastest per perturbation.
    Those chunks are real work, so tuning costs only their inefficiency. All sizes, a fixed one
    too, stay within :data:`BUFFER_BUDGET_BYTES` and the number of perturbations.

    A ``memo`` dict carries the choice over to later sweeps of the same ``key``: the first sweep
    tunes from the smallest candidate and stores its choice; later ones try only the candidates
    from half that choice up (the small ones are the slowest trials and the most host work),
    and store theirs.

    Args:
        inputs (sequence of Tensor): The inputs, each ``(N, *S)``.
        num_perturbations (int): Largest number of perturbations of any input.
        chunk_size (int, optional): A fixed size. Default: None (automatic).
        total (int, optional): Perturbations of the whole sweep, all inputs together.
            Default: None (``num_perturbations``).
        memo (dict, optional): Chosen sizes by ``key``, read and written. Default: None
        key (hashable, optional): This sweep's entry in ``memo``. Default: None
        budget (int, optional): Bytes the perturbation buffers may take. Default: None
            (:data:`BUFFER_BUDGET_BYTES`)
    """

    def __init__(
        self,
        inputs: Sequence[Tensor],
        num_perturbations: int,
        chunk_size: Optional[int] = None,
        total: Optional[int] = None,
        memo: Optional[Dict[Hashable, int]] = None,
        key: Hashable = None,
        budget: Optional[int] = None,
    ) -> None:
        n = inputs[0].shape[0]
        cap = max(1, min(memory_bound(inputs, budget), num_perturbations))
        if chunk_size is not None:
            # More slots than perturbations or than the budget allows would only hold memory.
            self.candidates = [min(chunk_size, cap)]
        elif inputs[0].device.type != "cpu":
            self.candidates = [min(max(ACCELERATOR_ROWS // n, 1), cap)]
        else:
            self.candidates = sorted({min(max(rows // n, 1), cap) for rows in _cpu_rows(inputs)})
            if memo is not None and key in memo:
                # Tuned before: start from half that choice. Timings on a shared CPU are noisy,
                # so later sweeps go on checking the neighbourhood, cheaply, rather than trust
                # one sweep's choice for ever.
                floor = min(memo[key], cap) // 2
                self.candidates = [c for c in self.candidates if c >= floor] or [cap]
        self.capacity = max(self.candidates)
        self._remaining = num_perturbations if total is None else total
        self._memo, self._key = (memo, key) if chunk_size is None else (None, None)
        self._timings: Dict[int, List[float]] = {}
        self._chosen: Optional[int] = self.candidates[0] if len(self.candidates) == 1 else None

    @property
    def tuning(self) -> bool:
        """Whether the next chunk is still a timed trial."""
        return self._chosen is None

    def next_size(self) -> int:
        """Size of the next chunk."""
        if self._chosen is not None:
            return self._chosen
        for size in self.candidates:
            trials_left = TRIALS_PER_CANDIDATE - len(self._timings.get(size, ()))
            if trials_left <= 0:
                continue
            if size not in self._timings and self._timings:
                # A new candidate: worth trying only if enough of the sweep is left to use it.
                trial = TRIALS_PER_CANDIDATE * size
                if self._remaining - trial < TRIAL_PAYBACK * trial:
                    self._settle()
                    return self.next_size()
            return size
        return self.candidates[-1]  # not reached: the last full trial settles the choice

    def seed(self, size: int, per_window: Sequence[float]) -> None:
        """Count chunks of ``size`` timed before this sweep's tuning (the engine race's) as trials.

        ``size`` joins the candidates, already timed: tuning does not run it again.
        """
        if self._chosen is not None or not per_window or size > self.capacity:
            return
        self.candidates = sorted(set(self.candidates) | {size})
        self._timings[size] = list(per_window)[:TRIALS_PER_CANDIDATE]
        if len(self._timings[size]) == TRIALS_PER_CANDIDATE and size == self.candidates[-1]:
            self._settle()

    def record(self, size: int, seconds: float, count: int) -> None:
        """Report a chunk: ``size`` slots ran ``count`` perturbations in ``seconds``."""
        self._remaining -= count
        if self._chosen is not None or count < size:
            return  # a short last chunk says little about its size
        self._timings.setdefault(size, []).append(seconds / count)
        if len(self._timings[size]) < TRIALS_PER_CANDIDATE:
            return
        # The fastest of a candidate's trials: a passing hiccup on a shared machine only ever
        # slows a trial down, so the minimum is the robust estimate.
        best = self._best()
        if best[size] > TUNING_STOP * min(best.values()) or size == self.candidates[-1]:
            self._settle()

    def _best(self) -> Dict[int, float]:
        """Per-perturbation time of every candidate whose trials are complete."""
        return {c: min(t) for c, t in self._timings.items() if len(t) == TRIALS_PER_CANDIDATE}

    def _settle(self) -> None:
        """End tuning: the largest candidate within :data:`PREFER_LARGER` of the fastest."""
        best = self._best()
        if not best:  # no complete trial (a short sweep): the smallest candidate, as tried
            self._chosen = self.candidates[0]
            return
        fastest = min(best.values())
        self._chosen = max(c for c, t in best.items() if t <= PREFER_LARGER * fastest)
        if self._memo is not None:
            self._memo[self._key] = self._chosen

    def expected_chunks(self, remaining: int) -> int:
        """Chunks still to come for ``remaining`` perturbations, if tuning ended now."""
        if self._chosen is not None:
            return math.ceil(remaining / self._chosen)
        best = {c: min(t) for c, t in self._timings.items()}
        return math.ceil(remaining / min(best, key=best.__getitem__, default=self.capacity))


def changed_windows(x: Tensor, baseline: Tensor, geometry: TileGeometry) -> Tensor:
    """Which windows would change at least one element of at least one example.

    Memory: the examples are compared a block of rows at a time and folded into one bool map
    over ``S`` ("differs in some example"); :func:`box_any` then reduces that map with ``int16``
    prefix sums one dimension at a time. The peak is about one float32 copy of one example
    (a few bool maps and one int16 map over ``S``) or three bytes per element of a block of
    :data:`ROWS_COMPARED_ELEMENTS`, whichever is larger, whatever ``N``.

    Args:
        x (Tensor): Input, shape ``(N, *S)``.
        baseline (Tensor): Baseline broadcastable to ``x``.
        geometry (TileGeometry): The tiling of ``S``.

    Returns:
        Tensor: Bool tensor of shape ``(J_1, ..., J_d)``.
    """
    n = x.shape[0]
    # Only a NaN in the baseline can meet a NaN in the input; without one, != is the answer.
    nan_baseline = (baseline.is_floating_point() or baseline.is_complex()) and bool(
        baseline.isnan().any()
    )
    baseline = baseline.expand_as(x)
    per_example = max(x[0].numel(), 1)
    rows = max(1, ROWS_COMPARED_ELEMENTS // per_example)
    differs = torch.zeros(x.shape[1:], dtype=torch.bool, device=x.device)
    for start in range(0, n, rows):
        xs, bs = x[start : start + rows], baseline[start : start + rows]
        block = xs != bs
        if nan_baseline:
            both_nan = xs.isnan()
            both_nan.logical_and_(bs.isnan())
            block.logical_and_(both_nan.logical_not_())  # NaN over NaN changes nothing
            del both_nan
        differs.logical_or_(block.any(dim=0))
        del block
    return box_any(differs, geometry)


def occlusion_sweep(
    forward_func: Callable[..., Tensor],
    inputs: Tuple[Tensor, ...],
    baselines: Tuple[Tensor, ...],
    geometries: Sequence[TileGeometry],
    targets: Sequence[Any],
    score_fn: Callable[[Tensor], Tensor],
    additional_forward_args: Tuple[Any, ...] = (),
    chunk_size: Optional[int] = None,
    skip_unchanged: bool = True,
    show_progress: bool = False,
    description: str = "TiledOcclusion attribution",
    windows: Optional[Sequence[Sequence[int]]] = None,
    return_differences: bool = False,
    evaluator: Optional[Callable[..., Any]] = None,
    chunk_memo: Optional[Dict[Hashable, int]] = None,
    plan: Optional[SweepPlan] = None,
) -> SweepResult:
    """Occlude every window of every input and average the score differences per element.

    Args:
        forward_func (callable): ``forward_func(*inputs, *additional_forward_args)``.
        inputs (tuple of Tensor): Each ``(N, *S_j)``, same ``N``.
        baselines (tuple of Tensor): One per input, broadcastable to it, same dtype and device.
        geometries (sequence of TileGeometry): One per input.
        targets (sequence): Target specifications; one attribution per target.
        score_fn (callable): Maps the model output to the scores that are differenced.
        additional_forward_args (tuple, optional): Extra positional arguments of the model;
            tensors with ``N`` rows are repeated for every copy of the batch. Default: ``()``.
        chunk_size (int, optional): Perturbations per forward pass. Default: automatic.
        skip_unchanged (bool, optional): Skip windows whose box equals the baseline.
            Default: True.
        show_progress (bool, optional): Show a progress bar over forward passes. Default: False.
        description (str, optional): Progress bar label.
        windows (sequence of sequence of int, optional): Per input, the flat indices of the
            only windows to evaluate (in increasing order); the others get no forward pass and
            count neither as perturbed nor as skipped. Default: None (every window).
        return_differences (bool, optional): Also return every window's score difference.
            Default: False
        evaluator (callable, optional): Builds the object that evaluates chunks, called like
            ``DenseEvaluator(forward_func, inputs, baselines, geometries,
            additional_forward_args, capacity)``; it must have ``evaluate`` and ``finish`` as
            described in :class:`DenseEvaluator`. Default: None (:class:`DenseEvaluator`)
        chunk_memo (dict, optional): Chunk sizes chosen by earlier sweeps, keyed by
            :func:`tuning_key`; read, and written when this sweep tunes. Default: None (tune
            afresh)
        plan (SweepPlan, optional): All of the above in one object (candidate engines, chunk
            size, windows, memos); ``chunk_size``, ``windows``, ``evaluator`` and
            ``chunk_memo`` given as arguments take precedence over its fields. With several
            candidate engines the first chunks time each and the sweep keeps the fastest
            (:class:`extra_attrib._plan.EngineRace`). Default: None (the arguments alone)

    Returns:
        SweepResult: Attributions per input of shape ``(T, N, *S_j)`` in the scores' dtype.
    """
    plan = _resolved_plan(plan, chunk_size, windows, evaluator, chunk_memo)
    windows, chunk_size = plan.windows, plan.chunk_size
    n = inputs[0].shape[0]
    checked = _matching_checks(plan, inputs, baselines, geometries, additional_forward_args)
    pre = checked[0] if checked else None
    with torch.no_grad():
        # ``score`` receives whatever the model returns (a dict for torchvision's segmentation
        # models); only the scores must be a tensor with one row per example. The self-check's
        # pass already gave the model's clean output of these very inputs: no second pass.
        if pre is not None and pre.clean is not None:
            raw = pre.clean
        else:
            raw = forward_func(*(x.clone() for x in inputs), *additional_forward_args)
        source = describe_score(score_fn)
        scored = check_output(score_fn(raw), n, source)
    index = resolve_targets(targets, scored, raw)
    base_scores = select(scored, index, 1)[0]
    acc_dtype = torch.promote_types(base_scores.dtype, torch.float32)
    base_scores = base_scores.to(acc_dtype)
    pick = _TargetPicker(index, acc_dtype)

    active = []
    for j, (x, b, geometry) in enumerate(zip(inputs, baselines, geometries)):
        if skip_unchanged:
            mask = changed_windows(x, b, geometry).flatten()
            active.append(mask.nonzero().squeeze(1).tolist())
        else:
            active.append(list(range(geometry.num_perturbations)))
        if windows is not None:
            wanted = set(windows[j])
            active[-1] = [i for i in active[-1] if i in wanted]
    # Windows whose model outputs came with the plan (the self-check's): scored, not evaluated.
    reused = _precomputed_scores(checked, active, score_fn, pick, n)
    for j, (windows_j, _) in reused.items():
        precomputed = set(windows_j)
        active[j] = [i for i in active[j] if i not in precomputed]
    busiest = max(len(a) for a in active)
    total = sum(len(a) for a in active)
    keys = {
        name: tuning_key(inputs, geometries, additional_forward_args, factory)
        for name, factory in plan.engines.items()
    }
    planners = {
        name: ChunkPlanner(
            inputs, max(busiest, 1), chunk_size, total, plan.chunk_memo, key, plan.memory_budget
        )
        for name, key in keys.items()
    }
    race = EngineRace(
        list(plan.engines),
        {
            name: trial_size(
                inputs, planners[name].capacity, total, plan.chunk_memo, keys[name], chunk_size
            )
            for name in plan.engines
        },
        plan.engine_memo,
        engine_key(inputs, geometries, additional_forward_args),
        # The self-check's batched pass through the model timed dense on this call's windows.
        {"dense": pre.timings["dense"]} if pre is not None and pre.timings else None,
    )
    planner = planners[race.next()[0]]
    # The engine whose chunk planner runs the sweep after the race (set when it settles: that
    # planner starts with the windows the race left).
    settled: Optional[str] = race.chosen
    requested = (
        sum(g.num_perturbations for g in geometries)
        if windows is None
        else sum(len(set(w)) for w in windows)
    )
    skipped = requested - total - sum(len(w) for w, _ in reused.values())

    # No bar object at all without progress: even a disabled tqdm costs host time per chunk.
    bar = (
        tqdm(total=1 + planner.expected_chunks(total), desc=description) if show_progress else None
    )
    if bar is not None:
        bar.update(1)
    evaluations, done = 1, 0
    runners: Dict[str, Any] = {}

    def runner_for(name: str) -> Any:
        if name not in runners:
            runners[name] = (plan.engines[name] or DenseEvaluator)(
                forward_func,
                inputs,
                baselines,
                geometries,
                additional_forward_args,
                planners[name].capacity,
            )
        return runners[name]

    try:
        attributions: List[Tensor] = [inputs[0]] * len(inputs)  # placeholders, all replaced
        differences: List[Tensor] = [inputs[0]] * len(inputs)
        # The input whose windows the self-check timed first: the race's trial chunks are that
        # input's (the first input may be one incremental runs densely, e.g. a vector).
        first = pre.index if pre is not None else 0
        for j in [first] + [i for i in range(len(inputs)) if i != first]:
            geometry, indices = geometries[j], active[j]
            if race.racing and len(indices) > 1:
                # Trial chunks of interior windows: the first windows in flat order lie on the
                # border, where the boxes are clipped and incremental is at its cheapest. Every
                # window is still evaluated once; only the order changes.
                middle = max(0, len(indices) // 2 - (race.next()[1] or 1) // 2)
                indices = indices[middle:] + indices[:middle]
            on_device = torch.tensor(indices, dtype=torch.long, device=inputs[j].device)
            while True:
                # A skipped window leaves the input as it is: its score is the unperturbed one
                # and its difference score(x) - score(x), which is 0, or NaN where the score
                # itself is not finite, as the forward pass gives. Layout (P, N, T): a chunk's
                # scores are one index_copy_, the differences one subtraction at the end.
                scores_all = base_scores.unsqueeze(0).repeat(geometry.num_perturbations, 1, 1)
                if j in reused:
                    windows_j, scores_j = reused[j]
                    scores_all[torch.tensor(windows_j, device=scores_all.device)] = scores_j
                start = 0
                while start < len(indices):
                    name, trial = race.next()
                    if trial is None and settled != name:  # the race has just settled
                        settled = name
                        # Tuning goes on with the race's chunks as trials of their size, from
                        # the smallest size (or half an earlier call's choice): a 3D U-Net is
                        # fastest at 2-4 windows per chunk, below the race's 8.
                        planner = planners[name] = ChunkPlanner(
                            inputs,
                            max(busiest, 1),
                            chunk_size,
                            total - done,
                            plan.chunk_memo,
                            keys[name],
                            plan.memory_budget,
                        )
                        planner.seed(race.trial_sizes[name], race.trial_timings(name))
                    size = planner.next_size() if trial is None else trial
                    # This input's last chunk, one window longer: nothing left to time it for.
                    tail = trial is None and size < without_single_tail(
                        size, len(indices) - start, n, planner.capacity
                    )
                    size += tail
                    chunk = indices[start : start + size]
                    where = on_device[start : start + size]  # a view: no host-device copy
                    timed = (race.racing or planner.tuning) and not tail
                    if race.racing:
                        synchronize(inputs[j].device)
                    began = time.perf_counter()
                    outputs = runner_for(name).evaluate(j, chunk, where)
                    scored = check_output(score_fn(outputs), len(chunk) * n, source)
                    scores_all.index_copy_(0, where, pick(scored, len(chunk)))
                    if timed:
                        synchronize(inputs[j].device)
                        seconds = time.perf_counter() - began
                        if race.racing:
                            race.record(name, size, seconds, len(chunk))
                        else:
                            planner.record(size, seconds, len(chunk))
                    start += len(chunk)
                    done += len(chunk)
                    evaluations += 1
                    if bar is not None:
                        bar.total = evaluations + planner.expected_chunks(total - done)
                        bar.update(1)
                # Every engine that ran restores its copies (and checks them): no short-circuit.
                intact = [runner.finish(j) for runner in list(runners.values())]
                if all(intact):
                    break
                # The model changed its input behind autograd's back (through ``.data`` or
                # numpy): the chunks of this input may have seen a corrupted copy. The
                # evaluator now rebuilds every copy before each chunk; sweep this input again.
                total += len(indices)
            diffs = base_scores - scores_all
            per_window = diffs.permute(1, 2, 0).reshape(n, index.shape[1], *geometry.grid)
            attributions[j] = accumulate(per_window, geometry).transpose(0, 1)
            if return_differences:
                differences[j] = per_window.transpose(0, 1)
    finally:
        if bar is not None:
            bar.close()
    chosen = race.chosen or race.next()[0]
    reason = race.reason or (
        "the only candidate" if len(plan.engines) == 1 else "the sweep ended during the race"
    )
    # Notes on every candidate (e.g. incremental's self-check), whichever won.
    note = "; ".join(plan.notes.values())
    scored_only = sum(len(w) for w, _ in reused.values())
    return SweepResult(
        attributions,
        evaluations,
        done + scored_only,
        skipped,
        differences if return_differences else None,
        index,
        chosen,
        f"{reason}; {note}" if note else reason,
        scored_only,
        race.margin,
    )


def _matching_checks(
    plan: SweepPlan,
    inputs: Tuple[Tensor, ...],
    baselines: Tuple[Tensor, ...],
    geometries: Sequence[TileGeometry],
    additional_forward_args: Tuple[Any, ...],
) -> List[PrecomputedWindows]:
    """The self-check's passes in ``plan`` (one per input it checked) that belong to this call.

    Only where the outputs belong to this sweep (same inputs, baselines and tilings, see
    :meth:`extra_attrib._plan.PrecomputedWindows.matches`).
    """
    given = plan.precomputed
    passes = [given] if isinstance(given, PrecomputedWindows) else list(given or ())
    return [p for p in passes if p.matches(inputs, baselines, geometries, additional_forward_args)]


def _precomputed_scores(
    checked: Sequence[PrecomputedWindows],
    active: List[List[int]],
    score_fn: Callable[[Any], Tensor],
    pick: _TargetPicker,
    n: int,
) -> Dict[int, Tuple[List[int], Tensor]]:
    """Per input, the checked windows this sweep would evaluate, and their scores.

    Only windows in ``active`` (not skipped as unchanged, among the windows asked for). Scores
    ``(R, N, T)`` go through ``score_fn`` and the target picker as an evaluated chunk's do.
    """
    found: Dict[int, Tuple[List[int], Tensor]] = {}
    for pre in checked:
        wanted = set(active[pre.index])
        rows = [w for w, window in enumerate(pre.windows) if window in wanted]
        if not rows or pre.index in found:
            continue
        with torch.no_grad():
            scored = check_output(
                score_fn(pre.outputs), len(pre.windows) * n, describe_score(score_fn)
            )
        picked = pick(scored, len(pre.windows))
        chosen = picked.index_select(0, torch.tensor(rows, device=picked.device))
        found[pre.index] = ([pre.windows[w] for w in rows], chosen)
    return found


def _resolved_plan(
    plan: Optional[SweepPlan],
    chunk_size: Optional[int],
    windows: Optional[Sequence[Sequence[int]]],
    evaluator: Optional[Callable[..., Any]],
    chunk_memo: Optional[Dict[Hashable, int]],
) -> SweepPlan:
    """The plan, with the arguments given one by one taking precedence over its fields."""
    plan = SweepPlan() if plan is None else dataclasses.replace(plan)
    if chunk_size is not None:
        plan.chunk_size = chunk_size
    if windows is not None:
        plan.windows = windows
    if evaluator is not None:
        plan.engines = {"custom": evaluator}
    if chunk_memo is not None:
        plan.chunk_memo = chunk_memo
    if not plan.engines:
        raise ValueError("plan.engines is empty: name at least one engine")
    return plan


class DenseEvaluator:
    """Model outputs for chunks of windows, from persistent batch buffers.

    The evaluator interface of :func:`occlusion_sweep` (an alternative evaluator, e.g. an
    incremental one, needs only these two methods):

    - ``evaluate(j, windows, windows_on_device) -> Tensor``: the model outputs, shape
      ``(R * N, ...)``, for the ``N`` examples with input ``j`` occluded at each of the ``R``
      flat window indices ``windows`` (also given as a long tensor on the input's device, so
      that no per-chunk host-device copy is needed), all other inputs unchanged; copy ``r`` of
      the batch is rows ``r * N`` to ``(r + 1) * N``.
    - ``finish(j) -> bool``: called after the last chunk of input ``j``; ``False`` asks the sweep
      to evaluate input ``j`` again (the earlier outputs cannot be trusted).

    This one keeps, per input, a buffer of ``size`` copies of the batch, each slot filled with
    a clean copy when a chunk first uses it. A chunk is built with
    a number of tensor operations that does not depend on its size (no Python loop over
    windows, no host-device synchronisation), in one of two ways chosen per input:

    - *patch*: each slot still holds its previous window; one gather + scatter restores those
      windows from the input and one writes the baseline into the new ones, with flat offsets
      looked up in a table of every window's offsets (made once from :func:`window_offsets`;
      summed per chunk instead where the table would be large, see
      :data:`OFFSET_TABLE_BYTES`). Data moved: about ``2 * N * prod(window)`` elements per
      perturbation; host work per chunk: about ten dispatched operations, the target scores'
      gather and copy included.
    - *rebuild*: one ``torch.where`` writes every copy from the input and the baseline under a
      window mask built from :func:`window_masks` (one row per dimension, outer AND). Data
      moved: ``N * prod(S)`` elements per perturbation.

    - *slices* (CPU, large windows): today's loop, per slot one slice copy restoring the previous
      box and one writing the new: about 12 host operations per perturbation, but plain copies.

    Cost rule: rebuild when ``PATCH_ELEMENT_COST * 2 * prod(window) >= prod(S)`` (the indexed
    writes would move about as much as the dense rebuild); otherwise, on CPU, slices when the
    windows of all examples hold at least :data:`SLICE_MIN_ELEMENTS` elements (copy volume
    dominates the host work), else patch. On accelerators host work is what costs, so never
    slices. The forward pass costs
    the same either way, so only the build costs are compared; the rule is a function of the
    shapes, so the choice (and the result, which is bit-identical either way) is repeatable.

    A model that writes into its input: an in-place operation bumps the buffer's version
    counter, seen after the forward pass; from then on every copy of every input is rebuilt
    before each chunk. A write that bypasses the counter (``x.data``, numpy) is caught by
    :meth:`finish`, which checks every copy against the input once per input; then the
    evaluator switches to rebuilding everything and asks for the input to be swept again. A
    write undone before the end of the input's sweep, e.g. overwritten by a later window,
    escapes that check: the rebuild mode is immune, the patch mode is not.

    Args:
        forward_func (callable): ``forward_func(*inputs, *additional_forward_args)``.
        inputs (tuple of Tensor): Each ``(N, *S_j)``.
        baselines (tuple of Tensor): One per input, broadcastable to it.
        geometries (sequence of TileGeometry): One per input.
        additional_forward_args (tuple): Extra arguments, repeated like the batch.
        size (int): Most windows per chunk.
    """

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        inputs: Tuple[Tensor, ...],
        baselines: Tuple[Tensor, ...],
        geometries: Sequence[TileGeometry],
        additional_forward_args: Tuple[Any, ...],
        size: int,
    ) -> None:
        self.forward_func = forward_func
        self.inputs = inputs
        self.geometries = list(geometries)
        self.fills = [b.expand_as(x) for x, b in zip(inputs, baselines)]
        self.args = additional_forward_args
        self.n = inputs[0].shape[0]
        # Slots are filled with clean copies when a chunk first needs them: a sweep whose
        # tuning stops early never pays for the copies it does not use.
        self.buffers = [x.new_empty(size, *x.shape) for x in inputs]
        self.used = 0  # slots filled so far
        self.rebuild_all = False
        self.modes = [build_mode(g, self.n, x.device) for g, x in zip(self.geometries, inputs)]
        self._boxes: List[List[Optional[Tuple[slice, ...]]]] = [[None] * size for _ in inputs]
        self._masks: Dict[int, List[Tensor]] = {}
        self._offsets: Dict[int, List[Tensor]] = {}
        self._flat_tables: Dict[int, Tuple[Tensor, Optional[Tensor]]] = {}
        self._dirty: List[Optional[Tensor]] = [None] * len(inputs)
        self._expanded: dict = {}
        self._views: Dict[int, _ChunkViews] = {}
        # Inputs and baselines over flattened S, for the patch mode's gathers: views unless an
        # input is not contiguous or a baseline is not viewable so (e.g. per channel), then one
        # copy each.
        self.flat_inputs = [x.reshape(1, self.n, -1) for x in inputs]
        self.flat_fills = [f.reshape(1, self.n, -1) for f in self.fills]

    def evaluate(self, j: int, windows: Sequence[int], windows_on_device: Tensor) -> Tensor:
        """Forward the copies of the batch with input ``j`` occluded at ``windows``."""
        reps = len(windows)
        if reps > self.used:
            for b, x in zip(self.buffers, self.inputs):
                b[self.used : reps].copy_(x.expand(reps - self.used, *x.shape))
            self.used = reps
        views = self._chunk_views(reps)
        if self.rebuild_all:
            for k, (slots, x) in enumerate(zip(views.slots, views.inputs)):
                if k != j:
                    slots.copy_(x)
        if self.rebuild_all or self.modes[j] == "rebuild":
            self._rebuild(j, window_positions(self.geometries[j], windows_on_device), views)
        elif self.modes[j] == "slices":
            self._slices(j, windows)
        else:
            self._patch(j, windows_on_device, views)
        batch = views.batch
        versions = [b._version for b in self.buffers]
        with torch.no_grad():
            outputs = self.forward_func(*batch, *self._args(reps))  # the sweep checks the scores
        if [b._version for b in self.buffers] != versions:
            # The model wrote into its input: from now on rebuild every copy before each chunk.
            self.rebuild_all = True
        return outputs

    def _chunk_views(self, reps: int) -> _ChunkViews:
        if reps not in self._views:
            self._views[reps] = _ChunkViews(self, reps)
        return self._views[reps]

    def _rebuild(self, j: int, positions: List[Tensor], views: _ChunkViews) -> None:
        geometry, device = self.geometries[j], self.inputs[j].device
        if j not in self._masks:
            # The per-dimension tables (J_i * s_i bytes) unless they would be a sizeable part of
            # one copy of the input (long series): then each chunk fills its own rows (#21).
            table_bytes = sum(n * s for n, s in zip(geometry.grid, geometry.shape))
            small = table_bytes <= max(MASK_TABLE_BYTES, math.prod(geometry.shape) // 16)
            self._masks[j] = window_masks(geometry, device) if small else []
        reps, d = positions[0].shape[0], len(positions)
        rows = []
        for i, pos in enumerate(positions):
            row = (
                self._masks[j][i].index_select(0, pos)
                if self._masks[j]
                else window_mask_rows(geometry, i, pos.tolist(), device)
            )
            rows.append(row.view(reps, 1, *([1] * i), row.shape[1], *([1] * (d - 1 - i))))
        mask = functools.reduce(operator.and_, rows)
        torch.where(mask, self.fills[j], self.inputs[j], out=views.slots[j])
        self._dirty[j] = None
        self._boxes[j] = [None] * len(self._boxes[j])

    def _patch(self, j: int, windows_on_device: Tensor, views: _ChunkViews) -> None:
        old = self._dirty[j]
        if old is not None:
            self._restore(j, old)
        new = self._flat_offsets(j, windows_on_device).expand(-1, self.n, -1)
        # A gather of the baseline and a scatter of that source: on CPU a scatter of a scalar
        # value measured over twice as slow per element as both together.
        views.flat_slots[j].scatter_(2, new, views.flat_fills[j].gather(2, new))
        self._dirty[j] = new

    def _flat_offsets(self, j: int, windows_on_device: Tensor) -> Tensor:
        """Flat offsets over ``S`` of the elements of each window, shape ``(R, 1, W)``.

        From a table of every window's offsets, made once per input (one lookup per chunk). A
        table may take at most :data:`OFFSET_TABLE_BYTES` and a quarter of the buffers; where the
        whole one would not fit, it covers only the dimensions with several window positions and
        the offsets of the dimensions every window spans alike (e.g. all channels) are added per
        chunk; where neither fits, the offsets are summed per chunk from the per-dimension tables
        of :func:`window_offsets`.
        """
        geometry = self.geometries[j]
        if j not in self._offsets:
            device = self.inputs[j].device
            self._offsets[j] = tables = window_offsets(geometry, device)
            limit = min(
                OFFSET_TABLE_BYTES, sum(b.numel() * b.element_size() for b in self.buffers) // 4
            )
            every = torch.arange(geometry.num_perturbations, device=device)
            if geometry.num_perturbations * math.prod(geometry.window) * 8 <= limit:
                # (P, 1, W): every window's offsets, one lookup per chunk
                self._flat_tables[j] = (_summed_offsets(tables, geometry, every), None)
            else:
                varying = [i for i, n in enumerate(geometry.grid) if n > 1]
                same = [i for i, n in enumerate(geometry.grid) if n == 1]
                width = math.prod(geometry.window[i] for i in varying)
                if same and geometry.num_perturbations * width * 8 <= limit:
                    # (P, 1, W_varying) and, for the alike dimensions, (1, 1, W_alike, 1)
                    self._flat_tables[j] = (
                        _summed_offsets(tables, geometry, every, varying),
                        _summed_offsets(tables, geometry, every[:1], same).unsqueeze(3),
                    )
        if j in self._flat_tables:
            table, common = self._flat_tables[j]
            rows = table.index_select(0, windows_on_device)
            if common is None:
                return rows
            return (common + rows.unsqueeze(2)).view(rows.shape[0], 1, -1)
        return _summed_offsets(self._offsets[j], geometry, windows_on_device)

    def _slices(self, j: int, windows: Sequence[int]) -> None:
        """Per slot, copy the input back into the previous box and the baseline into the new."""
        buf, x, fill, dirty = self.buffers[j], self.inputs[j], self.fills[j], self._boxes[j]
        for slot, box in enumerate(perturbation_boxes(self.geometries[j], windows)):
            old = dirty[slot]
            if old is not None:
                buf[(slot, slice(None)) + tuple(old)] = x[(slice(None),) + tuple(old)]
            buf[(slot, slice(None)) + tuple(box)] = fill[(slice(None),) + tuple(box)]
            dirty[slot] = box

    def _restore(self, j: int, old: Tensor) -> None:
        """Write the input back into the windows ``old`` (``(R, N, W)`` flat offsets)."""
        views = self._chunk_views(old.shape[0])
        views.flat_slots[j].scatter_(2, old, views.flat_inputs[j].gather(2, old))

    def finish(self, j: int) -> bool:
        """Restore input ``j``'s copies; check that the model left every copy intact."""
        buf, x = self.buffers[j], self.inputs[j]
        old = self._dirty[j]
        if old is not None:
            self._restore(j, old)
            self._dirty[j] = None
        elif self.modes[j] == "slices" and not self.rebuild_all:
            for slot, box in enumerate(self._boxes[j]):
                if box is not None:
                    buf[(slot, slice(None)) + tuple(box)] = x[(slice(None),) + tuple(box)]
        elif self.used:
            buf[: self.used].copy_(x.expand(self.used, *x.shape))
        if self.rebuild_all:
            return True  # every chunk was rebuilt from the inputs: nothing stale was used
        intact = True
        for b, x in zip(self.buffers, self.inputs):
            # Blocks of copies of about ROWS_COMPARED_ELEMENTS: few operations, bounded memory.
            step = max(1, ROWS_COMPARED_ELEMENTS // max(x.numel(), 1))
            for start in range(0, self.used, step):
                block = b[start : min(start + step, self.used)]
                intact = intact and _same(block, x.expand_as(block))
        if not intact:
            for b, x in zip(self.buffers, self.inputs):
                b[: self.used].copy_(x.expand(self.used, *x.shape))
            self.rebuild_all = True
        return intact

    def _args(self, reps: int) -> Tuple[Any, ...]:
        if reps not in self._expanded:
            self._expanded[reps] = tuple(_repeat_arg(a, reps, self.n) for a in self.args)
        return self._expanded[reps]


class _ChunkViews:
    """Views of an evaluator's buffers and sources for chunks of ``reps`` windows, made once."""

    def __init__(self, ev: DenseEvaluator, reps: int) -> None:
        n = ev.n
        self.slots = [b[:reps] for b in ev.buffers]
        self.batch = [b.view(reps * n, *b.shape[2:]) for b in self.slots]
        self.inputs = [x.expand(reps, *x.shape) for x in ev.inputs]
        self.flat_slots = [b.view(reps, n, -1) for b in self.slots]
        self.flat_inputs = [x.expand(reps, -1, -1) for x in ev.flat_inputs]
        self.flat_fills = [f.expand(reps, -1, -1) for f in ev.flat_fills]


class _TargetPicker:
    """The target scores of a chunk: ``(R * N, *O)`` scores to ``(R, N, T)`` in ``dtype``."""

    def __init__(self, index: Tensor, dtype: torch.dtype) -> None:
        self.index = index
        self.dtype = dtype
        self._expanded: Dict[int, Tensor] = {}

    def __call__(self, scored: Tensor, reps: int) -> Tensor:
        if reps not in self._expanded:
            n, t = self.index.shape
            self._expanded[reps] = self.index.unsqueeze(0).expand(reps, n, t)
        n = self.index.shape[0]
        return scored.reshape(reps, n, -1).gather(2, self._expanded[reps]).to(self.dtype)


def tuning_key(
    inputs: Sequence[Tensor],
    geometries: Sequence[TileGeometry],
    additional_forward_args: Tuple[Any, ...],
    evaluator: Optional[Callable[..., Any]],
) -> Hashable:
    """What a chunk size tuned for one sweep depends on, for :class:`ChunkPlanner`'s memo.

    The evaluator, the torch thread count, and per input the shape, dtype, device and tiling;
    the shapes and dtypes of tensor arguments.
    """
    kind = "dense" if evaluator is None else getattr(evaluator, "__qualname__", repr(evaluator))
    tensors = tuple(
        (tuple(x.shape), x.dtype, str(x.device), g.window, g.k) for x, g in zip(inputs, geometries)
    )
    args = tuple(
        (tuple(a.shape), a.dtype) if isinstance(a, Tensor) else type(a).__name__
        for a in additional_forward_args
    )
    return (kind, torch.get_num_threads(), tensors, args)


#: The evaluator's former name.
_Sweep = DenseEvaluator


def build_mode(geometry: TileGeometry, n: int = 1, device: Any = "cpu") -> str:
    """How :class:`DenseEvaluator` builds chunks of this tiling.

    One of ``"patch"``, ``"rebuild"`` or ``"slices"`` (see its cost rule).
    """
    window = math.prod(geometry.window)
    if PATCH_ELEMENT_COST * 2 * window >= math.prod(geometry.shape):
        return "rebuild"
    if torch.device(device).type == "cpu" and n * window >= SLICE_MIN_ELEMENTS:
        return "slices"
    return "patch"


def _summed_offsets(
    tables: List[Tensor],
    geometry: TileGeometry,
    flat: Tensor,
    dims: Optional[Sequence[int]] = None,
) -> Tensor:
    """Flat offsets ``(R, 1, W)`` of the windows ``flat``, from :func:`window_offsets`' tables.

    Only the dimensions ``dims`` (default: all) count: ``W`` is the product of their window
    sizes (1 for none). A dimension with a single window position adds its one row to every
    window: no lookup.
    """
    reps = flat.shape[0]
    dims = list(range(len(tables))) if dims is None else list(dims)
    positions = window_positions(geometry, flat)
    rows = []
    for i, dim in enumerate(dims):
        table = tables[dim]
        row = table if table.shape[0] == 1 else table.index_select(0, positions[dim])
        if len(dims) > 1:
            row = row.view(row.shape[0], *([1] * i), row.shape[1], *([1] * (len(dims) - 1 - i)))
        rows.append(row)
    if not rows:
        return flat.new_zeros(reps, 1, 1)
    total = functools.reduce(operator.add, rows)
    if total.shape[0] != reps:  # every dimension has a single position
        total = total.expand(reps, *total.shape[1:])
    return total.reshape(reps, 1, -1)


def _same(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors hold the same values, NaN equal to NaN."""
    if torch.equal(a, b):  # one pass, no temporaries: the usual answer
        return True
    differ = a != b
    if a.is_floating_point() or a.is_complex():
        differ.logical_and_(~(a.isnan() & b.isnan()))
    return not bool(differ.any())


def _repeat_arg(arg: Any, reps: int, n: int) -> Any:
    """Repeat a per-example tensor argument for ``reps`` copies of the batch."""
    if isinstance(arg, Tensor) and arg.dim() > 0 and arg.shape[0] == n:
        return arg.repeat(reps, *([1] * (arg.dim() - 1)))
    return arg
