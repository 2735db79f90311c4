"""Exact top-k by inner product over a dense matrix: one GEMM, then a blocked selection.

Why not FAISS's ``IndexFlatIP.search``: it gets the scores from BLAS too, but then feeds
every score to a per-query heap (or reservoir) one element at a time, and at dim 64 that
loop costs about twice the GEMM. One thread, 50,000 random 64-d items, k 250
(a scratch script on this 2-core machine): 500 queries 150 ms in FAISS, 85 ms here; 40
queries 13.2 ms and 8.1 ms. Selectors, HNSW and GPUs stay with FAISS.

The selection. Cut each query's score row into ``n // w`` blocks of ``w`` columns (block b
holds columns b, b + n//w, b + 2·n//w, ..., so a block's maximum is one vectorised
``max`` over a (w, n//w) view), plus a tail of fewer than ``w`` columns. Keep the k blocks
with the largest maxima, and the tail; the top k lie among those k·w + tail scores:

    if x is a top-k score and its block B was not kept, then k kept blocks have a maximum
    >= max(B) >= x, which is k other scores >= x, so x is not needed (a tie is a tie).

So the answer is exact: FAISS's ranking up to float rounding and the order of ties. The
candidates are then ``argpartition``-ed to k and sorted, best first.

>>> scores, rows = top_k(np.array([[1, 4, 2, 0]], np.float32), np.eye(4, dtype=np.float32), 2)
>>> rows.tolist(), scores.tolist()
([[1, 2]], [[4.0, 2.0]])

Over 5,000 items in blocks, the same rows as a full sort:

>>> rng = np.random.default_rng(0)
>>> items, users = rng.standard_normal((2, 5000, 8), dtype=np.float32)
>>> _, rows = top_k(users[:50], items, 10)
>>> bool((rows == np.argsort(-(users[:50] @ items.T), axis=1)[:, :10]).all())
True

Threads. A query's row is scored and selected on its own, so the queries can be split over
threads: the GEMM and numpy's selections let the GIL go. ``use_threads(n)`` (process-wide,
called by the worker's entry point) gives each call of at least ``2 * MIN_PART`` queries
``n`` threads. A worker is one core's worth of Python (the GIL), so on a host with a core
to spare that core serves its largest stage under a backlog: 500 queries over 50,000 64-d
items, k 250, ~85 ms on one thread, ~38 ms on two (this 2-core machine, otherwise idle).
Smaller calls stay on one thread: beside a thread running Python, as the worker's event
loop does, each numpy call's return waits for the GIL, and two threads gained nothing up to
128 queries (a scratch benchmark: 45.7 against 45.4 ms at 128, 85.2 against 59.6 at 256).
Plain threads block when idle, unlike OpenMP's, which spin (why ``compute_threads`` is 1).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["top_k", "use_threads"]

#: Columns per block: 8 measured fastest of 8, 16 and 32 at 50,000 items, k 250.
BLOCK = 8
#: Scores held at once (floats): queries are scored in chunks of at most this many.
CHUNK_FLOATS = 1 << 23
#: Fewest queries a thread is given (the module docstring's "Threads").
MIN_PART = 128

_threads, _pool = 1, None  # `use_threads`' count and pool (None: the caller's thread only)


def use_threads(n: int) -> None:
    """Process-wide: split each `top_k` call's queries over `n` threads (1: none)."""
    global _threads, _pool
    if _pool is not None:
        _pool.shutdown()
    _threads, _pool = n, ThreadPoolExecutor(n, "top-k") if n > 1 else None


def top_k(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` rows of `vectors` with the largest inner product with each query, best
    first: scores (nq, k) float32 and row numbers (nq, k) int64. Needs 0 < k <= len(vectors).
    """
    n, nq = len(vectors), len(queries)
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    scores = np.empty((nq, k), np.float32)
    rows = np.empty((nq, k), np.int64)

    def run(lo: int, hi: int) -> None:
        scores[lo:hi], rows[lo:hi] = _select(queries[lo:hi] @ vectors.T, k)

    pool = _pool if nq >= 2 * MIN_PART else None
    parts = -(-nq // max(1, CHUNK_FLOATS // n))  # chunks of at most CHUNK_FLOATS scores
    if pool is not None:  # as many for each thread
        parts = _threads * -(-parts // _threads)
    bounds = np.linspace(0, nq, min(parts, nq) + 1).astype(int).tolist()
    list((map if pool is None else pool.map)(run, bounds[:-1], bounds[1:]))
    return scores, rows


def _select(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top `k` of each row of the score matrix `s`, best first."""
    cols = _candidates(s, k)
    cand = s if cols is None else np.take_along_axis(s, cols, 1)
    keep = np.argpartition(cand, cand.shape[1] - k, axis=1)[:, cand.shape[1] - k :]
    vals = np.take_along_axis(cand, keep, 1)
    if cols is not None:
        keep = np.take_along_axis(cols, keep, 1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(vals, order, 1), np.take_along_axis(keep, order, 1)


def _candidates(s: np.ndarray, k: int) -> np.ndarray | None:
    """Columns of each row that hold its top `k`: those of the k blocks with the largest
    maxima plus the tail (the module docstring); None (every column) where blocks would
    keep most of the row anyway."""
    nq, n = s.shape
    nb = n // BLOCK
    if nb <= 2 * k:
        return None
    block_max = s[:, : nb * BLOCK].reshape(nq, BLOCK, nb).max(axis=1)
    best = np.argpartition(block_max, nb - k, axis=1)[:, nb - k :]
    cols = (best[:, None, :] + nb * np.arange(BLOCK)[:, None]).reshape(nq, -1)
    tail = np.broadcast_to(np.arange(nb * BLOCK, n), (nq, n - nb * BLOCK))
    return np.hstack([cols, tail])
