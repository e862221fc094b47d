"""Brute-force tiled occlusion, written straight from the definition in DESIGN.md §1.

One forward pass per window, one example batch at a time, no shared code with the package.
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
    assert bool((count == math.prod(k)).all()), "definition violated: coverage is not prod(k)"
    return total / count
