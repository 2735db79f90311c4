"""Scenarios on the event path: items restricted to scenarios, one recommendation per (user,
scenario), `request` events, and the bound on scenarios. The batch processor runs with the
real learner, FAISS index and encoder; the last test runs a worker and a trainer on the real
broker."""

from __future__ import annotations

import orjson
import pytest
from helpers import dead_letters, index_catalog, make_settings, read_all

from models.config import LearnerConfig
from models.learner import OnlineLearner
from models.serving import Server
from models.user_state import UserState
from streams.catalog import CatalogEncoder, decode_item_vector
from streams.processor import EventProcessor
from streams.records import RawRecord
from streams.schemas import InvalidRecord, Reason, parse_event, parse_item
from streams.settings import Settings

T = 1_700_000_000_000
KIDS = [f"kids-{i}" for i in range(8)]  # only in scenario "kids"
ALL = [f"item-{i}" for i in range(16)]  # everywhere


def processor(encoder, tmp_path, **learner: object) -> EventProcessor:
    cfg = LearnerConfig(dim=16, history_len=8, device="cpu", **learner)
    model = OnlineLearner(cfg, text_dim=encoder.dim, capacity=64)
    ids = ALL + KIDS
    model.upsert_items(ids, encoder.encode([f"movie number {i}" for i in range(len(ids))]),
                       [None] * len(ALL) + [["kids"]] * len(KIDS))
    server = Server(model.model, exclude_seen="none")
    server.add_items(ids)
    server.refresh()
    s = Settings(data_dir=tmp_path, learner=cfg, top_k=10)
    return EventProcessor(s, server, model.personal, encoder)


def record(offset: int, user: str = "u1", **event: object) -> RawRecord:
    ev = {"user_id": user, "item_id": "item-1", "event_type": "view", "ts": T + offset} | event
    return RawRecord(user.encode(), orjson.dumps(ev), partition=0, offset=offset)


def run(proc: EventProcessor, records: list[RawRecord], states: dict[str, UserState]):
    good, bad = proc.decode(records)
    for _, ev in good:
        states.setdefault(ev.user_id, UserState())
    return proc.process(good, bad, states)


def recs(out, user: str = "u1") -> list[dict]:
    return [orjson.loads(r) for r in out.users[user].recommendations]


def test_each_scenario_of_a_batch_gets_its_own_recommendation_inside_it(encoder, tmp_path):
    proc = processor(encoder, tmp_path)
    out = run(proc, [record(0, item_id="item-1"), record(1, item_id="kids-1", scenario="kids"),
                     record(2, item_id="item-2")], {})
    (default, kids) = sorted(recs(out), key=lambda r: r["scenario"] != "default")
    assert (default["scenario"], kids["scenario"]) == ("default", "kids")
    assert not {it["item_id"] for it in default["items"]} & set(KIDS)
    assert {it["item_id"] for it in kids["items"]} & set(KIDS)  # allowed there
    assert default["source_event_ts"] == T + 2 and kids["source_event_ts"] == T + 1


def test_a_request_is_answered_and_changes_no_history_and_trains_nothing(encoder, tmp_path):
    proc = processor(encoder, tmp_path)
    states: dict[str, UserState] = {}
    run(proc, [record(0, item_id="item-1"), record(1, item_id="item-2")], states)
    before = (list(states["u1"].items), states["u1"].n_events)
    out = run(proc, [record(2, item_id=None, event_type="request", scenario="kids")], states)
    (rec,) = recs(out)
    assert rec["scenario"] == "kids" and rec["source_event_ts"] == T + 2
    assert len(rec["items"]) == 10
    assert (list(states["u1"].items), states["u1"].n_events) == before
    assert out.examples == [] and out.pending.targets == []
    assert states["u1"].already_applied(0, 2)  # a replayed request is not answered twice


def test_a_request_with_context_text_is_served_from_that_text(encoder, tmp_path):
    proc = processor(encoder, tmp_path)
    states: dict[str, UserState] = {}
    run(proc, [record(0, item_id="item-1")], states)
    answers = []
    for k, text in enumerate(["movie number 20", "movie number 3"]):
        out = run(proc, [record(1 + k, item_id=None, event_type="request", text=text)], states)
        answers.append([it["item_id"] for it in recs(out)[0]["items"]])
    assert answers[0] != answers[1]
    assert states["u1"].n_events == 1 and list(states["u1"].items) == ["item-1"]


def test_a_scenario_beyond_the_bound_goes_to_the_dlq_with_its_reason(encoder, tmp_path):
    proc = processor(encoder, tmp_path, max_scenarios=2)
    out = run(proc, [record(0, scenario="default"), record(1, scenario="kids"),
                     record(2, scenario="garden"), record(3, scenario="kids")], {})
    ((rec, exc),) = out.rejected
    assert rec.offset == 2 and exc.reason is Reason.SCENARIO_LIMIT
    assert "garden" in exc.detail and "max_scenarios" in exc.detail
    assert out.applied == 3


def test_the_schemas_take_scenarios_and_requests():
    assert parse_event(orjson.dumps({"user_id": "u", "event_type": "request", "ts": T}),
                       1000).event_type == "request"
    with pytest.raises(InvalidRecord) as err:
        parse_event(orjson.dumps({"user_id": "u", "item_id": "i", "event_type": "request",
                                  "ts": T}), 1000)
    assert err.value.reason is Reason.INVALID_VALUE and "request names no item" in err.value.detail
    with pytest.raises(InvalidRecord):  # an id-like string: no control characters
        parse_event(orjson.dumps({"user_id": "u", "item_id": "i", "event_type": "view",
                                  "ts": T, "scenario": "a\u202eb"}), 1000)
    assert parse_item(orjson.dumps({"item_id": "i", "scenarios": ["kids"]}), 1000
                      ).scenarios == ["kids"]
    assert parse_item(orjson.dumps({"item_id": "i"}), 1000).scenarios is None


def test_the_catalog_record_carries_the_scenarios(encoder):
    cat = CatalogEncoder(encoder.encode, 10_000)
    out = cat.process([RawRecord(b"a", orjson.dumps({"item_id": "a", "title": "A",
                                                      "scenarios": ["kids", "home"]}), 0, 0),
                       RawRecord(b"b", orjson.dumps({"item_id": "b", "title": "B"}), 0, 1)])
    where_a, where_b = (decode_item_vector(v)[1].scenarios for _, v in out.vectors)
    assert (where_a, where_b) == (["kids", "home"], None)


@pytest.mark.kafka
@pytest.mark.slow
def test_scenarios_and_requests_end_to_end(kafka, tmp_path):
    """Worker + trainer on the real broker: restricted items stay in their scenario, a
    request is answered with its scenario, and it is not trained on."""
    from streams.publish import publish_events
    from streams.supervisor import TrainerProcess, WorkerProcess, total
    from streams.topics import ensure_topics

    s = make_settings(kafka, tmp_path, top_k=5)
    ensure_topics(s)
    items = [{"item_id": i, "title": f"movie {i}"} for i in ALL] + [
        {"item_id": i, "title": f"cartoon {i}", "scenarios": ["kids"]} for i in KIDS]
    events = [{"user_id": f"u{k % 4}", "item_id": (KIDS if k % 2 else ALL)[k % 8],
               "event_type": "view", "ts": T + k, "scenario": "kids" if k % 2 else "default"}
              for k in range(40)]
    requests = [{"user_id": "u0", "event_type": "request", "ts": T + 100, "scenario": "kids",
                 "text": "cartoon"},
                {"user_id": "u1", "event_type": "request", "ts": T + 101}]
    trainer = TrainerProcess(s, tmp_path / "trainer.log").start()
    worker = WorkerProcess(s, tmp_path / "worker.log").start()
    try:
        index_catalog(s, worker, items, trainer=trainer)
        publish_events(s, events + requests, quiet=True)
        worker.wait_for("streamrec_events_total", len(events) + len(requests), timeout=180)
        worker.wait_idle()
        trainer.wait_for("streamrec_trainer_trained", len(events), timeout=120)
        assert total(trainer.metrics(), "streamrec_trainer_trained") == len(events)
    finally:
        worker.stop()
        trainer.stop()
    out = [orjson.loads(m.value) for m in read_all(s, s.topic(s.recommendations_topic))]
    for rec in out:
        got = {it["item_id"] for it in rec["items"]}
        assert rec["scenario"] == "kids" or not got & set(KIDS), rec
    answers = {(r["user_id"], r["scenario"]) for r in out if r["source_event_ts"] >= T + 100}
    assert answers == {("u0", "kids"), ("u1", "default")}
    assert dead_letters(s, s.topic(s.events_dlq_topic)) == []
