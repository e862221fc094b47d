"""How many calls like this one are still to come: a hint from a caller that knows (#30).

A long run (``explain_dataset`` over a dataset, the groups of one large batch) makes many sweeps
with the same shapes, which share one engine decision. What trying the incremental engine costs
is paid once per run, while what it saves recurs in every sweep: the payback rule
(:func:`extra_attrib._incremental._sweep.choose_engine`) counts the savings of the sweeps still
to come, as far as the caller can say how many there are. The hint is a context variable, so it
reaches a :class:`~extra_attrib.TiledOcclusion` wrapped in ``NoiseTunnel`` or ``FusionGrad``.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

_CALLS_AHEAD: contextvars.ContextVar[float] = contextvars.ContextVar(
    "extra_attrib_calls_ahead", default=1.0
)


def calls_ahead() -> float:
    """Calls with these shapes still to come in the caller's run, this one included (>= 1)."""
    return _CALLS_AHEAD.get()


@contextlib.contextmanager
def expected_calls(calls: float) -> Iterator[None]:
    """Say that about ``calls`` calls like the next one (it included) are still to come.

    Args:
        calls (float): At least 1; a value below 1 counts as 1.
    """
    token = _CALLS_AHEAD.set(max(float(calls), 1.0))
    try:
        yield
    finally:
        _CALLS_AHEAD.reset(token)
