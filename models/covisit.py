"""Co-visitation statistics: which items follow which in users' sequences.

The sequence-aware item-kNN signal (session-kNN style) as features of the ranker. When a user
interacts with item i, each of their last `window` earlier events j adds `pair_decay^(k-1)`
(k = distance in the sequence, 1 = the previous event) to the symmetric counts c_ij and c_ji
and to the directed count f_ji ("i followed j"); n_i += 1.

Features for a user and item i, one per profile recency r (profile = the user's last
`profile` distinct items p, age 0 = newest):
  sym_r(i) = Σ_p r^age(p) · c_pi / sqrt(n_p · n_i)      for r in `recencies`
  fwd(i)   = Σ_p r0^age(p) · f_pi / sqrt(n_p · n_i)     (r0 = the middle recency)
Several recencies let the ranker weigh "what you did just now" against "what you like";
the weights are learned online (models/two_tower.PriorHead), not fixed per data set.

Storage is sparse (scipy CSR over item rows): memory grows with the pairs actually seen, not
with the square of the catalog, and `prune` bounds it: an item followed by more than
2 x `max_neighbours` others keeps its strongest `max_neighbours` (the candidates and features
come from the strong pairs; a co-visitation count never decays, so without a bound a
long-running catalog fills toward items x items). Increments are merged once per batch.

>>> cv = CoVisitation(recencies=(0.8,))
>>> _ = cv.learn([([], 1), ([1], 2), ([1, 2], 3)])  # one user: item 1, then 2, then 3
>>> sym, fwd = cv.features([[2]], np.array([1, 3]))  # a user who just saw item 2
>>> sym.round(3).tolist(), fwd.round(3).tolist()    # both co-occurred; only 3 came after 2
([[1.0, 1.0]], [[0.0, 1.0]])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp


class Increment(NamedTuple):
    """Co-visitation counts to add: f[j, i] += w for each triplet, n[targets] += n."""

    j: np.ndarray  # earlier item rows
    i: np.ndarray  # later item rows
    w: np.ndarray  # float32 pair weights
    targets: np.ndarray  # item rows whose interaction count grows ...
    n: np.ndarray  # ... by this much


class CoVisitation:
    """The counts c, f and n of the module doc: `learn` adds a batch's pairs, `features`
    and `neighbours` read them (the ranker's features, the `covisit` candidates)."""

    def __init__(self, window: int = 50, pair_decay: float = 0.9,
                 recencies: Sequence[float] = (0.5, 0.8, 0.95), profile: int = 50):
        self.window, self.pair_decay, self.profile = window, pair_decay, profile
        self.recencies = tuple(recencies)
        self.C = sp.csr_matrix((1, 1), dtype=np.float32)
        self.F = sp.csr_matrix((1, 1), dtype=np.float32)
        self.n = np.zeros(1)
        self._pair_w = pair_decay ** np.arange(window)
        self._tops: dict[tuple[int, int], np.ndarray] = {}  # neighbour lists until next learn

    @property
    def n_features(self) -> int:
        return len(self.recencies) + 1

    @property
    def size(self) -> int:
        return len(self.n)

    @property
    def nbytes(self) -> int:
        """Memory held by the counts (both sparse matrices and n)."""
        return self.n.nbytes + sum(M.data.nbytes + M.indices.nbytes + M.indptr.nbytes
                                   for M in (self.C, self.F))

    def _ensure(self, rows: int) -> None:
        if rows <= self.size:
            return
        cap = max(rows, 2 * self.size)
        self.C.resize((cap, cap))
        self.F.resize((cap, cap))
        self.n = np.concatenate([self.n, np.zeros(cap - self.size)])

    def learn(self, pairs: Sequence[tuple[Sequence[int], int]]) -> Increment | None:
        """Events as (earlier item rows of the user, oldest first; 0 = none, item row).
        Returns what they added (None: nothing), e.g. for a replica's delta."""
        inc = self.increment(pairs)
        if inc is not None:
            self.add(inc)
        return inc

    def increment(self, pairs: Sequence[tuple[Sequence[int], int]]) -> Increment | None:
        """What `pairs` add to the counts, as COO triplets of f (j, i, w) and targets."""
        rows, cols, vals = [], [], []
        targets = []
        for history, target in pairs:
            recent = np.asarray(history[-self.window:], dtype=np.int64)[::-1]
            w = self._pair_w[: len(recent)]
            keep = (recent != 0) & (recent != target)
            rows.append(recent[keep])
            cols.append(np.full(int(keep.sum()), target, dtype=np.int64))
            vals.append(w[keep])
            targets.append(target)
        if not targets:
            return None
        return Increment(np.concatenate(rows), np.concatenate(cols),
                         np.concatenate(vals).astype(np.float32),
                         *np.unique(np.asarray(targets, np.int64), return_counts=True))

    def add(self, inc: Increment) -> None:
        """Add an increment (from this process's pairs, or another's delta mapped to rows)."""
        self._ensure(int(max(inc.j.max(initial=0), inc.i.max(initial=0),
                             inc.targets.max(initial=0))) + 1)
        fwd = sp.csr_matrix((inc.w, (inc.j, inc.i)), shape=(self.size, self.size))  # i after j
        self.F = self.F + fwd
        self.C = self.C + fwd + fwd.T
        self._tops.clear()
        np.add.at(self.n, inc.targets, inc.n.astype(np.float64))

    def prune(self, max_neighbours: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Bound the counts: an item with more than 2 x `max_neighbours` followers in f keeps
        its `max_neighbours` strongest. Returns the removed (j, i) pairs (None: nothing to
        do), which a replica then removes too (`remove`): the pruning is decided once."""
        F = self.F.tocsr()
        over = np.flatnonzero(np.diff(F.indptr) > 2 * max_neighbours)
        if not len(over):
            return None
        rm_j, rm_i = [], []
        for r in over:
            lo, hi = F.indptr[r], F.indptr[r + 1]
            drop = np.argpartition(F.data[lo:hi], hi - lo - max_neighbours)[
                : hi - lo - max_neighbours]
            rm_j.append(np.full(len(drop), r, np.int64))
            rm_i.append(F.indices[lo:hi][drop].astype(np.int64))
        removed = np.concatenate(rm_j), np.concatenate(rm_i)
        self.remove(*removed)
        return removed

    def remove(self, j: np.ndarray, i: np.ndarray) -> None:
        """Drop the pairs f[j, i] (and their share of c, which is f + f^T)."""
        if not len(j):
            return
        F = self.F.tocoo()
        gone = np.isin(F.row.astype(np.int64) * self.size + F.col,
                       np.asarray(j, np.int64) * self.size + np.asarray(i, np.int64))
        self.F = sp.csr_matrix((F.data[~gone], (F.row[~gone], F.col[~gone])), shape=F.shape)
        self.C = self.F + self.F.T
        self._tops.clear()

    def _profile(self, history: Sequence[int]) -> np.ndarray:
        """Last `profile` distinct item rows, newest first."""
        seen: dict[int, None] = {}
        for r in reversed(history):
            if r != 0 and r not in seen:
                seen[r] = None
                if len(seen) == self.profile:
                    break
        return np.fromiter(seen, dtype=np.int64, count=len(seen))

    def features(self, histories: Sequence[Sequence[int]], cols: np.ndarray) -> np.ndarray:
        """(n_features, len(histories), len(cols)) co-visitation features of item rows `cols`."""
        out = self._features(histories, cols, lambda M: _columns(M, cols))
        return np.zeros((self.n_features, len(histories), len(cols)), np.float32) \
            if out is None else np.stack(out)

    def pair_features(self, histories: Sequence[Sequence[int]], owner: np.ndarray,
                      rows: np.ndarray) -> np.ndarray:
        """(n_features, len(rows)): `features` of the pairs (histories[owner[k]], rows[k])
        only. Serving ranks a few hundred candidates per user; the dense form would fill
        every user's row for every candidate of the batch.

        >>> cv = CoVisitation(recencies=(0.8,))
        >>> _ = cv.learn([([], 1), ([1], 2), ([1, 2], 3)])
        >>> dense = cv.features([[2], [1]], np.array([1, 3]))
        >>> pairs = cv.pair_features([[2], [1]], np.array([0, 1, 1]), np.array([3, 3, 1]))
        >>> np.array_equal(pairs, dense[:, [0, 1, 1], [1, 1, 0]])
        True
        """
        out = self._features(histories, rows, lambda M: _entries(M, owner, rows))
        return np.zeros((self.n_features, len(rows)), np.float32) if out is None \
            else np.stack(out)

    def _features(self, histories: Sequence[Sequence[int]], cols: np.ndarray,
                  pick: Callable[[sp.csr_matrix], np.ndarray]) -> list[np.ndarray] | None:
        """Each feature as `pick` takes it from its (users x items) product, the item rows
        `cols` being what it takes (None: no history has an item)."""
        profiles = [self._profile(h) for h in histories]
        items = np.concatenate(profiles + [np.zeros(0, np.int64)])
        if len(items) == 0:
            return None
        self._ensure(int(max(items.max(), cols.max(initial=0))) + 1)
        inv = np.zeros(self.size)
        np.divide(1.0, np.sqrt(self.n), out=inv, where=self.n > 0)
        owner = np.repeat(np.arange(len(profiles)), [len(p) for p in profiles])
        age = np.concatenate([np.arange(len(p)) for p in profiles])
        inv_cols = inv[cols].astype(np.float32)
        shape = (len(profiles), self.size)
        Ws = [sp.csr_matrix(((inv[items] * r**age).astype(np.float32), (owner, items)), shape)
              for r in self.recencies]
        sym = [pick(W @ self.C) * inv_cols for W in Ws]
        return [*sym, pick(Ws[len(Ws) // 2] @ self.F) * inv_cols]

    def neighbours(self, rows: np.ndarray, k: int) -> np.ndarray:
        """Each row's `k` strongest co-visited items, concatenated (serving candidates; may
        repeat an item: callers merge them with other candidates and dedupe once). A row's
        list is computed once between two `learn` calls: the users of a batch share rows."""
        out = [self._top(int(r), k) for r in rows if r < self.size]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _top(self, r: int, k: int) -> np.ndarray:
        hit = self._tops.get((r, k))
        if hit is None:
            C = self.C
            lo, hi = C.indptr[r], C.indptr[r + 1]
            cols = C.indices[lo:hi]
            if hi - lo > k:
                cols = cols[np.argpartition(-C.data[lo:hi], k)[:k]]
            hit = self._tops[(r, k)] = cols.astype(np.int64)
        return hit

    # ---------------------------------------------------------------- persistence
    def arrays(self, size: int | None = None) -> dict[str, np.ndarray]:
        """The counts as plain arrays (for safetensors), for rows [0, size) (default: all
        allocated; rows beyond the allocation are empty)."""
        size = self.size if size is None else size
        n = np.zeros(size)
        n[: min(size, self.size)] = self.n[:size]
        out = {"n": n}
        for name, M in (("C", self.C), ("F", self.F)):
            M = M.tocsr()[:size, :size] if size <= self.size else M.tocsr().copy()
            if size > self.size:
                M.resize((size, size))
            out[f"{name}.data"], out[f"{name}.indices"], out[f"{name}.indptr"] = \
                M.data.copy(), M.indices.astype(np.int64), M.indptr.astype(np.int64)
        return out

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.n = np.asarray(arrays["n"], dtype=np.float64).copy()
        shape = (len(self.n), len(self.n))
        for name in ("C", "F"):
            setattr(self, name, sp.csr_matrix((arrays[f"{name}.data"], arrays[f"{name}.indices"],
                                               arrays[f"{name}.indptr"]), shape=shape))
        self._tops.clear()


def _entries(M: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """M[rows[k], cols[k]] for each k. A sparse product's indices come out unsorted, and
    scipy then scans a whole row per entry; sorted, it bisects (on ML-100K the serving
    path's pair features took 966 samples of a profile unsorted, 273 sorted)."""
    M.sort_indices()
    return np.asarray(M[rows, cols], np.float32).ravel()


def _columns(M: sp.csr_matrix, cols: np.ndarray, max_dense: int = 1 << 24) -> np.ndarray:
    """Dense M[:, cols]: densify first when most columns are wanted (cheaper than slicing),
    unless the dense copy would be large (500 users x 131k rows of a 100k catalog: 262 MB
    per call, measured as a 2.2 GB peak RSS in bench/memory.py)."""
    if len(cols) * 4 > M.shape[1] and M.shape[0] * M.shape[1] <= max_dense:
        return M.toarray()[:, cols]
    return M.tocsc()[:, cols].toarray()
