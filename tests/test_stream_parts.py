"""The parts of streams/ that need no worker: schemas, table routing helper, catalog
encoding, checkpoint chunking, settings (and, on the broker, the catalog backlog and the
topic replica)."""

from __future__ import annotations

import asyncio
import gc
import json

import faust.streams
import numpy as np
import orjson
import pytest
import torch
from aiokafka.structs import ConsumerRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from models.config import LearnerConfig
from models.lr_rules import Fixed, RMSPropNorm
from models.model import SharedModel
from streams.catalog import CatalogEncoder, decode_item_vector, encode_item_vector
from streams.checkpoint import CheckpointStore
from streams.faust_internals import current_event
from streams.records import RawRecord, isolate_failures
from streams.runtime import Runtime
from streams.schemas import (
    InvalidRecord,
    Item,
    ModelInfo,
    Reason,
    Recommendation,
    RecommendedItem,
    dumps,
    parse_event,
    parse_item,
    recommendation_bytes,
)
from streams.settings import Settings
from streams.supervisor import settings_env


class _Event:  # anything weak-referenceable stands in for a Faust event here
    pass


def test_current_event_sets_and_restores_fausts_context_variable():
    assert faust.streams.current_event() is None
    outer, inner = _Event(), _Event()
    with current_event(outer):
        assert faust.streams.current_event() is outer
        with current_event(inner):
            assert faust.streams.current_event() is inner
        assert faust.streams.current_event() is outer
    assert faust.streams.current_event() is None
    del outer, inner
    gc.collect()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parse_event_rejects_any_garbage_with_a_reason(raw):
    try:
        parse_event(raw, 200)
    except InvalidRecord as exc:
        assert isinstance(exc.reason, Reason) and exc.detail


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["user_id", "item_id", "event_type", "ts", "text",
                                        "value", "scenario"]),
                       st.one_of(st.none(), st.integers(), st.text(max_size=20),
                                 st.floats(allow_nan=False), st.booleans())))
def test_parse_event_on_random_objects_accepts_or_gives_a_reason(obj):
    try:
        ev = parse_event(json.dumps(obj).encode(), 65536)  # json: big ints, Infinity too
    except InvalidRecord as exc:
        assert isinstance(exc.reason, Reason)
    else:
        assert ev.user_id and ev.ts >= 0
        assert ev.item_id or ev.text or ev.event_type == "request"  # (a request names none)



@pytest.mark.parametrize(("change", "reason"), [
    ({"user_id": "u\u0085x"}, Reason.INVALID_VALUE),  # C1 control (NEL)
    ({"item_id": "item\u200b"}, Reason.INVALID_VALUE),  # zero-width space
    ({"user_id": "\u202eevil"}, Reason.INVALID_VALUE),  # bidi override: a spoofed id
    ({"event_type": 5}, Reason.WRONG_TYPE),
    ({"event_type": None}, Reason.WRONG_TYPE),
    ({"event_type": "teleport"}, Reason.INVALID_VALUE),
    ({"ts": 10**20}, Reason.BAD_TIMESTAMP),  # beyond 64 bits: orjson reads a float
    ({"ts": 2**64 - 1}, Reason.BAD_TIMESTAMP),
    ({"ts": 1.5}, Reason.WRONG_TYPE),
    ({"value": True}, Reason.WRONG_TYPE),
    ({"value": "3"}, Reason.WRONG_TYPE),
])
def test_hostile_quirks_get_their_reason(change, reason):
    ev = {"user_id": "u1", "item_id": "i1", "event_type": "view", "ts": 1_700_000_000_000}
    with pytest.raises(InvalidRecord) as exc:
        parse_event(json.dumps(ev | change).encode(), 65536)
    assert exc.value.reason is reason, exc.value.detail
    assert "pattern" not in exc.value.detail  # said in words, not as a regex


def test_numeric_value_and_printable_unicode_ids_are_accepted():
    ev = parse_event(json.dumps({"user_id": "ok ü 漢", "item_id": "i", "event_type": "rate",
                                 "ts": 1, "value": 3}).encode(), 65536)
    assert ev.value == 3.0 and ev.user_id == "ok ü 漢"



@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=30),
       st.lists(st.tuples(st.text(min_size=1, max_size=20),
                          st.floats(allow_nan=False, allow_infinity=False),
                          st.none() | st.text(min_size=1, max_size=20)), max_size=12),
       st.integers(0, 2**53), st.floats(0.0001, 1.0))
def test_recommendation_writer_matches_the_schema(user, items, ts, alpha):
    """The agent's direct writer emits exactly the JSON of the pydantic Recommendation."""
    model = ModelInfo(encoder="enc", index_version=7, model_version=3)
    fast = recommendation_bytes(user, "home", items, ts, ts - 1, model, alpha)
    slow = dumps(Recommendation(
        user_id=user, scenario="home", generated_at=ts, source_event_ts=ts - 1, model=model,
        learning_rate=alpha, items=[RecommendedItem(item_id=i, score=s, reason_item_id=r)
                                    for i, s, r in items]))
    assert fast == slow
    assert Recommendation.model_validate_json(fast).items == \
        Recommendation.model_validate_json(slow).items

def test_item_embedding_text_recipe():
    item = Item(item_id="i", title=" Space ", text="stars", tags=["a", "b"], category="sci")
    assert item.embedding_text() == "Space. stars. a, b. sci"


def test_isolate_failures_finds_every_poison_item_and_keeps_order():
    items = list(range(20))
    poison = {3, 11, 12}

    def fn(batch):
        if poison & set(batch):
            raise ValueError("poison")
        return [x * 10 for x in batch]

    good, bad = isolate_failures(fn, items)
    assert [x for x, _ in good] == [x for x in items if x not in poison]
    assert all(y == x * 10 for x, y in good)
    assert sorted(x for x, _ in bad) == sorted(poison)


def test_catalog_encoder_with_the_real_encoder(encoder):
    records = [
        RawRecord(b"a", orjson.dumps({"item_id": "a", "title": "Galaxy telescope"}), 0, 0),
        RawRecord(b"b", orjson.dumps({"item_id": "b", "title": "Pasta recipe",
                                      "tags": ["food"]}), 0, 1),
        RawRecord(b"c", orjson.dumps({"item_id": "c", "deleted": True}), 0, 2),
        RawRecord(b"d", None, 0, 3),  # tombstone
        RawRecord(b"e", b"not json", 0, 4),
    ]
    out = CatalogEncoder(encoder.encode, 10_000).process(records)
    vectors = dict(out.vectors)
    assert vectors[b"c"] is None and vectors[b"d"] is None
    item_id, (vec, *_) = decode_item_vector(vectors[b"a"])
    assert item_id == "a" and vec.shape == (encoder.dim,)
    assert abs(np.linalg.norm(vec) - 1) < 1e-4
    np.testing.assert_allclose(vec, encoder.encode(["Galaxy telescope"])[0], atol=1e-5)
    assert [(r.offset, e.reason) for r, e in out.rejected] == [(4, Reason.INVALID_JSON)]


def _catalog(*items: tuple[str, str]) -> list[RawRecord]:
    return [RawRecord(i.encode(), orjson.dumps({"item_id": i, "title": t}), 0, n)
            for n, (i, t) in enumerate(items)]


def test_catalog_encoder_skips_the_encoder_for_texts_the_worker_holds(encoder):
    """A catalog published again: the unchanged items' vectors come from the model's
    replica of item-vectors, only changed and new texts reach the encoder, and the records
    keep the batch's order (an item's last record wins)."""
    seen: list[str] = []

    def encode(texts):
        seen.extend(texts)
        return encoder.encode(texts)

    cat = CatalogEncoder(encode, 10_000, encoder.identity)
    first = cat.process(_catalog(("a", "Galaxy telescope"), ("b", "Pasta recipe")))
    model = SharedModel(LearnerConfig(device="cpu"), text_dim=encoder.dim)
    decoded = [decode_item_vector(v)[1] for _, v in first.vectors]
    model.upsert_items(["a", "b"], np.stack([d.vector for d in decoded]), None,
                       np.array([d.fingerprint for d in decoded], np.uint64))
    seen.clear()
    work = cat.parse(_catalog(("b", "Pasta recipe with basil"), ("a", "Galaxy telescope"),
                              ("c", "Galaxy survey"), ("b", "Pasta recipe")))
    out = cat.embed(work, model.known_text_vectors(work.item_ids, work.fingerprints))
    assert sorted(seen) == ["Galaxy survey", "Pasta recipe with basil"]
    assert (out.embedded, out.unchanged) == (2, 2)
    assert [k for k, _ in out.vectors] == [b"b", b"a", b"c", b"b"]
    again = [decode_item_vector(v)[1] for _, v in out.vectors]
    np.testing.assert_allclose(again[1].vector, decoded[0].vector, atol=1e-6)  # a: reused
    np.testing.assert_allclose(again[3].vector, decoded[1].vector, atol=1e-6)  # b's last
    assert again[1].fingerprint == decoded[0].fingerprint != 0
    np.testing.assert_allclose(again[2].vector, encoder.encode(["Galaxy survey"])[0], atol=1e-5)
    # another encoder's fingerprints match nothing: every item is embedded
    other = CatalogEncoder(encode, 10_000, "another-model").parse(
        _catalog(("a", "Galaxy telescope")))
    assert model.known_text_vectors(other.item_ids, other.fingerprints) == {}


def test_an_item_sent_again_unchanged_changes_nothing_in_the_worker(encoder, tmp_path):
    """item-vectors records apply to model and index, except an item's record with the text
    fingerprint and scenarios the worker holds already (a catalog dump sent again): even
    with other vector bytes (another worker's float rounding), it is left as it is."""
    rt = Runtime(Settings(broker="kafka://127.0.0.1:9", data_dir=tmp_path, store="memory"),
                 encoder=encoder)
    first = rt.catalog.process(_catalog(("a", "Galaxy telescope"), ("b", "Pasta recipe")))

    def apply(vectors: list[tuple[bytes, bytes | None]]) -> None:
        rt._apply_item_vectors([ConsumerRecord("item-vectors", 0, n, 0, 0, k, v, None, 0, 0, ())
                                for n, (k, v) in enumerate(vectors)])

    apply(first.vectors)
    before = rt.model.items.T.clone()
    again = []
    for (key, raw), where in zip(first.vectors, [None, ["books"]], strict=True):
        item_id, iv = decode_item_vector(raw)
        again.append((key, encode_item_vector(item_id, "", np.roll(iv.vector, 1), where,
                                              iv.fingerprint)))
    apply(again)
    a, b = rt.model.catalog.rows_of(["a", "b"])
    assert torch.equal(rt.model.items.T[a], before[a])  # unchanged: not applied
    assert not torch.equal(rt.model.items.T[b], before[b])  # its scenarios changed: applied
    assert rt.model.catalog.allowed("games")[[a, b]].tolist() == [True, False]


def test_catalog_encoder_isolates_an_item_that_makes_the_encoder_fail(encoder):
    def fragile(texts):
        if any("POISON" in t for t in texts):
            raise RuntimeError("tokenizer blew up")
        return encoder.encode(texts)

    records = _catalog(*((str(i), t) for i, t in
                         enumerate(["ok one", "POISON pill", "ok two", "ok three"])))
    out = CatalogEncoder(fragile, 10_000).process(records)
    assert sorted(k for k, _ in out.vectors) == [b"0", b"2", b"3"]
    assert [(r.offset, e.reason) for r, e in out.rejected] == [(1, Reason.PROCESSING_ERROR)]


def test_parse_item_rejects_with_reasons():
    with pytest.raises(InvalidRecord) as exc:
        parse_item(orjson.dumps({"title": "no id"}), 1000)
    assert exc.value.reason is Reason.MISSING_FIELD
    with pytest.raises(InvalidRecord) as exc:
        parse_item(b"x" * 2000, 1000)
    assert exc.value.reason is Reason.OVERSIZE


def _store_and_topic():
    topic: dict[bytes, bytes | None] = {}

    async def send(key, value):
        topic[key] = value

    return CheckpointStore("m", send, chunk_bytes=1000), topic


def test_checkpoint_round_trip_chunks_and_tombstones_old_versions():
    store, topic = _store_and_topic()
    first = np.random.default_rng(0).bytes(4500)
    v1 = asyncio.run(store.save(first))
    assert store.assemble(topic) == first
    assert sum(1 for k in topic if b"/v" in k) == 5  # 4500 bytes in chunks of 1000
    second = b"y" * 2500
    asyncio.run(store.save(second))
    assert store.assemble(topic) == second
    old = [k for k in topic if k.startswith(f"m/v{v1}/".encode())]
    assert old and all(topic[k] is None for k in old)  # tombstoned for compaction


def test_checkpoint_ignores_a_corrupt_or_incomplete_one():
    store, topic = _store_and_topic()
    asyncio.run(store.save(b"z" * 3000))
    chunk = next(k for k in topic if k.endswith(b"/1"))
    topic[chunk] = b"corrupted" + topic[chunk][9:]
    assert store.assemble(topic) is None
    topic.pop(chunk)
    assert store.assemble(topic) is None
    assert CheckpointStore("other", store.send).assemble(topic) is None


def test_settings_from_env_and_back(monkeypatch):
    monkeypatch.setenv("STREAMREC_BROKER", "10.0.0.1:9093")
    monkeypatch.setenv("STREAMREC_LEARNER__LR_RULE", "fixed")  # a rule by name
    monkeypatch.setenv("STREAMREC_LEARNER__SCENARIO_LR_RULE", '{"name": "rmsprop", '
                       '"alpha0": 0.2}')  # or with its parameters
    monkeypatch.setenv("STREAMREC_INDEX__KIND", "hnsw")
    s = Settings()
    assert s.broker == "kafka://10.0.0.1:9093" and s.bootstrap == ["10.0.0.1:9093"]
    assert s.learner.lr_rule == Fixed() and s.index.kind == "hnsw"
    assert s.learner.scenario_lr_rule == RMSPropNorm(alpha0=0.2)
    for key in ("STREAMREC_BROKER", "STREAMREC_LEARNER__LR_RULE",
                "STREAMREC_LEARNER__SCENARIO_LR_RULE", "STREAMREC_INDEX__KIND"):
        monkeypatch.delenv(key)
    for key, value in settings_env(s).items():
        monkeypatch.setenv(key, value)
    assert Settings() == s


def _processor(encoder, tmp_path, batch_encoder):
    """A real batch processor over a 20-item catalog (real learner, FAISS, encoder)."""
    from models.config import LearnerConfig
    from models.learner import OnlineLearner
    from models.serving import Server
    from streams.processor import EventProcessor

    learner = OnlineLearner(LearnerConfig(dim=16, history_len=8, device="cpu"),
                            text_dim=encoder.dim, capacity=64)
    ids = [f"item-{i}" for i in range(20)]
    learner.upsert_items(ids, encoder.encode([f"movie number {i}" for i in range(20)]))
    server = Server(learner.model)
    server.add_items(ids)
    server.refresh()
    return EventProcessor(Settings(data_dir=tmp_path), server, learner.personal, batch_encoder)


def test_processor_applies_a_record_delivered_twice_in_one_batch_once(encoder, tmp_path):
    """After a rebalance one batch can hold the same record twice; its effect counts once."""
    from models.user_state import UserState

    proc = _processor(encoder, tmp_path, encoder)

    def rec(offset: int, item: str) -> RawRecord:
        ev = {"user_id": "u1", "item_id": item, "event_type": "view", "ts": 1_700_000_000_000}
        return RawRecord(b"u1", orjson.dumps(ev), partition=0, offset=offset)

    state = UserState()
    state.mark_applied(0, 4)  # offsets up to 4 were applied by an earlier batch
    batch = [rec(4, "item-0"), rec(5, "item-1"), rec(6, "item-2"), rec(5, "item-1"),
             rec(6, "item-2"), rec(7, "item-3")]
    good, bad = proc.decode(batch)
    out = proc.process(good, bad, {"u1": state})
    assert (out.applied, out.duplicates) == (3, 3)
    assert out.users["u1"].state.items[-3:] == ["item-1", "item-2", "item-3"]
    assert out.users["u1"].state.n_events == 3
    assert out.users["u1"].state.offsets == {"0": 7}


def test_processor_hands_back_users_whose_events_were_all_replays(encoder, tmp_path):
    """A worker killed after its local store write but before the changelog's ack restarts
    with state the changelog lacks; the uncommitted batch comes back as replays only, and
    those users' states must be written again (tests/test_faults_workers.py lost events
    when they were not)."""
    from models.user_state import UserState

    proc = _processor(encoder, tmp_path, encoder)
    states = {u: UserState() for u in ("u1", "u2")}
    for state in states.values():
        state.mark_applied(0, 10)

    def rec(user: str, offset: int) -> RawRecord:
        ev = {"user_id": user, "item_id": "item-1", "event_type": "view", "ts": 1_700_000_000_000}
        return RawRecord(user.encode(), orjson.dumps(ev), partition=0, offset=offset)

    good, bad = proc.decode([rec("u1", 9), rec("u1", 10), rec("u2", 10), rec("u2", 11)])
    out = proc.process(good, bad, states)
    assert (out.applied, out.duplicates) == (1, 3)
    assert list(out.users) == ["u2"]  # u2 has a new event: written with it, as always
    assert list(out.replayed) == ["u1"]
    assert out.replayed["u1"].state is states["u1"] and out.replayed["u1"].recommendations == []
    assert out.replayed["u1"].record.offset == 9  # routes the write to u1's partition


def test_misrouted_and_keyless_events_count_under_their_own_event_type(encoder, tmp_path):
    """A valid event on the wrong key (or none) goes to the DLQ as `misrouted`, and is
    counted under its event type: `invalid` is for records that never parsed."""
    from streams import metrics as m

    def count(event_type: str) -> float:
        return m.EVENTS.labels(event_type=event_type, outcome="dlq")._value.get()

    proc = _processor(encoder, tmp_path, encoder)
    ev = {"user_id": "u1", "item_id": "item-1", "event_type": "purchase", "ts": 1_700_000_000_000}
    before = {t: count(t) for t in ("purchase", "invalid")}
    good, bad = proc.decode([RawRecord(b"u2", orjson.dumps(ev), 0, 1),
                             RawRecord(None, orjson.dumps(ev), 0, 2),
                             RawRecord(b"u1", b"{not json", 0, 3)])
    assert good == [] and [exc.reason for _, exc in bad] == [Reason.MISROUTED] * 2 + [
        Reason.INVALID_JSON]
    proc.process(good, bad, {})
    assert count("purchase") - before["purchase"] == 2
    assert count("invalid") - before["invalid"] == 1


class _FragileEncoder:
    """The real encoder, except that it raises on one text: a poison search query."""

    def __init__(self, encoder, poison: str):
        self.encoder, self.poison, self.name, self.dim = encoder, poison, encoder.name, encoder.dim

    def encode(self, texts):
        if self.poison in texts:
            raise RuntimeError("tokenizer exploded")
        return self.encoder.encode(texts)


def test_processor_isolates_a_search_text_that_makes_the_encoder_fail(encoder, tmp_path):
    from models.user_state import UserState

    proc = _processor(encoder, tmp_path, _FragileEncoder(encoder, "poison query"))
    evs = [("u1", None, "space movies"), ("u2", None, "poison query"), ("u1", "item-3", None),
           ("u3", None, "poison query"), ("u3", None, "comedy"), ("u2", "item-4", None)]
    batch = [RawRecord(u.encode(), orjson.dumps({
        "user_id": u, "item_id": item, "text": text, "ts": 1_700_000_000_000,
        "event_type": "search" if text else "view"}), partition=0, offset=k)
        for k, (u, item, text) in enumerate(evs)]
    good, bad = proc.decode(batch)
    out = proc.process(good, bad, {u: UserState() for u, _, _ in evs})
    assert sorted(rec.offset for rec, _ in out.rejected) == [1, 3]
    assert {exc.reason for _, exc in out.rejected} == {Reason.PROCESSING_ERROR}
    assert out.applied == 4
    assert {u: upd.state.n_events for u, upd in out.users.items()} == {"u1": 2, "u2": 1, "u3": 1}
    assert all(len(upd.recommendations) == 1 for upd in out.users.values())


class _CountingEncoder:
    """The real encoder, recording the texts of each call."""

    def __init__(self, encoder):
        self.encoder, self.name, self.dim = encoder, encoder.name, encoder.dim
        self.calls: list[list[str]] = []

    def encode(self, texts):
        self.calls.append(list(texts))
        return self.encoder.encode(texts)


def test_a_repeated_search_text_is_encoded_once(encoder, tmp_path):
    """The query cache: a text searched again (in the batch or a later one) costs no encoder
    pass, and its event gets the vector the encoder gives that text."""
    from models.user_state import UserState

    counting = _CountingEncoder(encoder)
    proc = _processor(encoder, tmp_path, counting)
    texts = ["space movies", "comedy", "space movies"]

    def batch(first_offset: int):
        recs = [RawRecord(b"u1", orjson.dumps({
            "user_id": "u1", "text": t, "ts": 1_700_000_000_000, "event_type": "search"}),
            partition=0, offset=first_offset + k) for k, t in enumerate(texts)]
        return proc.decode(recs)

    out = proc.process(*batch(0), {"u1": UserState()})
    assert counting.calls == [["space movies", "comedy"]]
    out = proc.process(*batch(3), {"u1": out.users["u1"].state})
    assert counting.calls == [["space movies", "comedy"]]
    assert (proc.queries.hits, proc.queries.misses) == (4, 2)
    st = out.users["u1"].state
    assert st.n_events == 6
    np.testing.assert_allclose(st.text_vector(-1), encoder.encode(["space movies"])[0],
                               atol=1e-3)  # (kept as float16)


@pytest.mark.kafka
def test_catalog_backlog_counts_what_no_catalog_agent_has_committed(kafka, tmp_path):
    """Partitions without a commit read -1 from the broker: an empty catalog is 0 behind
    (it read 4, one per partition, and every batch naming an unknown item then waited 10 s
    for a catalog agent with nothing to do)."""
    from helpers import make_settings
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    from streams.catalog import CatalogBacklog
    from streams.clients import kafka_consumer, kafka_producer
    from streams.topics import admin_client, ensure_topics

    s = make_settings(kafka, tmp_path, partitions=4)
    ensure_topics(s)
    topic = s.topic(s.catalog_topic)
    backlog = CatalogBacklog(lambda: admin_client(s.bootstrap, 10), topic, s.app_id)
    try:
        # a fresh group's coordinator may not be elected yet: no answer, not an error
        assert asyncio.run(backlog.wait(stall_s=30)) == 0
        assert backlog.behind() == 0
        producer = kafka_producer(s)
        for p in (0, 0, 2):
            producer.send(topic, key=b"k", value=b"{}", partition=p)
        producer.flush()
        producer.close()
        assert backlog.behind() == 3
        consumer = kafka_consumer(s, group_id=s.app_id, enable_auto_commit=False)
        consumer.commit({TopicPartition(topic, 0): OffsetAndMetadata(2, None, -1)})
        consumer.close()
        assert backlog.behind() == 1
    finally:
        backlog.close()


def _pausing_after_takes(topic: str, **options: object) -> object:
    """A consumer of the whole topic that pauses 0.1 s after each take that returns records,
    so that others act between its takes."""
    from aiokafka import AIOKafkaConsumer

    class Pausing(AIOKafkaConsumer):
        async def getmany(self, *args, **kwargs):
            batches = await super().getmany(*args, **kwargs)
            if batches:
                await asyncio.sleep(0.1)
            return batches

    return Pausing(topic, group_id=None, auto_offset_reset="earliest", **options)


@pytest.mark.kafka
def test_a_replica_applies_in_order_and_syncs_only_once_applied(kafka, tmp_path, monkeypatch):
    """Chunks are awaited one at a time, in order, each gathered from several takes of at
    most `TAKE` records; `caught_up` and `sync` wait for the application, not for the fetch
    (an apply off the loop can take seconds at 1M items, and a batch that syncs must then
    see the item). Each take is followed by a pause, so that `sync` polls between takes, when
    the position already counts records that no apply has seen."""
    from helpers import make_settings

    from streams import replica as replica_module
    from streams.clients import aio_options, kafka_producer
    from streams.replica import TopicReplica
    from streams.topics import ensure_topics

    monkeypatch.setattr(replica_module, "TAKE", 2)
    monkeypatch.setattr(replica_module, "CHUNK", 4)
    s = make_settings(kafka, tmp_path, partitions=1)
    ensure_topics(s)
    topic = s.topic(s.item_vectors_topic)
    producer = kafka_producer(s)

    def send(first: int, n: int) -> None:
        for k in range(first, first + n):
            producer.send(topic, key=b"item-%d" % k, value=b"{}")
        producer.flush()

    applied: list[bytes] = []
    chunks: list[int] = []
    running = 0

    async def apply(msgs: list) -> None:  # slow, as a table growth off the loop is
        nonlocal running
        running += 1
        assert running == 1, "two chunks applied at once"
        chunks.append(len(msgs))
        await asyncio.sleep(0.3)
        applied.extend(m.key for m in msgs)
        running -= 1

    async def main() -> bool:
        replica = TopicReplica(lambda t: _pausing_after_takes(t, **aio_options(s)), topic, apply)
        await replica.start()
        try:
            await asyncio.wait_for(replica.caught_up.wait(), 60)
            assert len(applied) == 7
            await asyncio.to_thread(send, 7, 3)
            synced = await replica.sync(timeout=60)
            assert len(applied) == 10  # sync returned only once the chunk was applied
            return synced
        finally:
            await replica.stop()

    send(0, 7)
    try:
        assert asyncio.run(main())
    finally:
        producer.close()
    assert applied == [b"item-%d" % k for k in range(10)]
    assert max(chunks) == 4, chunks  # takes of 2 gathered into chunks of at most 4


def test_model_steps_run_off_the_loop_one_at_a_time_in_call_order():
    """The worker's batches and catalog changes (and the trainer's steps) share one OffLoop:
    a change never lands while a step runs, and changes keep their order."""
    import threading
    import time

    from streams.off_loop import OffLoop

    log: list[tuple[str, int]] = []
    inside = 0

    def step(k: int) -> int:
        nonlocal inside
        inside += 1
        assert threading.current_thread() is not threading.main_thread()
        log.append(("start", k))
        time.sleep(0.01 * (5 - k))  # earlier calls take longer: order is not by finish
        log.append(("end", k))
        overlap = inside
        inside -= 1
        return overlap

    async def main() -> list[int]:
        guard = OffLoop()
        return await asyncio.gather(*(guard.run(step, k) for k in range(5)))

    assert asyncio.run(main()) == [1] * 5
    assert log == [(e, k) for k in range(5) for e in ("start", "end")]


def _child_prints(code: str) -> list[str]:
    """What `code` prints, run in a fresh interpreter (for process-wide settings), split."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=120).stdout.split()


def test_the_model_steps_thread_computes_under_the_entry_points_thread_cap():
    """FAISS's and torch's thread counts are per thread (OpenMP's), and so is the cap the
    entry point sets: it must reach the thread that searches and steps, not only the main
    thread. FAISS's is read back; torch's is seen by its effect, since torch.get_num_threads()
    answers 1 there either way: a matmul at 2 threads starts an OpenMP worker thread. The
    worker's import order (streams.app first) is the one in which torch's cap was lost. Run
    in a child process, so the cap does not outlive the test."""
    code = """
import os, asyncio
import streams.app
import faiss, torch
from models.compute_threads import limit_threads
from streams.off_loop import OffLoop
limit_threads(1)
def step():
    before = len(os.listdir("/proc/self/task"))
    a = torch.randn(1500, 1500)
    a @ a
    return faiss.omp_get_max_threads(), len(os.listdir("/proc/self/task")) - before
async def main():
    return await OffLoop().run(step)
print(faiss.omp_get_max_threads(), *asyncio.run(main()))
"""
    out = _child_prints(code)
    # FAISS's cap in the main thread and in model-steps; threads torch's matmul started
    assert list(map(int, out)) == [1, 1, 0]


def test_configure_process_shortens_the_gil_switch_interval_and_sets_the_search_threads():
    """The model-steps thread retakes the GIL around every torch and FAISS op; at CPython's
    5 ms each retake could wait that long behind the event loop (streams/process.py
    GIL_SWITCH_INTERVAL_S). The exact search's threads (index.topk.use_threads) are the
    settings'. In a child process, as the thread-cap test, since both are process-wide."""
    from streams.process import GIL_SWITCH_INTERVAL_S

    code = """
import sys
from index import topk
from streams.process import configure_process
from streams.settings import Settings
s = Settings(index={"search_threads": 3})
before = sys.getswitchinterval()
configure_process(s.compute_threads, s.index.blas_threshold, s.index.search_threads)
print(before, sys.getswitchinterval(), topk._threads)
"""
    out = _child_prints(code)
    assert list(map(float, out)) == [0.005, GIL_SWITCH_INTERVAL_S, 3]


def test_the_allocator_reuses_large_blocks_and_gives_free_memory_back():
    """A batch's large tensors come from the heap, not from fresh mappings whose every page
    faults when first written, and the trimming thread gives the heap's free pages back
    (streams/process.py tune_allocator). In a child process: both are process-wide."""
    code = """
import resource, time
import numpy as np
from streams.process import tune_allocator
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096
tune_allocator(trim_every_s=0.2)
before = faults()
np.ones(2 << 20, np.float32)  # an 8 MB block, allocated, written and freed
first = faults() - before
for _ in range(20):  # the next batches' blocks of that size
    np.ones(2 << 20, np.float32)
again = faults() - before - first
blocks = [np.ones(1 << 18, np.float32) for _ in range(48)]  # 48 MB of heap, under the
held = rss()                                                 # trim threshold
del blocks
deadline = time.monotonic() + 60
while rss() > held - (32 << 20) and time.monotonic() < deadline:
    time.sleep(0.05)
print(first, again, (held - rss()) >> 20)
"""
    first, again, returned_mb = map(int, _child_prints(code))
    # a block mapped afresh faults each time (a 1 MB threshold: ~20 × first); from the heap
    # only after a trim has given its pages back (none here)
    assert 0 < first and again < 5 * first
    assert returned_mb >= 32  # 48 here; 0 without the trimming thread


def test_the_loop_watch_measures_how_long_the_loop_was_blocked():
    import time

    from prometheus_client import REGISTRY

    from streams.loop_stalls import watch_loop

    def value(name: str) -> float:
        return REGISTRY.get_sample_value(f"streamrec_event_loop_stall_{name}") or 0.0

    async def main() -> None:
        watch = asyncio.create_task(watch_loop())
        await asyncio.sleep(0.1)  # a few unblocked wake-ups
        time.sleep(0.3)  # the blocking work the watch exists to see
        seen = value("seconds_count")
        while value("seconds_count") == seen:  # the first wake-up after it
            await asyncio.sleep(0.01)
        watch.cancel()

    asyncio.run(main())
    assert 0.25 <= value("max_seconds") < 5.0
    assert value("seconds_sum") >= 0.25


def test_processor_counts_an_event_whose_item_was_in_the_users_last_list_as_a_hit(encoder,
                                                                                   tmp_path):
    """The online hit rate: an event of a user this worker served in the event's scenario is
    scored against the list served last; searches, requests and dislikes are not scored, and
    the lists of users pruned as idle are forgotten."""
    from prometheus_client import REGISTRY

    from models.user_state import UserState

    proc = _processor(encoder, tmp_path, encoder)
    states = {u: UserState() for u in ("u1", "u2")}
    offsets = iter(range(100))

    def batch(*events: dict) -> None:
        recs = [RawRecord(ev["user_id"].encode(), orjson.dumps(
            {"event_type": "view", "ts": 1_700_000_000_000 + (o := next(offsets)), **ev}),
            partition=0, offset=o) for ev in events]
        good, bad = proc.decode(recs)
        assert not bad
        proc.process(good, bad, states)

    def counted() -> tuple[float, float]:
        return tuple(REGISTRY.get_sample_value(f"streamrec_{n}_total")
                     for n in ("next_events", "next_event_hits"))

    batch({"user_id": "u1", "item_id": "item-0"})
    shown = proc.served[("u1", "default")]
    assert len(shown) == 10
    unshown = next(i for i in (f"item-{k}" for k in range(20)) if i not in shown)
    before = counted()
    batch({"user_id": "u1", "item_id": shown[3]},  # a hit
          {"user_id": "u1", "item_id": unshown},  # a miss
          {"user_id": "u1", "item_id": shown[0], "event_type": "dislike"},
          {"user_id": "u1", "text": "a movie", "event_type": "search"},
          {"user_id": "u1", "event_type": "request"},
          {"user_id": "u1", "item_id": shown[1], "scenario": "kids"},  # nothing served there
          {"user_id": "u2", "item_id": shown[2]})  # u2 had no list yet
    assert (counted()[0] - before[0], counted()[1] - before[1]) == (2, 1)
    assert set(proc.served) == {("u1", "default"), ("u1", "kids"), ("u2", "default")}
    proc.last_seen["u1"] -= 3600
    assert proc.prune_active() == 1
    assert set(proc.served) == {("u2", "default")}
