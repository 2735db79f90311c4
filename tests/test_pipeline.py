"""End to end on the real broker: catalog + events in, recommendations and DLQ records out.

One worker process runs one scenario (module fixture); each test checks one promise of it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import orjson
import pytest
from helpers import dead_letters, index_catalog, latest_recommendations, make_settings, read_all

from evaluation.synthetic import SyntheticStream, make_world, topic_hit_rate
from streams.clients import kafka_producer
from streams.publish import publish_events, publish_items
from streams.supervisor import TrainerProcess, WorkerProcess, total
from streams.topics import ensure_topics

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

N_EVENTS = 4000
N_SECOND_WAVE = 600
MAX_EVENT_BYTES = 4096
N_DELETED = 10

#: catalog records that must go to item-catalog-dlq: (value, reason)
BAD_ITEMS: list[tuple[bytes, str]] = [
    (b"{broken", "invalid_json"),
    (orjson.dumps({"title": "no id"}), "missing_field"),
    (orjson.dumps({"item_id": "x", "tags": "not-a-list"}), "wrong_type"),
]


def _event(**kw: object) -> dict:
    return {"user_id": "bad-user", "item_id": "item-000001", "event_type": "view",
            "ts": 1_700_000_000_000, **kw}


#: (raw value, expected DLQ reason or None when the record must be accepted)
BAD_INPUT: list[tuple[bytes, str | None]] = [
    (b'{"user_id": "u1", "item_id": ', "invalid_json"),  # truncated / malformed JSON
    (b"\xff\xfe\x00garbage", "invalid_utf8"),
    (b'["not", "an", "object"]', "not_object"),
    (orjson.dumps({"user_id": "bad-user", "item_id": "item-000001", "ts": 1}), "missing_field"),
    (orjson.dumps(_event(ts="yesterday")), "wrong_type"),
    (orjson.dumps(_event(user_id=12345)), "wrong_type"),
    (orjson.dumps(_event(event_type="teleport")), "invalid_value"),
    (orjson.dumps(_event(event_type="search", item_id=None, text="x" * 2500)), "too_long"),
    (b'{"pad": "' + b"x" * MAX_EVENT_BYTES + b'"}', "oversize"),
    (orjson.dumps(_event(item_id="no-such-item")), "unknown_item"),
    (orjson.dumps(_event(user_id="")), "empty_id"),
    (orjson.dumps(_event(ts=-5)), "bad_timestamp"),
    # a valid event whose processing raises (tests/poison_worker.py): isolated, the rest of
    # its batch still applied
    (orjson.dumps(_event(user_id="poison-user")), "processing_error"),
    # keyed by something else than its user id (`_send` keys this one "bad-user"): its
    # user's state lives on another partition
    (orjson.dumps(_event(user_id="someone-else")), "misrouted"),
    # extra fields are ignored, not rejected: producers may add fields (DESIGN: schemas)
    (orjson.dumps(_event(user_id="extra-user", extra_field={"nested": [1, 2]})), None),
]


@pytest.fixture(scope="module")
def run(kafka, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    s = make_settings(kafka, tmp, max_event_bytes=MAX_EVENT_BYTES)
    ensure_topics(s)
    world = make_world(480, n_topics=8, seed=3)
    stream = SyntheticStream(world, n_users=80, seed=4, drift_prob=0.01, noise=0.05)
    events = list(stream.events(N_EVENTS))
    trainer = TrainerProcess(s, tmp / "trainer.log").start()
    worker = WorkerProcess(s, tmp / "worker.log", extra_env={"POISON_USER_ID": "poison-user"},
                           program=[str(Path(__file__).with_name("poison_worker.py"))]).start()
    try:
        sent_bad_items = _send(s, s.topic(s.catalog_topic), BAD_ITEMS)
        index_catalog(s, worker, world.items, trainer=trainer)
        sent_bad = _send(s, s.topic(s.events_topic), BAD_INPUT)
        publish_events(s, events, quiet=True)  # good events after the bad ones
        expected = len(events) + len(BAD_INPUT)
        worker.wait_for("streamrec_events_total", expected, timeout=300)
        worker.wait_idle()  # the last recommendations have landed
        samples = worker.metrics()
        deleted, deleted_at = _delete_popular(s, worker, len(world.items))
        # events naming a deleted item would (rightly) go to the DLQ as unknown_item: skip them
        second = [e for e in stream.events(N_SECOND_WAVE) if e["item_id"] not in deleted]
        publish_events(s, second, quiet=True)
        worker.wait_for("streamrec_events_total", expected + len(second), timeout=300)
        worker.wait_idle()
        readded_at = _readd(s, worker, world, deleted)
        third = list(stream.events(N_SECOND_WAVE))  # may name the re-added items again
        publish_events(s, third, quiet=True)
        worker.wait_for("streamrec_events_total", expected + len(second) + len(third),
                        timeout=300)
        worker.wait_idle()
        yield dict(settings=s, world=world, stream=stream, events=events, sent_bad=sent_bad,
                   sent_bad_items=sent_bad_items, samples=samples, worker=worker,
                   deleted=deleted, deleted_at=deleted_at, second=second,
                   readded_at=readded_at, third=third, trainer=trainer)
    finally:
        worker.stop()
        trainer.stop()


def _send(s, topic: str, records: list[tuple[bytes, str | None]]
          ) -> list[tuple[int, int, bytes, str | None]]:
    """Send records synchronously; returns (partition, offset, value, expected reason)."""
    producer = kafka_producer(s)
    out = []
    for value, reason in records:
        md = producer.send(topic, key=_user_key(value), value=value).get(timeout=30)
        out.append((md.partition, md.offset, value, reason))
    producer.close()
    return out


def _user_key(value: bytes) -> bytes:
    """Key a record by its user id, as every producer must (a foreign key is `misrouted`)."""
    try:
        user = orjson.loads(value).get("user_id")
    except (orjson.JSONDecodeError, AttributeError):
        user = None
    return user.encode() if isinstance(user, str) and user and user != "someone-else" \
        else b"bad-user"


def _delete_popular(s, worker: WorkerProcess, n_items: int) -> tuple[set[str], int]:
    """Delete the most recommended items (half by `deleted: true`, half by tombstone)."""
    counts: dict[str, int] = defaultdict(int)
    for rec in latest_recommendations(s).values():
        for it in rec["items"]:
            counts[it["item_id"]] += 1
    victims = sorted(counts, key=counts.get, reverse=True)[:N_DELETED]
    producer = kafka_producer(s)
    topic = s.topic(s.catalog_topic)
    for n, item_id in enumerate(victims):
        value = orjson.dumps({"item_id": item_id, "deleted": True}) if n % 2 else None
        producer.send(topic, key=item_id.encode(), value=value).get(timeout=30)
    producer.close()
    deadline = time.monotonic() + 60
    while total(worker.metrics(), "streamrec_index_items") > n_items - N_DELETED:
        assert time.monotonic() < deadline, "deletes not applied"
        time.sleep(0.2)
    return set(victims), int(time.time() * 1000)


def test_every_user_gets_recommendations_without_seen_items(run):
    s, events = run["settings"], run["events"] + run["second"] + run["third"]
    recs = latest_recommendations(s)
    by_user: dict[str, list[str | None]] = defaultdict(list)
    for ev in events:
        by_user[ev["user_id"]].append(ev["item_id"])
    users = {ev["user_id"] for ev in events}
    assert users <= set(recs), f"users without a recommendation: {sorted(users - set(recs))[:5]}"
    H = s.learner.history_len
    for user, rec in recs.items():
        if user not in users:
            continue
        assert len(rec["items"]) == s.top_k
        seen = set(by_user[user][-H:]) - {None}  # the history window: the last H events
        assert not seen & {it["item_id"] for it in rec["items"]}, user


def test_last_recommendation_comes_after_last_event(run):
    recs = latest_recommendations(run["settings"])
    last_ts = {}
    for ev in run["events"] + run["second"] + run["third"]:
        last_ts[ev["user_id"]] = ev["ts"]
    for user, ts in last_ts.items():
        assert recs[user]["source_event_ts"] == ts, user


def test_reasons_are_recent_items_and_the_model_is_named(run):
    recs = latest_recommendations(run["settings"])
    history = defaultdict(list)
    for ev in run["events"] + run["second"] + run["third"]:
        if ev["item_id"]:
            history[ev["user_id"]].append(ev["item_id"])
    window = run["settings"].reason_window
    for user, rec in recs.items():
        if user not in history:
            continue
        recent = set(history[user][-window:])
        assert all(it["reason_item_id"] in recent for it in rec["items"]), user
        assert rec["model"]["index_version"] >= 1
        assert rec["model"]["encoder"]
        # the user's own rate: rmsprop's α = α0 / sqrt(mean ||g||²) has no upper bound
        assert 0 < rec["learning_rate"] < float("inf")


def test_synthetic_users_get_their_true_topic_far_above_chance(run):
    world, stream = run["world"], run["stream"]
    recs = latest_recommendations(run["settings"])
    lists = {u: [it["item_id"] for it in r["items"]] for u, r in recs.items()
             if u.startswith("user-")}
    hit = topic_hit_rate(world, lists, stream.current_topic)
    chance = stream.chance_hit_rate()
    assert hit >= 3 * chance, (hit, chance)


def test_bad_input_goes_to_the_dlq_with_reason_and_offset(run):
    s = run["settings"]
    dlq = dead_letters(s, s.topic(s.events_dlq_topic))
    got = {(h["streamrec.source.partition"], h["streamrec.source.offset"]): (v, h)
           for v, h in dlq}
    for partition, offset, value, reason in run["sent_bad"]:
        key = (str(partition), str(offset))
        if reason is None:
            assert key not in got, f"accepted record went to the DLQ: {got.get(key)}"
            continue
        assert key in got, f"no DLQ record for {reason} at {key}"
        dlq_value, headers = got[key]
        assert headers["streamrec.reason"] == reason, (headers, value[:80])
        assert dlq_value == value  # original bytes, untouched
        assert headers["streamrec.source.topic"] == s.topic(s.events_topic)
        assert headers["streamrec.detail"]
    assert len(dlq) == sum(1 for *_, r in run["sent_bad"] if r is not None)


def test_counters_match_what_was_sent(run):
    samples = run["samples"]
    n_bad = sum(1 for *_, r in BAD_INPUT if r is not None)
    assert total(samples, "streamrec_events_total") == len(run["events"]) + len(BAD_INPUT)
    assert total(samples, "streamrec_events_total", outcome="applied") == \
        len(run["events"]) + 1  # + the extra-fields event
    assert total(samples, "streamrec_events_total", outcome="dlq") == n_bad
    source = run["settings"].topic(run["settings"].events_topic)
    assert total(samples, "streamrec_dlq_total", topic=source) == n_bad
    for *_, reason in BAD_INPUT:
        if reason is not None:
            assert total(samples, "streamrec_dlq_total", topic=source, reason=reason) >= 1
    n_recs = len(read_all(run["settings"], run["settings"].topic(
        run["settings"].recommendations_topic)))
    assert total(run["worker"].metrics(), "streamrec_recommendations_total") == n_recs


def test_metrics_page_has_design_metrics_and_faust_sensors(run):
    samples = run["samples"]
    names = {n for n, _ in samples}
    for name in ("streamrec_events_total", "streamrec_dlq_total", "streamrec_batch_size_count",
                 "streamrec_stage_seconds_count", "streamrec_event_to_recommendation_seconds_count",
                 "streamrec_recommendations_total", "streamrec_learning_rate_count",
                 "streamrec_online_loss", "streamrec_index_items", "streamrec_index_version",
                 "streamrec_users_active", "streamrec_linger_seconds_count"):
        assert name in names, name
    assert any(n.startswith("streamrec_faust_") for n in names)
    s, waits = run["settings"], total(samples, "streamrec_linger_seconds_count")
    assert waits >= 1  # one chosen after each batch of the stream
    assert s.batch_wait_s <= total(samples, "streamrec_linger_seconds_sum") / waits \
        <= s.linger_max_s
    assert total(samples, "streamrec_index_items") == len(run["world"].items)
    assert total(samples, "streamrec_catalog_items_total", outcome="rejected") == len(BAD_ITEMS)
    stages = {dict(lab)["stage"] for n, lab in samples if n == "streamrec_stage_seconds_count"}
    assert stages == {"decode", "encode", "learn", "search", "emit", "state", "commit"}


def test_only_new_texts_reach_the_encoder(run):
    """The re-added items were published again with the text they had: their vectors were
    reused, not embedded again."""
    samples = run["worker"].metrics()
    assert total(samples, "streamrec_catalog_items_total", outcome="embedded") == \
        len(run["world"].items)
    assert total(samples, "streamrec_catalog_items_total", outcome="unchanged") == N_DELETED


def test_invalid_catalog_items_go_to_their_dlq(run):
    s = run["settings"]
    dlq = {(h["streamrec.source.partition"], h["streamrec.source.offset"]): (v, h)
           for v, h in dead_letters(s, s.topic(s.catalog_dlq_topic))}
    assert len(dlq) == len(BAD_ITEMS)
    for partition, offset, value, reason in run["sent_bad_items"]:
        dlq_value, headers = dlq[(str(partition), str(offset))]
        assert headers["streamrec.reason"] == reason
        assert dlq_value == value


def _readd(s, worker: WorkerProcess, world, deleted: set[str]) -> int:
    """Publish the deleted items again; returns when the index holds the whole catalog."""
    publish_items(s, [it for it in world.items if it["item_id"] in deleted], quiet=True)
    worker.wait_for("streamrec_index_items", len(world.items), timeout=60)
    return int(time.time() * 1000)


def test_deleted_items_are_never_recommended_after_the_delete(run):
    s, deleted = run["settings"], run["deleted"]
    after = [orjson.loads(m.value) for m in read_all(s, s.topic(s.recommendations_topic))]
    after = [r for r in after if run["deleted_at"] < r["generated_at"] < run["readded_at"]]
    # the second wave was served: each of its users got a recommendation (how many each got
    # depends on how the wave was cut into batches)
    assert {r["user_id"] for r in after} >= {e["user_id"] for e in run["second"]}
    for rec in after:
        assert not deleted & {it["item_id"] for it in rec["items"]}, rec["user_id"]


def test_re_added_items_come_back(run):
    s, deleted = run["settings"], run["deleted"]
    recs = [orjson.loads(m.value) for m in read_all(s, s.topic(s.recommendations_topic))]
    later = [r for r in recs if r["generated_at"] > run["readded_at"]]
    assert {r["user_id"] for r in later} >= {e["user_id"] for e in run["third"]}  # served
    back = deleted & {it["item_id"] for r in later for it in r["items"]}
    assert back, "no re-added item was recommended again"
    # and events naming them are applied, not dead-lettered as unknown items: the only
    # unknown_item record is the one BAD_INPUT sent on purpose
    dlq = dead_letters(s, s.topic(s.events_dlq_topic))
    assert sum(h["streamrec.reason"] == "unknown_item" for _, h in dlq) == 1
