"""Serving: the FAISS index of item-tower vectors, kept fresh, and top-K with reasons.

The index is rebuilt from the current item tower every N batches or T seconds and swapped
atomically (`index_version` goes up by one); between rebuilds, catalog changes are applied to
the serving index at once, so a deleted item is never recommended after its delete is
processed and a new item is recommendable immediately (from its text).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from index.faiss_index import FaissIndex, IndexConfig, VersionedIndex
from index.ids import IdMap
from models.learner import OnlineLearner
from models.user_state import UserState

log = logging.getLogger("streamrec.serving")


@dataclass(frozen=True)
class Scored:
    item_id: str
    score: float
    reason_item_id: str | None


def rank_candidates(learner: OnlineLearner, hists: Sequence[tuple], U: np.ndarray,
                    tower_rows: Sequence[np.ndarray], seen_rows: Sequence[set[int]],
                    residuals: Sequence[np.ndarray | None] | None = None
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The serving ranker: the index's (two-tower) candidates plus, with co-visitation, the
    items co-visited most with the user's recent ones; live and unseen only; scored by the
    learner's blend. Returns (item rows, scores) per user, best first. The offline evaluator
    ranks through this same function, so it measures what the agent serves."""
    cands = []
    for hist, rows, seen in zip(hists, tower_rows, seen_rows, strict=True):
        c = np.union1d(rows, learner.covisit_candidates(hist)).astype(np.int64)
        keep = learner.live[c] & ~np.isin(c, np.fromiter(seen, dtype=np.int64, count=len(seen)))
        cands.append(c[keep])
    cols = np.unique(np.concatenate(cands + [np.zeros(0, np.int64)]))
    if len(cols) == 0:
        return [(c, np.zeros(0, np.float32)) for c in cands]
    S = learner.blend(hists, U, cols, residuals)
    out = []
    for p, c in enumerate(cands):
        s = S[p, np.searchsorted(cols, c)]
        order = np.argsort(-s, kind="stable")
        out.append((c[order], s[order]))
    return out


class Server:
    """Owns the id map and the versioned index for one learner."""

    def __init__(self, learner: OnlineLearner, config: IndexConfig | None = None,
                 refresh_batches: int = 20, refresh_s: float = 5.0, candidates: int = 200):
        self.learner = learner
        self.config = config or IndexConfig()
        self.refresh_batches = refresh_batches
        self.refresh_s = refresh_s
        self.candidates = candidates
        self.ids = IdMap()
        self.index = VersionedIndex()
        self._batches_since = 0
        self._last_refresh = 0.0

    # ------------------------------------------------------------------ catalog changes
    def add_items(self, item_ids: Sequence[str]) -> None:
        """Register ids (collision-checked) and put their current vectors in the index."""
        keys = np.array([self.ids.add(i) for i in item_ids], dtype=np.int64)
        idx, _ = self.index.current()
        if idx is not None and len(keys):
            rows = np.array([self.learner.rows[i] for i in item_ids], dtype=np.int64)
            idx.upsert(keys, self.learner.item_vectors(rows)[1])

    def remove_items(self, item_ids: Sequence[str]) -> None:
        keys = [k for k in (self.ids.to_int(i) for i in item_ids) if k is not None]
        idx, _ = self.index.current()
        if idx is not None and keys:
            idx.remove(keys)

    # ------------------------------------------------------------------ refresh
    def maybe_refresh(self) -> bool:
        """Call once per batch: rebuild when N batches or T seconds have passed."""
        self._batches_since += 1
        due = (self._batches_since >= self.refresh_batches
               or time.monotonic() - self._last_refresh >= self.refresh_s
               or self.index.current()[0] is None)
        if due:
            self.refresh()
        return due

    def refresh(self) -> int:
        """Build a new index from the current item tower and swap it in; returns its version."""
        item_ids, vecs = self.learner.item_vectors()
        keys = np.array([self.ids.add(i) for i in item_ids], dtype=np.int64)
        new = FaissIndex.build(keys, vecs, self.config) if len(keys) else \
            FaissIndex(self.learner.cfg.dim, self.config)
        version = self.index.swap(new)
        self._batches_since = 0
        self._last_refresh = time.monotonic()
        return version

    @property
    def version(self) -> int:
        return self.index.version

    @property
    def n_items(self) -> int:
        idx, _ = self.index.current()
        return 0 if idx is None else len(idx)

    # ------------------------------------------------------------------ recommend
    def recommend(self, states: Sequence[UserState], user_vecs: np.ndarray, k: int,
                  reason_window: int = 10) -> tuple[list[list[Scored]], int]:
        """Top-k unseen items per user, each with the recent item it is most similar to.

        Returns the lists and the index version they came from (one version per batch).
        """
        idx, version = self.index.current()
        if idx is None or len(states) == 0:
            return [[] for _ in states], version
        seen = [{self.ids.to_int(i) for i in st.seen_items()} - {None} for st in states]
        if self.learner.head is None:  # two-tower alone: the index's ranking is final
            scores, keys = idx.search(user_vecs, k, exclude=seen)
            ranked = [(krow[krow >= 0], srow[krow >= 0]) for srow, krow in zip(scores, keys,
                                                                                strict=True)]
        else:
            ranked = self._rerank(idx, states, user_vecs, seen, k)
        out = [self._with_reasons(idx, st, keys, scores, reason_window)
               for st, (keys, scores) in zip(states, ranked, strict=True)]
        return out, version

    def _rerank(self, idx: FaissIndex, states: Sequence[UserState], user_vecs: np.ndarray,
                seen: list[set[int]], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Index candidates + co-visitation candidates, ordered by the learned ranker."""
        _, keys = idx.search(user_vecs, self.candidates, exclude=seen)
        rows = self.learner.rows
        tower_rows = [np.array([rows[self.ids.to_str(int(kk))] for kk in krow if kk >= 0],
                               dtype=np.int64) for krow in keys]
        seen_rows = [{rows[i] for i in st.seen_items() if i in rows} for st in states]
        hists = [self.learner.history(st) for st in states]
        ranked = rank_candidates(self.learner, hists, user_vecs, tower_rows, seen_rows,
                                 [st.residual for st in states])
        ids = self.learner.ids
        return [(np.array([self.ids.add(ids[r]) for r in c[:k]], dtype=np.int64), s[:k])
                for c, s in ranked]

    def _with_reasons(self, idx: FaissIndex, st: UserState, keys: np.ndarray,
                      scores: np.ndarray, window: int) -> list[Scored]:
        recent = [i for i in reversed(st.items) if i is not None][:window]
        keyed = (self.ids.to_int(i) for i in recent)
        recent_keys = [k for k in keyed if k is not None and k in idx]
        reasons: list[str | None] = [None] * len(keys)
        if recent_keys and len(keys):
            R = _unit(idx.vectors(recent_keys))
            C = _unit(idx.vectors(keys))
            best = (C @ R.T).argmax(axis=1)
            reasons = [self.ids.to_str(recent_keys[b]) for b in best]
        return [Scored(self.ids.to_str(int(kk)), float(s), r)
                for kk, s, r in zip(keys, scores, reasons, strict=True)]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
