"""Adaptive drill-down (``refine=``): pure functions, and the maps against a brute-force reference
written from the three rules of issue #12 (coarse pass, top cells, full value inside them)."""

import itertools
import math

import pytest
import torch
from captum.attr import NoiseTunnel, Occlusion
from hypothesis import given, settings
from hypothesis import strategies as st

from extra_attrib import FusionGrad, TiledOcclusion
from extra_attrib._drilldown import (
    cell_grid,
    coarse_windows,
    covering_windows,
    drilldown_sweep,
    select_cells,
)
from extra_attrib._geometry import TileGeometry, window_bounds
from extra_attrib._targets import score_function
from tests._reference import brute_force
from tests.models import FlatLinear, TwoInput

# ------------------------------------------------------------------------------------------------
# Brute-force reference from the rules
# ------------------------------------------------------------------------------------------------


def cells_of(shape, window):
    """Every coarse cell as a tuple of (lo, hi) per dimension, in row-major order."""
    per_dim = [[(lo, min(lo + w, s)) for lo in range(0, s, w)] for s, w in zip(shape, window)]
    return list(itertools.product(*per_dim))


def reference(model, x, window, k, targets, refine, refine_by="abs"):
    """Rules 1-3 with a per-example selection, union over targets; maps (T, N, *S)."""
    shape = x.shape[1:]
    ones = tuple(1 for _ in shape)
    fulls = [brute_force(model, x, window, k, t) for t in targets]
    coarses = [brute_force(model, x, window, ones, t) for t in targets]
    cells = cells_of(shape, window)
    count = math.ceil(round(refine * len(cells), 9))
    out = torch.stack(coarses).clone()
    for n in range(x.shape[0]):
        chosen = set()
        for coarse in coarses:
            keys = []
            for i, cell in enumerate(cells):
                v = float(coarse[(n,) + tuple(lo for lo, _ in cell)])
                v = abs(v) if refine_by == "abs" else max(v, 0.0)
                keys.append((-(math.inf if math.isnan(v) else v), i))
            chosen |= {i for _, i in sorted(keys)[:count]}
        for i in chosen:
            region = (n,) + tuple(slice(lo, hi) for lo, hi in cells[i])
            for t, full in enumerate(fulls):
                out[(t,) + region] = full[region]
    return out


CASES = [
    ((13,), (4,), (2,)),
    ((2, 9, 7), (1, 4, 3), (1, 2, 3)),
    ((1, 8, 8), (1, 4, 4), (1, 4, 2)),
    ((2, 3, 5, 4), (1, 2, 2, 4), (1, 2, 1, 2)),
]


# ------------------------------------------------------------------------------------------------
# Pure functions
# ------------------------------------------------------------------------------------------------


def test_coarse_windows_are_the_k1_positions():
    g = TileGeometry((10, 7), (4, 3), (2, 3))
    bounds = window_bounds(g)
    got = coarse_windows(g)
    starts = []
    for flat in got:
        j = divmod(flat, g.grid[1])
        starts.append((bounds[0][0][j[0]], bounds[1][0][j[1]]))
        # A coarse window is its cell: it starts on the grid of stride w and is not clipped at 0.
        assert bounds[0][1][j[0]] - bounds[0][0][j[0]] == min(4, 10 - bounds[0][0][j[0]])
    assert starts == [(a, b) for a in (0, 4, 8) for b in (0, 3, 6)]
    assert cell_grid(g) == (3, 3)


@given(s=st.integers(1, 20), w=st.integers(1, 8), k=st.integers(1, 4), data=st.data())
@settings(max_examples=60, deadline=None)
def test_covering_windows_equal_brute_force(s, w, k, data):
    w = min(w * k, s - s % k) if s >= k else None
    if not w:
        return
    g = TileGeometry((s,), (w,), (k,))
    cells = cell_grid(g)[0]
    sel = torch.tensor(data.draw(st.lists(st.booleans(), min_size=cells, max_size=cells)))
    got = covering_windows(sel, g).tolist()
    lo, hi = window_bounds(g)[0]
    for j in range(g.grid[0]):
        want = any(sel[u // w] for u in range(lo[j], hi[j]))
        assert got[j] == want


def test_select_cells_ties_and_nan():
    values = torch.tensor([[[1.0, -3.0, 3.0, float("nan"), 0.0, 2.0]]])  # (T=1, N=1, 6 cells)
    assert select_cells(values, 0.5, "abs", 1)[0].tolist() == [
        False,
        True,
        True,
        True,
        False,
        False,
    ]
    # Positive part: -3 ranks as 0 and ties with the 0 cell; the lower index wins.
    assert select_cells(values, 0.5, "positive", 1)[0].tolist() == [
        False,
        False,
        True,
        True,
        False,
        True,
    ]
    assert select_cells(values, 5 / 6, "positive", 1)[0].tolist() == [
        True,
        True,
        True,
        True,
        False,
        True,
    ]
    # 0.1 * 30 is 3 cells, not 4 (float representation).
    assert int(select_cells(torch.randn(1, 1, 30), 0.1, "abs", 1).sum()) == 3


def test_select_cells_union_over_targets():
    values = torch.tensor([[[5.0, 0.0, 1.0]], [[0.0, 0.0, 9.0]]])  # T=2, N=1
    assert select_cells(values, 0.2, "abs", 1)[0].tolist() == [True, False, True]


# ------------------------------------------------------------------------------------------------
# Maps against the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,window,k", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("refine", [0.2, 0.5])
@pytest.mark.parametrize("refine_by", ["abs", "positive"])
def test_refine_equals_reference(shape, window, k, refine, refine_by):
    model = FlatLinear(shape)
    x = torch.randn(3, *shape, dtype=torch.float64)
    tiled = TiledOcclusion(model)
    got = tiled.attribute(x, target=1, window=window, k=k, refine=refine, refine_by=refine_by)
    want = reference(model, x, window, k, [1], refine, refine_by)[0]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shape,window,k", CASES, ids=lambda c: str(c))
def test_refine_one_is_the_full_map(shape, window, k):
    model = FlatLinear(shape)
    x = torch.randn(2, *shape, dtype=torch.float64)
    tiled = TiledOcclusion(model)
    full = tiled.attribute(x, target=2, window=window, k=k, perturbations_per_eval=1)
    full_count = tiled.last_perturbations
    refined = tiled.attribute(x, target=2, window=window, k=k, perturbations_per_eval=1, refine=1.0)
    torch.testing.assert_close(refined, full, rtol=0, atol=1e-12)
    assert tiled.last_perturbations == full_count


def test_coarse_cells_equal_captum_occlusion_outside_selection():
    shape, window, k = (1, 12, 12), (1, 4, 4), (1, 2, 2)
    model = FlatLinear(shape)
    x = torch.randn(2, *shape, dtype=torch.float64)
    tiled = TiledOcclusion(model)
    got = tiled.attribute(x, target=0, window=window, k=k, refine=0.3)
    occ = Occlusion(model).attribute(x, target=0, sliding_window_shapes=window, strides=window)
    occ = occ.double()  # Captum returns float32
    full = tiled.attribute(x, target=0, window=window, k=k)
    is_coarse = torch.isclose(got, occ)
    is_full = torch.isclose(got, full)
    assert bool((is_coarse | is_full).all())
    # 3 of 9 cells refined per example: 3 * 16 elements take the full value.
    assert int((is_full & ~is_coarse).sum()) <= 2 * 3 * 16
    assert int((~is_full).sum()) > 0


@pytest.mark.parametrize("batch_mode", ["per_example", "union"])
def test_batch_modes_agree_with_reference_and_single_examples(batch_mode):
    shape, window, k = (2, 9, 7), (1, 4, 3), (1, 2, 3)
    model = FlatLinear(shape)
    x = torch.randn(4, *shape, dtype=torch.float64)
    base = torch.randn(4, *shape, dtype=torch.float64) * 0.1
    targets = [torch.tensor([0, 1, 2, 3]), 1]
    res = drilldown_sweep(
        model,
        (x,),
        (base,),
        [TileGeometry(shape, window, k)],
        targets,
        score_function("raw"),
        (),
        0.25,
        batch_mode=batch_mode,
    )
    tiled = TiledOcclusion(model)
    for e in range(4):
        single = tiled.attribute_multi(
            x[e : e + 1],
            [int(targets[0][e]), 1],
            window=window,
            k=k,
            baselines=base[e : e + 1],
            refine=0.25,
        )
        torch.testing.assert_close(res.attributions[0][:, e : e + 1], single)
    assert res.selected[0].shape == (4, 2, 3, 3)


class Counting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.model(x)


def test_per_example_runs_fewer_rows_than_the_union_for_the_same_maps():
    shape, window, k = (1, 12, 12), (1, 4, 4), (1, 2, 2)
    counting = Counting(FlatLinear(shape))
    x = torch.randn(4, *shape, dtype=torch.float64)
    args = (
        (x,),
        (torch.tensor(0.0, dtype=torch.float64),),
        [TileGeometry(shape, window, k)],
        [0],
        score_function("raw"),
        (),
        0.2,
    )
    rows, maps = {}, {}
    for mode in ("per_example", "union"):
        counting.rows = 0
        maps[mode] = drilldown_sweep(counting, *args, batch_mode=mode).attributions[0]
        rows[mode] = counting.rows
    torch.testing.assert_close(maps["per_example"], maps["union"])
    assert rows["per_example"] < rows["union"]
    with pytest.raises(ValueError, match="batch_mode='both'"):
        drilldown_sweep(counting, *args, batch_mode="both")


def test_attribute_multi_selects_the_union_over_targets():
    shape, window, k = (1, 8, 8), (1, 4, 4), (1, 4, 2)
    model = FlatLinear(shape)
    x = torch.randn(2, *shape, dtype=torch.float64)
    tiled = TiledOcclusion(model)
    got = tiled.attribute_multi(x, [0, 3], window=window, k=k, refine=0.25)
    want = reference(model, x, window, k, [0, 3], 0.25)
    torch.testing.assert_close(got, want)
    # Each target's map is at least as refined as its own attribute() call.
    for i, t in enumerate([0, 3]):
        own = tiled.attribute(x, target=t, window=window, k=k, refine=0.25)
        full = tiled.attribute(x, target=t, window=window, k=k)
        own_full = torch.isclose(own, full)
        assert bool(torch.isclose(got[i], full)[own_full].all())


def test_tuple_inputs_and_additional_args():
    shape_a, shape_b = (1, 6, 6), (8,)
    model = TwoInput(shape_a, shape_b).double()
    xa = torch.randn(3, *shape_a, dtype=torch.float64)
    xb = torch.randn(3, *shape_b, dtype=torch.float64)
    scale = torch.tensor([[1.0], [2.0], [0.5]], dtype=torch.float64)
    tiled = TiledOcclusion(model)
    ga, gb = tiled.attribute(
        (xa, xb),
        target=1,
        window=((1, 2, 2), 4),
        k=((1, 2, 2), 2),
        additional_forward_args=(scale,),
        refine=0.4,
    )
    wrapped_a = lambda a: model(a, xb, scale)  # noqa: E731
    wrapped_b = lambda b: model(xa, b, scale)  # noqa: E731
    torch.testing.assert_close(ga, reference(wrapped_a, xa, (1, 2, 2), (1, 2, 2), [1], 0.4)[0])
    torch.testing.assert_close(gb, reference(wrapped_b, xb, (4,), (2,), [1], 0.4)[0])


def test_counts_report_what_ran():
    shape, window, k = (1, 16, 16), (1, 8, 8), (1, 4, 4)
    model = FlatLinear(shape)
    x = torch.randn(1, *shape, dtype=torch.float64)
    tiled = TiledOcclusion(model)
    tiled.attribute(x, target=0, window=window, k=k, perturbations_per_eval=1)
    full = tiled.last_perturbations
    tiled.attribute(x, target=0, window=window, k=k, perturbations_per_eval=1, refine=0.25)
    # 11x11 windows; 4 coarse cells, 1 refined: its 7x7 covering windows (one coarse) + 4 coarse.
    assert full == 11 * 11
    assert tiled.last_perturbations == 4 + (7 * 7 - 1)
    assert tiled.last_evaluations == 1 + 4 + 1 + (7 * 7 - 1)


def test_unchanged_windows_and_nan_scores():
    shape, window, k = (1, 8, 8), (1, 4, 4), (1, 2, 2)
    model = FlatLinear(shape)
    x = torch.randn(2, *shape, dtype=torch.float64)
    x[:, :, :4, :] = 0.0  # the top cells equal the baseline: coarse difference 0
    tiled = TiledOcclusion(model)
    got = tiled.attribute(x, target=0, window=window, k=k, refine=0.5)
    torch.testing.assert_close(got, reference(model, x, window, k, [0], 0.5)[0])
    assert tiled.last_skipped > 0


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), "0.5", True])
def test_bad_refine(bad):
    tiled = TiledOcclusion(FlatLinear((8,)))
    x = torch.randn(1, 8, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match="refine="):
        tiled.attribute(x, target=0, window=4, k=2, refine=bad)


def test_bad_refine_by():
    tiled = TiledOcclusion(FlatLinear((8,)))
    x = torch.randn(1, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="refine_by='max'"):
        tiled.attribute(x, target=0, window=4, k=2, refine=0.5, refine_by="max")


# ------------------------------------------------------------------------------------------------
# Composition
# ------------------------------------------------------------------------------------------------


class Recording(torch.nn.Module):
    """Keeps the first batch it sees: the unperturbed inputs of the coarse pass."""

    def __init__(self, model):
        super().__init__()
        self.model, self.first = model, None

    def forward(self, x):
        if self.first is None:
            self.first = x.clone()
        return self.model(x)


def test_noise_tunnel_is_the_mean_of_refined_maps():
    shape, window, k = (1, 8, 8), (1, 4, 4), (1, 2, 2)
    model = FlatLinear(shape)
    x = torch.randn(2, *shape, dtype=torch.float64)
    recording = Recording(model)
    got = NoiseTunnel(TiledOcclusion(recording)).attribute(
        x, nt_type="smoothgrad", nt_samples=3, stdevs=0.2, target=1, window=window, k=k, refine=0.3
    )
    noisy = recording.first
    assert noisy.shape == (6, *shape) and not torch.equal(noisy[0], noisy[1])
    maps = reference(model, noisy, window, k, [1], 0.3)[0]
    torch.testing.assert_close(got, maps.reshape(2, 3, *shape).mean(1))


def test_fusion_grad_wraps_refined_occlusion():
    shape, window, k = (1, 8, 8), (1, 4, 4), (1, 2, 2)
    model = FlatLinear(shape)
    x = torch.randn(2, *shape, dtype=torch.float64)
    fg = FusionGrad(TiledOcclusion(model))
    torch.manual_seed(5)
    refined = fg.attribute(x, target=1, n=2, m=2, window=window, k=k, refine=0.3)
    torch.manual_seed(5)
    full = fg.attribute(x, target=1, n=2, m=2, window=window, k=k)
    torch.manual_seed(5)
    one = fg.attribute(x, target=1, n=2, m=2, window=window, k=k, refine=1.0)
    assert refined.shape == x.shape and torch.isfinite(refined).all()
    torch.testing.assert_close(one, full)
    assert not torch.allclose(refined, full)
