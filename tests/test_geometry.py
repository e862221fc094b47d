import itertools
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from extra_attrib._geometry import (
    TileGeometry,
    accumulate,
    box_sums,
    perturbation_boxes,
    window_bounds,
)
from tests._reference import positions


@st.composite
def geometries(draw, max_dims=4):
    d = draw(st.integers(1, max_dims))
    shape, window, k = [], [], []
    for _ in range(d):
        s = draw(st.integers(1, 9 if d < 3 else 5))
        kk = draw(st.integers(1, 3))
        t = draw(st.integers(1, 3))
        w = kk * t
        if w > s:
            kk, w = 1, s
        shape.append(s)
        window.append(w)
        k.append(kk)
    return TileGeometry(tuple(shape), tuple(window), tuple(k))


def test_grid_counts_match_definition():
    g = TileGeometry((10,), (4,), (2,))
    assert g.stride == (2,)
    assert g.grid == (math.ceil(10 / 2) + 1,)
    lo, hi = window_bounds(g)[0]
    assert list(zip(lo, hi)) == [(0, 2), (0, 4), (2, 6), (4, 8), (6, 10), (8, 10)]


@given(geometries())
@settings(max_examples=60, deadline=None)
def test_bounds_equal_reference_and_cover_prod_k(g):
    for (lo, hi), s, w, k in zip(window_bounds(g), g.shape, g.window, g.k):
        assert list(zip(lo, hi)) == positions(s, w, k)
    count = torch.zeros(g.shape, dtype=torch.long)
    for box in perturbation_boxes(g, range(g.num_perturbations)):
        count[box] += 1
    assert bool((count == g.coverage).all())


def test_perturbation_boxes_are_row_major():
    g = TileGeometry((4, 6), (2, 2), (1, 2))
    boxes = perturbation_boxes(g, range(g.num_perturbations))
    per_dim = [list(zip(lo, hi)) for lo, hi in window_bounds(g)]
    expected = [tuple(slice(*b) for b in combo) for combo in itertools.product(*per_dim)]
    assert boxes == expected


@given(geometries(), st.integers(1, 3))
@settings(max_examples=60, deadline=None)
def test_accumulate_is_mean_over_covering_windows(g, lead):
    diffs = torch.randn(lead, *g.grid, dtype=torch.float64)
    total = torch.zeros(lead, *g.shape, dtype=torch.float64)
    for flat, box in enumerate(perturbation_boxes(g, range(g.num_perturbations))):
        total[(slice(None), *box)] += diffs.reshape(lead, -1)[:, flat].reshape(
            lead, *([1] * len(g.shape))
        )
    torch.testing.assert_close(accumulate(diffs, g), total / g.coverage)


@given(geometries())
@settings(max_examples=60, deadline=None)
def test_box_sums_equal_direct_sums(g):
    values = torch.randint(0, 3, (2, *g.shape))
    sums = box_sums(values, g).reshape(2, -1)
    for flat, box in enumerate(perturbation_boxes(g, range(g.num_perturbations))):
        assert torch.equal(sums[:, flat], values[(slice(None), *box)].reshape(2, -1).sum(1))
