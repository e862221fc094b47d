"""Brute-force tiled occlusion, written straight from its definition.

The definition (the user guide, docs/guide/definition.md, states the same): an input ``x`` of
shape ``(N, s_1, ..., s_d)``, a window ``(w_1, ..., w_d)`` and a tiling ``(k_1, ..., k_d)`` with
``w_i % k_i == 0`` give the stride ``t_i = w_i / k_i``.

- Along dimension ``i`` a window starts at every multiple of ``t_i`` in ``[-(k_i - 1) t_i, s_i)``
  and covers ``[start, start + w_i)`` clipped to ``[0, s_i)``; the windows of the whole input are
  all products of one window per dimension. So there are ``ceil(s_i / t_i) + k_i - 1`` positions
  per dimension, and every element is covered by exactly ``prod(k)`` windows, at the borders too.
- ``attr(u) = mean over the windows W covering u of [score(x) - score(x with W set to the
  baseline)]``, where ``score`` is the model output (after an optional transform) at ``target``.

Consequences used by the tests: with ``k = 1`` this is Captum's ``Occlusion`` with
``sliding_window_shapes = strides = window``; away from the borders it equals Captum's
``Occlusion`` with ``strides = window / k``.

This module shares no code with the package: one forward pass per window, one call per example
batch, float64 accumulation.
"""

import itertools
import math

import torch


def positions(s, w, k):
    """Clipped [lo, hi) of every window along one dimension."""
    t = w // k
    out = []
    p = -(k - 1) * t
    while p < s:
        out.append((max(p, 0), min(p + w, s)))
        p += t
    return out


def brute_force(model, x, window, k, target, baseline=0.0, score=lambda o: o):
    """Mean over covering windows of score(x) - score(x with window set to baseline)."""
    shape = x.shape[1:]
    base = torch.as_tensor(baseline, dtype=x.dtype).expand_as(x)
    with torch.no_grad():
        ref = score(model(x))[:, target]
        total = torch.zeros_like(x, dtype=torch.float64)
        count = torch.zeros(shape, dtype=torch.long)
        per_dim = [positions(s, w, kk) for s, w, kk in zip(shape, window, k)]
        for box in itertools.product(*per_dim):
            region = (slice(None),) + tuple(slice(lo, hi) for lo, hi in box)
            occluded = x.clone()
            occluded[region] = base[region]
            diff = (ref - score(model(occluded))[:, target]).double()
            view = diff.reshape(-1, *([1] * len(shape)))
            total[region] += view
            count[region[1:]] += 1
    if not bool((count == math.prod(k)).all()):
        raise RuntimeError("definition violated: an element is not covered by prod(k) windows")
    return total / count
