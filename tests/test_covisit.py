"""Co-visitation counts (hand-checked), their replication properties, and the ranker that
learns from them (models/covisit.py, models/two_tower.PriorHead, models/serving)."""

from __future__ import annotations

import numpy as np
from helpers import walk_cycle
from hypothesis import given, settings
from hypothesis import strategies as st

from models.config import LearnerConfig
from models.covisit import CoVisitation
from models.learner import OnlineLearner
from models.serving import Server, rank_candidates
from models.user_state import exclusions


def test_counts_follow_the_sequence_aware_formula():
    """One user: 1, 2, 3. Pairs: (1,2) at distance 1; (2,3) at 1; (1,3) at 2 -> 0.9."""
    cv = CoVisitation(window=50, pair_decay=0.9, recencies=(0.8,))
    cv.learn([([], 1), ([1], 2), ([1, 2], 3)])
    C, F = cv.C.toarray(), cv.F.toarray()
    assert np.allclose(C, C.T)
    assert C[1, 2] == 1.0 and C[2, 3] == 1.0 and np.isclose(C[1, 3], 0.9)
    assert F[1, 2] == 1.0 and F[2, 1] == 0.0 and np.isclose(F[1, 3], 0.9)  # f[j, i]: i after j
    assert cv.n[1:4].tolist() == [1.0, 1.0, 1.0]
    # features of item 3 for a user whose profile is [2 (newest), 1]:
    # sym = 0.8^0 * c_23 / sqrt(n2 n3) + 0.8^1 * c_13 / sqrt(n1 n3) = 1 + 0.8 * 0.9
    sym, fwd = cv.features([[1, 2]], np.array([3]))
    assert np.isclose(sym[0, 0], 1 + 0.8 * 0.9) and np.isclose(fwd[0, 0], 1 + 0.8 * 0.9)


def test_window_limits_how_far_back_pairs_reach_and_self_pairs_are_skipped():
    cv = CoVisitation(window=2, pair_decay=0.5, recencies=(0.8,))
    cv.learn([([5, 6, 7, 7], 7)])
    C = cv.C.toarray()
    assert C[7, 7] == 0  # an item never pairs with itself
    assert C[6, 7] == 0 and C[5, 7] == 0  # beyond the window of 2 (both slots hold 7)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 30), max_size=8), st.integers(1, 30)),
                min_size=1, max_size=40), st.randoms(use_true_random=False))
def test_replicas_applying_the_same_pairs_in_any_order_agree(pairs, rnd):
    """Every worker applies the whole item-covisits topic: order of batches must not matter."""
    a, b = CoVisitation(), CoVisitation()
    a.learn(pairs)
    shuffled = list(pairs)
    rnd.shuffle(shuffled)
    for k in range(0, len(shuffled), 3):
        b.learn(shuffled[k:k + 3])
    m = 31  # item rows used; capacities may differ (they grow by doubling)
    a._ensure(m)
    b._ensure(m)
    assert np.allclose(a.C.toarray()[:m, :m], b.C.toarray()[:m, :m], atol=1e-5)
    assert np.allclose(a.F.toarray()[:m, :m], b.F.toarray()[:m, :m], atol=1e-5)
    assert np.array_equal(a.n[:m], b.n[:m])


def test_arrays_round_trip_and_neighbours():
    cv = CoVisitation(recencies=(0.8,))
    cv.learn([([], 1), ([1], 2), ([1, 2], 3), ([4], 1)])
    back = CoVisitation(recencies=(0.8,))
    back.load_arrays(cv.arrays())
    assert np.allclose(back.C.toarray(), cv.C.toarray()) and np.array_equal(back.n, cv.n)
    assert set(back.neighbours(np.array([1]), k=10).tolist()) == {2, 3, 4}
    assert set(back.neighbours(np.array([1]), k=1).tolist()) == {2}  # the strongest only


def _cycle_learner(covisit: bool, **cfg: object
                   ) -> tuple[OnlineLearner, list[str], dict, dict]:
    """Users walk item i -> i+1 (mod 40); text vectors are pure noise, so only co-visitation
    and learned ids carry the next item."""
    n, rng = 40, np.random.default_rng(0)
    ids = [f"i{k}" for k in range(n)]
    learner = OnlineLearner(LearnerConfig(dim=16, history_len=10, device="cpu", seed=0,
                                          covisit=covisit, **cfg), text_dim=8, capacity=64)
    learner.upsert_items(ids, rng.normal(size=(n, 8)).astype(np.float32))
    states, pos, _ = walk_cycle(learner, ids, n_users=8, rounds=40)
    return learner, ids, states, pos


def test_ranker_serves_the_co_visited_next_item():
    learner, ids, states, pos = _cycle_learner(covisit=True)
    server = Server(learner.model)
    server.add_items(ids)
    server.refresh()
    hists = [st.history(learner.model.catalog) for st in states.values()]
    U = learner.model.history_vectors(hists, [st.residual for st in states.values()])
    rows = [np.zeros(0, dtype=np.int64)] * len(hists)  # co-visitation candidates only
    # each user cycles through the catalog, so the next item comes back: repeats allowed
    seen = [exclusions(st, "recent") for st in states.values()]
    ranked = rank_candidates(learner.model, hists, U, rows, seen)
    top = [learner.model.catalog.ids[int(r[0])] if len(r) else None for r, _ in ranked]
    want = [ids[pos[u] % len(ids)] for u in states]
    assert sum(t == w for t, w in zip(top, want, strict=True)) == len(states)
    # the blend weights the co-visitation feature positively and scores come best first
    assert float(learner.model.head.covis_w.detach().sum()) > 0
    assert all(np.all(np.diff(s) <= 0) for _, s in ranked)


def test_the_index_scores_rank_as_the_item_tower_does():
    """Serving passes the index search's u·v for the tower's candidates (only co-visitation's
    are computed from vectors): the ranking is the one computed from the item tower alone,
    items both sources found included."""
    learner, ids, states, _ = _cycle_learner(covisit=True)
    model = learner.model
    hists = [st.history(model.catalog) for st in states.values()]
    U = model.history_vectors(hists, [st.residual for st in states.values()])
    rows = np.flatnonzero(model.catalog.live)
    S = U @ model.item_vectors(rows)[1].T
    top = np.argsort(-S, axis=1)[:, :15]  # the tower's 15 best, as an exact index finds them
    seen = [exclusions(st, "recent") for st in states.values()]
    args = (model, hists, U, [rows[t] for t in top], seen)
    given = rank_candidates(*args, tower_scores=[s[t] for s, t in zip(S, top, strict=True)])
    computed = rank_candidates(*args)
    both = sum(len(np.intersect1d(rows[t], model.covis.neighbours(
        np.unique([r for r in h.rows if r]), 50))) for t, h in zip(top, hists, strict=True))
    assert both > 0  # some items come from both sources
    for (r1, s1), (r2, s2) in zip(given, computed, strict=True):
        assert r1.tolist() == r2.tolist()
        np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-5)
