"""Serving: the FAISS index of item-tower vectors, and top-K with reasons.

The index is built at start-up and again, in a thread, for each new snapshot of the model
(streams/runtime.py SnapshotFollower), and swapped atomically (`index_version` goes up by
one); between swaps, catalog changes are applied to the serving index at once, so a deleted
item is never recommended after its delete is processed and a new item is recommendable
immediately (from its text).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from index.faiss_index import FaissIndex, IndexConfig, VersionedIndex
from models.candidates import history_rows, tower_of
from models.items import unique_ints
from models.model import SharedModel
from models.user_state import (
    ExcludeSeen,
    Exclusion,
    History,
    UserState,
    exclusions,
    first_unexcluded,
)


class Scored(NamedTuple):
    """One recommended item (a tuple: a batch makes ~5,000 of them, and a frozen dataclass
    took twice as long to build)."""

    item_id: str
    score: float
    reason_item_id: str | None


def rank_candidates(model: SharedModel, hists: Sequence[History], U: np.ndarray,
                    tower_rows: Sequence[np.ndarray], excluded: Sequence[Exclusion],
                    residuals: Sequence[np.ndarray | None] | None = None,
                    scenarios: Sequence[str] | None = None,
                    vectors: Callable[[np.ndarray], np.ndarray] | None = None,
                    tower_scores: Sequence[np.ndarray] | None = None
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The serving ranker: the `tower` source's candidates (`tower_rows`, from the caller's
    index search, with its u·v scores `tower_scores` if the caller has them) plus the other
    sources' (models/candidates.py; co-visitation); live, allowed in the query's scenario
    and not `excluded` only; scored by the model's blend (with the scenario's parameters).
    `vectors(rows)`: the items' vectors for the u·v the search did not give (the index's),
    else the item tower's. Returns (item rows, scores) per user, best first. The offline
    evaluator ranks through this same function, so it measures what the agent serves.

    One flat array of (user, row) pairs for the whole batch, not a loop per user: the
    agent ranks ~500 users per micro-batch under load."""
    n = len(hists)
    other = [history_rows(model.sources, model, hist) for hist in hists]
    owner, rows, tower = candidate_pairs(tower_rows, other, tower_scores,
                                         model.catalog.capacity)
    keep = model.catalog.live[rows] & ~_excluded(owner, model.catalog.keys[rows], excluded)
    if scenarios is not None:
        keep &= allowed_pairs(model, scenarios, owner, rows)
    owner, rows, tower = owner[keep], rows[keep], tower[keep]
    need = np.flatnonzero(np.isnan(tower))
    if len(need):
        tower[need] = model.pair_dots(U, owner[need], rows[need],
                                      None if vectors is None else vectors(rows[need]))
    scores = model.blend_pairs(hists, U, owner, rows, residuals, scenarios, tower)
    order = best_first_per_user(owner, scores)
    splits = np.cumsum(np.bincount(owner, minlength=n))[:-1]
    return list(zip(np.split(rows[order], splits), np.split(scores[order], splits),
                    strict=True))


def best_first_per_user(owner: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The order of pairs by user, then by score descending, ties in their given order:
    `np.lexsort((-scores, owner))` as one stable argsort of int64 codes, the user in the high
    32 bits and the score's order-preserving integer image in the low 32 (4.6 against 14.9 ms
    on a batch's 10^5 pairs).

    >>> best_first_per_user(np.array([1, 0, 0, 0, 1]),
    ...                     np.array([2.0, -1.0, 3.0, -0.0, 2.0], np.float32)).tolist()
    [2, 3, 1, 0, 4]
    """
    neg = (np.float32(0) - scores.astype(np.float32)).view(np.int32).astype(np.int64)
    low = np.where(neg < 0, neg ^ 0x7FFFFFFF, neg) + (1 << 31)  # float order, unsigned
    return np.argsort((owner.astype(np.int64) << 32) | low, kind="stable")


def candidate_pairs(tower_rows: Sequence[np.ndarray], other_rows: Sequence[np.ndarray],
                    tower_scores: Sequence[np.ndarray] | None, base: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The batch's distinct (user, row) candidates, sorted by user then row, and their u·v
    where the search gave it (NaN elsewhere): an item both sources found keeps the tower's
    score. One sort of codes 2·(user·base + row) + (0 tower, 1 other), so that a tower pair
    sorts before its duplicate from another source.

    >>> o, r, t = candidate_pairs([np.array([5, 2])], [np.array([2, 7, 7])],
    ...                           [np.array([0.9, 0.4], np.float32)], base=10)
    >>> o.tolist(), r.tolist(), t.tolist()
    ([0, 0, 0], [2, 5, 7], [0.4000000059604645, 0.8999999761581421, nan])
    """
    parts = [np.asarray(r, np.int64) for pair in zip(tower_rows, other_rows, strict=True)
             for r in pair]
    sizes = [len(part) for part in parts]
    users = np.repeat(np.arange(len(tower_rows)), 2)
    source = np.tile([0, 1], len(tower_rows))
    code = (np.repeat(users, sizes) * base + np.concatenate([np.zeros(0, np.int64), *parts])
            ) * 2 + np.repeat(source, sizes)
    scores = np.full(len(code), np.nan, np.float32)
    if tower_scores is not None:
        starts = np.cumsum([0, *sizes])[:-1:2]
        for start, s in zip(starts, tower_scores, strict=True):
            scores[start : start + len(s)] = s
    order = np.argsort(code)
    code = code[order] >> 1
    first = np.concatenate([[True], code[1:] != code[:-1]])[: len(code)]
    owner, rows = np.divmod(code[first], base)
    return owner, rows, scores[order][first]


def allowed_pairs(model: SharedModel, scenarios: Sequence[str], owner: np.ndarray,
                  rows: np.ndarray) -> np.ndarray:
    """Whether each (owner, row) candidate is allowed in its owner's scenario."""
    allowed = model.catalog.allowed_table(scenarios)
    if allowed is None:
        return np.ones(len(rows), bool)
    table, which = allowed
    return table[which[owner], rows]


SearchTarget = Callable[[str], tuple[FaissIndex, np.ndarray | None]]


def search_scenarios(idx: FaissIndex, U: np.ndarray, excluded: Sequence[Exclusion],
                     want: int, scenarios: Sequence[str] | None, target: SearchTarget
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`search_allowed` per scenario of the batch, each in the index and allowed set that
    `target(scenario)` names (one search for the whole batch when nothing is restricted)."""
    groups: dict[str, list[int]] = {}
    for p, name in enumerate(scenarios or []):
        groups.setdefault(name, []).append(p)
    where = {name: target(name) for name in groups}
    if all(t[0] is idx and t[1] is None for t in where.values()):
        return search_allowed(idx, U, excluded, want)
    parts = {name: search_allowed(where[name][0], U[ps], [excluded[p] for p in ps], want,
                                  where[name][1])
             for name, ps in groups.items()}
    width = max(part[1].shape[1] for part in parts.values())
    scores = np.full((len(U), width), -np.inf, np.float32)
    keys, ok = np.full((len(U), width), -1, np.int64), np.zeros((len(U), width), bool)
    for name, ps in groups.items():
        s, k, m = parts[name]
        scores[ps, : s.shape[1]], keys[ps, : k.shape[1]], ok[ps, : m.shape[1]] = s, k, m
    return scores, keys, ok


def search_allowed(idx: FaissIndex, U: np.ndarray, excluded: Sequence[Exclusion], want: int,
                   allowed: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The `want` best index neighbours of each user vector that are not excluded: scores
    and keys (n, fetch) plus the mask of the chosen ones (`first_unexcluded`). The index is
    asked for `want` + the batch's largest exclusion (at most `want` more); the rare user
    left short by more exclusions than that is searched again alone, deeper, so no user's
    search depth depends on another's."""
    fetch = want + min(max(map(len, excluded), default=0), want)
    scores, keys = idx.search(U, fetch, allowed=allowed)
    ok = first_unexcluded(keys, excluded, want)
    short = [p for p, ex in enumerate(excluded)
             if ok[p].sum() < want and len(ex) > fetch - want and fetch < len(idx)]
    if short:
        deep = want + max(len(excluded[p]) for p in short)
        s2, k2 = idx.search(U[short], deep, allowed=allowed)
        pad = ((0, 0), (0, deep - fetch))
        scores = np.pad(scores, pad, constant_values=-np.inf)
        keys = np.pad(keys, pad, constant_values=-1)
        scores[short], keys[short] = s2, k2
        ok = first_unexcluded(keys, excluded, want)
    return scores, keys, ok


def _excluded(owner: np.ndarray, keys: np.ndarray, excluded: Sequence[Exclusion]
              ) -> np.ndarray:
    """Which (owner, key) pairs are excluded; `owner` sorted ascending."""
    out = np.zeros(len(keys), bool)
    bounds = np.searchsorted(owner, np.arange(len(excluded) + 1))
    for p, ex in enumerate(excluded):
        lo, hi = bounds[p], bounds[p + 1]
        if hi > lo and len(ex):
            out[lo:hi] = ex.contains(keys[lo:hi])
    return out


class Server:
    """Owns the versioned index for one model (which a snapshot swaps). Items are named
    by their catalog's keys (models/items.py), the index's labels.

    >>> from models.config import LearnerConfig
    >>> model = SharedModel(LearnerConfig(device="cpu"), text_dim=4)
    >>> model.upsert_items(["a", "b", "c"], np.eye(3, 4, dtype=np.float32))
    >>> server = Server(model); server.refresh()             # index version 1
    1
    >>> st = UserState(); st.append("a", etype=1, ts=1_000, text_vec=None, max_len=50)
    >>> lists, version = server.recommend([st], k=2)
    >>> [(r.item_id, r.reason_item_id) for r in lists[0]]    # "a" is seen: not recommended
    [('b', 'a'), ('c', 'a')]
    """

    def __init__(self, model: SharedModel, config: IndexConfig | None = None,
                 exclude_seen: ExcludeSeen = "all"):
        self.model = model
        self.exclude_seen = exclude_seen
        self.config = config or IndexConfig()
        self.index = VersionedIndex()
        self._subs: dict[tuple[int, str], FaissIndex] = {}  # (index version, scenario)

    # ------------------------------------------------------------------ catalog changes
    def add_items(self, item_ids: Sequence[str]) -> None:
        """Put the items' current vectors in the index (the model has their rows)."""
        rows = np.array([self.model.catalog.rows[i] for i in item_ids], dtype=np.int64)
        keys = self.model.catalog.keys[rows]
        idx, _ = self.index.current()
        if idx is not None and len(keys):
            vecs = self.model.item_vectors(rows)[1]
            idx.upsert(keys, vecs)
            for (_, scenario), sub in self._subs.items():  # (an item may leave a scenario)
                mask = self.model.catalog.allowed(scenario)
                ok = np.ones(len(rows), bool) if mask is None else mask[rows]
                sub.upsert(keys[ok], vecs[ok])
                sub.remove(keys[~ok])

    def remove_items(self, item_ids: Sequence[str]) -> None:
        keys = self.model.catalog.keys_of_ids(item_ids)
        idx, _ = self.index.current()
        if idx is not None and len(keys):
            idx.remove(keys)
            for sub in self._subs.values():
                sub.remove(keys)

    # ------------------------------------------------------------------ the index
    def refresh(self) -> int:
        """Build a new index from the current item tower and swap it in (at start-up; a
        new snapshot's index is built in a thread: streams/runtime.py SnapshotFollower);
        returns its version."""
        return self.index.swap(self.build_index(self.model))

    def build_index(self, model: SharedModel) -> FaissIndex:
        """An index of `model`'s live item vectors (safe in a thread: rows are shared and
        only ever added, under the catalog's lock)."""
        item_ids, vecs = model.item_vectors()
        keys = model.catalog.keys_of_ids(item_ids)
        return FaissIndex.build(keys, vecs, self.config) if len(keys) else \
            FaissIndex(model.cfg.dim, self.config)

    def swap(self, model: SharedModel, index: FaissIndex) -> int:
        """Serve `model` (a newer snapshot of the same catalog) and its index from now on."""
        self.model = model
        return self.index.swap(index)

    @property
    def version(self) -> int:
        return self.index.version

    def has_item(self, item_id: str) -> bool:
        """Whether the served model knows `item_id` (an event naming any other is rejected)."""
        return self.model.has_item(item_id)

    @property
    def n_items(self) -> int:
        idx, _ = self.index.current()
        return 0 if idx is None else len(idx)

    # ------------------------------------------------------------------ recommend
    def recommend(self, states: Sequence[UserState], k: int, reason_window: int = 10,
                  scenarios: Sequence[str] | None = None) -> tuple[list[list[Scored]], int]:
        """Top-k items per user that `exclude_seen` allows (models/user_state.py) and the query's
        scenario allows (`scenarios[p]` for user p), each with the recent item it is most
        similar to. The users' histories are read once, for their vectors and the ranker.

        Returns the lists and the index version they came from (one version per batch).
        """
        idx, version = self.index.current()
        if idx is None or len(states) == 0:
            return [[] for _ in states], version
        model = self.model
        hists = [st.history(model.catalog) for st in states]
        user_vecs = model.history_vectors(hists, [st.residual for st in states], scenarios)
        excluded = [exclusions(st, self.exclude_seen) for st in states]
        if model.head is None:  # two-tower alone: the index's ranking is final
            scores, keys, ok = search_scenarios(idx, user_vecs, excluded, k, scenarios,
                                                lambda name: self._target(idx, version, name))
            ranked = [(krow[m], srow[m]) for srow, krow, m in zip(scores, keys, ok, strict=True)]
        else:
            ranked = self._rerank(idx, version, states, hists, user_vecs, k, excluded,
                                  scenarios)
        keys = [keys for keys, _ in ranked]
        reasons = self._reasons(idx, states, keys, reason_window)
        out = [[Scored(i, s, r) for i, s, r in zip(ids, scores.tolist(), why, strict=True)]
               for ids, (_, scores), why in zip(self._ids_of(keys), ranked, reasons,
                                                strict=True)]
        return out, version

    def _ids_of(self, keys: Sequence[np.ndarray]) -> list[list[str | None]]:
        """The item ids of each user's keys, all looked up in one call: a call per user
        cost more in call overhead than in lookups (500 users, 10 items each)."""
        flat = self.model.catalog.ids_of_keys(np.concatenate([np.zeros(0, np.int64), *keys]))
        ends = np.cumsum([len(kk) for kk in keys]).tolist()
        return [flat[end - len(kk): end] for kk, end in zip(keys, ends, strict=True)]

    def _target(self, idx: FaissIndex, version: int, scenario: str
                ) -> tuple[FaissIndex, np.ndarray | None]:
        """Where to search for `scenario`'s items: a scenario of at most
        `sub_index_max_items` items in an exact sub-index of them (built at its first query
        on each index version, then kept in step with the catalog), a larger one in the
        index with its allowed keys as a selector (bench/scenario_search.py measured both)."""
        keys = self.model.catalog.allowed_keys(scenario)
        if keys is None:
            return idx, None
        if len(keys) > self.config.sub_index_max_items:
            return idx, keys
        sub = self._subs.get((version, scenario))
        if sub is None:
            keys = np.array([key for key in keys.tolist() if key in idx], np.int64)
            sub = FaissIndex.build(keys, idx.vectors(keys), IndexConfig(kind="flat")) \
                if len(keys) else FaissIndex(idx.dim, IndexConfig(kind="flat"))
            self._subs = {k: v for k, v in self._subs.items() if k[0] == version}
            self._subs[(version, scenario)] = sub
        return sub, None

    def _rerank(self, idx: FaissIndex, version: int, states: Sequence[UserState],
                hists: Sequence[History], user_vecs: np.ndarray, k: int,
                excluded: Sequence[Exclusion],
                scenarios: Sequence[str] | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """The candidate sources' items, ordered by the learned ranker. The index is asked
        for the `tower` source's count plus the exclusions, and the excluded ones are
        masked; without a `tower` source it is not searched."""
        tower_rows, tower_scores = self._tower_rows(idx, version, user_vecs, excluded,
                                                    scenarios)
        catalog = self.model.catalog
        ranked = rank_candidates(self.model, hists, user_vecs, tower_rows, excluded,
                                 [st.residual for st in states], scenarios,
                                 lambda rows: self._index_vectors(idx, rows), tower_scores)
        return [(catalog.keys[c[:k]], s[:k]) for c, s in ranked]

    def _tower_rows(self, idx: FaissIndex, version: int, user_vecs: np.ndarray,
                    excluded: Sequence[Exclusion], scenarios: Sequence[str] | None
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The `tower` source's candidate rows per user and the search's u·v of each (none
        when the source is not chosen)."""
        tower = tower_of(self.model.sources)
        if tower is None:
            return [np.zeros(0, np.int64)] * len(user_vecs), \
                [np.zeros(0, np.float32)] * len(user_vecs)
        scores, keys, ok = search_scenarios(idx, user_vecs, excluded, tower.count, scenarios,
                                            lambda name: self._target(idx, version, name))
        cand = self.model.catalog.rows_of_keys(keys)
        ok &= cand >= 0  # (a key the model lacks: never seen in practice)
        return [c[m] for c, m in zip(cand, ok, strict=True)], \
            [s[m] for s, m in zip(scores, ok, strict=True)]

    def _index_vectors(self, idx: FaissIndex, rows: np.ndarray) -> np.ndarray:
        """The vectors the index holds for `rows` (those its search scored; no item-tower
        pass per batch), the tower's if it lacks one (an item not indexed yet)."""
        try:
            return idx.vectors(self.model.catalog.keys[rows])
        except KeyError:
            return self.model.item_vectors(rows)[1]

    def _reasons(self, idx: FaissIndex, states: Sequence[UserState],
                 keys: Sequence[np.ndarray], window: int) -> list[list[str | None]]:
        """Per recommended item, the user's recent item (of the last `window`) whose index
        vector is most similar (cosine): one batched product for all users."""
        recent = []
        for st in states:
            newest = [i for i in reversed(st.items) if i is not None][:window]
            keyed = map(self.model.catalog.key_of, newest)
            recent.append([kk for kk in keyed if kk is not None and kk in idx])
        W, K = max(map(len, recent), default=0), max(map(len, keys), default=0)
        if W == 0 or K == 0:
            return [[None] * len(kk) for kk in keys]
        R, C = _padded_keys(recent, W), _padded_keys(keys, K)
        known = unique_ints(np.concatenate([R[R >= 0], C[C >= 0]]))
        V = _unit(idx.vectors(known))
        sims = np.einsum("nkd,nwd->nkw", V[np.searchsorted(known, C)],
                         V[np.searchsorted(known, R)])
        sims[np.broadcast_to(R[:, None, :] < 0, sims.shape)] = -np.inf
        best = np.take_along_axis(R, sims.argmax(axis=2), axis=1)  # (n, K) keys; -1: none
        return self._ids_of([row[: len(kk)] for row, kk in zip(best, keys, strict=True)])


def _padded_keys(lists: Sequence[Sequence[int]], width: int) -> np.ndarray:
    out = np.full((len(lists), width), -1, np.int64)
    for p, keys in enumerate(lists):
        out[p, : len(keys)] = keys
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
