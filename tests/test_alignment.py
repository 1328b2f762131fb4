"""Shortest path and aligned local distance against brute-force references (the textbook cell-by-cell
recurrence and per-pair loops), for square and non-square grids, with and without autograd, and
gradchecks in float64."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pipeline.alignment import local_distance, paired_local_distance, shortest_path

SHAPES = [(1, 1), (1, 6), (6, 1), (3, 7), (7, 3), (5, 5), (8, 8)]


def brute_shortest_path(d: torch.Tensor) -> float:
    """S(0,0)=d00; S(i,0)=S(i-1,0)+di0; S(0,j)=S(0,j-1)+d0j; S(i,j)=min(S(i-1,j), S(i,j-1))+dij."""
    m, n = d.shape
    s = [[0.0] * n for _ in range(m)]
    for i in range(m):
        for j in range(n):
            cell = float(d[i, j])
            if i == 0 and j == 0:
                s[i][j] = cell
            elif i == 0:
                s[i][j] = s[i][j - 1] + cell
            elif j == 0:
                s[i][j] = s[i - 1][j] + cell
            else:
                s[i][j] = min(s[i - 1][j], s[i][j - 1]) + cell
    return s[-1][-1]


def brute_local_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = torch.empty(len(x), len(y), dtype=torch.float64)
    for a in range(len(x)):
        for b in range(len(y)):
            euclid = (x[a, :, None, :] - y[b, None, :, :]).double().pow(2).sum(-1).sqrt()
            element = (euclid.exp() - 1) / (euclid.exp() + 1)        # the paper's formula, literally
            out[a, b] = brute_shortest_path(element)
    return out


@pytest.mark.parametrize("m,n", SHAPES)
def test_shortest_path_matches_brute_force(m: int, n: int) -> None:
    gen = torch.Generator().manual_seed(m * 100 + n)
    d = torch.rand(3, 4, m, n, generator=gen, dtype=torch.float64)
    expected = torch.tensor([[brute_shortest_path(g) for g in row] for row in d], dtype=torch.float64)
    torch.testing.assert_close(shortest_path(d), expected, rtol=1e-12, atol=1e-12)        # in-place path
    torch.testing.assert_close(shortest_path(d.clone().requires_grad_()), expected, rtol=1e-12, atol=1e-12)
    # A non-contiguous view of the grid gives the same answer.
    transposed = d.transpose(-1, -2).contiguous().transpose(-1, -2)
    torch.testing.assert_close(shortest_path(transposed), expected, rtol=1e-12, atol=1e-12)


def test_shortest_path_picks_the_cheap_corridor() -> None:
    # Only the first row and the last column are cheap: the path must go right, then down.
    d = torch.full((4, 6), 10.0)
    d[0, :] = 1.0
    d[:, -1] = 1.0
    assert shortest_path(d).item() == pytest.approx(9.0)
    # Its gradient marks exactly the cells of the path.
    g = d.clone().requires_grad_()
    shortest_path(g).backward()
    path = torch.zeros(4, 6)
    path[0, :] = 1.0
    path[:, -1] = 1.0
    torch.testing.assert_close(g.grad, path)


@pytest.mark.parametrize("m,n", [(3, 5), (5, 3), (4, 4), (1, 4)])
def test_shortest_path_gradcheck(m: int, n: int) -> None:
    gen = torch.Generator().manual_seed(7)
    d = torch.rand(2, m, n, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(shortest_path, (d,))


@pytest.mark.parametrize("m,n", [(4, 6), (6, 4), (5, 5), (1, 3)])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_local_distance_matches_brute_force(m: int, n: int, chunk_size: int | None) -> None:
    gen = torch.Generator().manual_seed(m * 10 + n)
    x = torch.randn(5, m, 16, generator=gen, dtype=torch.float64)
    y = torch.randn(9, n, 16, generator=gen, dtype=torch.float64)
    expected = brute_local_distance(x, y)
    torch.testing.assert_close(local_distance(x, y, chunk_size=chunk_size), expected, rtol=1e-9, atol=1e-9)
    got = local_distance(x.clone().requires_grad_(), y, chunk_size=chunk_size)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("m,n", [(8, 8), (3, 7), (7, 3), (1, 5), (6, 1)])
@pytest.mark.parametrize("chunk_size", [1, 7, 12, 40, None])
def test_local_distance_blocks_match_brute_force(m: int, n: int, chunk_size: int | None) -> None:
    """Ragged tilings (tiles of unequal size, one-row and one-column tiles, a single tile) and both
    orientations (m > n is computed transposed) give the brute-force answer, with and without autograd."""
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + (chunk_size or 0))
    x = torch.randn(11, m, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(13, n, 6, generator=gen, dtype=torch.float64)
    expected = brute_local_distance(x, y)
    torch.testing.assert_close(local_distance(x, y, chunk_size=chunk_size), expected, rtol=1e-9, atol=1e-9)
    swapped = local_distance(y, x, chunk_size=chunk_size)
    torch.testing.assert_close(swapped, expected.t(), rtol=1e-9, atol=1e-9)
    got = local_distance(x, y.clone().requires_grad_(), chunk_size=chunk_size)
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), expected, rtol=1e-9, atol=1e-9)


def test_local_distance_threads_and_views() -> None:
    """Same answer with one and with several threads (blocks are then spread over worker threads),
    for non-contiguous inputs; the caller's thread count is restored afterwards."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(23, 128, 5, generator=gen).relu().transpose(1, 2)    # [23, 5, 128], strided
    y = torch.randn(31, 7, 128, generator=gen).relu()[::2]                 # [16, 7, 128], strided
    expected = brute_local_distance(x, y).float()
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got = local_distance(x, y, chunk_size=10)
            assert torch.get_num_threads() == threads
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
            swapped = local_distance(y, x, chunk_size=10)
            torch.testing.assert_close(swapped, expected.t(), rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_local_distance_blocks_share_no_state(threads: int) -> None:
    """Blocks reuse buffers: blocks of near-identical images (short paths) followed by blocks of far ones
    (long paths) must not see the earlier blocks' values."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 8, 16, generator=gen, dtype=torch.float64)
    # near, not identical: no |a|^2 + |b|^2 - 2ab cancellation to tolerate
    near = x + 0.05 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    far = x + 10.0
    y = torch.stack([near[0], far[0], near[1], far[1], near[2], far[2]] * 2)
    expected = brute_local_distance(x, y)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for chunk_size in (1, 2, 3):
            got = local_distance(x, y, chunk_size=chunk_size)
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    finally:
        torch.set_num_threads(before)


def test_local_distance_concurrent_callers_restore_threads() -> None:
    """Calls from several threads at once (they take turns) all get the right answer, and the thread
    count they found is back afterwards, in the callers' threads and the main one (not a call's
    temporary 1)."""
    gen = torch.Generator().manual_seed(8)
    x, y = torch.randn(20, 4, 8, generator=gen), torch.randn(30, 5, 8, generator=gen)
    expected = local_distance(x, y, chunk_size=7)

    def call(_: int) -> tuple[torch.Tensor, int]:
        return local_distance(x, y, chunk_size=7), torch.get_num_threads()

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(call, range(16)))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for got, threads in results:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert threads == 2


@pytest.mark.parametrize("threads", [1, 2])
def test_local_distance_block_error_propagates(threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error in a block (on any worker) reaches the caller, and the thread count is restored."""
    import pipeline.alignment as alignment

    real_block = alignment._Workspace.block

    def failing_block(self, *args, **kwargs):
        if args[4][0] > 0:              # tile_a starting past the first rows
            raise RuntimeError("block failed")
        return real_block(self, *args, **kwargs)

    monkeypatch.setattr(alignment._Workspace, "block", failing_block)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with pytest.raises(RuntimeError, match="block failed"):
            local_distance(torch.randn(12, 3, 4), torch.randn(12, 3, 4), chunk_size=4)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_local_distance_inference_mode() -> None:
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(9, 4, 8, generator=gen), torch.randn(7, 6, 8, generator=gen)
    expected = local_distance(x, y, chunk_size=4)
    with torch.inference_mode():
        got = local_distance(x.clone(), y.clone(), chunk_size=4)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_local_distance_empty_sides() -> None:
    x, y = torch.randn(0, 4, 8), torch.randn(3, 5, 8)
    assert local_distance(x, y).shape == (0, 3) and local_distance(y, x).shape == (3, 0)


def test_local_distance_float32_and_identical_stripes() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 8, 128, generator=gen).relu()
    y = torch.cat([x[:2], torch.randn(10, 8, 128, generator=gen).relu()])
    expected = brute_local_distance(x, y).float()
    got = local_distance(x, y)
    assert got.dtype == torch.float32
    same = torch.zeros_like(got, dtype=torch.bool)
    same[0, 0] = same[1, 1] = True
    torch.testing.assert_close(got[~same], expected[~same], rtol=1e-5, atol=1e-4)
    # Identical images: float32 |x|^2 + |y|^2 - 2xy cancellation leaves ~sqrt(eps * |x|^2) per cell.
    torch.testing.assert_close(got[same], expected[same], rtol=0, atol=2e-2)


def test_local_distance_gradcheck_and_paired() -> None:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: local_distance(a, b, chunk_size=5), (x, y))
    yp = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(paired_local_distance, (x, yp))
    full = brute_local_distance(x.detach(), yp.detach())
    torch.testing.assert_close(paired_local_distance(x, yp).detach(), full.diagonal(), rtol=1e-12, atol=1e-12)


def test_gradient_finite_at_zero_distance() -> None:
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    paired_local_distance(x, y).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    x.grad = None
    local_distance(x, y).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match=r"x \[M, m, c\]"):
        local_distance(torch.zeros(2, 3), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="same c"):
        local_distance(torch.zeros(2, 3, 5), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="chunk_size"):
        local_distance(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), chunk_size=0)
    with pytest.raises(ValueError, match="same number of rows"):
        paired_local_distance(torch.zeros(2, 3, 4), torch.zeros(3, 3, 4))
    with pytest.raises(ValueError, match=r"\[\.\.\., m, n\]"):
        shortest_path(torch.zeros(5))
