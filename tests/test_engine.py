import pytest
import torch

from extra_attrib._engine import (
    ChunkPlanner,
    changed_windows,
    occlusion_sweep,
)
from extra_attrib._geometry import TileGeometry, perturbation_boxes
from extra_attrib._targets import score_function
from tests._reference import brute_force
from tests.models import FlatLinear

GEOMETRIES = [
    TileGeometry((11,), (4,), (2,)),
    TileGeometry((3, 7, 5), (3, 3, 2), (1, 3, 2)),
    TileGeometry((2, 4, 5, 3), (1, 2, 4, 3), (1, 2, 2, 3)),
]


def _sweep(model, x, geometry, chunk, skip=True, targets=(1,), baseline=0.0):
    base = torch.tensor(baseline, dtype=x.dtype)
    return occlusion_sweep(
        model, (x,), (base,), [geometry], list(targets), score_function("raw"),
        chunk_size=chunk, skip_unchanged=skip,
    )


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{len(g.shape)}d")
def test_every_chunk_size_equals_brute_force(geometry):
    model = FlatLinear(geometry.shape)
    x = torch.randn(2, *geometry.shape, dtype=torch.float64)
    expected = brute_force(model, x, geometry.window, geometry.k, 1)
    p = geometry.num_perturbations
    for chunk in sorted({1, 2, 5, p - 1, p, p + 7} - {0}):
        result = _sweep(model, x, geometry, chunk)
        torch.testing.assert_close(result.attributions[0][0], expected, msg=f"chunk={chunk}")
        assert result.evaluations == 1 + -(-p // chunk)


def test_skip_path_equals_full_path():
    geometry = TileGeometry((1, 12, 12), (1, 4, 4), (1, 2, 2))
    model = FlatLinear(geometry.shape)
    x = torch.randn(3, *geometry.shape, dtype=torch.float64)
    x[:, :, :6, :] = 0.0  # a band that equals the baseline in every example
    x[0, 0, 7, 7] = float("nan")
    full = _sweep(model, x, geometry, 4, skip=False)
    skipped = _sweep(model, x, geometry, 4, skip=True)
    assert full.skipped == 0 and skipped.skipped > 0
    assert skipped.evaluations < full.evaluations
    torch.testing.assert_close(skipped.attributions[0], full.attributions[0], equal_nan=True)


def test_nan_baseline_over_nan_input_is_unchanged():
    geometry = TileGeometry((4,), (2,), (1,))
    x = torch.tensor([[float("nan"), float("nan"), 1.0, 2.0]])
    base = torch.tensor(float("nan"))
    assert changed_windows(x, base, geometry).tolist() == [False, True]


def test_changed_windows_matches_direct_check():
    geometry = TileGeometry((5, 6), (2, 4), (2, 2))
    x = (torch.rand(2, 5, 6) > 0.8).double()
    base = torch.zeros(())
    flags = changed_windows(x, base, geometry).flatten()
    boxes = perturbation_boxes(geometry, range(geometry.num_perturbations))
    for flag, box in zip(flags.tolist(), boxes):
        assert flag == bool((x[(slice(None), *box)] != 0).any())


def test_multi_target_sweep_is_one_sweep():
    geometry = TileGeometry((9,), (3,), (3,))
    model = FlatLinear(geometry.shape)
    x = torch.randn(2, 9, dtype=torch.float64)
    one = _sweep(model, x, geometry, 3, targets=(0,))
    three = _sweep(model, x, geometry, 3, targets=(0, 2, 3))
    assert one.evaluations == three.evaluations
    torch.testing.assert_close(three.attributions[0][0], one.attributions[0][0])
    torch.testing.assert_close(three.attributions[0][2], brute_force(model, x, (3,), (3,), 3))


def test_planner_candidates_respect_budget_and_count():
    small = torch.zeros(1, 3, 32, 32)
    assert ChunkPlanner([small], 1000).candidates == [1, 2, 4, 8, 16, 32]
    assert ChunkPlanner([small], 5).candidates == [1, 2, 4, 5]
    assert ChunkPlanner([torch.zeros(32, 3, 8, 8)], 1000).candidates == [1]
    huge = torch.zeros(1, 1, 400, 400, 400)  # 256 MB per copy
    assert ChunkPlanner([huge], 1000).candidates == [1]
    assert ChunkPlanner([small], 1000, chunk_size=7).candidates == [7]
    assert ChunkPlanner([small], 1000).capacity == 32


def test_planner_keeps_the_fastest_size_per_perturbation():
    planner = ChunkPlanner([torch.zeros(1, 3, 32, 32)], 1000)
    per_item = {1: 10.0, 2: 6.0, 4: 5.0, 8: 4.0, 16: 5.5}
    hiccup = {8: 9.0}  # the first trial at 8 is disturbed; the second one counts
    tried = []
    while planner.tuning:
        size = planner.next_size()
        tried.append(size)
        planner.record(size, hiccup.pop(size, per_item[size]) * size, size)
    assert tried == [1, 1, 2, 2, 4, 4, 8, 8, 16, 16]  # 16 was over 15 % slower: stop
    assert planner.next_size() == 8
    assert planner.expected_chunks(20) == 3


def test_tuned_sweep_equals_brute_force_and_counts_passes():
    geometry = TileGeometry((1, 10, 10), (1, 2, 2), (1, 2, 2))
    model = FlatLinear(geometry.shape)
    x = torch.randn(1, *geometry.shape, dtype=torch.float64)
    result = _sweep(model, x, geometry, None)
    torch.testing.assert_close(result.attributions[0][0], brute_force(model, x, (1, 2, 2),
                                                                      (1, 2, 2), 1))
    assert result.perturbations == geometry.num_perturbations
    assert 1 + geometry.num_perturbations // 32 <= result.evaluations <= geometry.num_perturbations
