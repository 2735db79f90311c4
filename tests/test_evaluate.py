"""The prequential protocol on hand-checked streams, and the comparison runner end to end."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from helpers import FixedScores

from evaluation import comparison as cmp
from evaluation.baselines import ItemKNNSeq
from evaluation.evaluate import (
    StreamrecModel,
    metrics_of,
    prequential,
    rank_of,
)
from models.config import LearnerConfig

# items 0..4 score 5, 4, 4, 4, 1
STREAM = [("a", 0, 1), ("a", 1, 2), ("a", 2, 3), ("b", 4, 4), ("b", 3, 5), ("a", 4, 6)]
# (a,1): excluded {0}; ties with 2 and 3 -> 0 above + floor(2/2) = 1
# (a,2): excluded {0,1}; tie with 3 -> floor(1/2) = 0
# (b,3): excluded {4}; item 0 above, ties 1 and 2 -> 1 + 1 = 2
# (a,4): excluded {0,1,2}; item 3 above -> 1
EXPECTED_RANKS = [1, 0, 2, 1]


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_ranks_on_a_hand_checked_stream(batch_size):
    res = prequential(FixedScores([5, 4, 4, 4, 1]), STREAM, batch_size)
    assert res.ranks.tolist() == EXPECTED_RANKS
    assert res.positions.tolist() == [1, 2, 4, 5]
    assert res.metrics["hr@10"] == 1.0
    ndcg = (2 / math.log2(3) + 1 + 1 / math.log2(4)) / 4
    assert res.metrics["ndcg@10"] == pytest.approx(ndcg)
    assert res.metrics["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 3 + 1 / 2) / 4)
    assert res.metrics["recall@50"] == 1.0
    assert res.last_half["mrr"] == pytest.approx((1 / 3 + 1 / 2) / 2)  # positions >= 3
    assert res.summary()["evaluated"] == 4


def test_only_first_time_items_of_returning_users_are_evaluated():
    model = FixedScores([1, 1, 1])
    prequential(model, [("a", 0, 1), ("a", 0, 2), ("a", 1, 3), ("b", 1, 4)], batch_size=4)
    # a's repeat of 0 and b's first event are not scored
    assert [(len(b), w) for b, w, _ in model.calls] == [(4, [2])]


@pytest.mark.parametrize(("mode", "scored", "ranks"), [
    ("all", [1, 2], [0, 0]),  # the return to item 0 is never evaluated: it cannot be served
    ("recent", [1, 2, 3], [0, 0, 0]),  # history_len 2: by event 3, item 0 has left the ring
    ("none", [1, 2, 3], [1, 2, 0]),  # nothing excluded: item 0 (score 5) tops every list
])
def test_what_is_evaluated_and_excluded_follows_the_serving_rule(mode, scored, ranks):
    """Which events are evaluated, and which items their ranking drops, is the serving rule
    (models/user_state.py): under `recent` a long-ago item may come back; under `all` it may not,
    so that event cannot be a hit for any model and is not evaluated."""
    events = [("a", 0, 1), ("a", 1, 2), ("a", 2, 3), ("a", 0, 4)]
    res = prequential(FixedScores([5, 4, 3, 2, 1]), events, batch_size=1, exclude_seen=mode,
                      history_len=2)
    assert res.positions.tolist() == scored
    assert res.ranks.tolist() == ranks


def test_rank_of_splits_ties_and_ignores_excluded_items():
    scores = np.array([3.0, 3.0, 3.0, 3.0, 9.0])
    assert rank_of(scores, 0, []) == 1 + 3 // 2
    assert rank_of(scores, 0, [4]) == 3 // 2
    assert rank_of(scores, 0, [1, 2, 3, 4]) == 0


def test_metrics_of_ranks():
    m = metrics_of(np.array([0, 9, 10, 49, 50]))
    assert m["hr@10"] == pytest.approx(2 / 5)
    assert m["recall@50"] == pytest.approx(4 / 5)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(11)) / 5)
    assert m["mrr"] == pytest.approx((1 + 1 / 10 + 1 / 11 + 1 / 50 + 1 / 51) / 5)


def test_within_a_batch_each_event_sees_the_users_own_earlier_events():
    """a's second event is predicted from a's first even when both share a batch: 1 follows 0
    for user b earlier, so item 1 must rank first for a once a has touched 0."""
    events = [("b", 0, 1), ("b", 1, 2), ("a", 0, 3), ("a", 1, 4)]
    res = prequential(ItemKNNSeq(n_items=5), events, batch_size=2)
    assert res.ranks.tolist() == [1, 0]  # (b,1): b's profile {0} has no co-counts yet


def _tiny_stream(n_items=30, n_users=12, length=400, seed=0):
    rng = np.random.default_rng(seed)
    events, pos = [], dict.fromkeys(range(n_users), 0)
    for t in range(length):
        u = int(rng.integers(n_users))
        events.append((f"u{u}", (u * 3 + pos[u]) % n_items, t * 1000))  # a cycle per user
        pos[u] += 1
    return events


def test_streamrec_learner_under_the_protocol_beats_random_at_batch_1_and_64():
    events = _tiny_stream()
    ids = [f"i{k}" for k in range(30)]
    text = np.random.default_rng(1).normal(size=(30, 16)).astype(np.float32)
    cfg = LearnerConfig(dim=16, history_len=10, covisit=True, seed=0)
    for batch_size in (1, 64):
        res = prequential(StreamrecModel(ids, text, cfg), events, batch_size)
        assert res.metrics["hr@10"] > 2 * (10 / 30), (batch_size, res.metrics)  # random: 1/3


@pytest.mark.slow
def test_comparison_runs_peers_and_streamrec_in_processes_and_writes_outputs(tmp_path):
    items = [{"item_id": f"i{k}", "title": f"item number {k}"} for k in range(30)]
    events = [{"user_id": u, "item_id": f"i{i}", "ts": ts} for u, i, ts in _tiny_stream()]
    data = cmp.make_dataset("tiny", items, events,
                            lambda texts: np.random.default_rng(0).normal(
                                size=(len(texts), 16)).astype(np.float32))
    base = LearnerConfig(dim=16, history_len=10)
    results = cmp.run_comparison(data, ["streamrec", "itemknn_seq", "pop"], 8, base, jobs=2,
                                 show_progress=False)
    doc = cmp.to_json(data, results, 8)
    assert set(doc["models"]) == {"streamrec", "itemknn_seq", "pop"}
    for m in doc["models"].values():
        assert set(m) >= {"hr@10", "ndcg@10", "mrr", "recall@50", "evaluated", "events_per_s"}
        assert m["evaluated"] > 300
    cmp.write_json(tmp_path / "q.json", doc)
    assert orjson.loads((tmp_path / "q.json").read_bytes())["batch_size"] == 8
    cmp.plot(results, tmp_path / "q.png", "tiny")
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "streamrec-fixed" in cmp.model_names() and "itemknn_seq" in cmp.model_names()


def test_candidate_recall_counts_targets_the_serving_path_retrieved():
    """A serving path that retrieves 5 of 30 items: a retrieved target ranks within what was
    scored, a missed one below all of it; a full scorer retrieves every rankable item."""
    events = _tiny_stream()
    ids = [f"i{k}" for k in range(30)]
    text = np.random.default_rng(1).normal(size=(30, 16)).astype(np.float32)
    cfg = LearnerConfig(dim=16, history_len=10, covisit=False, seed=0,
                        candidate_sources=({"name": "tower", "count": 5},))
    res = prequential(StreamrecModel(ids, text, cfg), events, 8)
    assert 0 < res.summary()["candidate_recall"] < 1
    assert res.scored.max() == 5 and res.summary()["candidates"] <= 5
    assert (res.ranks[res.retrieved] < res.scored[res.retrieved]).all()
    assert (res.ranks[~res.retrieved] >= res.scored[~res.retrieved]).all()
    full = prequential(ItemKNNSeq(n_items=30), events, 8)
    assert full.summary()["candidate_recall"] == 1.0
    assert (full.ranks < full.scored).all() and full.scored.max() > 5




def test_progress_off_a_terminal_prints_while_it_runs():
    """rich prints nothing off a terminal until the bar stops; ours logs each task meanwhile
    (and leaves a terminal to rich's own redraw)."""
    import io
    import time

    from rich.console import Console

    from evaluation.progress import Progress

    out = io.StringIO()
    with Progress(console=Console(file=out, width=80), every=0.05) as bar:
        task = bar.add_task("replay", total=10)
        bar.advance(task, 3)
        deadline = time.monotonic() + 30
        while "replay: 3/10 (30%)" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "replay: 3/10 (30%)" in out.getvalue()
        bar.add_task("start-up", total=None, info="loading")  # no total: no count
        bar.log_tasks()
        assert "start-up: loading" in out.getvalue().splitlines()
    with Progress(console=Console(file=io.StringIO(), force_terminal=True)) as bar:
        assert bar._ticker is None


def test_a_model_that_fails_is_reported_and_the_others_figures_kept() -> None:
    """One model raising in its process must not lose the other models' results."""
    data = cmp.make_dataset("tiny", [{"item_id": f"i{k}"} for k in range(30)],
                            [{"user_id": u, "item_id": f"i{i}", "ts": ts}
                             for u, i, ts in _tiny_stream()[:200]],
                            lambda texts: np.zeros((len(texts), 4), np.float32))
    failures: dict[str, str] = {}
    results = cmp.run_comparison(data, ["pop", "no_such_model"], 8, jobs=1,
                                 show_progress=False, failures=failures)
    assert set(results) == {"pop"} and len(results["pop"].ranks) > 100
    assert failures["no_such_model"].startswith("ValueError: unknown baseline 'no_such_model'")
    doc = cmp.to_json(data, results, 8, failures)
    assert doc["failed"] == failures and set(doc["models"]) == {"pop"}
    assert not cmp.is_known("no_such_model") and cmp.is_known("streamrec@w2e64")
    assert all(cmp.is_known(n) for n in cmp.model_names())


def test_each_kind_of_name_builds_the_model_it_names() -> None:
    """`is_known` and `build_model` read a name one way: a sharded name's counts, an
    ablation's override and a peer reach the model built."""
    from models.config import LearnerConfig

    data = cmp.make_dataset("tiny", [{"item_id": f"i{k}"} for k in range(30)],
                            [{"user_id": "u", "item_id": "i1", "ts": 1}],
                            lambda texts: np.zeros((len(texts), 4), np.float32))
    cfg = LearnerConfig(device="cpu")
    sharded = cmp.build_model("streamrec@w2e64r2", data, cfg)
    assert (sharded.workers, sharded.snapshot_every, len(sharded.ranks)) == (2, 64, 2)
    ablation = cmp.build_model("streamrec-noreplay", data, cfg)
    assert ablation.name == "streamrec-noreplay"
    assert ablation.serving.cfg.replay_ratio == 0 != cfg.replay_ratio
    assert cmp.build_model("pop", data, cfg).name == "pop"
    with pytest.raises(ValueError, match="unknown baseline 'streamrec-nosuch'"):
        cmp.build_model("streamrec-nosuch", data, cfg)


def test_eval_refuses_an_unknown_model_before_loading_anything(tmp_path) -> None:
    from click.testing import CliRunner

    from streams.cli import main

    out = CliRunner().invoke(main, ["eval", "--movielens-100k", str(tmp_path),  # no u.data
                                    "--models", "pop,itemknn_sq"])
    assert out.exit_code == 2 and "unknown model(s) itemknn_sq" in out.output, out.output
