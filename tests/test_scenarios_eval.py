"""The evaluator on scenario-labelled streams: ranking within the event's scenario, a day
at a time, the per-scenario report, per-scenario popularity and the streamrec variants."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import FixedScores

from evaluation import comparison as cmp
from evaluation.baselines import ItemKNNSeq, Pop
from evaluation.evaluate import (
    DAY_MS,
    PerScenario,
    StreamrecModel,
    batches,
    prequential,
    scenario_report,
)
from models.config import LearnerConfig


# --------------------------------------------------------------------------- the filter
def test_items_not_allowed_in_the_events_scenario_are_not_ranked():
    """Item 0 tops every list, but it may only be shown in "books": a "games" event ranks
    as if it were not in the catalog, a "books" event has it above the target. An item
    without scenarios (3) is ranked everywhere."""
    where = [["books"], ["books", "games"], ["games"], None]
    events = [("a", 1, 1, "games"), ("a", 2, 2, "games"), ("b", 1, 3, "books"),
              ("b", 3, 4, "books"), ("c", 1, 5, "games"), ("c", 0, 6, "games")]
    scores = [9.0, 1.0, 2.0, 5.0]
    res = prequential(FixedScores(scores), events, 1, item_scenarios=where)
    # (a,2) games: 0 dropped, 1 seen -> 3 above: rank 1; (b,3) books: 0 above -> rank 1;
    # (c,0) games: not allowed there, so not evaluated (no model could serve it)
    assert res.positions.tolist() == [1, 3] and res.ranks.tolist() == [1, 1]
    plain = prequential(FixedScores(scores), events, 1)  # no restriction: 0 above everywhere
    assert plain.positions.tolist() == [1, 3, 5] and plain.ranks.tolist() == [2, 1, 0]


def test_streamrec_never_retrieves_an_item_outside_the_scenario():
    ids, vecs = _catalog(12)
    where = [["s0"] if k % 2 == 0 else ["s1"] for k in range(12)]
    cfg = LearnerConfig(dim=16, history_len=10, covisit=True, seed=0,
                        candidate_sources=({"name": "tower", "count": 3}, "covisit"))
    model = StreamrecModel(ids, vecs, cfg, item_scenarios=where)
    events = [("u", k % 12, k, f"s{k % 2}") for k in range(40)]
    for b in range(0, 40, 8):
        out = model.step(events[b: b + 8], list(range(8)))
        for row, e in zip(out, events[b: b + 8], strict=True):
            wrong = [k for k in range(12) if e[3] not in where[k]]
            assert np.isneginf(row[wrong]).all()  # never retrieved in this scenario
            assert np.isfinite(row).sum() >= 1


def test_the_tower_fills_its_count_from_the_scenarios_own_items():
    """The exact search is over the scenario's items only, as the index's is: however well
    the other scenario's items score, each event gets the tower's whole count from its own."""
    ids, vecs = _catalog(40)
    where = [["s0"] if k < 30 else ["s1"] for k in range(40)]
    cfg = LearnerConfig(dim=16, history_len=10, covisit=False, seed=0,
                        candidate_sources=({"name": "tower", "count": 5},))
    model = StreamrecModel(ids, vecs, cfg, item_scenarios=where)
    model.step([(f"u{k}", k, k, "s0") for k in range(8)], [])  # histories: distinct vectors
    out = model.step([(f"u{k}", 30 + k, 8 + k, "s1") for k in range(8)], list(range(8)))
    assert (np.isfinite(out).sum(axis=1) == 5).all()
    assert np.isneginf(out[:, :30]).all()


def test_a_nan_score_ranks_last_not_first():
    from evaluation.evaluate import rank_of

    scores = np.array([np.nan, 1.0, 2.0, np.nan, -np.inf])
    assert rank_of(scores, 0, []) == 2 + 2 // 2  # ties with the other NaN and the -inf
    assert rank_of(scores, 1, [2]) == 0


# --------------------------------------------------------------------------- by day
def test_a_batch_is_one_day_however_many_events():
    ts = [0, 5, DAY_MS - 1, DAY_MS, 3 * DAY_MS, 3 * DAY_MS + 7]
    events = [("u", 0, t) for t in ts]
    assert batches(events, 2, by_day=True) == [(0, 3), (3, 4), (4, 6)]
    assert batches(events, 4, by_day=False) == [(0, 4), (4, 6)]


def test_no_event_of_a_day_is_learned_before_every_event_of_that_day_is_scored():
    """Each call scores and then learns one whole day, without the users' same-day events:
    day 2's events of `a` all see a's state as of the day's start (its first day
    only), so each is evaluated, and the same (user, item) twice in a day counts once."""
    day = [0, 0, 0, 1, 1, 1, 1, 2]
    events = [("a", 0, 0), ("b", 1, 1), ("a", 1, 2), ("a", 2, DAY_MS), ("a", 3, DAY_MS + 1),
              ("a", 3, DAY_MS + 2), ("c", 2, DAY_MS + 3), ("a", 0, 2 * DAY_MS)]
    model = FixedScores([1, 2, 3, 4])
    res = prequential(model, events, batch_size=2, by_day=True)
    assert [len(c[0]) for c in model.calls] == [3, 4, 1]  # whole days, batch_size ignored
    for batch, _, kw in model.calls:
        assert len({e[2] // DAY_MS for e in batch}) == 1 and kw == {"own_history": False}
    # day 0: a's and b's first day: nothing; day 1: (a,2), (a,3) once; c is new; day 2:
    # a's return to 0 is excluded (seen)
    assert res.positions.tolist() == [3, 4]
    assert {day[p] for p in res.positions} == {1}
    # a's items 0, 1 are excluded at both: 2 and 3 are the only candidates
    assert res.ranks.tolist() == [1, 0]


def test_a_same_day_event_does_not_inform_the_score_of_another():
    """itemknn_seq: b's 0 -> 1 on day 0 makes 1 follow 0 (and 0 the most popular). On day 1
    `a` has 0 then 1 in the file: event by event, a's 0 puts 1 first; by day, a's profile
    is its day 0 only (item 3, no neighbours), so popular 0 ranks above 1."""
    events = [("b", 0, 0), ("b", 1, 1), ("a", 3, 2), ("c", 0, 3),
              ("a", 0, DAY_MS), ("a", 1, DAY_MS + 1)]
    ordered = prequential(ItemKNNSeq(n_items=5), events, batch_size=4)  # a batch = a day too
    by_day = prequential(ItemKNNSeq(n_items=5), events, batch_size=4, by_day=True)
    assert ordered.positions.tolist() == [1, 4, 5]  # by day, (b, 1) shares b's first day
    assert by_day.positions.tolist() == [4, 5]
    assert ordered.ranks[-1] == 0 and by_day.ranks[-1] > 0


def test_streamrec_scores_a_day_against_the_state_before_it():
    """Two events of one user in one day get the same scores by day (same exclusion),
    different ones event by event."""
    ids, vecs = _catalog(10)
    warm = [("u", k % 10, k, "s") for k in range(30)] + [("v", 5, 31, "s")]
    day = [("u", 3, 40, "s"), ("u", 7, 41, "s")]
    rows = {}
    for own in (True, False):
        model = StreamrecModel(ids, vecs, _cfg(), item_scenarios=None)
        model.step(warm, [])
        ex = [_nothing(), _nothing()]
        rows[own] = model.step(day, [0, 1], ex, own_history=own)
    np.testing.assert_array_equal(rows[False][0], rows[False][1])
    assert not np.array_equal(rows[True][0], rows[True][1])


# --------------------------------------------------------------------------- report
def test_scenario_report_and_the_ten_smallest():
    scen = np.array([f"s{k:02d}" for k in range(12) for _ in range(k + 1)], dtype=object)
    ranks = np.array([0 if s in ("s00", "s11") else 20 for s in scen])
    per, small = scenario_report(ranks, scen)
    assert per["s00"] == {"ndcg@10": 1.0, "hr@10": 1.0, "n": 1}
    assert per["s05"] == {"ndcg@10": 0.0, "hr@10": 0.0, "n": 6}
    assert small == pytest.approx(1 / 10)  # s00..s09: only s00 hits; s11 is not small
    assert scenario_report(ranks, np.array(["default"] * len(ranks), object)) == ({}, None)


def test_report_in_json_and_table(capsys):
    events = [(u, i, t, s) for t, (u, i, s) in enumerate(
        [("a", 0, "x"), ("a", 1, "x"), ("a", 2, "y"), ("b", 2, "y"), ("b", 0, "x")])]
    res = prequential(FixedScores([3, 2, 1]), events, 2)
    assert res.scenarios.tolist() == ["x", "y", "x"]
    assert res.by_scenario["x"]["n"] == 2 and res.by_scenario["y"]["n"] == 1
    data = cmp.Dataset("t", ["i0", "i1", "i2"], np.zeros((3, 2), np.float32), events)
    doc = cmp.to_json(data, {"fixed": res}, 2)
    m = doc["models"]["fixed"]
    assert set(m["per_scenario"]) == {"x", "y"}
    assert doc["scenario_items"] == {"x": 3, "y": 3}  # no item is restricted here
    assert m["small10_ndcg@10"] == pytest.approx(
        np.mean([m["per_scenario"]["x"]["ndcg@10"], m["per_scenario"]["y"]["ndcg@10"]]))
    cmp.print_table(doc)
    out = capsys.readouterr().out
    assert "10 smallest" in out and "per scenario" in out


# --------------------------------------------------------------------------- peers
def test_pop_counts_within_the_events_scenario():
    pop = Pop(3)
    pop.learn([("a", 0, 0, "x"), ("b", 0, 1, "x"), ("c", 1, 2, "y"), ("d", 2, 3)])
    out = pop.step([("e", 2, 4, "x"), ("f", 0, 5, "y"), ("g", 1, 6, "z"),
                    ("h", 0, 7)], [0, 1, 2, 3])
    np.testing.assert_array_equal(out, [[2, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(pop.by_scenario["x"], [2, 0, 1])  # then learned the batch
    np.testing.assert_array_equal(pop.score(["any"]), [[4, 2, 2]])  # over all scenarios


# --------------------------------------------------------------------------- variants
def test_the_variants_build_and_run_on_a_multi_scenario_stream():
    data = _scenario_data()
    results = {}
    for name in cmp.SCENARIO_MODELS:
        model = cmp.build_model(name, data, _cfg())
        results[name] = prequential(model, data.events, 16, item_ids=data.item_ids,
                                    item_scenarios=data.item_scenarios, by_day=True)
    shared = cmp.build_model("streamrec-shared", data, _cfg())
    assert shared.serving.cfg.scenario_params is False
    assert cmp.build_model("streamrec", data, _cfg()).serving.cfg.scenario_params is True
    evaluated = {n: r.positions.tolist() for n, r in results.items()}
    assert len({tuple(p) for p in evaluated.values()}) == 1  # same events for every model
    for name, res in results.items():
        assert len(res.ranks) > 100 and set(res.by_scenario) == {"s0", "s1", "s2"}, name
        assert res.small_ndcg is not None and 0 <= res.small_ndcg <= 1
    for name in ("streamrec", "streamrec-shared", "streamrec-separate", "itemknn_seq"):
        assert results[name].metrics["ndcg@10"] > results["pop"].metrics["ndcg@10"], name


def test_separate_models_learn_only_their_scenario():
    data = _scenario_data()
    sep = cmp.build_model("streamrec-separate", data, _cfg())
    assert isinstance(sep, PerScenario)
    prequential(sep, data.events[:200], 16, item_ids=data.item_ids,
                item_scenarios=data.item_scenarios)
    assert set(sep.models) == {"s0", "s1", "s2"}
    for scenario, (model, cols, _) in sep.models.items():
        assert all(scenario in data.item_scenarios[c] for c in cols) and len(cols) == 10
        mine = {e[0] for e in data.events[:200] if e[3] == scenario}
        assert set(model.states) == mine  # no user state from another scenario
        theirs = {data.item_ids[c] for c in cols}
        for st in model.states.values():
            assert set(st.items) <= theirs  # histories hold this scenario's events only


# --------------------------------------------------------------------------- helpers
def _cfg() -> LearnerConfig:
    return LearnerConfig(dim=16, history_len=10, covisit=True, seed=0)


def _catalog(n: int) -> tuple[list[str], np.ndarray]:
    return [f"i{k}" for k in range(n)], \
        np.random.default_rng(1).normal(size=(n, 16)).astype(np.float32)


def _nothing():
    from models.user_state import Exclusion

    return Exclusion()


def _scenario_data(n_users: int = 12, length: int = 600) -> cmp.Dataset:
    """30 items, 10 per scenario; each user cycles through one scenario's items, moving to
    the next scenario every 5 events; 20 events a day."""
    rng = np.random.default_rng(0)
    events, pos = [], dict.fromkeys(range(n_users), 0)
    for t in range(length):
        u = int(rng.integers(n_users))
        s = (u + pos[u] // 5) % 3
        events.append((f"u{u}", 10 * s + (u + pos[u]) % 10, (t // 20) * DAY_MS + t, f"s{s}"))
        pos[u] += 1
    ids, vecs = _catalog(30)
    return cmp.Dataset("scen", ids, vecs, events, [[f"s{k // 10}"] for k in range(30)], True)


# --------------------------------------------------------------------------- the command
@pytest.mark.slow
def test_eval_command_on_a_generated_ciao_directory(tmp_path):
    """`streamrec eval --ciao DIR` end to end: Ciao's csv.gz layout (made here), a day a
    batch, per-scenario figures in the JSON, a plot."""
    import gzip

    import orjson
    from click.testing import CliRunner

    from streams.cli import main

    rng = np.random.default_rng(0)
    rows = ["user_id,item_id,category_id,rating,helpfulness,timestamp,category"]
    for n in range(300):
        u, cat = int(rng.integers(15)), int(rng.integers(3))
        item = 100 * cat + int(rng.integers(8))
        rows.append(f"{u},{item},{cat},4,3,{(n // 30) * 86_400},{['DVDs', 'Books', 'Games'][cat]}")
    (tmp_path / "ciao").mkdir()
    with gzip.open(tmp_path / "ciao" / "interactions.csv.gz", "wt") as fh:
        fh.write("\n".join(rows) + "\n")
    out = CliRunner().invoke(main, [
        "eval", "--ciao", str(tmp_path / "ciao"), "--models", "pop,itemknn_seq", "--jobs", "1",
        "--json", str(tmp_path / "c.json"), "--plot", str(tmp_path / "c.png")])
    assert out.exit_code == 0, out.output
    doc = orjson.loads((tmp_path / "c.json").read_bytes())
    assert doc["batch_size"] == "day" and doc["items"] == 24
    assert doc["scenario_items"] == {"Books": 8, "DVDs": 8, "Games": 8}
    for m in doc["models"].values():
        assert set(m["per_scenario"]) == {"DVDs", "Books", "Games"}
        assert sum(s["n"] for s in m["per_scenario"].values()) == m["evaluated"] > 50
        assert "small10_ndcg@10" in m
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
