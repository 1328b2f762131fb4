"""AlignedReID's aligned local distance: element distances between horizontal stripes, then the shortest
right/down path through the m x n grid of those distances.

What makes this fast enough for test time on a Market-size query x gallery matrix:

* The dynamic programme walks the anti-diagonals (wavefront): every cell of diagonal k depends only on
  diagonal k-1, so one vectorised step per diagonal covers all cells of it for every pair at once,
  m + n - 1 Python steps in all (the reproductions loop over all m * n cells).
* `local_distance` works in blocks (on the CPU of 2 MB of float32 cells: cache-sized). Per block: one
  matrix product of augmented stripe-major rows [-2a, |a|^2, 1] x [b, 1, |b|^2] gives the squared stripe
  distances; one clamp pass also lays them out as a contiguous [m, n, pairs] grid (each cell a
  contiguous slab over the block's pairs, each diagonal a strided view of whole slabs); the element
  distance is applied in place (as a sigmoid, its affine part moved behind the DP); the wavefront runs
  in two buffers. All buffers and the views of every step are made once per worker and block shape.
* On the CPU the blocks are spread over torch.get_num_threads() Python worker threads, each running
  its blocks with one intra-op thread (torch releases the GIL inside its kernels). At the CPU's block
  size every op is small, and thread-parallel small ops meet at a barrier after each of them, which
  stalls on a busy machine; whole blocks per thread need no synchronisation at all.
* With autograd the same recurrence builds a normal differentiable graph instead (training uses it on
  the few mined pairs only).

Element distance: (e^d - 1) / (e^d + 1) = tanh(d / 2), computed as tanh by `element_distance` (no
overflow for large d).
Euclidean distances take the square root of a squared distance clamped at EPS, so the gradient at
d = 0 is finite (zero) instead of NaN.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext

import torch
from tqdm.auto import tqdm

EPS = 1e-12
DEFAULT_CHUNK_CELLS = 1 << 19   # grid cells per block in local_distance on the CPU: 2 MB of float32
DEFAULT_CHUNK_CELLS_DEVICE = 1 << 20   # on other devices (the former default everywhere, 16,384 pairs at 8x8)


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


class _Workspace:
    """One worker's buffers for `local_distance` blocks of up to size_a x size_b pairs (m <= n stripes,
    c channels), and per block shape the views every step of a block uses, made once.

    A block: the augmented rows aug_a [m, sa, c + 2] = [-2a, |a|^2, 1] and aug_b [n, sb, c + 2] =
    [b, 1, |b|^2] (stripe-major) give |a - b|^2 = |a|^2 - 2ab + |b|^2 of all stripe pairs in one matrix
    product [m * sa, n * sb] = [m, sa, n, sb]; one clamp pass at EPS writes it transposed into the grid
    [m, n, sa * sb] (cell (i, j) a contiguous slab over the block's pairs); sqrt_ and sigmoid_ give
    (1 + tanh(d / 2)) / 2 in place (torch's sigmoid is several times cheaper than its tanh on the CPU;
    every right/down path has m + n - 1 cells, so path(2 s - 1) = 2 path(s) - (m + n - 1) is applied to
    the block's result at the end); the wavefront then runs over the grid's diagonals (strided views of
    whole slabs) in two buffers [m + 2, pairs] as in `_wavefront_inplace`. There row 0 stays +inf, and
    rows 2..m are reset to +inf per block: the first-column cell (k, 0) of diagonal k < m reads row
    k + 1 of diagonal k - 1 as its left neighbour, which that diagonal does not write, so it would hold
    a value of the previous block otherwise (never the minimum, as such paths are longer and cells are
    in [1/2, 1], but every block is then exactly a fresh `_wavefront_inplace`). The grid and buffers are
    laid out for the largest block; smaller ones use the first sa * sb columns of the same rows, so no
    shape's boundary rows overlap another shape's values."""

    def __init__(self, m: int, n: int, c: int, size_a: int, size_b: int, like: torch.Tensor):
        self.m, self.n, self.c = m, n, c
        pairs = size_a * size_b
        self.aug_a_store = like.new_empty(m * size_a * (c + 2))
        self.aug_b_store = like.new_empty(n * size_b * (c + 2))
        self.product_store = like.new_empty(m * n * pairs)
        self.grid = like.new_empty(m, n, pairs)
        self.bufs = like.new_full((2, m + 2, pairs), math.inf)
        self.minus_steps = like.new_tensor(-(m + n - 1.0))     # path(2 s - 1) = 2 path(s) - (m + n - 1)
        self.plans: dict[tuple[int, int], tuple] = {}
        self.tile_a = self.tile_b = None                       # whose rows aug_a / aug_b hold now

    def plan(self, sa: int, sb: int) -> tuple:
        key = (sa, sb)
        if key not in self.plans:
            m, n, c, pairs = self.m, self.n, self.c, sa * sb
            aug_a = self.aug_a_store[:m * sa * (c + 2)].view(m, sa, c + 2)
            aug_b = self.aug_b_store[:n * sb * (c + 2)].view(n, sb, c + 2)
            product = self.product_store[:m * n * pairs].view(m * sa, n * sb)
            grid = self.grid[:, :, :pairs]
            cells, bufs = grid.flatten(0, 1), self.bufs[:, :, :pairs]
            steps = []
            for k in range(1, m + n - 1):
                lo, hi = _bounds(k, m, n)
                prev, cur = bufs[(k - 1) % 2], bufs[k % 2]
                start = lo * (n - 1) + k                       # cell (lo, k - lo); step n - 1 along k
                steps.append((prev[lo:hi + 1], prev[lo + 1:hi + 2], cur[lo + 1:hi + 2],
                              cells[start:start + (hi - lo) * (n - 1) + 1:n - 1]))
            self.plans[key] = (aug_a, aug_b, product, product.view(m, sa, n, sb).transpose(1, 2),
                               grid.view(m, n, sa, sb), bufs[:, 2:m + 1], bufs[0, 1], cells[0], steps,
                               bufs[(m + n - 2) % 2, m].view(sa, sb))
        return self.plans[key]

    def block(self, rows_a: torch.Tensor, sq_a: torch.Tensor, rows_b: torch.Tensor, sq_b: torch.Tensor,
              tile_a: tuple[int, int], tile_b: tuple[int, int], out: torch.Tensor) -> None:
        """out[tile_a, tile_b] = local distances of a's and b's rows in the tiles (start, size), from
        stripe-major rows_a [m, A, c], rows_b [n, B, c] and their squared norms sq_a [m, A], sq_b [n, B]."""
        (i, sa), (j, sb) = tile_a, tile_b
        c = self.c
        aug_a, aug_b, product, product_mn, grid, stale, first, cell0, steps, last = self.plan(sa, sb)
        if self.tile_a != tile_a:
            torch.mul(rows_a[:, i:i + sa], -2.0, out=aug_a[..., :c])
            aug_a[..., c].copy_(sq_a[:, i:i + sa])
            aug_a[..., c + 1].fill_(1.0)
            self.tile_a = tile_a
        if self.tile_b != tile_b:
            aug_b[..., :c].copy_(rows_b[:, j:j + sb])
            aug_b[..., c].fill_(1.0)
            aug_b[..., c + 1].copy_(sq_b[:, j:j + sb])
            self.tile_b = tile_b
        torch.mm(aug_a.view(-1, c + 2), aug_b.view(-1, c + 2).t(), out=product)
        torch.clamp(product_mn, min=EPS, out=grid)
        grid.sqrt_().sigmoid_()                                # (1 + tanh(d / 2)) / 2
        stale.fill_(math.inf)
        first.copy_(cell0)
        for up, left, cur, diagonal in steps:
            torch.minimum(up, left, out=cur)
            cur.add_(diagonal)
        torch.add(self.minus_steps, last, alpha=2.0, out=out[i:i + sa, j:j + sb])


def _tiles(total: int, step: int) -> list[tuple[int, int]]:
    """(start, size) of ceil(total / step) near-equal tiles covering range(total) (sizes differ by <= 1)."""
    count = -(-total // step)
    size, extra = divmod(total, count)
    starts = [t * size + min(t, extra) for t in range(count)]
    return [(start, size + (t < extra)) for t, start in enumerate(starts)]


_cpu_calls = threading.Lock()   # one CPU local_distance at a time (see _one_intra_op_thread)


@contextmanager
def _one_intra_op_thread() -> Iterator[int]:
    """torch's intra-op thread count is 1 inside (the count before is yielded, and back after). One
    caller at a time: the count is process-wide (MKL's, torch's default for new threads) besides per
    thread (OpenMP's), so overlapping callers would save and restore each other's temporary 1, and
    each call uses all the threads anyway."""
    with _cpu_calls:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield before
        finally:
            torch.set_num_threads(before)


def _run_blocks(workers: int, tiles: Iterator, run, progress_bar) -> None:
    """run(slot, tile_a, tile_b) for every tile pair on `workers` threads (slot 0 is the caller's), each
    taking the next pair when done, with one intra-op thread each and the caller's inference mode.
    Pairs go out row by row, so a worker mostly keeps its tile_a."""
    if workers == 1:
        for tile_a, tile_b in tiles:
            run(0, tile_a, tile_b)
            progress_bar.update()
        return
    lock, failed = threading.Lock(), threading.Event()
    todo = iter(tiles)
    inference = torch.is_inference_mode_enabled()   # grad modes are per thread: the caller's for all

    def worker(slot: int) -> None:
        try:
            if slot:  # a fresh thread
                torch.set_num_threads(1)
            with torch.inference_mode(inference), torch.no_grad():
                while not failed.is_set():
                    with lock:
                        tile = next(todo, None)
                    if tile is None:
                        return
                    run(slot, *tile)
                    with lock:
                        progress_bar.update()
        except BaseException:
            failed.set()   # the others stop after their current block
            raise

    with ThreadPoolExecutor(workers - 1, thread_name_prefix="local_distance") as pool:
        helpers = [pool.submit(worker, slot) for slot in range(1, workers)]
        try:
            worker(0)
        finally:
            wait(helpers)
        for helper in helpers:
            helper.result()   # re-raises a helper's exception


def local_distance(x: torch.Tensor, y: torch.Tensor, chunk_size: int | None = None,
                   progress: bool = False) -> torch.Tensor:
    """Aligned local distance of every x against every y: x [M, m, c], y [N, n, c] -> [M, N].

    Works in blocks of about `chunk_size` (x, y) pairs (default on the CPU: 2^19 grid cells, i.e. 8,192
    pairs at m = n = 8, 2 MB of float32: cache-sized; 2^20 cells elsewhere), so memory beyond the [M, N]
    result is bounded whatever M and N are (Market-1501's 3,368 x 15,913 included): one block's buffers
    per worker thread. Blocks are near-square tiles of near-equal size so each block's matmul reuses both
    operands. On the CPU the blocks run on torch.get_num_threads() threads (the caller's and helpers),
    with torch's intra-op thread count set to 1 for the duration of the call (see the module docstring);
    CPU calls from several threads at once take turns.
    Differentiable (the result is then assembled with torch.cat, blocks in turn)."""
    _check_stripes(x, y, "local_distance")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"local_distance: chunk_size is {chunk_size}; must be >= 1 (pairs per block)")
    y = y.to(x.dtype)
    # The side with fewer stripes goes first in every block (fewer cells per diagonal); the path set is
    # symmetric, so the swapped result is the transpose.
    swap = x.shape[1] > y.shape[1]
    a, b = (y, x) if swap else (x, y)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return x.new_zeros(x.shape[0], y.shape[0])
    (_, m, c), n = a.shape, b.shape[1]
    cpu = a.device.type == "cpu"
    pairs = chunk_size or max(1, (DEFAULT_CHUNK_CELLS if cpu else DEFAULT_CHUNK_CELLS_DEVICE) // (m * n))
    step_a = max(1, min(a.shape[0], math.isqrt(pairs)))
    step_b = max(1, min(b.shape[0], pairs // step_a))
    tiles_a, tiles_b = _tiles(a.shape[0], step_a), _tiles(b.shape[0], step_b)
    blocks = len(tiles_a) * len(tiles_b)
    tiles = ((ta, tb) for ta in tiles_a for tb in tiles_b)     # row by row
    progress_bar = tqdm(total=blocks, desc="local distance", unit="block", disable=not progress or blocks < 2)

    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        rows = []
        for (i, sa) in tiles_a:
            row = []
            for (j, sb) in tiles_b:
                row.append(_block_autograd(a[i:i + sa], b[j:j + sb]))
                progress_bar.update()
            rows.append(torch.cat(row, dim=1))
        progress_bar.close()
        out = torch.cat(rows, dim=0)
        return out.t() if swap else out

    # On the CPU everything from here runs on one intra-op thread per worker (module docstring).
    with torch.no_grad(), _one_intra_op_thread() if cpu else nullcontext(1) as threads:
        rows_a, rows_b = a.transpose(0, 1), b.transpose(0, 1)    # stripe-major views [m, A, c], [n, B, c]
        sq_a, sq_b = rows_a.pow(2).sum(-1), rows_b.pow(2).sum(-1)
        out = x.new_empty(x.shape[0], y.shape[0])
        out_ab = out.t() if swap else out
        workers = min(threads, blocks)
        spaces = [_Workspace(m, n, c, tiles_a[0][1], tiles_b[0][1], a) for _ in range(workers)]

        def run(slot: int, tile_a: tuple[int, int], tile_b: tuple[int, int]) -> None:
            spaces[slot].block(rows_a, sq_a, rows_b, sq_b, tile_a, tile_b, out_ab)

        _run_blocks(workers, tiles, run, progress_bar)
        progress_bar.close()
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


def shortest_path_cells(d: torch.Tensor) -> list[tuple[int, int]]:
    """The cells (i, j) of the shortest right/down path through one grid d [m, n], from (0, 0) to
    (m-1, n-1) in order: the stripe pairs the aligned distance matches (its pictures draw them). The
    cumulative costs S of the recurrence in the module docstring are computed in float64, then the path
    is traced back from (m-1, n-1), each time to whichever of (i-1, j) and (i, j-1) has the smaller S
    (on the first row or column the one neighbour there is; a tie goes to (i-1, j)). The sum of d over
    the cells equals shortest_path(d)."""
    if d.dim() != 2 or d.shape[0] == 0 or d.shape[1] == 0:
        raise ValueError(f"shortest_path_cells expects one [m, n] grid with m, n >= 1; got {tuple(d.shape)}")
    grid = d.detach().to("cpu", torch.float64).tolist()
    m, n = len(grid), len(grid[0])
    cost = [[0.0] * n for _ in range(m)]
    for i in range(m):
        for j in range(n):
            before = min(cost[i - 1][j] if i else math.inf, cost[i][j - 1] if j else math.inf)
            cost[i][j] = grid[i][j] + (before if i or j else 0.0)
    i, j = m - 1, n - 1
    cells = [(i, j)]
    while i or j:
        if j == 0 or (i and cost[i - 1][j] <= cost[i][j - 1]):
            i -= 1
        else:
            j -= 1
        cells.append((i, j))
    return cells[::-1]
