"""AlignedReID's aligned local distance: element distances between horizontal stripes, then the shortest
right/down path through the m x n grid of those distances.

Two things make this fast enough for test time on a Market-size query x gallery matrix:

* The dynamic programme walks the anti-diagonals (wavefront): every cell of diagonal k depends only on
  diagonal k-1, so one vectorised step per diagonal covers all cells of it for every pair at once,
  m + n - 1 Python steps in all (the reproductions loop over all m * n cells).
* Grids are laid out as [m, n, pairs]: each cell is a slab over a block of pairs, each diagonal a
  strided view (no gather copies). One matrix product of stripe-major rows yields the squared stripe
  distances of a whole block already in that layout, the element distance is applied in place (as a
  sigmoid, its affine part moved behind the DP), and the wavefront runs in two preallocated buffers.
  With autograd the same recurrence builds a normal differentiable graph instead (training uses it on
  the few mined pairs only).

Element distance: (e^d - 1) / (e^d + 1) = tanh(d / 2), computed as tanh (no overflow for large d).
Euclidean distances take the square root of a squared distance clamped at EPS, so the gradient at
d = 0 is finite (zero) instead of NaN.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

EPS = 1e-12
DEFAULT_CHUNK_PAIRS = 1 << 14   # (x, y) pairs per block in local_distance: 4 MB of float32 cells at 8x8


def element_distance(sq_dist: torch.Tensor) -> torch.Tensor:
    """tanh(||f - g|| / 2) from squared Euclidean distances."""
    return torch.tanh(0.5 * torch.sqrt(sq_dist.clamp_min(EPS)))


def _bounds(k: int, m: int, n: int) -> tuple[int, int]:
    """First and last row i of the cells (i, k - i) on anti-diagonal k of an m x n grid."""
    return max(0, k - n + 1), min(k, m - 1)


def _wavefront_autograd(grid: torch.Tensor) -> torch.Tensor:
    """Differentiable shortest path of grid [m, n, P] (m <= n); returns [P]. Each diagonal's values are
    padded with +inf on both sides so a cell's up/left neighbours are two shifted slices."""
    m, n = grid.shape[:2]
    flat = grid.reshape(m * n, -1)
    inf = flat.new_full((1, flat.shape[1]), math.inf)
    prev, lo_prev = torch.cat([inf, flat[0:1], inf]), 0
    for k in range(1, m + n - 1):
        lo, hi = _bounds(k, m, n)
        # padded index of cell i on the previous diagonal is i - lo_prev + 1
        up = prev[lo - lo_prev:hi - lo_prev + 1]           # cell (i - 1, k - i)
        left = prev[lo - lo_prev + 1:hi - lo_prev + 2]     # cell (i, k - 1 - i)
        start = lo * (n - 1) + k                           # flat index of cell (lo, k - lo); step n - 1
        cur = torch.minimum(up, left) + flat[start:start + (hi - lo) * (n - 1) + 1:n - 1]
        prev, lo_prev = torch.cat([inf, cur, inf]), lo
    return prev[1]


def _wavefront_inplace(grid: torch.Tensor) -> torch.Tensor:
    """The same recurrence without autograd for a strided grid [m, n, *P] (m <= n): each diagonal is an
    as_strided view (no copy), the values live in two [m + 2, *P] buffers (cell i of a diagonal at row
    i + 1; rows never written stay +inf). Reads never touch stale rows: the lowest cell of diagonal k
    reads row lo_k, which is row 0 (+inf) while lo_k = 0, and cell lo_k - 1 of diagonal k - 1 after."""
    m, n = grid.shape[:2]
    batch = grid.shape[2:]
    si, sj = grid.stride(0), grid.stride(1)
    if m > 1 and si <= sj:  # diagonals need a positive stride (i up, j down); a copy provides it
        grid = grid.contiguous()
        si, sj = grid.stride(0), grid.stride(1)
    bufs = grid.new_full((2, m + 2) + batch, math.inf)
    bufs[0, 1] = grid[0, 0]
    for k in range(1, m + n - 1):
        lo, hi = _bounds(k, m, n)
        diagonal = grid.as_strided((hi - lo + 1,) + batch, (si - sj,) + grid.stride()[2:],
                                   grid.storage_offset() + lo * si + (k - lo) * sj)
        prev, cur = bufs[(k - 1) % 2], bufs[k % 2]
        out = cur[lo + 1:hi + 2]
        torch.minimum(prev[lo:hi + 1], prev[lo + 1:hi + 2], out=out)
        out.add_(diagonal)
    return bufs[(m + n - 2) % 2, m].clone()


def _grid_shortest_path(grid: torch.Tensor) -> torch.Tensor:
    """grid [m, n, *P] -> [*P]. The path set is symmetric under transposition, so the shorter side is
    put first (fewer cells per diagonal; the step count m + n - 1 is the same)."""
    m, n = grid.shape[:2]
    batch = grid.shape[2:]
    if m > n:
        grid = grid.transpose(0, 1)
    if torch.is_grad_enabled() and grid.requires_grad:
        return _wavefront_autograd(grid.reshape(grid.shape[:2] + (math.prod(batch),))).reshape(batch)
    return _wavefront_inplace(grid)


def shortest_path(d: torch.Tensor) -> torch.Tensor:
    """Shortest right/down path from (0, 0) to (m-1, n-1) through d [..., m, n], summing the cells
    (both ends included); returns [...]. Vectorised over the leading dims, m + n - 1 Python steps."""
    if d.dim() < 2 or d.shape[-1] == 0 or d.shape[-2] == 0:
        raise ValueError(f"shortest_path expects a [..., m, n] tensor with m, n >= 1; got {tuple(d.shape)}")
    return _grid_shortest_path(d.movedim((-2, -1), (0, 1)))


def _check_stripes(x: torch.Tensor, y: torch.Tensor, fn: str) -> None:
    if x.dim() != 3 or y.dim() != 3 or x.shape[2] != y.shape[2]:
        raise ValueError(f"{fn}: expected x [M, m, c] and y [N, n, c] stripe features with the same c; "
                         f"got x {tuple(x.shape)}, y {tuple(y.shape)}")
    if x.shape[1] == 0 or y.shape[1] == 0:
        raise ValueError(f"{fn}: need at least one stripe; got x {tuple(x.shape)}, y {tuple(y.shape)}")


def _block_autograd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [Ab, m, c], b [Bb, n, c] -> [Ab, Bb], differentiably. One matmul of the stripe-major rows,
    (i, p) x (j, q), gives a [m, Ab, n, Bb] block whose [m, n, Ab, Bb] view is the wavefront's grid."""
    m, n = a.shape[1], b.shape[1]
    rows_a = a.transpose(0, 1).reshape(-1, a.shape[2])
    rows_b = b.transpose(0, 1).reshape(-1, b.shape[2])
    sq = rows_a.pow(2).sum(1, keepdim=True) + rows_b.pow(2).sum(1) - 2.0 * rows_a @ rows_b.t()
    grid = element_distance(sq).view(m, a.shape[0], n, b.shape[0]).transpose(1, 2)
    return _grid_shortest_path(grid)


def _block_inplace(rows_a: torch.Tensor, sq_a: torch.Tensor, rows_b: torch.Tensor,
                   sq_b: torch.Tensor) -> torch.Tensor:
    """The same without autograd, from stripe-major views: rows_a [m, Ab, c] with squared norms
    sq_a [m, Ab], rows_b [n, Bb, c] with sq_b [n, Bb] (m <= n) -> [Ab, Bb].

    |a - b|^2 = |a|^2 - 2ab + |b|^2 comes out of one addmm plus one broadcast add, and the element
    distance is taken as tanh(d / 2) = 2 sigmoid(d) - 1 with the affine part moved behind the DP: every
    right/down path has exactly m + n - 1 cells, so path(2 s - 1) = 2 path(s) - (m + n - 1). That leaves
    in-place passes over the block only (torch's sigmoid is several times cheaper than its tanh on
    the CPU) and no other allocation of its size."""
    (m, size_a, c), (n, size_b, _) = rows_a.shape, rows_b.shape
    sq = torch.addmm(sq_a.reshape(-1, 1), rows_a.reshape(-1, c), rows_b.reshape(-1, c).t(), alpha=-2.0)
    half_plus = sq.add_(sq_b.reshape(1, -1)).clamp_(min=EPS).sqrt_().sigmoid_()  # (1 + tanh(d/2)) / 2
    path = _grid_shortest_path(half_plus.view(m, size_a, n, size_b).transpose(1, 2))
    return path.mul_(2.0).sub_(m + n - 1)


def local_distance(x: torch.Tensor, y: torch.Tensor, chunk_size: int | None = None,
                   progress: bool = False) -> torch.Tensor:
    """Aligned local distance of every x against every y: x [M, m, c], y [N, n, c] -> [M, N].

    Works in blocks of about `chunk_size` (x, y) pairs (default 16,384: 4 MB of float32 cells per
    block at m = n = 8, cache-sized), so memory beyond the [M, N] result is bounded whatever M and N are
    (Market-1501's 3,368 x 15,913 included). Blocks are near-square tiles so each block's matmul reuses
    both operands. Differentiable (the result is then assembled with torch.cat)."""
    _check_stripes(x, y, "local_distance")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"local_distance: chunk_size is {chunk_size}; must be >= 1 (pairs per block)")
    y = y.to(x.dtype)
    # The side with fewer stripes goes first in every block (see _wavefront_inplace); the path set is
    # symmetric, so the swapped result is the transpose.
    swap = x.shape[1] > y.shape[1]
    a, b = (y, x) if swap else (x, y)
    pairs = chunk_size or DEFAULT_CHUNK_PAIRS
    step_a = max(1, min(a.shape[0], math.isqrt(pairs)))
    step_b = max(1, min(b.shape[0], pairs // step_a))
    tiles = [(i, j) for i in range(0, a.shape[0], step_a) for j in range(0, b.shape[0], step_b)]
    if not tiles:  # no x or no y
        return x.new_zeros(x.shape[0], y.shape[0])
    progress_bar = tqdm(tiles, desc="local distance", unit="block", disable=not progress or len(tiles) < 2)

    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        rows: dict[int, list[torch.Tensor]] = {}
        for i, j in progress_bar:
            rows.setdefault(i, []).append(_block_autograd(a[i:i + step_a], b[j:j + step_b]))
        out = torch.cat([torch.cat(row, dim=1) for row in rows.values()], dim=0)
        return out.t() if swap else out

    rows_a, rows_b = a.transpose(0, 1), b.transpose(0, 1)    # stripe-major views [m, A, c], [n, B, c]
    sq_a, sq_b = rows_a.pow(2).sum(-1), rows_b.pow(2).sum(-1)
    out = x.new_empty(x.shape[0], y.shape[0])
    out_ab = out.t() if swap else out
    for i, j in progress_bar:
        ia, jb = slice(i, i + step_a), slice(j, j + step_b)
        out_ab[ia, jb] = _block_inplace(rows_a[:, ia], sq_a[:, ia], rows_b[:, jb], sq_b[:, jb])
    return out


def paired_local_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Aligned local distance of x[b] and y[b]: x [B, m, c], y [B, n, c] -> [B].

    Used for the local triplet loss on mined pairs, so it computes stripe differences directly
    (no |a|^2 + |b|^2 - 2ab cancellation) for accurate gradients."""
    _check_stripes(x, y, "paired_local_distance")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"paired_local_distance: x and y need the same number of rows; got x "
                         f"{tuple(x.shape)}, y {tuple(y.shape)}")
    diff = x.unsqueeze(2) - y.to(x.dtype).unsqueeze(1)           # [B, m, n, c]
    grid = element_distance(diff.pow(2).sum(-1))                   # [B, m, n]
    return _grid_shortest_path(grid.permute(1, 2, 0))
