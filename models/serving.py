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


class Server:
    """Owns the id map and the versioned index for one learner."""

    def __init__(self, learner: OnlineLearner, config: IndexConfig | None = None,
                 refresh_batches: int = 20, refresh_s: float = 5.0):
        self.learner = learner
        self.config = config or IndexConfig()
        self.refresh_batches = refresh_batches
        self.refresh_s = refresh_s
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
        scores, keys = idx.search(user_vecs, k, exclude=seen)
        out = []
        for st, srow, krow in zip(states, scores, keys, strict=True):
            valid = krow >= 0
            out.append(self._with_reasons(idx, st, krow[valid], srow[valid], reason_window))
        return out, version

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
