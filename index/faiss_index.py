"""FAISS item index: inner-product top-k over the full catalog, with upserts and deletes.

Layout
------
Every :class:`FaissIndex` keeps a dense CPU copy of the live catalog (``_Store``): rows
``[0, n)`` of a float32 matrix that grows by doubling, the external id of each row, and a
dict ``id -> row``.  Deletes swap the last row into the hole, so the copy never has gaps.
The copy is what makes ``vector()`` work for every kind, lets GPU and HNSW indexes be
rebuilt, and lets :meth:`FaissIndex.compacted` build the next version without re-reading
the catalog.  FAISS indexes are used *without* ``IndexIDMap``; each backend maps FAISS's
sequential labels back to item ids itself:

``flat`` / ``flat-gpu`` (``IndexFlatIP`` / ``GpuIndexFlatIP``)
    FAISS label == store row.  Appends are copied to FAISS lazily before the next search.
    Overwrites and deletes move rows, so they mark the FAISS copy stale and it is rebuilt
    (reset + one add, a memcpy of ``n * dim`` floats) before the next search.  That costs
    about as much as scanning the catalog for a *single* query, so it is negligible next
    to the search itself, and it avoids two FAISS limitations: no GPU index supports
    ``remove_ids``, and a search with an ``IDSelector`` drops flat search to ~1/3.5 of its
    BLAS speed (measured: 100k x 64, 256 queries, 11.6k -> 3.3k q/s).  On the CPU, a
    search without a selector skips FAISS: ``index/topk.py`` scores the store's matrix with
    one GEMM and selects in blocks, ~1.8x faster than FAISS's per-score heap at dim 64.

``hnsw`` (``IndexHNSWFlat``, CPU only: FAISS has no GPU HNSW)
    HNSW cannot remove vectors.  A delete, or the old version of an upserted id, becomes a
    *tombstone*: its label is marked dead in ``label -> id`` and searches pass
    ``SearchParametersHNSW(sel=IDSelectorBitmap(live labels))``, so a dead label is never
    returned (the graph still walks through it, which keeps recall intact).  An upsert
    adds the new vector under a fresh label.  When tombstones exceed
    ``rebuild_tombstone_ratio`` of the labels, the graph is rebuilt from the store.

Why not ``IndexIDMap2``: re-adding an existing id duplicates it, HNSW under it still has
no ``remove_ids`` and GPU indexes have none at all, so a CPU-side id layer is needed
anyway.  (For the record, in faiss 1.15 ``IndexIDMap2.search`` wraps ``params.sel`` in
``IDSelectorTranslated``, so a selector passed to an ``IDMap2(HNSW)`` sees *external*
ids; we do not rely on that.)

Searching
---------
``search`` over-fetches ``k + len(exclude[i])`` (batch maximum) candidates and drops the
excluded ids (e.g. items the user has already seen), then pads to ``k`` with id ``-1`` and
score ``-inf``.  At dim 64 a FAISS flat search (a selector's) of three or more queries
goes through BLAS (``use_blas_from``, which the entry points call: FAISS's own default
keeps batches under 2,000 queries off it, 5x slower with one thread).  Searches and
mutations are serialised by one lock per index: FAISS releases the GIL and parallelises
each call with OpenMP, so concurrent calls would only oversubscribe the cores, and FAISS
indexes are not safe to mutate while searched.
Whole-index replacement (e.g. after a background rebuild) goes through
:class:`VersionedIndex`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import Future
from typing import Literal, Protocol

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from index.ids import ID_MASK
from index.topk import top_k

__all__ = ["FaissIndex", "IndexConfig", "VersionedIndex", "use_blas_from"]

log = logging.getLogger(__name__)

#: Largest k the classic FAISS GPU k-selection kernels accept; GPU searches are clamped.
GPU_MAX_K = 2048

_gpu_lock = threading.Lock()
_gpu_res: object | None = None


class IndexConfig(BaseModel):
    """How a :class:`FaissIndex` is built; immutable so indexes can share one instance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["auto", "flat", "hnsw"] = Field(
        "auto",
        description="Index type. 'auto' picks exact 'flat' below hnsw_threshold items (exact "
        "and fast enough for small catalogs) and approximate 'hnsw' at or above it.",
    )
    hnsw_threshold: int = Field(
        500_000,
        ge=1,
        description="Catalog size at which 'auto' switches to HNSW: exact search costs "
        "O(items) per query, HNSW roughly O(log items) at recall@10 >= 0.95, but serving "
        "fetches at least 200 candidates, which HNSW pays for in its beam. Measured at k 250, 330 "
        "queries a batch: flat is faster up to 300k items (bench.index, embedding-like: "
        "3,499 vs 2,644 q/s at 300k; random vectors: 50 vs 267 ms at 50k, 164 vs 265 ms at "
        "300k, 486 vs 298 ms at 1M).",
    )
    hnsw_m: int = Field(
        32,
        ge=2,
        description="HNSW graph degree M. 32 measured recall@10 0.98 at efSearch 64 on 100k "
        "embedding-like vectors; higher costs memory and build time.",
    )
    ef_construction: int = Field(
        80,
        ge=1,
        description="HNSW build beam width; 80 is the setting behind the measured recall "
        "above and keeps (re)builds fast.",
    )
    ef_search: int = Field(
        128,
        ge=1,
        description="HNSW search beam width (raised to the fetched k when smaller). On "
        "embedding-like vectors (bench/index.py) 1M items gave recall@10 0.934 at 64, 0.982 "
        "at 128, 0.997 at 256; 128 is the cheapest setting above 0.95.",
    )
    sub_index_max_items: int = Field(
        10_000,
        ge=0,
        description="A scenario restricted to at most this many items is searched in an "
        "exact (flat) sub-index of them, kept in step with the catalog; a larger one "
        "searches the whole index through an ID selector. Measured (bench/scenario_search.py, "
        "50k items, 256 queries, k 200): up to 10k allowed items the flat sub-index is exact "
        "and faster than the selector (HNSW under a restrictive selector also loses recall: "
        "0.62-0.83 recall@200 at 1%); at 25k the selector on the whole index was faster.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where flat indexes live. 'auto' uses a GPU when faiss sees one, 'cuda' "
        "requires one. HNSW always stays on the CPU (faiss has no GPU HNSW).",
    )
    rebuild_tombstone_ratio: float = Field(
        0.2,
        gt=0.0,
        le=1.0,
        description="Rebuild an HNSW graph once deleted/replaced entries exceed this fraction "
        "of its labels: dead nodes cost search time and memory but keep recall.",
    )
    blas_threshold: int = Field(
        192,
        ge=0,
        description="Process-wide faiss.cvar.distance_compute_blas_threshold (set by the "
        "entry points, index.faiss_index.use_blas_from): FAISS scans a flat index without "
        "BLAS while queries x dim is below it. Its build default, 128,000, keeps batches of "
        "under 2,000 queries at dim 64 off BLAS: 500 queries over 50,000 items took 296 ms "
        "instead of 53 (one thread). 192 is the one-thread crossover measured at dim 64.",
    )
    search_threads: int = Field(
        2,
        ge=1,
        description="Process-wide (set by the worker's entry point, index.topk.use_threads): "
        "threads an exact CPU search splits its queries over. A worker's Python is one core "
        "(the GIL), and the search its largest stage under a backlog: on a 2-core host two "
        "threads served 500 queries over 50,000 items in ~38 ms instead of ~85. Searches of "
        "under 256 queries (a light load's batches) stay on one thread (index/topk.py). Idle "
        "threads block, so a busy host only time-slices them; 1 keeps every search on the "
        "model-steps thread.",
    )


# --------------------------------------------------------------------------- helpers


def use_blas_from(threshold: int) -> None:
    """Process-wide: FAISS flat search uses BLAS once queries x dim reaches `threshold`.

    Since faiss 1.15 (PR #5022) `distance_compute_blas_threshold` compares against queries x
    dim, with a default of 128,000 tuned for many OpenMP threads; with one thread, as our
    workers run, BLAS is faster from three queries on, 3.6x at 32 and 5.6x at 500 (faiss
    PR #5109, open, would scale the default with the thread count and retire this call).
    Measured here at dim 64 over 50,000 items, sequential / BLAS ms: 1 query 0.53 / 1.36,
    2 queries 1.07 / 1.41, 4 queries 2.18 / 1.60, 32 queries 17.3 / 4.8, 500 queries
    296 / 53."""
    faiss.cvar.distance_compute_blas_threshold = threshold


def _num_gpus() -> int:
    """GPUs visible to faiss (0 on faiss-cpu builds); a function so tests can fake a GPU."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def _new_gpu_flat(dim: int) -> faiss.Index:
    """A ``GpuIndexFlatIP`` on GPU 0, sharing one ``StandardGpuResources`` per process."""
    global _gpu_res
    with _gpu_lock:
        if _gpu_res is None:
            _gpu_res = faiss.StandardGpuResources()
        return faiss.GpuIndexFlatIP(_gpu_res, dim)


def _grow(arr: np.ndarray, needed: int) -> np.ndarray:
    """Return ``arr`` or a copy with capacity >= ``needed`` (doubling keeps appends O(1))."""
    if needed <= len(arr):
        return arr
    bigger = np.empty((max(needed, 2 * len(arr), 16), *arr.shape[1:]), dtype=arr.dtype)
    bigger[: len(arr)] = arr
    return bigger


def _as_ids(ids: Iterable[int] | np.ndarray) -> np.ndarray:
    """Validate ids as a 1-D non-negative int64 array (-1 is FAISS's 'no result')."""
    arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TypeError(f"ids must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    if arr.dtype.kind == "u" and int(arr.max()) > ID_MASK:
        raise ValueError("ids must be < 2**63")
    arr = arr.astype(np.int64, copy=False)
    if int(arr.min()) < 0:
        raise ValueError("ids must be non-negative (-1 marks padding)")
    return arr


def _as_matrix(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    """float32, C-contiguous, shape (n, dim): the only layout FAISS's Python API accepts."""
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{what} must have shape (n, {dim}), got {arr.shape}")
    return arr


def _checked(ids: np.ndarray, vectors: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """ids and vectors as FAISS takes them, or ValueError: as many of each, all finite (one
    NaN would poison every score)."""
    keys = _as_ids(ids)
    vecs = _as_matrix(vectors, dim, "vectors")
    if len(keys) != len(vecs):
        raise ValueError(f"{len(keys)} ids but {len(vecs)} vectors")
    if not np.isfinite(vecs).all():
        raise ValueError("vectors contain NaN or inf")
    return keys, vecs


def _last_wins(ids: np.ndarray, vecs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop earlier duplicates inside one batch, so a batch behaves like sequential upserts."""
    _, first_in_reversed = np.unique(ids[::-1], return_index=True)
    if len(first_in_reversed) == len(ids):
        return ids, vecs
    keep = np.sort(len(ids) - 1 - first_in_reversed)
    return ids[keep], vecs[keep]


def _padded(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)


# --------------------------------------------------------------------------- CPU store


class _Store:
    """Dense CPU copy of the live catalog: rows [0, n), ``pos[id] = row``, swap-remove."""

    def __init__(self, dim: int, capacity: int) -> None:
        self.vecs = np.empty((capacity, dim), dtype=np.float32)
        self.ids = np.empty(capacity, dtype=np.int64)
        self.pos: dict[int, int] = {}
        self.n = 0
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None  # (ids, rows); None: stale

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Rows of `ids` (-1: not stored), vectorised: a serving batch looks up ~10^5 ids,
        and the catalog changes far less often than it is read."""
        if self._sorted is None:
            order = np.argsort(self.ids[: self.n], kind="stable")
            self._sorted = self.ids[: self.n][order], order
        live, order = self._sorted
        if not len(live):
            return np.full(len(ids), -1, np.int64)
        at = np.minimum(np.searchsorted(live, ids), len(live) - 1)
        return np.where(live[at] == ids, order[at], -1)

    def put(self, ids: np.ndarray, vecs: np.ndarray) -> np.ndarray:
        """Overwrite known ids in place, append new ones; returns the 'already existed' mask."""
        rows = np.empty(len(ids), dtype=np.int64)
        existed = np.zeros(len(ids), dtype=bool)
        n = self.n
        for j, key in enumerate(ids.tolist()):
            row = self.pos.get(key)
            if row is None:  # new id: next free row at the tail
                row = self.pos[key] = n
                n += 1
            else:
                existed[j] = True
            rows[j] = row
        self.vecs, self.ids = _grow(self.vecs, n), _grow(self.ids, n)
        self.vecs[rows], self.ids[rows], self.n = vecs, ids, n
        self._sorted = None
        return existed

    def delete(self, ids: np.ndarray) -> np.ndarray:
        """Remove ids by moving the last row into each hole; returns the ids that existed."""
        removed = []
        for key in ids.tolist():
            row = self.pos.pop(key, None)
            if row is None:
                continue
            removed.append(key)
            last = self.n - 1
            if row != last:
                moved = int(self.ids[last])
                self.vecs[row], self.ids[row], self.pos[moved] = self.vecs[last], moved, row
            self.n = last
        self._sorted = None
        return np.asarray(removed, dtype=np.int64)

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        """Views of the live (ids, vectors); copy them before releasing the index lock."""
        return self.ids[: self.n], self.vecs[: self.n]

    def ids_of_rows(self, rows: np.ndarray) -> np.ndarray:
        out = np.full(rows.shape, -1, dtype=np.int64)
        ok = rows >= 0
        out[ok] = self.ids[rows[ok]]
        return out


# --------------------------------------------------------------------------- backends


class _Backend(Protocol):
    kind: str
    max_k: int | None
    dead: int

    def upsert(self, ids: np.ndarray, vecs: np.ndarray, existed: np.ndarray) -> None: ...
    def remove(self, ids: np.ndarray) -> None: ...
    def needs_rebuild(self) -> bool: ...
    def rebuild(self, ids: np.ndarray, vecs: np.ndarray) -> None: ...
    def search(self, q: np.ndarray, kk: int, allowed: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]: ...


def _bitmap(mask: np.ndarray) -> tuple[faiss.IDSelectorBitmap, np.ndarray]:
    """A selector of the labels where `mask` holds (keep the array referenced while the
    selector is in use: FAISS reads it through a raw pointer)."""
    bits = np.packbits(mask, bitorder="little")
    return faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits)), bits


class _FlatBackend:
    """Exact search; FAISS label == store row, FAISS copy re-synced lazily before the
    searches that use it (GPU, or a selector on the CPU)."""

    dead = 0

    def __init__(self, index: faiss.Index, store: _Store, kind: str, max_k: int | None) -> None:
        self.index, self.kind, self.max_k = index, kind, max_k
        self._store = store
        self._stale = False

    def upsert(self, ids: np.ndarray, vecs: np.ndarray, existed: np.ndarray) -> None:
        # New ids were appended to the store's tail and are picked up by _sync; an
        # overwritten row changed in place, which FAISS cannot do, so resync fully.
        self._stale |= bool(existed.any())

    def remove(self, ids: np.ndarray) -> None:
        self._stale |= len(ids) > 0  # swap-remove moved rows

    def needs_rebuild(self) -> bool:
        return False

    def rebuild(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        self._stale = True

    def search(self, q: np.ndarray, kk: int, allowed: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        if allowed is None and self.kind == "flat":  # index/topk.py: ~1.8x FAISS's scan
            scores, rows = top_k(q, self._store.live()[1], kk)
            return scores, self._store.ids[rows]
        self._sync()
        if allowed is None:
            scores, rows = self.index.search(q, kk)
        elif self.kind == "flat-gpu":  # no selector on GPU: fetch what the kernel allows
            scores, rows = self.index.search(q, min(self.index.ntotal, self.max_k or kk))
            rows = np.where(np.isin(self._store.ids_of_rows(rows), allowed), rows, -1)
        else:
            sel, _bits = _bitmap(np.isin(self._store.ids[: self.index.ntotal], allowed))
            scores, rows = self.index.search(q, kk, params=faiss.SearchParameters(sel=sel))
        return scores, self._store.ids_of_rows(rows)

    def _sync(self) -> None:
        ids, vecs = self._store.live()
        if self._stale or self.index.ntotal > len(ids):
            self.index.reset()
            self._stale = False
        if self.index.ntotal < len(ids):
            self.index.add(vecs[self.index.ntotal :])


class _HnswBackend:
    """Approximate search; deletes/replacements are tombstoned labels filtered at search."""

    kind = "hnsw"
    max_k = None

    def __init__(self, dim: int, cfg: IndexConfig) -> None:
        self._dim, self._cfg = dim, cfg
        self._reset()

    def _reset(self) -> None:
        self.index = faiss.IndexHNSWFlat(self._dim, self._cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = self._cfg.ef_construction
        self._owner = np.empty(0, dtype=np.int64)  # label -> item id, -1 = tombstone
        self._label_of: dict[int, int] = {}
        self.dead = 0

    def upsert(self, ids: np.ndarray, vecs: np.ndarray, existed: np.ndarray) -> None:
        self.remove(ids[existed])
        start = self.index.ntotal
        self.index.add(vecs)
        self._owner = _grow(self._owner, start + len(ids))
        self._owner[start : start + len(ids)] = ids
        # In pieces: one dict.update of 1M keys holds the GIL for ~0.19 s, which held the
        # worker's event loop while the first index was built in a thread.
        for first in range(0, len(ids), 65536):
            part = ids[first : first + 65536].tolist()
            label = start + first
            self._label_of.update(zip(part, range(label, label + len(part)), strict=True))

    def remove(self, ids: np.ndarray) -> None:
        for key in ids.tolist():
            label = self._label_of.pop(key, None)
            if label is not None:
                self._owner[label] = -1
                self.dead += 1

    def needs_rebuild(self) -> bool:
        return self.dead > self._cfg.rebuild_tombstone_ratio * self.index.ntotal

    def rebuild(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        log.info("rebuilding HNSW: %d live, %d tombstones", len(ids), self.dead)
        self._reset()
        self.upsert(ids, vecs, np.zeros(len(ids), dtype=bool))

    def search(self, q: np.ndarray, kk: int, allowed: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        ntotal = self.index.ntotal
        owner = self._owner[:ntotal]
        kwargs: dict[str, object] = {"efSearch": max(self._cfg.ef_search, kk)}
        if self.dead or allowed is not None:
            # Labels are sequential, so a bitmap of live (and allowed) labels is the
            # cheapest selector; `_bits` and `sel` stay referenced until the search returns.
            mask = owner >= 0 if allowed is None else np.isin(owner, allowed)
            kwargs["sel"], _bits = _bitmap(mask)
            if allowed is not None:  # a filter passes fewer nodes: widen the beam as much
                share = max(float(mask.mean()), 0.1)  # (at most 10x: small sets go flat)
                kwargs["efSearch"] = int(kwargs["efSearch"] / share)
        scores, labels = self.index.search(q, kk, params=faiss.SearchParametersHNSW(**kwargs))
        ids = np.full(labels.shape, -1, dtype=np.int64)
        ok = labels >= 0
        ids[ok] = owner[labels[ok]]
        return scores, ids


# --------------------------------------------------------------------------- index


def _choose_kind(cfg: IndexConfig, expected_size: int) -> str:
    """Resolve config 'auto' values into 'flat', 'flat-gpu' or 'hnsw'."""
    kind = cfg.kind
    if kind == "auto":
        kind = "hnsw" if expected_size >= cfg.hnsw_threshold else "flat"
    gpus = _num_gpus()
    if cfg.device == "cuda" and gpus == 0:
        raise RuntimeError("IndexConfig.device='cuda' but faiss sees no GPU")
    if kind == "hnsw":
        if cfg.device == "cuda":
            log.warning("faiss has no GPU HNSW; keeping the HNSW index on the CPU")
        return "hnsw"
    return "flat-gpu" if cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0) else "flat"


class FaissIndex:
    """One FAISS index over item vectors (inner product), with an id layer.

    Mutable through :meth:`upsert` / :meth:`remove` (for streaming catalog updates), but the
    kind is fixed at construction; :meth:`compacted` builds a fresh index (re-choosing the
    kind for the current size) to publish through :class:`VersionedIndex`.
    """

    def __init__(self, dim: int, config: IndexConfig | None = None, expected_size: int = 0):
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self._dim = dim
        self._cfg = config or IndexConfig()
        self._lock = threading.RLock()
        self._store = _Store(dim, max(expected_size, 16))
        self._backend = self._new_backend(_choose_kind(self._cfg, expected_size))

    def _new_backend(self, kind: str) -> _Backend:
        if kind == "hnsw":
            return _HnswBackend(self._dim, self._cfg)
        if kind == "flat-gpu":
            return _FlatBackend(_new_gpu_flat(self._dim), self._store, kind, GPU_MAX_K)
        return _FlatBackend(faiss.IndexFlatIP(self._dim), self._store, kind, None)

    @classmethod
    def build(
        cls, ids: np.ndarray, vectors: np.ndarray, config: IndexConfig | None = None
    ) -> FaissIndex:
        """Build an index over a whole catalog; the kind is chosen from its size."""
        arr = np.asarray(vectors)
        if arr.ndim != 2:
            raise ValueError(f"vectors must be 2-D (n, dim), got shape {arr.shape}")
        # distinct ids by sorting, which lets the GIL go (numpy 2.4's hash-based np.unique
        # held it for ~0.1 s at 1M ids while the worker's first index was built in a thread)
        keys, vecs = _last_wins(*_checked(ids, arr, arr.shape[1]))
        index = cls(arr.shape[1], config, expected_size=len(keys))
        index._put(keys, vecs)
        return index

    # ---- properties

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def kind(self) -> str:
        """'flat', 'flat-gpu' or 'hnsw'."""
        return self._backend.kind

    @property
    def config(self) -> IndexConfig:
        return self._cfg

    @property
    def tombstones(self) -> int:
        """Dead HNSW entries awaiting a rebuild (always 0 for flat kinds); for metrics."""
        return self._backend.dead

    def __len__(self) -> int:
        """Live items (tombstones excluded)."""
        return self._store.n

    def __contains__(self, id: object) -> bool:
        return isinstance(id, int | np.integer) and int(id) in self._store.pos

    def __repr__(self) -> str:
        return f"FaissIndex(kind={self.kind!r}, dim={self._dim}, items={len(self)})"

    # ---- mutations

    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace items: int64 ids (n,), float32 vectors (n, dim).

        An existing id is replaced, never duplicated; within one batch the last occurrence
        of an id wins.  Non-finite vectors are rejected: one NaN would poison every score.
        """
        self._put(*_last_wins(*_checked(ids, vectors, self._dim)))

    def _put(self, keys: np.ndarray, vecs: np.ndarray) -> None:
        """Upsert checked, distinct ids."""
        if not len(keys):
            return
        with self._lock:
            existed = self._store.put(keys, vecs)
            self._backend.upsert(keys, vecs, existed)
            self._maybe_rebuild()

    def remove(self, ids: Iterable[int]) -> None:
        """Delete items; unknown ids are ignored (deletes may be replayed from Kafka)."""
        keys = _as_ids(ids)
        with self._lock:
            removed = self._store.delete(keys)
            self._backend.remove(removed)
            self._maybe_rebuild()

    def _maybe_rebuild(self) -> None:
        if self._backend.needs_rebuild():
            self._backend.rebuild(*self._store.live())

    # ---- reads

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[Collection[int]] | None = None,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: scores (n, k) float32 and ids (n, k) int64.

        ``exclude[i]`` holds ids that must not appear in row ``i`` (e.g. the user's seen
        items); the search over-fetches to still return ``k`` results when the catalog has
        enough.  ``allowed`` (sorted ids) restricts every query of the call to those ids
        (a scenario's items) by an ``IDSelectorBitmap`` over the labels.  Missing slots
        are id ``-1`` with score ``-inf``.  On GPU the fetch is capped at
        :data:`GPU_MAX_K`, so a very long ``exclude`` can leave padded slots (and GPU flat
        search, which takes no selector, filters ``allowed`` after the fetch).
        """
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        q = _as_matrix(queries, self._dim, "queries")
        excl = self._exclude_arrays(exclude, len(q))
        with self._lock:
            n = len(self._store.pos)
            if n == 0 or k == 0 or len(q) == 0:
                return _padded(len(q), k)
            extra = max((len(e) for e in excl), default=0)
            kk = min(k + extra, n, self._backend.max_k or n)
            scores, ids = self._backend.search(
                q, kk, None if allowed is None else np.asarray(allowed, np.int64))
        return self._top_k(scores, ids, k, excl)

    @staticmethod
    def _exclude_arrays(exclude: Sequence[Collection[int]] | None, nq: int) -> list[np.ndarray]:
        if exclude is None:
            return []
        if len(exclude) != nq:
            raise ValueError(f"exclude has {len(exclude)} rows for {nq} queries")
        return [np.fromiter(e, dtype=np.int64, count=len(e)) for e in exclude]

    @staticmethod
    def _top_k(
        scores: np.ndarray, ids: np.ndarray, k: int, excl: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Drop padding and excluded ids per row, then left-align into (n, k) with padding."""
        out_s, out_i = _padded(len(ids), k)
        if not excl:  # FAISS pads only at the end of a row: copy the block
            kk = min(k, ids.shape[1])
            out_i[:, :kk], out_s[:, :kk] = ids[:, :kk], scores[:, :kk]
            out_s[out_i < 0] = -np.inf
            return out_s, out_i
        for row in range(len(ids)):
            keep = ids[row] >= 0
            if excl and len(excl[row]):
                keep &= ~np.isin(ids[row], excl[row])
            kept_i, kept_s = ids[row][keep][:k], scores[row][keep][:k]
            out_i[row, : len(kept_i)], out_s[row, : len(kept_s)] = kept_i, kept_s
        return out_s, out_i

    def vector(self, id: int) -> np.ndarray | None:
        """A copy of the stored vector of ``id``, or ``None`` if it is not in the index."""
        with self._lock:
            row = self._store.pos.get(int(id))
            return None if row is None else self._store.vecs[row].copy()

    def vectors(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """Stored vectors (len(ids), dim) in the order given; KeyError on unknown ids."""
        keys = _as_ids(ids)
        with self._lock:
            rows = self._store.rows_of(keys)
            if (rows < 0).any():
                raise KeyError(f"ids not in index: {keys[rows < 0][:10].tolist()}")
            return self._store.vecs[rows]

    def ids(self) -> np.ndarray:
        """All live ids (a copy, in no particular order)."""
        with self._lock:
            return self._store.live()[0].copy()

    def compacted(self, config: IndexConfig | None = None) -> FaissIndex:
        """A fresh index over the live items, kind re-chosen for the current size.

        Only the snapshot copy holds this index's lock; the (possibly slow) build does not,
        so it can run in a background thread while this index keeps serving.
        """
        with self._lock:
            ids, vecs = (a.copy() for a in self._store.live())
        return FaissIndex.build(ids, vecs, config or self._cfg)


# --------------------------------------------------------------------------- versions


class VersionedIndex:
    """Holder that swaps whole indexes atomically: readers take (index, version) once per
    batch and keep using it, so one batch never mixes two catalogs.

    The pair lives in a single tuple attribute, so ``current()`` is one atomic read and
    needs no lock; ``swap`` takes a lock only to keep versions strictly increasing.
    The version is 0 until the first swap (also when constructed with an index).
    """

    def __init__(self, index: FaissIndex | None = None) -> None:
        self._state: tuple[FaissIndex | None, int] = (index, 0)
        self._lock = threading.Lock()

    def current(self) -> tuple[FaissIndex | None, int]:
        """The (index, version) pair to use for one whole batch."""
        return self._state

    @property
    def version(self) -> int:
        return self._state[1]

    def swap(self, new: FaissIndex) -> int:
        """Publish ``new``; returns its version (1 for the first swap, then +1 each)."""
        if not isinstance(new, FaissIndex):
            raise TypeError(f"expected a FaissIndex, got {type(new).__name__}")
        with self._lock:
            version = self._state[1] + 1
            self._state = (new, version)
        return version

    def swap_in_background(self, build: Callable[[], FaissIndex]) -> Future[int]:
        """Run ``build`` (e.g. ``old.compacted``) in a daemon thread, then swap its result.

        The future resolves to the new version, or carries the build's exception.
        """
        future: Future[int] = Future()

        def run() -> None:
            try:
                future.set_result(self.swap(build()))
            except BaseException as exc:  # report every failure through the future
                future.set_exception(exc)

        threading.Thread(target=run, name="index-rebuild", daemon=True).start()
        return future
