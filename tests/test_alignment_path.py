"""The shortest path's cells (the stripe pairs the aligned distance matches) against brute force: every
monotone right/down path of small random grids enumerated, the cheapest one found by hand."""
from __future__ import annotations

from itertools import combinations

import pytest
import torch

from pipeline.alignment import shortest_path, shortest_path_cells


def all_monotone_paths(m: int, n: int):
    """Every path from (0, 0) to (m-1, n-1) moving down or right: choose which of the m+n-2 moves go down."""
    moves = m + n - 2
    for downs in combinations(range(moves), m - 1):
        i = j = 0
        cells = [(0, 0)]
        for k in range(moves):
            if k in downs:
                i += 1
            else:
                j += 1
            cells.append((i, j))
        yield cells


@pytest.mark.parametrize("m,n", [(1, 1), (1, 5), (5, 1), (2, 2), (3, 4), (4, 3), (5, 5), (6, 6)])
def test_path_cells_are_the_brute_force_cheapest_path(m: int, n: int) -> None:
    gen = torch.Generator().manual_seed(10 * m + n)
    for _ in range(5):
        d = torch.rand(m, n, generator=gen, dtype=torch.float64)
        paths = list(all_monotone_paths(m, n))
        costs = [sum(float(d[i, j]) for i, j in cells) for cells in paths]
        best = paths[min(range(len(paths)), key=costs.__getitem__)]   # unique: continuous random costs
        cells = shortest_path_cells(d)
        assert cells == best
        assert sum(float(d[i, j]) for i, j in cells) == pytest.approx(min(costs), rel=1e-12)
        assert sum(float(d[i, j]) for i, j in cells) == pytest.approx(shortest_path(d).item(), rel=1e-12)


def test_path_cells_follow_the_cheap_corridor_and_accept_float32() -> None:
    d = torch.full((4, 6), 10.0)
    d[0, :] = 1.0
    d[:, -1] = 1.0
    assert shortest_path_cells(d) == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (1, 5), (2, 5), (3, 5)]
    # Free diagonal, ties everywhere off it: the path runs through every diagonal cell, ties going up.
    assert shortest_path_cells(1 - torch.eye(3)) == [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2)]
    with pytest.raises(ValueError, match="one \\[m, n\\] grid"):
        shortest_path_cells(torch.zeros(2, 3, 3))
