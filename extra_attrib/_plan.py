"""The sweep's plan, and the choice of engine by measurement (#20).

A :class:`SweepPlan` says how :func:`extra_attrib._engine.occlusion_sweep` evaluates its windows:
the candidate engines, the chunk size, the windows, and what earlier sweeps learnt (chunk sizes,
engines). With several candidate engines, an :class:`EngineRace` times chunks of each on the
sweep's own windows, interleaved, and keeps the fastest for the rest of the sweep: a cost model
guesses, a measurement on this machine does not. Trial chunks are real work: their windows
count towards the map, so deciding costs only the trials' excess over the faster engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import torch

#: Timed chunks per engine in a race (interleaved); the fastest of each engine's counts.
RACE_TRIALS = 2
#: After the first chunk of each engine, a candidate this much slower than the fastest drops
#: out at once: a second trial of a clearly slower engine would only cost time.
RACE_DROP = 1.5
#: Rows (perturbed copies times examples) per trial chunk on CPU, when no chunk size was tuned
#: before for that engine; on accelerators the engine's usual rows per pass.
RACE_ROWS = 8
#: A trial chunk holds at most this fraction of the sweep's windows, so that the trials of a
#: slower engine cost a small part of the sweep.
RACE_SHARE = 1 / 16


@dataclass
class PrecomputedWindows:
    """Model outputs of some windows, computed before the sweep, that count towards the map.

    The incremental engine's self-check runs a few windows through the real model
    (:func:`extra_attrib._incremental.verify_incremental`); those outputs are the exact dense
    values of those windows (the model is the truth), so a sweep over the same batch, baseline
    and tiling scores them with its own ``score_fn`` and target picker and does not evaluate
    those windows again (#18, #20).

    Attributes:
        x (Tensor): The input ``(N, *S)``; a sweep reuses the outputs only when its first (and
            only) input is this very tensor, unchanged since (its version counter).
        fill (Tensor): Its baseline, as given (also matched by identity).
        geometry (TileGeometry): The tiling of ``x``.
        windows (list of int): Flat window indices, in the outputs' order.
        outputs (Tensor, dict or tuple): The model's outputs, ``len(windows) * N`` rows,
            window-major (copy ``w`` of the batch is rows ``w * N`` to ``(w + 1) * N``), as an
            evaluator's ``evaluate`` returns them.
        index (int): Which input of the sweep ``x`` is (several inputs, #20). Default: 0
        context (tuple): Every input and extra argument of the call the outputs were made in,
            matched by identity (the other inputs were clean in those windows). Default:
            ``(x,)``
        clean (Tensor, dict or tuple, optional): The model's output on ``x`` itself, from the
            same pass; the sweep uses it instead of a clean pass of its own. Default: None
        timings (dict, optional): Seconds per window of the engines that ran these windows
            (``"dense"``: the batched pass through the model, per copy), a measurement the
            engine race uses instead of dense trial chunks.
            Default: None
    """

    x: torch.Tensor
    fill: torch.Tensor
    geometry: Any
    windows: List[int]
    outputs: Any
    index: int = 0
    context: Tuple[Any, ...] = ()
    clean: Any = None
    timings: Optional[Dict[str, float]] = None
    #: Version counters of ``x`` and ``fill`` when the outputs were made: an in-place change
    #: since then makes them stale.
    versions: Tuple[int, int] = field(init=False)
    #: Version counters of the tensors of ``context``, likewise.
    context_versions: Tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.context:
            self.context = (self.x,)
        self.versions = (self.x._version, self.fill._version)
        self.context_versions = _versions(self.context)

    def matches(
        self,
        inputs: Sequence[torch.Tensor],
        baselines: Sequence[torch.Tensor],
        geometries: Sequence[Any],
        args: Sequence[Any],
    ) -> bool:
        """Whether these outputs belong to a sweep over ``inputs``, ``baselines``, ``geometries``.

        A drill-down's sub-batch, another call's tensors, tensors changed in place since, or a
        call with extra arguments do not.
        """
        j = self.index
        given = (*inputs, *args)
        return (
            len(given) == len(self.context)
            and all(a is b for a, b in zip(given, self.context))
            and inputs[j] is self.x
            and baselines[j] is self.fill
            and geometries[j] == self.geometry
            and (inputs[j]._version, baselines[j]._version) == self.versions
            and _versions(given) == self.context_versions
        )


def _versions(values: Sequence[Any]) -> Tuple[int, ...]:
    return tuple(v._version if isinstance(v, torch.Tensor) else -1 for v in values)


@dataclass
class SweepPlan:
    """How a sweep evaluates its windows.

    Attributes:
        engines (dict): Candidate engines by name, each an evaluator factory called like
            :class:`extra_attrib._engine.DenseEvaluator` (``None``: the dense engine). With
            one entry that engine runs; with several, the first chunks time each and the
            sweep keeps the fastest (see :class:`EngineRace`). Order matters for ties: the
            first listed wins them. Default: ``{"dense": None}``
        chunk_size (int, optional): Perturbations per forward pass. Default: None (tuned)
        windows (sequence of sequence of int, optional): Per input, the only windows to
            evaluate. Default: None (every window)
        chunk_memo (dict, optional): Chunk sizes tuned by earlier sweeps; read and written.
            Default: None
        engine_memo (dict, optional): Engines chosen by earlier races, by :func:`engine_key`;
            read and written. Default: None
        notes (dict): Per engine, words about it for the result's reason (e.g. what its
            self-check verified). Default: empty
        precomputed (PrecomputedWindows or sequence of them, optional): Model outputs of
            some windows of this sweep's inputs (one per input at most), scored instead of
            evaluated where they match the sweep (:meth:`PrecomputedWindows.matches`).
            Default: None
        memory_budget (int, optional): Bytes the perturbation buffers may take. Default:
            None (the engine's :data:`~extra_attrib._engine.BUFFER_BUDGET_BYTES`)
    """

    engines: Dict[str, Optional[Callable[..., Any]]] = field(
        default_factory=lambda: {"dense": None}
    )
    chunk_size: Optional[int] = None
    windows: Optional[Sequence[Sequence[int]]] = None
    chunk_memo: Optional[Dict[Hashable, int]] = None
    engine_memo: Optional[Dict[Hashable, str]] = None
    notes: Dict[str, str] = field(default_factory=dict)
    precomputed: Union[None, PrecomputedWindows, Sequence[PrecomputedWindows]] = None
    memory_budget: Optional[int] = None


def engine_key(
    inputs: Sequence[torch.Tensor], geometries: Sequence[Any], args: Sequence[Any]
) -> Hashable:
    """What the faster engine depends on: shapes, dtype, device, tiling, thread count.

    The model is the caller's (one memo per explainer object, as for chunk sizes).
    """
    shapes = tuple((tuple(x.shape), x.dtype, str(x.device)) for x in inputs)
    tiling = tuple((g.window, g.k) for g in geometries)
    extra = tuple(
        (tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args
    )
    return ("engine", torch.get_num_threads(), shapes, tiling, extra)


class EngineRace:
    """Times each candidate engine on the sweep's first chunks and keeps the fastest.

    Each engine runs :data:`RACE_TRIALS` chunks of its trial size, interleaved (a passing
    load on a shared machine hits both alike), and the fastest chunk per window counts. An
    engine :data:`RACE_DROP` times slower than the best after its first chunk drops out.
    The winner is stored in ``memo`` under ``key``; a later race with the same key starts
    settled (the measurement is remembered as the chunk size is).

    Args:
        names (sequence of str): Candidate engines, ties going to the first.
        trial_sizes (dict): Windows per trial chunk, by engine.
        memo (dict, optional): Earlier choices, read and written. Default: None
        key (hashable, optional): This sweep's entry in ``memo``. Default: None
        measured (dict, optional): Seconds per window of engines already timed on this
            call's windows outside the race; they run no trial chunks. The self-check's
            batched pass through the model times dense (its cost per window does not depend
            on where the window lies); incremental's check windows are mostly corners, whose
            boxes the borders clip, so incremental is always timed on trial chunks of
            interior windows. Default: None
    """

    def __init__(
        self,
        names: Sequence[str],
        trial_sizes: Dict[str, int],
        memo: Optional[Dict[Hashable, str]] = None,
        key: Hashable = None,
        measured: Optional[Dict[str, float]] = None,
    ) -> None:
        self.names = list(names)
        self.trial_sizes = trial_sizes
        self._memo, self._key = memo, key
        self.timings: Dict[str, List[float]] = {n: [] for n in self.names}
        self._order = [n for _ in range(RACE_TRIALS) for n in self.names]
        self.chosen: Optional[str] = None
        self.reason = ""
        #: Where the race ran: the slowest other engine's time per window over the winner's.
        self.margin: Optional[float] = None
        self._measured: set = set()
        if len(self.names) == 1:
            self.chosen = self.names[0]
        elif memo is not None and memo.get(key) in self.names:
            self.chosen = memo[key]
            self.reason = "the faster engine measured by an earlier call with these shapes"
        else:
            known = {n: t for n, t in (measured or {}).items() if n in self.names and t > 0}
            self._measured = set(known)
            for n, t in known.items():
                self.timings[n].append(t)
            self._order = [n for n in self._order if n not in known]
            if not self._order:
                self._settle({n: t[0] for n, t in self.timings.items() if t})

    @property
    def racing(self) -> bool:
        """Whether the next chunk is a timed trial."""
        return self.chosen is None

    def trial_timings(self, name: str) -> List[float]:
        """Seconds per window of ``name``'s trial chunks (of its trial size), fastest first.

        Empty for an engine timed on the self-check's pass instead of trial chunks.
        """
        return [] if name in self._measured else sorted(self.timings[name])

    def next(self) -> Tuple[str, Optional[int]]:
        """The engine of the next chunk and, during the race, its trial size (else None)."""
        if self.chosen is not None:
            return self.chosen, None
        name = self._order[0]
        return name, self.trial_sizes[name]

    def record(self, name: str, size: int, seconds: float, count: int) -> None:
        """Report a trial: ``size`` slots of ``name`` ran ``count`` windows in ``seconds``."""
        if self.chosen is not None:
            return
        if count == size:  # a short last chunk says little
            self.timings[name].append(seconds / count)
        self._order.pop(0)
        best = {n: min(t) for n, t in self.timings.items() if t}
        if len(best) == len(self.names):
            fastest = min(best.values())
            slow = [n for n in self._order if best[n] > RACE_DROP * fastest]
            self._order = [n for n in self._order if n not in slow]
            if slow and len(set(self._order)) == 1:  # the others dropped out: it has won
                self._order = []
        if not self._order:
            self._settle(best)

    def _settle(self, best: Dict[str, float]) -> None:
        if not best:
            self.chosen = self.names[0]
            self.reason = "no trial chunk completed"
            return
        chosen = next(n for n in self.names if n in best)
        for n in self.names:
            if n in best and best[n] < best[chosen]:
                chosen = n
        self.chosen = chosen
        losers = [best[n] / best[chosen] for n in self.names if n != chosen and n in best]
        self.margin = min(losers) if losers and best[chosen] > 0 else None
        others = ", ".join(
            f"{best[chosen] / best[n]:.2f}x the time of {n}" for n in self.names if n != chosen
        )
        trials = ", ".join(
            f"{n} on the self-check's pass"
            if n in self._measured
            else f"{len(self.timings[n])} of {self.trial_sizes[n]}"
            for n in self.names
        )
        self.reason = (
            f"measured on this sweep's windows: {chosen} took {others} per window "
            f"(timed chunks: {trials} windows)"
        )
        if self._memo is not None:
            self._memo[self._key] = chosen


def trial_size(
    inputs: Sequence[torch.Tensor],
    capacity: int,
    windows: int,
    memo: Optional[Dict[Hashable, int]],
    key: Hashable,
    fixed: Optional[int] = None,
) -> int:
    """Windows per trial chunk of one engine.

    A fixed chunk size as given; else the size tuned before for this engine, or
    :data:`RACE_ROWS` rows on CPU (the engine's usual rows on accelerators); at most
    :data:`RACE_SHARE` of the sweep's ``windows`` and the engine's ``capacity``.
    """
    if fixed is not None:
        size = fixed
    elif memo is not None and key in memo:
        size = memo[key]
    elif inputs[0].device.type == "cpu":
        size = max(1, RACE_ROWS // inputs[0].shape[0])
    else:
        size = capacity
    return max(1, min(size, capacity, int(windows * RACE_SHARE)))


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (timings on accelerators need it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":  # pragma: no cover - no such device here
        torch.mps.synchronize()
