"""Chunked, memory-bounded evaluation of occlusion perturbations.

The engine keeps a persistent batch buffer of ``B`` copies of each input. For every chunk of ``B``
perturbations it restores, in each slot, only the box the slot's previous window changed and writes
the baseline into the new window's box: window-sized writes instead of one full copy of the input
per perturbation. Windows whose box already equals the baseline in every example cannot change the
output; they get a zero difference without a forward pass.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from extra_attrib._geometry import TileGeometry, accumulate, box_sums, perturbation_boxes
from extra_attrib._targets import check_output, resolve_targets, select

#: Memory the perturbation buffers may take, in bytes, when the chunk size is chosen automatically.
BUFFER_BUDGET_BYTES = 256 * 2**20
#: Rows per forward pass on accelerators when the chunk size is chosen automatically.
ACCELERATOR_ROWS = 64
#: Rows per forward pass tried, in this order, while tuning the chunk size on CPU.
CPU_CANDIDATE_ROWS = (1, 2, 4, 8, 16, 32)
#: Tuning stops at the first candidate this much slower per perturbation than the best so far.
TUNING_STOP = 1.15
#: Timed chunks per candidate; the fastest counts.
TRIALS_PER_CANDIDATE = 2


@dataclass
class SweepResult:
    """What a sweep returns.

    Attributes:
        attributions (list of Tensor): Per input, shape ``(T, N, *S)``.
        evaluations (int): Forward passes run, the unperturbed one included.
        perturbations (int): Perturbed copies evaluated.
        skipped (int): Windows skipped because they could not change the input.
    """

    attributions: List[Tensor]
    evaluations: int
    perturbations: int
    skipped: int


def memory_bound(inputs: Sequence[Tensor]) -> int:
    """Most perturbed copies of the batch that fit the buffer budget (at least 1)."""
    bytes_per_copy = sum(x.numel() * x.element_size() for x in inputs)
    return max(1, BUFFER_BUDGET_BYTES // max(bytes_per_copy, 1))


class ChunkPlanner:
    """Chooses how many perturbations go through the model per forward pass.

    A fixed ``chunk_size`` is used as given. Otherwise, on an accelerator, about
    :data:`ACCELERATOR_ROWS` rows per pass; on CPU, where the best batch depends on the model and
    the machine (per-example time often grows past 4-16 rows), the first chunks of the sweep try
    :data:`CPU_CANDIDATE_ROWS` in turn, :data:`TRIALS_PER_CANDIDATE` timed chunks each, until
    one is clearly slower than the best so far; the rest of the sweep uses the fastest per
    perturbation. Those chunks are real work, so tuning costs only their inefficiency. All
    sizes stay within :data:`BUFFER_BUDGET_BYTES` and the number of perturbations.

    Args:
        inputs (sequence of Tensor): The inputs, each ``(N, *S)``.
        num_perturbations (int): Largest number of perturbations of any input.
        chunk_size (int, optional): A fixed size. Default: None (automatic).
    """

    def __init__(
        self, inputs: Sequence[Tensor], num_perturbations: int, chunk_size: Optional[int] = None
    ) -> None:
        n = inputs[0].shape[0]
        cap = max(1, min(memory_bound(inputs), num_perturbations))
        if chunk_size is not None:
            self.candidates = [chunk_size]
        elif inputs[0].device.type != "cpu":
            self.candidates = [min(max(ACCELERATOR_ROWS // n, 1), cap)]
        else:
            self.candidates = sorted({min(max(rows // n, 1), cap) for rows in CPU_CANDIDATE_ROWS})
        self.capacity = max(self.candidates)
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
            if len(self._timings.get(size, ())) < TRIALS_PER_CANDIDATE:
                return size
        return self.candidates[-1]  # not reached: the last full trial settles the choice

    def record(self, size: int, seconds: float, count: int) -> None:
        """Report that a trial chunk of ``size`` slots ran ``count`` perturbations in
        ``seconds``."""
        if self._chosen is not None or count < size:
            return  # a short last chunk says little about its size
        self._timings.setdefault(size, []).append(seconds / count)
        if len(self._timings[size]) < TRIALS_PER_CANDIDATE:
            return
        # The fastest of a candidate's trials: a passing hiccup on a shared machine only ever
        # slows a trial down, so the minimum is the robust estimate.
        best = {c: min(t) for c, t in self._timings.items() if len(t) == TRIALS_PER_CANDIDATE}
        winner = min(best, key=best.get)
        if best[size] > TUNING_STOP * best[winner] or size == self.candidates[-1]:
            self._chosen = winner

    def expected_chunks(self, remaining: int) -> int:
        """Chunks still to come for ``remaining`` perturbations, if tuning ended now."""
        if self._chosen is not None:
            return math.ceil(remaining / self._chosen)
        best = {c: min(t) for c, t in self._timings.items()}
        return math.ceil(remaining / min(best, key=best.get, default=self.capacity))


def changed_windows(x: Tensor, baseline: Tensor, geometry: TileGeometry) -> Tensor:
    """Which windows would change at least one element of at least one example.

    Args:
        x (Tensor): Input, shape ``(N, *S)``.
        baseline (Tensor): Baseline broadcastable to ``x``.
        geometry (TileGeometry): The tiling of ``S``.

    Returns:
        Tensor: Bool tensor of shape ``(J_1, ..., J_d)``.
    """
    same = (x == baseline) | (torch.isnan(x) & torch.isnan(baseline))
    differs = (~same).any(dim=0).to(torch.int64)
    return box_sums(differs, geometry) > 0


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
    evaluator: Optional[Callable[..., Any]] = None,
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
        evaluator (callable, optional): Builds the object that evaluates chunks, called like
            ``_Sweep(forward_func, inputs, baselines, additional_forward_args, capacity)``; its
            ``run(j, boxes)`` returns the model outputs of the chunk and ``reset(j)`` ends input
            ``j``. Default: None (the dense ``_Sweep``)

    Returns:
        SweepResult: Attributions per input of shape ``(T, N, *S_j)`` in the scores' dtype.
    """
    n = inputs[0].shape[0]
    with torch.no_grad():
        raw = check_output(
            forward_func(*(x.clone() for x in inputs), *additional_forward_args), n
        )
        scored = score_fn(raw)
        check_output(scored, n)
    index = resolve_targets(targets, scored, raw)
    base_scores = select(scored, index, 1)[0]
    acc_dtype = torch.promote_types(base_scores.dtype, torch.float32)
    base_scores = base_scores.to(acc_dtype)

    active = []
    for x, b, geometry in zip(inputs, baselines, geometries):
        if skip_unchanged:
            mask = changed_windows(x, b, geometry).flatten()
            active.append(mask.nonzero().squeeze(1).tolist())
        else:
            active.append(list(range(geometry.num_perturbations)))
    busiest = max(len(a) for a in active)
    planner = ChunkPlanner(inputs, max(busiest, 1), chunk_size)
    total = sum(len(a) for a in active)
    skipped = sum(g.num_perturbations for g in geometries) - total

    bar = tqdm(total=1 + planner.expected_chunks(total), desc=description,
               disable=not show_progress)
    bar.update(1)
    evaluations, done = 1, 0
    try:
        sweep = (evaluator or _Sweep)(
            forward_func, inputs, baselines, additional_forward_args, planner.capacity
        )
        attributions = []
        for j, (geometry, indices) in enumerate(zip(geometries, active)):
            # A skipped window leaves the input as it is: its difference is score(x) - score(x),
            # which is 0, or NaN where the score itself is not finite, as the forward pass gives.
            unchanged = (base_scores - base_scores).unsqueeze(-1)
            diffs = unchanged.repeat(1, 1, geometry.num_perturbations)
            on_device = torch.tensor(indices, dtype=torch.long, device=diffs.device)
            start = 0
            while start < len(indices):
                size = planner.next_size()
                chunk = indices[start : start + size]
                began = time.perf_counter()
                outputs = sweep.run(j, perturbation_boxes(geometry, chunk))
                scores = select(score_fn(outputs), index, len(chunk)).to(acc_dtype)
                where = on_device[start : start + size]  # a view: no host-device copy per chunk
                diffs.index_copy_(2, where, (base_scores - scores).permute(1, 2, 0))
                if planner.tuning:
                    planner.record(size, time.perf_counter() - began, len(chunk))
                start += len(chunk)
                done += len(chunk)
                evaluations += 1
                bar.total = evaluations + planner.expected_chunks(total - done)
                bar.update(1)
            sweep.reset(j)
            per_window = diffs.reshape(n, index.shape[1], *geometry.grid)
            attributions.append(accumulate(per_window, geometry).transpose(0, 1))
    finally:
        bar.close()
    return SweepResult(attributions, evaluations, total, skipped)


class _Sweep:
    """Persistent buffers of ``size`` copies of every input, perturbed window by window."""

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        inputs: Tuple[Tensor, ...],
        baselines: Tuple[Tensor, ...],
        additional_forward_args: Tuple[Any, ...],
        size: int,
    ) -> None:
        self.forward_func = forward_func
        self.inputs = inputs
        self.fills = [b.expand_as(x) for x, b in zip(inputs, baselines)]
        self.args = additional_forward_args
        self.n = inputs[0].shape[0]
        self.buffers = [x.unsqueeze(0).repeat(size, *([1] * x.dim())) for x in inputs]
        self.dirty: List[Optional[Tuple[slice, ...]]] = [None] * size
        self.refresh_all = False
        self._expanded: dict = {}

    def run(self, j: int, boxes: List[Tuple[slice, ...]]) -> Tensor:
        """Forward the copies of the batch with input ``j`` occluded at ``boxes``."""
        buf, x, fill = self.buffers[j], self.inputs[j], self.fills[j]
        reps = len(boxes)
        if self.refresh_all:
            self._restore_all(reps)
        for slot, box in enumerate(boxes):
            old = self.dirty[slot]
            if old is not None:
                buf[(slot, slice(None), *old)] = x[(slice(None), *old)]
            buf[(slot, slice(None), *box)] = fill[(slice(None), *box)]
            self.dirty[slot] = box
        batch = [b[:reps].reshape(reps * self.n, *b.shape[2:]) for b in self.buffers]
        versions = [b._version for b in self.buffers]
        with torch.no_grad():
            outputs = check_output(self.forward_func(*batch, *self._args(reps)), reps * self.n)
        if [b._version for b in self.buffers] != versions:
            # The model wrote into its input: from now on rebuild every copy before each chunk.
            self.refresh_all = True
        return outputs

    def _restore_all(self, reps: int) -> None:
        for buf, x in zip(self.buffers, self.inputs):
            buf[:reps].copy_(x.unsqueeze(0).expand(reps, *x.shape))
        self.dirty = [None] * len(self.dirty)

    def reset(self, j: int) -> None:
        """Restore input ``j``'s copies before the next input is swept."""
        buf, x = self.buffers[j], self.inputs[j]
        for slot, old in enumerate(self.dirty):
            if old is not None:
                buf[(slot, slice(None), *old)] = x[(slice(None), *old)]
        self.dirty = [None] * len(self.dirty)

    def _args(self, reps: int) -> Tuple[Any, ...]:
        if reps not in self._expanded:
            self._expanded[reps] = tuple(_repeat_arg(a, reps, self.n) for a in self.args)
        return self._expanded[reps]


def _repeat_arg(arg: Any, reps: int, n: int) -> Any:
    """Repeat a per-example tensor argument for ``reps`` copies of the batch."""
    if isinstance(arg, Tensor) and arg.dim() > 0 and arg.shape[0] == n:
        return arg.repeat(reps, *([1] * (arg.dim() - 1)))
    return arg
