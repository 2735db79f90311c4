"""Tests for models/serving.py (Server): versioned refreshes, top-k with reasons, catalog
changes between refreshes. Real learner, real FAISS, fixed seeds."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as gen

from index.faiss_index import FaissIndex, IndexConfig
from models.config import LearnerConfig
from models.examples import Interaction
from models.learner import OnlineLearner
from models.serving import Scored, Server, best_first_per_user, candidate_pairs
from models.user_state import UserState, item_keys

TEXT_DIM = 32
T0 = 1_700_000_000_000


def catalog(n: int, seed: int = 0, n_topics: int = 6):
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((n_topics, TEXT_DIM))
    vecs = centroids[np.arange(n) % n_topics] + 0.4 * rng.standard_normal((n, TEXT_DIM))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return [f"item-{i:05d}" for i in range(n)], vecs.astype(np.float32)


def make_learner(n_items: int = 120, seed: int = 0) -> tuple[OnlineLearner, list[str], np.ndarray]:
    cfg = LearnerConfig(dim=16, history_len=12, device="cpu", seed=seed, covisit=False)
    learner = OnlineLearner(cfg, text_dim=TEXT_DIM, capacity=256)
    ids, vecs = catalog(n_items, seed)
    learner.upsert_items(ids, vecs)
    return learner, ids, vecs


def train(learner: OnlineLearner, ids: list[str], n_users: int = 8, n_batches: int = 15,
          seed: int = 0, states: dict[str, UserState] | None = None) -> dict[str, UserState]:
    rng = np.random.default_rng(seed)
    states = {} if states is None else states
    ts = T0
    for _ in range(n_batches):
        evs = []
        for _ in range(16):
            u = f"user-{int(rng.integers(n_users))}"
            states.setdefault(u, UserState())
            ts += 1000
            evs.append(Interaction(u, ids[int(rng.integers(len(ids)))], "view", ts))
        learner.learn_batch(evs, states)
    return states


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _trained():
    learner, ids, _ = make_learner()
    states = train(learner, ids)
    server = Server(learner.model, IndexConfig())
    server.refresh()
    return learner, ids, states, server


@pytest.fixture(scope="module")
def trained():
    """A trained learner, its users and a refreshed server: read-only for the tests."""
    return _trained()


@pytest.fixture
def own_trained():
    """Same, but private to one test (which may change the catalog)."""
    return _trained()


# --------------------------------------------------------------------------- refresh


def test_refresh_increments_version_and_keeps_old_snapshots_consistent():
    learner, ids, _ = make_learner()
    server = Server(learner.model, IndexConfig())
    assert server.version == 0 and server.n_items == 0
    assert server.index.current() == (None, 0)
    v1 = server.refresh()
    assert v1 == 1 == server.version
    assert server.n_items == len(ids)
    old_idx, old_v = server.index.current()  # a reader takes (index, version) once
    names, old_vecs = learner.model.item_vectors()
    keys = np.array([server.model.catalog.key_of(i) for i in names])
    states = train(learner, ids, n_batches=5)  # the item tower moves
    _, new_vecs = learner.model.item_vectors()
    assert not np.allclose(old_vecs, new_vecs)
    learner.upsert_items(["brand-new"], catalog(1, seed=9)[1])
    assert server.refresh() == 2 and server.version == 2
    new_idx, new_v = server.index.current()
    assert new_idx is not old_idx and new_v == old_v + 1
    # the old snapshot is untouched: same items, same vectors as when it was built
    assert old_v == 1 and len(old_idx) == len(ids)
    np.testing.assert_array_equal(old_idx.vectors(keys), old_vecs)
    assert server.model.catalog.key_of("brand-new") not in old_idx
    # the new one has the new vectors and the new item
    np.testing.assert_allclose(new_idx.vectors(keys), new_vecs, rtol=1e-6, atol=1e-6)
    assert server.model.catalog.key_of("brand-new") in new_idx and len(new_idx) == len(ids) + 1
    assert server.refresh() == 3
    recs, version = server.recommend(list(states.values()), k=5)
    assert version == 3 and all(len(r) == 5 for r in recs)


def test_concurrent_readers_never_see_a_mixed_version():
    learner, ids, _ = make_learner(n_items=40)
    server = Server(learner.model, IndexConfig())
    extra_ids, extra_vecs = catalog(30, seed=5)
    extra_ids = [f"x-{i}" for i in extra_ids]
    expected = {1: 40}
    server.refresh()
    stop = threading.Event()
    errors: list[str] = []
    seen_versions: list[int] = []

    def reader():
        last = 0
        while not stop.is_set():
            idx, v = server.index.current()
            if v < last:
                errors.append(f"version went back {last} -> {v}")
            last = v
            n = len(idx)
            if v in expected and n != expected[v]:
                errors.append(f"version {v} has {n} items, expected {expected[v]}")
            seen_versions.append(v)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for k in range(15):  # each version holds exactly one more item than the last
            learner.upsert_items(extra_ids[k : k + 1], extra_vecs[k : k + 1])
            expected[k + 2] = 41 + k
            assert server.refresh() == k + 2
            time.sleep(0.001)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert server.version == 16 and len(set(seen_versions)) > 1


# --------------------------------------------------------------------------- recommend


def test_recommend_excludes_seen_and_returns_exact_top_k(trained):
    learner, _, states, server = trained
    sts = list(states.values())
    u = learner.model.user_vectors(sts)
    k = 10
    recs, version = server.recommend(sts, k=k)
    assert version == server.version
    names, V = learner.model.item_vectors()
    for st, uu, rec in zip(sts, u, recs, strict=True):
        seen = {n for n in names if st.seen.contains(item_keys([n]))[0]}
        assert len(seen) > 0
        assert len(rec) == k
        got = [r.item_id for r in rec]
        assert len(set(got)) == k
        assert not set(got) & seen
        # exact (flat) top-k among the unseen live items, scores = inner products
        scores = V @ uu
        unseen = [j for j, n in enumerate(names) if n not in seen]
        order = sorted(unseen, key=lambda j: -scores[j])[:k]
        assert got == [names[j] for j in order]
        np.testing.assert_allclose([r.score for r in rec], scores[order], rtol=1e-4, atol=1e-4)
        assert all(isinstance(r, Scored) for r in rec)


def test_reason_is_the_most_similar_recent_item(trained):
    learner, _, states, server = trained
    sts = list(states.values())
    window = 5
    recs, _ = server.recommend(sts, k=8, reason_window=window)
    names, V = learner.model.item_vectors()
    vec = dict(zip(names, _unit(V), strict=True))
    for st, rec in zip(sts, recs, strict=True):
        recent = [i for i in reversed(st.items) if i is not None][:window]
        assert recent
        for r in rec:
            assert r.reason_item_id in recent
            cos = {i: float(vec[r.item_id] @ vec[i]) for i in recent}
            assert cos[r.reason_item_id] == pytest.approx(max(cos.values()), abs=1e-5)


def test_reason_skips_removed_items_and_none_without_history(own_trained):
    learner, ids, _, server = own_trained
    st = UserState()
    for k, i in enumerate(ids[:4]):
        st.append(i, 1, T0 + k, None, 12)
    server.remove_items([ids[3]])  # the newest history item left the index
    sts = [st, UserState()]
    recs, _ = server.recommend(sts, k=5)
    assert len(recs[0]) == 5
    assert all(r.reason_item_id in ids[:3] for r in recs[0])
    assert len(recs[1]) == 5 and all(r.reason_item_id is None for r in recs[1])


def test_recommend_returns_fewer_when_catalog_is_short():
    learner, ids, _ = make_learner(n_items=15)
    states = {"u": UserState()}
    evs = [Interaction("u", ids[k], "view", T0 + 1000 * k) for k in range(10)]
    learner.learn_batch(evs, states)
    server = Server(learner.model, IndexConfig())
    empty, v0 = server.recommend([states["u"]], k=10)
    assert empty == [[]] and v0 == 0  # no index yet
    server.refresh()
    recs, _ = server.recommend([states["u"]], k=10)
    assert sorted(r.item_id for r in recs[0]) == sorted(ids[10:])
    assert server.recommend([], k=3) == ([], 1)


# --------------------------------------------------------------------------- catalog changes


def test_add_items_is_searchable_before_the_next_refresh(own_trained):
    learner, ids, states, server = own_trained
    n0 = server.n_items
    st = next(iter(states.values()))
    u = learner.model.user_vectors([st])
    # a new item whose vector is far in the user's direction: it must come first
    new_text = _unit(learner.model.items.proj.weight.detach().numpy().T @ u[0])[None]
    learner.upsert_items(["new-item"], new_text.astype(np.float32))
    server.add_items(["new-item"])
    assert server.version == 1 and server.n_items == n0 + 1
    idx, _ = server.index.current()
    key = server.model.catalog.key_of("new-item")
    assert key in idx
    np.testing.assert_allclose(idx.vectors([key])[0],
                               learner.model.item_vectors(np.array([learner.model.catalog.rows["new-item"]]))[1][0],
                               atol=1e-6)
    recs, version = server.recommend([st], k=5)
    assert version == 1
    assert recs[0][0].item_id == "new-item"


def test_add_items_before_first_refresh_is_picked_up_by_it():
    learner, ids, _ = make_learner(n_items=10)
    server = Server(learner.model, IndexConfig())
    learner.upsert_items(["late"], catalog(1, seed=3)[1])
    server.add_items(["late"])  # no index yet: only registered
    assert server.n_items == 0
    server.refresh()
    assert server.n_items == 11 and server.model.catalog.key_of("late") in server.index.current()[0]


def test_remove_items_disappears_immediately(own_trained):
    learner, ids, states, server = own_trained
    sts = list(states.values())
    recs, _ = server.recommend(sts, k=5)
    gone, also = recs[0][0].item_id, recs[0][1].item_id
    n0 = server.n_items
    server.remove_items([gone, "never-known", also])
    assert server.version == 1 and server.n_items == n0 - 2
    assert server.model.catalog.key_of(gone) not in server.index.current()[0]
    recs2, _ = server.recommend(sts, k=5)
    for rec in recs2:
        assert not {gone, also} & {r.item_id for r in rec}
        assert len(rec) == 5
        assert all(r.reason_item_id != gone for r in rec)
    # the learner forgets it too, so the next refresh keeps it out
    learner.delete_items([gone])
    assert server.refresh() == 2
    recs3, _ = server.recommend(sts, k=5)
    assert all(gone not in {r.item_id for r in rec} for rec in recs3)


def test_refresh_with_empty_catalog():
    cfg = LearnerConfig(dim=16, history_len=5, device="cpu")
    learner = OnlineLearner(cfg, text_dim=TEXT_DIM, capacity=16)
    server = Server(learner.model, IndexConfig())
    assert server.refresh() == 1
    idx, _ = server.index.current()
    assert isinstance(idx, FaissIndex) and len(idx) == 0
    recs, _ = server.recommend([UserState()], k=3)
    assert recs == [[]]


# --------------------------------------------------------------------------- the seen rule


class _Recorder:
    """A prequential model that records what the evaluator excludes for each scored event."""

    name = "recorder"

    def __init__(self, n_items: int):
        self.n_items, self.excluded = n_items, []

    def step(self, batch, which, excluded=None):
        self.excluded += [(batch[j][0], ex) for j, ex in zip(which, excluded, strict=True)]
        return np.zeros((len(which), self.n_items))


@pytest.mark.parametrize("mode", ["all", "recent", "none"])
def test_serving_and_the_evaluator_exclude_the_same_items(mode):
    """What `Server.recommend` will not serve a user (asked for the whole catalog) is
    exactly what the evaluator drops from that user's ranking at their next event, in every
    mode: both apply models/user_state.py to the same state. Users here have 3x history_len
    distinct items, so "the history" and "everything seen" differ."""
    from evaluation.evaluate import prequential

    learner, ids, _ = make_learner(n_items=60)
    H = learner.cfg.history_len
    rng = np.random.default_rng(4)
    users = [f"user-{k}" for k in range(5)]
    stream = [(u, int(i), T0 + 1000 * n) for n, (u, i) in enumerate(
        (u, i) for u in users for i in rng.permutation(len(ids))[:3 * H])]
    stream.sort(key=lambda e: e[2])
    states = {u: UserState() for u in users}
    learner.learn_batch([Interaction(u, ids[i], "view", ts) for u, i, ts in stream], states)
    server = Server(learner.model, IndexConfig(), exclude_seen=mode)
    server.refresh()
    sts = [states[u] for u in users]
    recs, _ = server.recommend(sts, k=len(ids))
    served = {u: {r.item_id for r in rec} for u, rec in zip(users, recs, strict=True)}

    touched = {u: {i for v, i, _ in stream if v == u} for u in users}
    probe = [(u, min(set(range(len(ids))) - touched[u]), T0 + 10**9 + k)  # a new item each:
             for k, u in enumerate(users)]  # evaluated in every mode, last for its user
    rec = _Recorder(len(ids))
    prequential(rec, stream + probe, batch_size=len(stream), item_ids=ids, exclude_seen=mode,
                history_len=H)
    last = dict(rec.excluded)  # each user's exclusion at their probe event
    keys = item_keys(ids)
    for u in users:
        dropped = {i for i, x in zip(ids, last[u].contains(keys), strict=True) if x}
        assert served[u] == set(ids) - dropped, (mode, u)
        assert len(dropped) == {"all": 3 * H, "recent": H, "none": 0}[mode]


@settings(max_examples=200, deadline=None)
@given(gen.lists(gen.tuples(gen.integers(0, 5), gen.floats(width=32, allow_nan=False)),
                max_size=60))
def test_best_first_per_user_is_lexsort_by_user_then_score(pairs):
    """The ranker's order (one argsort of integer codes) is np.lexsort's, ties included:
    infinities, ±0 and equal scores keep their given order."""
    owner = np.array([o for o, _ in pairs], np.int64)
    scores = np.array([s for _, s in pairs], np.float32)
    assert best_first_per_user(owner, scores).tolist() == \
        np.lexsort((-scores, owner)).tolist()



@settings(max_examples=200, deadline=None)
@given(gen.lists(gen.tuples(gen.sets(gen.integers(0, 30), max_size=8),
                            gen.lists(gen.integers(0, 30), max_size=10)), max_size=6),
       gen.booleans())
def test_candidate_pairs_is_each_users_union(users, scored):
    """The batch's one-sort candidate builder equals a plain per-user union: each user's
    distinct tower and other rows, ascending, with the tower's score where the tower found
    the row (an item both found keeps it) and NaN elsewhere."""
    tower = [np.array(sorted(t, reverse=True), np.int64) for t, _ in users]
    other = [np.array(o, np.int64) for _, o in users]
    scores = [np.arange(len(t), dtype=np.float32) + 0.5 for t in tower] if scored else None
    owner, rows, got = candidate_pairs(tower, other, scores, base=31)
    want_owner, want_rows, want_scores = [], [], []
    for u, (t, o) in enumerate(zip(tower, other, strict=True)):
        of_tower = dict(zip(t.tolist(), scores[u].tolist(), strict=True)) if scored else {}
        for row in sorted(set(t.tolist()) | set(o.tolist())):
            want_owner.append(u)
            want_rows.append(row)
            want_scores.append(of_tower.get(row, np.nan))
    assert owner.tolist() == want_owner
    assert rows.tolist() == want_rows
    np.testing.assert_array_equal(got, np.array(want_scores, np.float32))
