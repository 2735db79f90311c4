"""Scenarios in the model: per-scenario parameters that start at the shared model and adapt
by their own learning-rate rule in the trainer, travel in snapshots and checkpoints, stay
identical across trainer ranks, and items restricted to scenarios that never leave them
(co-visitation candidates and the FAISS search included)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_trainer import T0, TEXT_DIM, catalog, cfg

from index.faiss_index import FaissIndex, IndexConfig
from models.candidates import CovisitCandidates
from models.distributed import ThreadGroup
from models.examples import Interaction
from models.learner import OnlineLearner
from models.model import SharedModel
from models.serving import Server, rank_candidates
from models.snapshot import apply_base, apply_delta, encode_base, encode_delta
from models.trainer import Trainer, checkpoint, restore
from models.user_state import UserState


def stream(n: int, ids: list[str], scenarios: tuple[str, ...] = ("a", "b"), n_users: int = 8,
           seed: int = 0) -> list[Interaction]:
    """Users act in every scenario; in scenario k they pick from the k-th block of items
    (the scenario's taste, which only the scenario's parameters can learn: the histories
    mix the scenarios)."""
    rng = np.random.default_rng(seed)
    block = len(ids) // len(scenarios)
    out = []
    for k in range(n):
        s = int(rng.integers(len(scenarios)))
        item = ids[s * block + int(rng.integers(block))]
        out.append(Interaction(f"u{int(rng.integers(n_users))}", item, "view", T0 + 1000 * k,
                               scenario=scenarios[s]))
    return out


def learn(learner: OnlineLearner, events: list[Interaction], batch: int = 16
          ) -> dict[str, UserState]:
    states: dict[str, UserState] = {}
    for k in range(0, len(events), batch):
        part = events[k : k + batch]
        for ev in part:
            states.setdefault(ev.user_id, UserState())
        learner.learn_batch(part, states)
    return states


def block_preference(model: SharedModel, states: dict[str, UserState], scenario: str,
                     ids: list[str]) -> float:
    """Mean score of the first half of the catalog minus the second's, in `scenario`."""
    rows = np.asarray(model.catalog.add(ids))
    hists = [st.history(model.catalog) for st in states.values()]
    S = model.scores(hists, [st.residual for st in states.values()], rows,
                     [scenario] * len(hists))
    half = len(ids) // 2
    return float(S[:, :half].mean() - S[:, half:].mean())


@pytest.mark.parametrize("adapted", [True, False])
def test_each_scenario_learns_its_own_taste_only_with_scenario_parameters(adapted):
    ids, vecs = catalog(40)
    learner = OnlineLearner(cfg(scenario_params=adapted), TEXT_DIM)
    learner.upsert_items(ids, vecs)
    states = learn(learner, stream(1200, ids))
    a, b = (block_preference(learner.model, states, s, ids) for s in ("a", "b"))
    P = learner.model.scenarios.P.detach().numpy()
    if adapted:  # a's items score higher in a than in b
        assert a - b > 0.1, (a, b)
        assert np.abs(P[1:3]).sum() > 0 and sorted(learner.model.scenarios.names) == ["", "a", "b"]
        rules = learner.trainer.scenario_rules
        assert rules[1].steps > 0 and rules[2].steps > 0 and rules[0].steps == 0
    else:
        assert a == pytest.approx(b, abs=1e-6) and not P.any()


def test_a_new_scenario_is_served_by_the_shared_model_at_once():
    ids, vecs = catalog(40)
    learner = OnlineLearner(cfg(), TEXT_DIM)
    learner.upsert_items(ids, vecs)
    states = learn(learner, stream(400, ids))
    model, rows = learner.model, np.arange(1, 41)
    hists = [st.history(model.catalog) for st in states.values()]
    res = [st.residual for st in states.values()]
    np.testing.assert_allclose(model.scores(hists, res, rows, ["never-seen"] * len(hists)),
                               model.scores(hists, res, rows), rtol=1e-6)
    assert model.scores(hists, res, rows, ["a"] * len(hists)).tolist() != \
        model.scores(hists, res, rows).tolist()


def test_scenarios_beyond_the_bound_get_no_parameters():
    ids, vecs = catalog(40)
    learner = OnlineLearner(cfg(max_scenarios=2), TEXT_DIM)
    learner.upsert_items(ids, vecs)
    learn(learner, stream(300, ids, scenarios=("a", "b", "c")))
    table = learner.model.scenarios
    assert len(table.names) == 3 and table.full
    assert sorted(table.rows_of(["a", "b", "c"]).tolist()) == [0, 1, 2]  # the last one: none
    assert not table.P.detach()[0].any()  # row 0 (no parameters) never moves


def test_snapshots_and_checkpoints_carry_the_scenarios():
    ids, vecs = catalog(40)
    t = Trainer(SharedModel(cfg(), TEXT_DIM))
    t.upsert_items(ids, vecs)
    server = SharedModel(cfg(), TEXT_DIM)
    events = stream(200, ids, scenarios=("x", "y"))
    learner = OnlineLearner(cfg(), TEXT_DIM)  # cuts the examples as a worker would
    learner.upsert_items(ids, vecs)
    states = {ev.user_id: UserState() for ev in events}
    t.train(learner.observe(events[:100], states).examples)
    t.model.version = 1
    apply_base(server, encode_base(t.model, {}))
    t.take_pending()
    t.train(learner.observe(events[100:], states).examples)
    pending = t.take_pending()
    t.model.version = 2
    apply_delta(server, encode_delta(t.model, 2, pending.touched, pending.covis, {}))
    assert server.scenarios.names == t.model.scenarios.names
    assert sorted(t.model.scenarios.names) == ["", "x", "y"]
    np.testing.assert_array_equal(server.scenarios.P.detach(), t.model.scenarios.P.detach())
    again = Trainer(SharedModel(cfg(), TEXT_DIM))
    restore(again, checkpoint(t))
    assert again.model.scenarios.names == t.model.scenarios.names
    np.testing.assert_array_equal(again.model.scenarios.P.detach(), t.model.scenarios.P.detach())
    assert again.scenario_rules == t.scenario_rules and t.scenario_rules[1].steps > 0


def test_two_ranks_register_scenarios_alike_and_stay_identical():
    """Each rank sees other scenarios first; rows and parameters still agree."""
    ids, vecs = catalog(40)
    group = ThreadGroup(2)
    ranks = [Trainer(SharedModel(cfg(), TEXT_DIM), group.sync(r)) for r in range(2)]
    for t in ranks:
        t.upsert_items(ids, vecs)
    learner = OnlineLearner(cfg(), TEXT_DIM)
    learner.upsert_items(ids, vecs)
    events = stream(240, ids, scenarios=("p", "q", "r"))
    states = {ev.user_id: UserState() for ev in events}
    exs = [ex for k in range(0, 240, 40)
           for ex in learner.observe(events[k : k + 40], states).examples]
    for k, ex in enumerate(exs):  # rank 0 gets the even examples, rank 1 the odd ones
        object.__setattr__(ex, "partition", k % 2)
    for k in range(0, len(exs), 40):
        part = exs[k : k + 40]
        threads = [threading.Thread(target=t.train, args=([e for e in part
                                                            if e.partition == r],))
                   for r, t in enumerate(ranks)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert ranks[0].model.scenarios.names == ranks[1].model.scenarios.names
    assert sorted(ranks[0].model.scenarios.names) == ["", "p", "q", "r"]
    np.testing.assert_array_equal(ranks[0].model.scenarios.P.detach(),
                                  ranks[1].model.scenarios.P.detach())
    assert ranks[0].scenario_rules == ranks[1].scenario_rules


# --------------------------------------------------------------------------- the filter
def restricted_learner(kind: str = "flat", sub_max: int = 0, candidates: int = 15
                       ) -> tuple[OnlineLearner, list[str], Server]:
    """Items 0-19 only in 'a', 20-29 only in 'b', 30-39 everywhere; trained on a stream
    that visits all of them, so the co-visitation candidates cross the scenarios."""
    ids, vecs = catalog(40)
    sources = ({"name": "tower", "count": candidates}, "covisit")
    learner = OnlineLearner(cfg(candidate_sources=sources), TEXT_DIM)
    learner.upsert_items(ids, vecs, [["a"]] * 20 + [["b"]] * 10 + [None] * 10)
    rng = np.random.default_rng(3)
    events = [Interaction(f"u{k % 5}", ids[int(rng.integers(40))], "view", T0 + 1000 * k)
              for k in range(400)]
    learn(learner, events)
    server = Server(learner.model, IndexConfig(kind=kind, sub_index_max_items=sub_max),
                    exclude_seen="none")
    server.refresh()
    return learner, ids, server


def allowed_ids(ids: list[str], scenario: str) -> set[str]:
    return set(ids[:20] if scenario == "a" else ids[20:30]) | set(ids[30:])


@pytest.mark.parametrize("kind,sub_max", [("flat", 0), ("hnsw", 0), ("hnsw", 100)])
def test_recommendations_stay_inside_the_scenario(kind, sub_max):
    """(sub_max 0: the ID selector on the whole index; 100: exact sub-indexes.)"""
    learner, ids, server = restricted_learner(kind, sub_max)
    st = UserState()
    for k, item in enumerate(ids[:20:2] + ids[20:30:2]):  # history in both scenarios
        st.append(item, 1, T0 + k, None, 50)
    for scenario in ("a", "b"):
        (recs,), _ = server.recommend([st], 10, scenarios=[scenario])
        got = {r.item_id for r in recs}
        assert len(got) == 10 and got <= allowed_ids(ids, scenario), (scenario, got)
    assert len(server._subs) == (2 if sub_max else 0)
    (recs,), _ = server.recommend([st], 40)
    assert {r.item_id for r in recs} & set(ids[:20]) and {r.item_id for r in recs} & set(
        ids[20:30])  # without a scenario filter both blocks are reachable


def test_a_sub_index_follows_the_catalog():
    learner, ids, server = restricted_learner("hnsw", 100, candidates=40)
    st = UserState()
    st.append(ids[25], 1, T0, None, 50)

    def recommended(scenario: str) -> set[str]:
        (recs,), _ = server.recommend([st], 30,
                                      scenarios=[scenario])
        return {r.item_id for r in recs}

    assert recommended("b") == allowed_ids(ids, "b")  # k = 30 >= the 20 allowed
    new, vec = "new-b", learner.model.items.T[26 + 1].numpy()[None]  # (ids[26]'s text)
    learner.upsert_items([new], vec, [["b"]])
    server.add_items([new])
    learner.upsert_items([ids[0]], learner.model.items.T[1].numpy()[None], [["b"]])  # a -> b
    server.add_items([ids[0]])
    learner.delete_items([ids[21]])
    server.remove_items([ids[21]])
    assert recommended("b") == allowed_ids(ids, "b") - {ids[21]} | {new, ids[0]}
    assert ids[0] not in recommended("a")


def test_co_visitation_candidates_are_filtered_too():
    learner, ids, _ = restricted_learner()
    model = learner.model
    st = UserState()
    st.append(ids[0], 1, T0, None, 50)
    hist = st.history(model.catalog)
    covisit = CovisitCandidates()
    assert set(model.catalog.ids_of(covisit.rows(model, hist))) - allowed_ids(ids, "b")
    U = model.history_vectors([hist], [None], ["b"])
    from models.user_state import Exclusion
    (rows, _), = rank_candidates(model, [hist], U, [np.zeros(0, np.int64)], [Exclusion()],
                                 None, ["b"])
    assert len(rows) and set(model.catalog.ids_of(rows)) <= allowed_ids(ids, "b")


def test_the_index_search_takes_an_allowed_set():
    rng = np.random.default_rng(0)
    keys = np.arange(100, 300, dtype=np.int64)
    vecs = rng.standard_normal((200, 8)).astype(np.float32)
    for kind in ("flat", "hnsw"):
        idx = FaissIndex.build(keys, vecs, IndexConfig(kind=kind))
        allowed = keys[::7]
        _, got = idx.search(vecs[:3], 5, allowed=allowed)
        assert np.isin(got, allowed).all(), kind
        exact = allowed[np.argsort(-(vecs[:3] @ vecs[::7].T), axis=1)[:, :5]]
        assert (got == exact).mean() >= 0.9, kind


@pytest.mark.parametrize("sampled", [False, True])
def test_the_training_softmax_runs_over_the_scenarios_items(sampled):
    """A pair in scenario b is not pushed away from items that can never be shown in b."""
    import torch

    from models.two_tower import Seqs

    learner, ids, _ = restricted_learner()
    model = learner.model
    seqs = Seqs.pad([UserState().history(model.catalog)] * 2)
    targets = np.asarray(model.catalog.add([ids[25], ids[35]]))
    weights, fresh = np.ones(2), np.ones(2, bool)
    resid = torch.zeros(2, model.n_user)
    negatives = np.asarray(model.catalog.add(ids)) if sampled else None

    def losses(scenarios):
        return model.pair_losses(seqs, targets, weights, resid, fresh, negatives,
                                 scenarios).detach().numpy()

    before = losses(["b", "b"]), losses(None)
    with torch.no_grad():  # an a-only item now outscores everything
        model.items.E[model.catalog.rows[ids[3]]] += 100 * model.items(
            torch.as_tensor(targets[:1]))[0]
    np.testing.assert_allclose(losses(["b", "b"]), before[0], rtol=1e-5)
    assert (losses(None) > before[1] + 1).all()


def test_negatives_are_drawn_among_the_items_the_step_s_scenarios_show():
    """A step of pairs in b draws its sampled negatives from b's items (and the pairs'
    targets) only; a step that also holds a pair in a draws from both; no scenario: all."""
    from models.losses import SampledSoftmax

    learner, ids, _ = restricted_learner()
    model = learner.model
    model.softmax = SampledSoftmax(n_negatives=4000)
    rows = {s: set(model.catalog.add(sorted(allowed_ids(ids, s)))) for s in "ab"}
    a_target = np.asarray(model.catalog.add([ids[3]]))
    rng = np.random.default_rng(0)
    assert set(model.sample_negatives(rng, a_target, ["b"]).tolist()) == rows["b"] | {
        int(a_target[0])}
    both = np.asarray(model.catalog.add([ids[3], ids[25]]))
    assert set(model.sample_negatives(rng, both, ["a", "b"]).tolist()) == rows["a"] | rows["b"]
    assert len(set(model.sample_negatives(rng, both, None).tolist())) == 40


def test_the_full_softmax_over_the_pool_is_the_one_over_the_catalog(monkeypatch):
    """Scoring only the pool's columns drops what every pair's mask closes: same losses."""
    import torch

    from models.model import SharedModel
    from models.two_tower import Seqs

    learner, ids, _ = restricted_learner()
    model = learner.model
    hists = [UserState().history(model.catalog)] * 3
    targets = np.asarray(model.catalog.add([ids[25], ids[35], ids[3]]))
    scen = ["b", "b", "b"]  # the pool: b's 10 items, the 10 shown everywhere, an a-only target
    assert model.negative_pool(targets, scen).sum() == 21

    def losses() -> np.ndarray:
        return model.pair_losses(Seqs.pad(hists), targets, np.ones(3), torch.zeros(
            3, model.n_user), np.ones(3, bool), None, scen).detach().numpy()

    pooled = losses()
    monkeypatch.setattr(SharedModel, "negative_pool", lambda m, t, s: m.catalog.live.copy())
    np.testing.assert_allclose(pooled, losses(), rtol=1e-5)


def test_the_pairwise_ranker_scores_what_the_dense_blend_scores():
    """Serving scores (user, candidate) pairs only; the evaluator's full ranking fills the
    dense (users x items) matrix. Same model, same scores (scenario and users' parameters
    included), whether item vectors come from the tower or from the index."""
    learner, ids, server = restricted_learner()
    model = learner.model
    rng = np.random.default_rng(5)
    states = [UserState() for _ in range(4)]
    for k, st in enumerate(states):
        for item in rng.choice(ids, 6):
            st.append(str(item), 1, T0 + k, None, 50)
        st.residual = rng.standard_normal(model.n_user).astype(np.float32)
    hists = [st.history(model.catalog) for st in states]
    res, scen = [st.residual for st in states], ["a", "b", "", "a"]
    U = model.history_vectors(hists, res, scen)
    owner = rng.integers(0, 4, 50)
    rows = np.asarray(model.catalog.add(list(rng.choice(ids, 50))))
    cols = np.unique(rows)
    dense = model.blend(hists, U, cols, res, scen)[owner, np.searchsorted(cols, rows)]
    np.testing.assert_allclose(model.blend_pairs(hists, U, owner, rows, res, scen), dense,
                               rtol=1e-5, atol=1e-5)
    idx = server.index.current()[0]
    tower = model.pair_dots(U, owner, rows, server._index_vectors(idx, rows))
    np.testing.assert_allclose(model.blend_pairs(hists, U, owner, rows, res, scen, tower),
                               dense, rtol=1e-5, atol=1e-5)
    assert model.blend_pairs(hists, U, owner[:0], rows[:0]).shape == (0,)


def test_co_visitation_reads_the_history_within_the_query_scenario():
    """A query in b ranks by what the user did among b's items (recency counted there), as a
    model of b alone would; a user with nothing in b brings their whole history; with
    `scenario_history` off, or nothing restricted, the history is read whole."""
    learner, ids, _ = restricted_learner()
    model = learner.model
    row = model.catalog.rows
    mixed = [row[ids[0]], row[ids[25]], row[ids[35]], row[ids[5]]]  # a-only, b-only, both, a
    only_a = [row[ids[0]], row[ids[5]]]
    got = model.scenario_histories([mixed, only_a, mixed], ["b", "b", ""])
    assert [list(h) for h in got] == [[0, row[ids[25]], row[ids[35]], 0], only_a, mixed]
    cols = np.asarray(model.catalog.add(ids[20:]))
    in_b = model.features([[row[ids[25]], row[ids[35]]]], cols)[0]
    as_served = model.features(model.scenario_histories([mixed], ["b"]), cols)[0]
    np.testing.assert_array_equal(as_served, in_b)
    assert not np.array_equal(model.features([mixed], cols)[0], in_b)
    model.cfg.scenario_history = False  # (this learner's own config)
    assert model.scenario_histories([mixed], ["b"]) == [mixed]
