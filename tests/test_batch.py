"""The steps of streams/batch.py one at a time, on a real Faust app and table (not started:
table writes queue their changelog records) and, where a step sends, the real broker."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import faust
import orjson
import pytest
from faust.types import TP
from helpers import make_settings, read_all

from models.examples import Pending, TrainingExample
from models.user_state import UserState
from streams.app import faust_config
from streams.batch import EventBatches, lag, record_of
from streams.dead_letters import H_REASON
from streams.faust_internals import partition_event
from streams.group_lease import GroupLease
from streams.processor import BatchOutput, UserUpdate
from streams.records import RawRecord
from streams.runtime import Runtime
from streams.schemas import InvalidRecord, Reason
from streams.settings import Settings
from streams.topics import ensure_topics


def _batches(s: Settings, encoder) -> EventBatches:
    app = faust.App(s.app_id, **faust_config(s))
    users = app.Table("user-state", default=None, partitions=s.partitions,
                      key_type=bytes, value_type=bytes)
    dlq = app.topic(s.topic(s.events_dlq_topic), key_type=bytes, value_type=bytes)
    lease = GroupLease(s.app_id, s.session_timeout_s, s.rebalance_timeout_s, margin_s=s.heartbeat_s)
    return EventBatches(s, app, Runtime(s, encoder=encoder), users, dlq, lease)


def _record(b: EventBatches, partition: int, offset: int, user: str) -> RawRecord:
    ref = partition_event(b.app, TP(b.s.topic(b.s.events_topic), partition))
    return RawRecord(user.encode(), b"{}", partition, offset, 0, ref)


def _state(n: int) -> UserState:
    st = UserState()
    for k in range(n):
        st.append(f"item-{k}", 1, 1_700_000_000_000 + k, None, 50)
    return st


@pytest.fixture
def offline(tmp_path, encoder):
    s = Settings(broker="kafka://127.0.0.1:9", data_dir=tmp_path, store="memory",
                 partitions=4, compute_threads=1)

    async def make() -> EventBatches:
        return _batches(s, encoder)

    return asyncio.run(make())


def test_the_producer_builds_batches_of_the_configured_size():
    """Faust's producer (recommendations, examples, the changelog) takes the settings'
    batch size, not Faust's 16 KB: one request in flight per broker holds one batch per
    partition, so a 500-event batch waited for ~20 round trips (streams/settings.py). Faust's
    producer reads it from this conf (faust/transport/producer.py, `max_batch_size`)."""
    s = Settings(broker="kafka://127.0.0.1:9", store="memory", producer_batch_bytes=65_536)
    assert Settings().producer_batch_bytes == 262_144
    assert faust.App(s.app_id, **faust_config(s)).conf.producer_max_batch_size == 65_536


def test_write_state_writes_each_user_once_and_each_partitions_progress(offline):
    b = offline
    recs = [_record(b, 1, 7, "u1"), _record(b, 1, 9, "u2"), _record(b, 3, 4, "u3"),
            _record(b, 3, 2, "u4")]
    out = BatchOutput(users={u: UserUpdate(_state(k + 1), rec)
                             for k, (u, rec) in enumerate([("u1", recs[0]), ("u2", recs[1]),
                                                           ("u3", recs[2])])},
                      replayed={"u4": UserUpdate(_state(9), recs[3])})
    b.write_state(out, recs)
    for user, n in (("u1", 1), ("u2", 2), ("u3", 3), ("u4", 9)):
        stored = b.read_state(user, recs[0 if user < "u3" else 2])
        assert UserState.from_bytes(stored).n_events == n
    # nothing committed yet: all is read again, unless this process made it durable itself
    assert [b.last_done(p, recs[0 if p == 1 else 2].ref) for p in (1, 3)] == [-1, -1]
    b.runtime.gaps.made_durable(recs)
    assert [b.last_done(p, recs[0 if p == 1 else 2].ref) for p in (1, 3)] == [9, 4]
    # 4 states + 2 progress records, each awaited by `deliver`
    assert len(b.users._unacked) == 6


def test_pruning_the_active_users_waits_for_the_running_model_step(offline):
    """A batch's steps add users to the processor's `last_seen` in the model-steps thread;
    the gauge's prune (a timer on the loop) must run after the step, not beside it: beside
    it, it once crashed a worker ('dictionary changed size during iteration')."""
    runtime, proc = offline.runtime, offline.runtime.processor
    proc.last_seen["idle"] = time.monotonic() - 3600
    started, release = threading.Event(), threading.Event()

    def step() -> None:  # a batch's step: it marks its users active when it runs
        started.set()
        release.wait(30)
        proc.last_seen["new"] = time.monotonic()

    async def main() -> tuple[list[str], int]:
        steps = asyncio.ensure_future(runtime.model_steps.run(step))
        await asyncio.to_thread(started.wait, 30)
        prune = asyncio.ensure_future(runtime.prune_active())
        for _ in range(10):  # the prune's turns on the loop while the step runs
            await asyncio.sleep(0)
        during = list(proc.last_seen)
        release.set()
        await steps
        return during, await prune

    during, active = asyncio.run(main())
    assert during == ["idle"]  # untouched while the step ran
    assert active == 1 and list(proc.last_seen) == ["new"]


@pytest.mark.kafka
def test_emit_examples_and_deliver_land_in_kafka(kafka, tmp_path, encoder):
    s = make_settings(kafka, tmp_path, partitions=2)
    ensure_topics(s)

    async def run() -> None:
        b = _batches(s, encoder)
        await b.app.producer.start()
        try:
            r0, r1 = _record(b, 0, 3, "u0"), _record(b, 1, 5, "u1")
            st = _state(2)
            ex = [TrainingExample.cut(st, u, "item-9", "click", 1.0, 1, "", rec.partition,
                                      rec.offset) for u, rec in (("u0", r0), ("u1", r1))]
            out = BatchOutput(users={"u0": UserUpdate(st, r0, recommendations=[b'{"r":0}']),
                                     "u1": UserUpdate(st, r1)},
                              rejected=[(r1, InvalidRecord(Reason.INVALID_JSON, "not JSON"))],
                              pending=Pending(states={}, examples=ex))
            await b.emit(out)
            await asyncio.gather(*await b.send_examples(out))
            await b.deliver()
        finally:
            await b.app.producer.stop()

    asyncio.run(run())
    recs = read_all(s, s.topic(s.recommendations_topic))
    assert [(m.key, m.value) for m in recs] == [(b"u0", b'{"r":0}')]
    assert dict(recs[0].headers)["streamrec.worker"].endswith(b":%d" % os.getpid())
    dlq = read_all(s, s.topic(s.events_dlq_topic))
    assert len(dlq) == 1 and dict(dlq[0].headers)[H_REASON] == b"invalid_json"
    examples = read_all(s, s.topic(s.training_examples_topic))
    assert sorted((m.partition, orjson.loads(m.value)["o"]) for m in examples) == \
        [(0, 3), (1, 5)]


def test_record_of_a_faust_event_keeps_its_position(offline):
    ev = partition_event(offline.app, TP("events", 2))
    rec = record_of(ev)
    assert (rec.partition, rec.offset, rec.timestamp_ms, rec.ref) == (2, -1, 0, ev)


def test_lag_counts_none_where_the_consumer_cannot_say(offline):
    """Faust's real consumer, not started: its high-water marks raise (as aiokafka's do for
    a partition revoked since), and the linger's lag hint counts nothing for them instead
    of stopping the agent."""
    records = [record_of(partition_event(offline.app, TP("events", p))) for p in (0, 1)]
    with pytest.raises(Exception, match="not yet started"):
        offline.app.consumer.highwater(TP("events", 0))
    assert lag(offline.app.consumer, records) == 0
