"""streams/gaps.py against the real broker: records the stream skipped are read back, in
order, before the batch; progress records are found per partition."""

from __future__ import annotations

import asyncio

import pytest
from helpers import make_settings

from streams.catalog import RawRecord
from streams.clients import aio_options, kafka_producer
from streams.gaps import GapFiller, progress, progress_key
from streams.topics import ensure_topics

pytestmark = pytest.mark.kafka


def _filler(s) -> GapFiller:
    from aiokafka import AIOKafkaConsumer

    return GapFiller(lambda: AIOKafkaConsumer(group_id=None, enable_auto_commit=False,
                                              **aio_options(s)), s.topic(s.events_topic))


def test_complete_reads_back_the_skipped_range_before_the_batch(kafka, tmp_path):
    s = make_settings(kafka, tmp_path, partitions=1)
    ensure_topics(s)
    topic = s.topic(s.events_topic)
    producer = kafka_producer(s)
    for k in range(10):
        producer.send(topic, key=b"u", value=b"%d" % k, partition=0)
    producer.flush()
    producer.close()
    delivered = [RawRecord(b"u", b"%d" % k, 0, k, ref="event-ref") for k in (7, 8, 2, 3)]
    filler = _filler(s)
    # progress says offsets up to 1 were done: 2, 3 came, 4..6 were skipped, 7, 8 came
    out = asyncio.run(filler.complete(delivered, lambda p, ref: 1))
    assert [r.offset for r in out] == [2, 3, 4, 5, 6, 7, 8]
    assert [r.value for r in out] == [b"%d" % k for k in range(2, 9)]
    assert {r.ref for r in out} == {"event-ref"}  # table routing of the delivered records
    assert [r.offset for r in filler.filled] == [4, 5, 6] and filler.contiguous == {0}
    # unknown progress (a partition never seen): nothing to read back, not contiguous
    fresh = _filler(s)
    assert [r.offset for r in asyncio.run(fresh.complete(delivered[:2], lambda p, r: None))] \
        == [7, 8]
    assert fresh.filled == [] and fresh.contiguous == set()


def test_progress_is_the_newest_record_per_partition_and_keys_never_collide_with_users():
    recs = [RawRecord(None, None, p, o) for p, o in [(0, 5), (1, 2), (0, 9), (1, 1)]]
    assert {p: r.offset for p, r in progress(recs).items()} == {0: 9, 1: 2}
    assert progress_key(3) == b"\x00progress/3" and progress_key(3) != progress_key(13)
