"""Large inputs within one copy of memory (#21): the paths that avoid whole-input tables.

Peak memory itself is a benchmark figure (``benchmarks/memory.py``); these tests check that the
memory-saving paths give the same results as the ones they replace.
"""

import pytest
import torch

from extra_attrib import TiledOcclusion, _engine
from extra_attrib._geometry import TileGeometry, accumulate, window_mask_rows, window_masks
from tests._reference import brute_force


@pytest.mark.parametrize(
    "shape,window,k",
    [((40,), (10,), (2,)), ((7, 9), (4, 6), (2, 3)), ((5, 6, 4), (5, 3, 4), (1, 3, 2))],
)
def test_mask_rows_equal_the_table_rows(shape, window, k):
    g = TileGeometry(shape, window, k)
    tables = window_masks(g, torch.device("cpu"))
    for dim, table in enumerate(tables):
        positions = [j for j in range(table.shape[0])][::-1] + [0, 0]
        rows = window_mask_rows(g, dim, positions, torch.device("cpu"))
        assert torch.equal(rows, table[positions])


def test_long_series_without_mask_tables_matches_brute_force(monkeypatch):
    # A dimension too long for the per-dimension mask table: each chunk fills its own rows.
    monkeypatch.setattr(_engine, "MASK_TABLE_BYTES", 0)
    built = []
    real = _engine.window_masks
    monkeypatch.setattr(_engine, "window_masks", lambda *a: built.append(1) or real(*a))
    torch.manual_seed(0)
    x = torch.randn(2, 4000, dtype=torch.float64)
    model = torch.nn.Linear(4000, 3).double().eval()
    got = TiledOcclusion(model).attribute(
        x, target=1, window=1000, k=2, perturbations_per_eval=3, engine="dense"
    )
    assert not built
    torch.testing.assert_close(got, brute_force(model, x, (1000,), (2,), 1))


def test_accumulate_divides_its_own_tensor_only():
    g = TileGeometry((6, 4), (2, 2), (1, 1))  # stride 2: the differences are repeated
    differences = torch.arange(6.0).reshape(1, 3, 2)
    kept = differences.clone()
    out = accumulate(differences, g)
    assert torch.equal(differences, kept)
    assert torch.equal(out[0, ::2, ::2], kept[0])
    g1 = TileGeometry((3, 2), (1, 1), (1, 1))  # stride 1, k 1: nothing to repeat
    out = accumulate(differences, g1)
    assert out is not differences and torch.equal(differences, kept)
