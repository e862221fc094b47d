"""A close race settled by timing whole calls of a long run (#30).

The race of a sweep's first chunks (:class:`extra_attrib._plan.EngineRace`) ranks the engines
per window. Where the two come out close, the ranking can be wrong either way: a window of a
single example takes milliseconds, one slow chunk decides, and what an engine pays per call
besides its windows (incremental's clean pass through the traced program and its clean-output
check) is not in it. EfficientNet-Lite0 one image at a time raced within a few per cent and
chose dense, while whole calls ran 10 % faster incremental.

Where the race was within :data:`CLOSE_MARGIN` and the run has at least
:data:`MIN_CALLS_AFTER` calls with the same shapes still to come (``explain_dataset``, the
groups of a large batch), the next :data:`TRIAL_CALLS` calls alternate the engines, starting with
the one the race rejected, and are timed whole. The run then keeps the engine whose fastest call
took less time per example. The trial costs at most the race's margin on half of its calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

#: A race whose loser took less than this many times the winner's time per window is close.
CLOSE_MARGIN = 1.25

#: Calls the trial times, alternating the engines (half each).
TRIAL_CALLS = 4

#: Calls still to come, after the race's, for a trial to be worth it: most run the winner.
MIN_CALLS_AFTER = 3 * TRIAL_CALLS


@dataclass
class CallTrial:
    """Whole calls of each engine, timed to settle a close race.

    Attributes:
        raced (str): The engine the race chose.
        margin (float): The race's loser's time per window over the winner's (>= 1).
        pending (list of str): The engines of the calls still to time, in order.
        seconds (dict): Per engine, the seconds per example of its timed calls.
        verdict (str): Once every call is timed, why the run keeps the engine it keeps.
    """

    raced: str
    margin: float
    pending: List[str]
    seconds: Dict[str, List[float]] = field(default_factory=dict)
    verdict: str = ""

    @classmethod
    def after_race(
        cls, raced: str, margin: Optional[float], calls_after: float
    ) -> Optional[CallTrial]:
        """A trial where the race was close and enough calls are to come, else None.

        Args:
            raced (str): The race's winner, ``"dense"`` or ``"incremental"``.
            margin (float or None): The loser's time per window over the winner's; None where
                no race ran (one candidate, a remembered engine).
            calls_after (float): Calls with these shapes still to come after this one.

        Example::

            >>> CallTrial.after_race("dense", 1.04, 31).pending
            ['incremental', 'dense', 'incremental', 'dense']
            >>> CallTrial.after_race("dense", 1.9, 31) is None
            True
        """
        if margin is None or margin >= CLOSE_MARGIN or calls_after < MIN_CALLS_AFTER:
            return None
        other = "incremental" if raced == "dense" else "dense"
        return cls(raced, margin, [other, raced] * (TRIAL_CALLS // 2))

    @property
    def running(self) -> bool:
        """Whether calls remain to be timed."""
        return bool(self.pending)

    def next_engine(self) -> str:
        """The engine the next call runs: the trial's next, or the kept one once settled."""
        return self.pending[0] if self.pending else self.kept

    def record(self, engine: str, seconds: float, examples: int) -> None:
        """Report a timed call of ``engine`` (the one asked for, or dense where it fell back)."""
        if not self.pending:
            return
        asked = self.pending.pop(0)
        if engine == asked:
            self.seconds.setdefault(engine, []).append(seconds / max(examples, 1))
        if not self.pending:
            self._settle()

    @property
    def kept(self) -> str:
        """The engine the run keeps: the faster by whole calls, else the race's winner."""
        best = {e: min(t) for e, t in self.seconds.items() if t}
        if len(best) < 2:
            return self.raced
        return min(best, key=lambda e: (best[e], e != self.raced))

    def _settle(self) -> None:
        best = {e: min(t) for e, t in self.seconds.items() if t}
        if len(best) < 2:
            self.verdict = (
                f"the race's {self.raced} kept: the trial of whole calls did not time both engines"
            )
            return
        kept = self.kept
        other = next(e for e in best if e != kept)
        self.verdict = (
            f"timed on whole calls after a close race ({self.raced} by {self.margin:.2f}x per "
            f"window): {kept} took {best[kept] / best[other]:.2f}x the time of {other} per "
            f"example (fastest of {len(self.seconds[kept])} calls each)"
        )
