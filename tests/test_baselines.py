"""Tests for evaluation/baselines.py: hand-computed updates and a prequential sanity check.

The expected values below are written from the formulas in the docstrings (plain Python
floats), not by calling the models, so a model that drifts from its formula fails here.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from evaluation import baselines
from evaluation.baselines import (
    BASELINES,
    ISGD,
    ItemKNN,
    ItemKNNSeq,
    MarkovBackoff,
    Pop,
    PopDecay,
    SRDecay,
    StreamModel,
    _RecentDistinct,
    make_baseline,
)
from evaluation.evaluate import prequential

N_ITEMS = 200
N_CLUSTERS = 10


def clustered_stream(seed: int = 7, n_users: int = 250, per_user: int = 20) -> list:
    """``n_users * per_user`` events: 200 items in 10 clusters, each user stays in one cluster.

    Clusters are chosen with probability ∝ 1/rank and items within a cluster with
    probability ∝ 1/rank (so popularity carries signal too); a user's items are distinct
    (drawn without replacement); users' events are interleaved at random, each user in order.
    """
    rng = np.random.default_rng(seed)
    size = N_ITEMS // N_CLUSTERS
    item_p = 1.0 / np.arange(1, size + 1)
    cluster_p = 1.0 / np.arange(1, N_CLUSTERS + 1)
    sequences = {}
    for u in range(n_users):
        cluster = rng.choice(N_CLUSTERS, p=cluster_p / cluster_p.sum())
        picks = rng.choice(size, size=per_user, replace=False, p=item_p / item_p.sum())
        sequences[f"u{u}"] = list(cluster * size + picks)
    order = np.repeat(list(sequences), per_user)
    rng.shuffle(order)
    position = dict.fromkeys(sequences, 0)
    events = []
    for ts, user in enumerate(order):
        events.append((str(user), int(sequences[user][position[user]]), ts * 1000))
        position[user] += 1
    return events


def prequential_hr10(model: StreamModel, events: list, batch_size: int = 8) -> float:
    """HR@10 of the project's prequential evaluator (evaluation/evaluate.py)."""
    return prequential(model, events, batch_size).metrics["hr@10"]


@pytest.fixture(scope="module")
def stream() -> list:
    return clustered_stream()


@pytest.mark.parametrize("name", sorted(set(BASELINES) - {"isgd"}))
def test_every_peer_beats_random(name: str, stream: list) -> None:
    assert len(stream) == 5000
    hr = prequential_hr10(make_baseline(name, N_ITEMS), stream)
    assert hr > 2 * 10 / N_ITEMS, f"{name}: HR@10 {hr:.3f}"


def test_isgd_beats_random_on_a_longer_stream() -> None:
    # At its defaults (η = 0.05, vectors ~ N(0, 0.1)) ISGD needs ~100 updates per item:
    # on the 5,000-event stream (25 per item) it only reaches HR@10 ≈ 0.08-0.15, so it gets
    # the same generator with 4x the users (20,000 events; ~0.3 s).
    hr = prequential_hr10(ISGD(N_ITEMS), clustered_stream(n_users=1000))
    assert hr > 2 * 10 / N_ITEMS, f"isgd: HR@10 {hr:.3f}"


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_score_shapes_and_unknown_users(name: str) -> None:
    model = make_baseline(name, 5)
    assert isinstance(model, StreamModel) and model.name == name
    fresh = model.score(["a", "b"])
    assert fresh.shape == (2, 5) and fresh.dtype == np.float64
    assert np.isfinite(fresh).all()
    model.learn([("a", 0, 1), ("a", 3, 2), ("c", 3, 3)])
    scores = model.score(["a", "nobody", "c"])
    assert scores.shape == (3, 5) and scores.dtype == np.float64
    assert np.isfinite(scores).all()
    assert model.score([]).shape == (0, 5)


def test_make_baseline() -> None:
    assert set(BASELINES) == {"pop", "pop_decay", "itemknn", "isgd", "itemknn_seq", "sr_decay",
                              "markov_backoff"}
    assert make_baseline("sr_decay", 3, window=5).window == 5
    assert make_baseline("markov_backoff", 3, alpha=2.0, window=7).knn.window == 7
    assert isinstance(make_baseline("pop_decay", 3, half_life=10), PopDecay)
    assert make_baseline("pop_decay", 3, half_life=10).half_life == 10
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline("nope", 3)


def test_pop_counts() -> None:
    model = Pop(4)
    model.learn([("a", 1, 0), ("b", 1, 1), ("a", 3, 2)])
    np.testing.assert_array_equal(model.score(["a", "zzz"]), [[0, 2, 0, 1]] * 2)


def test_pop_decay_halves_after_half_life() -> None:
    model = PopDecay(3, half_life=2000)
    model.learn([("a", 0, 0)])
    model.learn([("b", 1, t) for t in range(2000)])
    assert model.score(["a"])[0, 0] == pytest.approx(0.5, rel=1e-9)
    assert model.score(["a"])[0, 1] == pytest.approx(sum(0.5 ** (k / 2000) for k in range(2000)))


def test_pop_decay_lazy_renormalisation_matches_eager() -> None:
    rng = np.random.default_rng(3)
    items = rng.integers(0, 4, size=300)
    model = PopDecay(4, half_life=3, renorm_at=50.0)  # renormalises every few events
    eager = np.zeros(4)
    d = 0.5 ** (1 / 3)
    for t, item in enumerate(items):
        model.learn([("u", int(item), t)])
        eager = eager * d
        eager[item] += 1.0
        np.testing.assert_allclose(model.counts, eager, rtol=1e-12)


def test_itemknn_counts_symmetric_and_repeats_not_double_counted() -> None:
    model = ItemKNN(4)
    model.learn([("u", 0, 0), ("u", 1, 1), ("u", 0, 2), ("u", 2, 3)])  # u repeats item 0
    model.learn([("v", 1, 4), ("v", 1, 5), ("v", 2, 6), ("v", 2, 7)])  # v repeats 1 and 2
    expected = np.zeros((4, 4))
    for i, j, c in [(0, 1, 1), (0, 2, 1), (1, 2, 2)]:
        expected[i, j] = expected[j, i] = c
    np.testing.assert_array_equal(model.cooc.toarray(), expected)
    np.testing.assert_array_equal(model.counts, [1, 2, 2, 0])
    # v's profile is {1, 2}: score_i = c_1i / sqrt(c_1 c_i) + c_2i / sqrt(c_2 c_i)
    s = model.score(["v"])[0]
    assert s[0] == pytest.approx(1 / math.sqrt(2 * 1) + 1 / math.sqrt(2 * 1))
    assert s[1] == pytest.approx(2 / math.sqrt(2 * 2))
    assert s[3] == 0.0


def test_itemknn_profile_is_last_50_distinct_items() -> None:
    model = ItemKNN(60)
    model.learn([("u", i, i) for i in range(55)])
    model.learn([("v", 0, 99), ("v", 59, 100)])  # links item 0 (outside u's profile) to 59
    model.learn([("w", 10, 101), ("w", 59, 102)])  # links item 10 (inside it) to 59
    s = model.score(["u"])[0]
    assert s[59] == pytest.approx(1 / math.sqrt(2 * 2))


def test_itemknn_seq_counts_after_three_events() -> None:
    model = ItemKNNSeq(4)
    model.learn([("u", 0, 0), ("u", 1, 1), ("u", 2, 2)])
    expected = np.zeros((4, 4))
    expected[1, 0] = expected[0, 1] = 1.0  # event 2: item 0 is at distance 1 -> 0.9^0
    expected[2, 1] = expected[1, 2] = 1.0  # event 3: item 1 at distance 1 -> 0.9^0
    expected[2, 0] = expected[0, 2] = 0.9  # event 3: item 0 at distance 2 -> 0.9^1
    np.testing.assert_allclose(model.cooc.toarray(), expected)
    np.testing.assert_array_equal(model.counts, [1, 1, 1, 0])


def test_itemknn_seq_score_formula() -> None:
    model = ItemKNNSeq(4)
    model.learn([("u", 0, 0), ("u", 1, 1), ("u", 2, 2), ("v", 1, 3), ("v", 2, 4)])
    # c_01 = 1, c_02 = 0.9, c_12 = 1 + 1 = 2; c = [1, 2, 2, 0]
    # u's profile, newest first: 2 (age 0, w 1), 1 (age 1, w 0.8), 0 (age 2, w 0.64)
    r2 = math.sqrt(2)
    expected = [
        0.8 * 1 / r2 + 1.0 * 0.9 / r2 + 0.05 * math.log(2),
        0.64 * 1 / r2 + 1.0 * 2 / 2 + 0.05 * math.log(3),
        0.64 * 0.9 / r2 + 0.8 * 2 / 2 + 0.05 * math.log(3),
        0.0,
    ]
    scores = model.score(["u", "stranger"])
    np.testing.assert_allclose(scores[0], expected, rtol=1e-12)
    pop_term = [0.05 * math.log(2), 0.05 * math.log(3), 0.05 * math.log(3), 0.0]
    np.testing.assert_allclose(scores[1], pop_term, rtol=1e-12)


def test_itemknn_seq_window_limits_pairs() -> None:
    model = ItemKNNSeq(60, window=3)
    model.learn([("u", i, i) for i in range(5)])
    assert model.cooc.toarray()[4, 1] == pytest.approx(0.9**2)
    assert model.cooc.toarray()[4, 0] == 0.0  # 4 events back: outside the window of 3


def test_isgd_one_step_matches_formula() -> None:
    eta, lam = 0.05, 0.01
    model = ISGD(3, k=2, learn_rate=eta, reg=lam)
    p, q = [0.1, 0.2], [0.3, -0.1]
    model.user_vecs["u"] = np.array(p)
    model.item_vecs[1] = q
    model.item_known[1] = True
    model.learn([("u", 1, 0)])
    err = 1 - (p[0] * q[0] + p[1] * q[1])
    p_new = [p[f] + eta * (err * q[f] - lam * p[f]) for f in range(2)]
    q_new = [q[f] + eta * (err * p_new[f] - lam * q[f]) for f in range(2)]
    np.testing.assert_allclose(model.user_vecs["u"], p_new, rtol=1e-12)
    np.testing.assert_allclose(model.item_vecs[1], q_new, rtol=1e-12)
    dot = p_new[0] * q_new[0] + p_new[1] * q_new[1]
    scores = model.score(["u", "nobody"])
    np.testing.assert_allclose(scores[0], [0.0, 1 - abs(1 - dot), 0.0], atol=1e-15)
    np.testing.assert_array_equal(scores[1], np.zeros(3))


def test_isgd_initialises_new_vectors_and_is_seeded() -> None:
    a, b = ISGD(5, seed=1), ISGD(5, seed=1)
    for model in (a, b):
        model.learn([("u", 2, 0), ("v", 2, 1)])
    assert a.item_known.tolist() == [False, False, True, False, False]
    assert a.user_vecs["u"].shape == (10,) and np.any(a.user_vecs["u"] != 0)
    np.testing.assert_array_equal(a.score(["u", "v"]), b.score(["u", "v"]))


# u: 0 1 2 3, v: 1 2 1 (window 2). Rules, from each later item back k ≤ 2 steps, + 1/k:
#   u: 1: 0→1 +1 | 2: 1→2 +1, 0→2 +1/2 | 3: 2→3 +1, 1→3 +1/2 (0 is 3 back: outside W)
#   v: 2: 1→2 +1 | 1: 2→1 +1 (1→1, 2 back, is a self-pair: skipped)
SR_EVENTS = [("u", 0, 0), ("u", 1, 1), ("u", 2, 2), ("u", 3, 3),
             ("v", 1, 4), ("v", 2, 5), ("v", 1, 6)]
SR_RULES = {(0, 1): 1.0, (0, 2): 0.5, (1, 2): 2.0, (1, 3): 0.5, (2, 3): 1.0, (2, 1): 1.0}


def test_sr_decay_rule_weights_are_one_over_distance() -> None:
    expected = np.zeros((5, 5))
    for (a, b), w in SR_RULES.items():
        expected[a, b] = w
    for batches in ([SR_EVENTS], [[e] for e in SR_EVENTS]):  # merged per batch or per event
        model = SRDecay(5, window=2)
        for batch in batches:
            model.learn(batch)
        np.testing.assert_allclose(model.rules.toarray(), expected, rtol=1e-12)
        np.testing.assert_allclose(model.rules.row_max, expected.max(axis=1), rtol=1e-12)
        np.testing.assert_allclose(model.rules.row_sum, expected.sum(axis=1), rtol=1e-12)
    wider = SRDecay(5, window=3)
    wider.learn(SR_EVENTS[:4])
    assert wider.rules.toarray()[0, 3] == pytest.approx(1 / 3)  # 3 back: inside W = 3


def test_sr_decay_score_is_decayed_max_normalised_rules() -> None:
    model = SRDecay(5, window=2, profile_size=3, decay=0.5)
    model.learn(SR_EVENTS)
    # u's last 3 distinct items, newest first: 3 (d=1, w 1), 2 (d=2, w 0.5), 1 (d=3, w 0.25);
    # row maxima: item 3 has no rules (max 0: no term), item 2 max 1, item 1 max 2
    rules = [0.5 * SR_RULES.get((2, j), 0.0) / 1.0 + 0.25 * SR_RULES.get((1, j), 0.0) / 2.0
             for j in range(5)]
    counts = [1, 3, 2, 1, 0]  # events per item; the tie-break is 1e-6 · n / max n
    scores = model.score(["u", "stranger"])
    np.testing.assert_allclose(scores[0], [r + 1e-6 * c / 3 for r, c in zip(rules, counts,
                                                                             strict=True)],
                               rtol=1e-12)
    assert rules == [0.0, 0.5, 0.25, 0.5625, 0.0]
    np.testing.assert_allclose(scores[1], [1e-6 * c / 3 for c in counts], rtol=1e-12)


MK_EVENTS = [("u", 0, 0), ("u", 1, 1), ("u", 2, 2), ("v", 0, 3), ("v", 1, 4),
             ("w", 0, 5), ("w", 3, 6), ("x", 2, 7), ("x", 4, 8)]  # c(0→1) = 2, c(0→3) = 1


def _knn_q(user: str, extra: tuple = ()) -> np.ndarray:
    """itemknn_seq's row for `user` after MK_EVENTS (+ `extra`), normalised to sum 1."""
    knn = ItemKNNSeq(6)
    knn.learn([*MK_EVENTS, *extra])
    q = knn.score([user])[0]
    return q / q.sum()


def test_markov_backoff_is_the_transition_probability_as_alpha_goes_to_zero() -> None:
    for alpha in (0.0, 1e-9):
        model = MarkovBackoff(6, alpha=alpha)
        model.learn(MK_EVENTS)
        model.learn([("y", 0, 9)])  # y's last item is 0: c(0→·) = 3
        np.testing.assert_allclose(model.score(["y"])[0], [0, 2 / 3, 0, 1 / 3, 0, 0],
                                   atol=1e-8)


def test_markov_backoff_formula_and_backoff_to_itemknn_seq() -> None:
    model = MarkovBackoff(6, alpha=2.0)
    model.learn(MK_EVENTS)
    model.learn([("y", 0, 9)])
    q = _knn_q("y", (("y", 0, 9),))
    c = np.array([0, 2, 0, 1, 0, 0])
    np.testing.assert_allclose(model.score(["y"])[0], (c + 2.0 * q) / (3 + 2.0), rtol=1e-12)
    # x's last item, 4, was never followed by anything: the row is itemknn_seq's, normalised
    q = _knn_q("x", (("y", 0, 9),))
    scores = model.score(["x"])[0]
    np.testing.assert_allclose(scores, q, rtol=1e-12)
    assert np.argsort(-scores, kind="stable").tolist() == np.argsort(-q, kind="stable").tolist()
    assert len(set(np.round(q, 12))) > 2  # the ranking it follows is not a flat one


@pytest.mark.parametrize("name", ["sr_decay", "markov_backoff"])
def test_sequence_peers_score_each_event_with_the_profile_just_before_it(name: str) -> None:
    model = make_baseline(name, 6)
    model.learn(MK_EVENTS)
    batch = [("w2", 0, 10), ("w2", 2, 11), ("u", 4, 12)]  # w2 is new: 0, then 2
    start, later, day = (copy.deepcopy(model) for _ in range(3))
    seen_0 = copy.deepcopy(model)  # batch-start shared state, w2's profile holding item 0
    seen_0._profile["w2"] = _RecentDistinct(model.profile_size)
    seen_0._profile["w2"].add(0)
    rows = model.step(batch, which=[0, 1, 2])
    np.testing.assert_allclose(rows[0], start.score(["w2"])[0], rtol=1e-12)
    np.testing.assert_allclose(rows[1], seen_0.score(["w2"])[0], rtol=1e-12)
    assert not np.allclose(rows[1], rows[0])  # it saw item 0 (rules/transitions from 0)
    np.testing.assert_allclose(rows[2], start.score(["u"])[0], rtol=1e-12)
    changed = later.step([*batch[:2], ("u", 5, 12)], which=[0, 1])  # the future differs
    np.testing.assert_allclose(changed, rows[:2], rtol=1e-12)
    # a day-batch (order unknown): every event sees the batch-start profile, w2's empty one
    np.testing.assert_allclose(day.step(batch, which=[0, 1, 2], own_history=False),
                               start.score(["w2", "w2", "u"]), rtol=1e-12)


def test_sequence_peers_learn_the_batch_after_scoring() -> None:
    for model in (SRDecay(6), MarkovBackoff(6)):
        model.step(MK_EVENTS, which=[0])
        ref = type(model)(6)
        ref.learn(MK_EVENTS)
        np.testing.assert_allclose(model.score(["u", "x"]), ref.score(["u", "x"]), rtol=1e-12)


@pytest.mark.slow
def test_sequence_peers_run_in_the_comparison() -> None:
    from evaluation import comparison as cmp
    from models.config import LearnerConfig

    assert {"sr_decay", "markov_backoff"} <= set(cmp.model_names())
    items = [{"item_id": f"i{k}", "title": f"item {k}"} for k in range(N_ITEMS)]
    events = [{"user_id": u, "item_id": f"i{i}", "ts": ts} for u, i, ts in
              clustered_stream(n_users=40)]
    data = cmp.make_dataset("tiny", items, events,
                            lambda texts: np.zeros((len(texts), 4), dtype=np.float32))
    for name in ("sr_decay", "markov_backoff"):
        assert cmp.build_model(name, data, LearnerConfig()).name == name
    results = cmp.run_comparison(data, ["sr_decay", "markov_backoff"], 8, jobs=1,
                                 show_progress=False)
    doc = cmp.to_json(data, results, 8)
    for name in ("sr_decay", "markov_backoff"):
        assert doc["models"][name]["evaluated"] == 800 - 40  # every event but users' first
        assert doc["models"][name]["hr@10"] > 2 * 10 / N_ITEMS


@pytest.mark.parametrize("cls", [ItemKNN, ItemKNNSeq, MarkovBackoff])
def test_neighbourhood_peers_score_alike_with_dense_and_sparse_counts(cls, monkeypatch) -> None:
    """Past PAIR_DENSE_BYTES the counts go sparse: the scores are the same."""
    rng = np.random.default_rng(7)
    events = [(f"u{rng.integers(12)}", int(rng.integers(30)), t) for t in range(400)]
    scores = {}
    for dense_bytes in (2**30, 0):
        monkeypatch.setattr(baselines, "PAIR_DENSE_BYTES", dense_bytes)
        model = cls(30)
        rows = [model.step(events[i:i + 16], range(16)) for i in range(0, 400, 16)]
        scores[dense_bytes] = np.concatenate(rows)
    assert type(model.cooc if cls is not MarkovBackoff else model.knn.cooc).__name__ == \
        "_GrowingRows"
    np.testing.assert_allclose(scores[0], scores[2**30], rtol=1e-12, atol=1e-15)


def test_neighbourhood_peers_run_at_a_catalog_whose_dense_counts_would_not_fit() -> None:
    """200,000 items: a dense count matrix would take 320 GB; the sparse one holds the pairs."""
    model = MarkovBackoff(200_000)
    model.learn([("u", 5, 0), ("u", 199_999, 1), ("v", 5, 2)])
    row = model.score(["v"])[0]
    assert row.shape == (200_000,) and row.argmax() == 199_999


def test_growing_rows_in_two_parts_read_as_one_matrix() -> None:
    """The sparse counts keep a small recent part beside the main one (a batch no longer
    copies the whole matrix): every read sees their sum, and both parts are used."""
    rng = np.random.default_rng(3)
    n = 40
    sparse, dense = baselines._GrowingRows(n), np.zeros((n, n))
    unmerged = 0
    for _ in range(60):
        k = int(rng.integers(1, 30))
        rows, cols = rng.integers(n, size=k), rng.integers(n, size=k)
        values = rng.random(k)
        sparse.add(rows, cols, values)
        np.add.at(dense, (rows, cols), values)
        unmerged += sparse._recent.nnz > 0
    some = np.array([3, 0, 3, 17])
    w = rng.random((2, len(some)))
    weights = baselines.sp.csr_array(rng.random((2, n)) * (rng.random((2, n)) < 0.3))
    np.testing.assert_allclose(sparse.toarray(), dense, rtol=1e-12)
    np.testing.assert_allclose(sparse.row_sum, dense.sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(sparse.row_max, dense.max(axis=1), rtol=1e-12)
    np.testing.assert_allclose(sparse.rows(some), dense[some], rtol=1e-12)
    np.testing.assert_allclose(sparse.product(w, some), w @ dense[some], rtol=1e-12)
    np.testing.assert_allclose(sparse.left_product(weights), weights @ dense, rtol=1e-12)
    assert 0 < unmerged < 60 and sparse._main.nnz > 0
