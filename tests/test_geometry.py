import itertools
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from extra_attrib._geometry import (
    TileGeometry,
    accumulate,
    box_any,
    box_sums,
    perturbation_boxes,
    window_bounds,
    window_masks,
    window_offsets,
    window_positions,
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


@given(geometries())
@settings(max_examples=60, deadline=None)
def test_window_positions_unravel_row_major(g):
    flat = torch.arange(g.num_perturbations)
    positions = window_positions(g, flat)
    expected = list(itertools.product(*(range(n) for n in g.grid)))
    assert list(zip(*(p.tolist() for p in positions))) == expected


@given(geometries())
@settings(max_examples=60, deadline=None)
def test_window_masks_and_offsets_cover_exactly_the_box(g):
    masks = window_masks(g, torch.device("cpu"))
    offsets = window_offsets(g, torch.device("cpu"))
    flat = torch.arange(g.num_perturbations)
    positions = [p.tolist() for p in window_positions(g, flat)]
    boxes = perturbation_boxes(g, range(g.num_perturbations))
    for p, box in enumerate(boxes):
        expected = torch.zeros(g.shape, dtype=torch.bool)
        expected[box] = True
        mask = torch.ones(g.shape, dtype=torch.bool)
        total = torch.zeros(g.window, dtype=torch.long)
        for i, table in enumerate(offsets):
            view = [1] * len(g.shape)
            view[i] = g.shape[i]
            mask = mask & masks[i][positions[i][p]].reshape(view)
            row_view = [1] * len(g.shape)
            row_view[i] = g.window[i]
            total = total + table[positions[i][p]].reshape(row_view)
        assert torch.equal(mask, expected)
        hit = torch.zeros(math.prod(g.shape), dtype=torch.bool)
        hit[total.flatten()] = True
        assert torch.equal(hit.reshape(g.shape), expected)


@given(geometries())
@settings(max_examples=60, deadline=None)
def test_box_any_equals_box_sums(g):
    flags = torch.rand(g.shape) > 0.85
    assert torch.equal(box_any(flags, g), box_sums(flags.long(), g) > 0)
