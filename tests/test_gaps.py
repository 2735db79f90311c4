"""streams/gaps.py against the real broker: records the stream skipped are read back, in
order, before the batch; progress records are found per partition."""

from __future__ import annotations

import asyncio

import pytest
from helpers import make_settings

from streams.clients import aio_options, kafka_producer
from streams.gaps import GapFiller, progress, progress_key
from streams.records import RawRecord
from streams.topics import ensure_topics

pytestmark = pytest.mark.kafka


def _filler(s) -> GapFiller:
    from aiokafka import AIOKafkaConsumer

    return GapFiller(lambda: AIOKafkaConsumer(group_id=None, enable_auto_commit=False,
                                              **aio_options(s)), s.topic(s.events_topic))


def _topic_with(kafka, tmp_path, n: int):
    """Settings of a 1-partition events topic holding records 0..n-1 (value = offset)."""
    s = make_settings(kafka, tmp_path, partitions=1)
    ensure_topics(s)
    producer = kafka_producer(s)
    for k in range(n):
        producer.send(s.topic(s.events_topic), key=b"u", value=b"%d" % k, partition=0)
    producer.flush()
    producer.close()
    return s


def test_complete_reads_back_the_skipped_range_before_the_batch(kafka, tmp_path):
    s = _topic_with(kafka, tmp_path, 10)
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


def test_a_tail_is_read_only_after_two_checks_that_saw_it_stuck(kafka, tmp_path):
    """Faust can skip a partition's last records and then deliver nothing more of it; the
    worker's timer reads such a tail once two checks saw the same (progress, end) behind."""
    s = _topic_with(kafka, tmp_path, 6)
    filler = _filler(s)
    assert not filler.stalled(0, 2, 6)  # first sight: may still be on its way
    assert not filler.stalled(0, 3, 6)  # progress moved: the stream is delivering
    assert filler.stalled(0, 3, 6)  # the same twice: stuck
    assert not filler.stalled(0, 5, 6) and not filler.stalled(0, 5, 6)  # caught up
    assert not filler.stalled(0, None, 6) and not filler.stalled(0, None, 6)  # no progress
    got = asyncio.run(filler.tail(0, 4, 6, "partition-ref"))
    assert [(r.offset, r.value, r.ref) for r in got] == [(4, b"4", "partition-ref"),
                                                        (5, b"5", "partition-ref")]
    assert filler.filled == got  # acknowledged to Faust once applied, like any skipped record


def test_last_durable_trusts_the_commit_over_a_store_that_may_be_ahead():
    """After a SIGKILL the worker's own store can hold progress the changelog never got;
    the committed offset (next to read) bounds it, except where this process made a batch
    durable itself (commits lag on a partition's first batches)."""
    filler = GapFiller(lambda: None, "events")
    assert filler.last_durable(0, None, 50) is None  # no progress: nothing to check against
    assert filler.last_durable(0, 80, 51) == 50  # store ahead of the commit: re-read 51..80
    assert filler.last_durable(0, 80, None) == -1  # nothing committed: re-read from the start
    assert filler.last_durable(0, 40, 51) == 40  # progress behind the commit: progress
    filler.made_durable([RawRecord(None, None, 0, 79), RawRecord(None, None, 0, 80),
                         RawRecord(None, None, 1, 7)])
    assert filler.last_durable(0, 80, None) == 80  # made durable here: the commit lags
    assert filler.last_durable(1, 7, 3) == 7 and filler.last_durable(2, 9, 3) == 2
