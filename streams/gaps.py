"""Fill holes in what Faust delivers, so every offset of a partition reaches the learner.

faust-streaming can skip records of a partition across a rebalance (records it had fetched
are dropped while its fetch position moves on; cf. faust-streaming issues #216/#221), and
its commit then passes them: those events would be lost (tests/test_faults_workers.py saw
20-440 of 20,000 lost per stop/rejoin before this). The events agent knows each partition's
next expected offset; when a batch starts past it, the missing range is read straight from
Kafka with a group-less consumer and processed first. Re-reading is always safe: the per-user
applied offsets in the state skip whatever was applied already.

The expected offset must survive a partition moving to another worker (the new owner is the
one that would miss the records), so it lives in the user-state table itself: one progress
record per partition (`progress_key`), written with the batch's user states to the same
changelog partition and restored with them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from streams import metrics as m
from streams.records import RawRecord

log = logging.getLogger("streamrec.gaps")


def progress_key(partition: int) -> bytes:
    """Table key of a partition's progress record (NUL-prefixed: never a valid user id)."""
    return b"\x00progress/%d" % partition


def progress(records: list[RawRecord]) -> dict[int, RawRecord]:
    """Each partition's newest record of a batch: its offset is the partition's progress."""
    out: dict[int, RawRecord] = {}
    for rec in records:
        if rec.partition not in out or rec.offset > out[rec.partition].offset:
            out[rec.partition] = rec
    return out


class GapFiller:
    def __init__(self, consumer_factory: Callable[[], Any], topic: str, timeout_s: float = 60.0):
        self._factory = consumer_factory
        self.topic = topic
        self.timeout_s = timeout_s
        self.filled: list[RawRecord] = []  # read by `complete`, to acknowledge once applied
        self.contiguous: set[int] = set()  # partitions of the last batch checked against progress
        self._behind: dict[int, tuple[int, int]] = {}  # partition -> (progress, end) last check
        self._durable: dict[int, int] = {}  # partition -> newest offset this process made durable

    def made_durable(self, records: list[RawRecord]) -> None:
        """Note a batch whose effects the broker has acknowledged."""
        for p, rec in progress(records).items():
            self._durable[p] = max(rec.offset, self._durable.get(p, -1))

    def last_durable(self, partition: int, stored: int | None, committed: int | None
                     ) -> int | None:
        """The partition's last offset whose effect the changelog surely has.

        `stored` (the progress record in the worker's store) can be ahead of the changelog: a
        worker killed between its local write and the changelog's ack restarts on its disk
        with it. The committed offset (`committed`, next to read; None: nothing committed)
        never is ahead, since a batch is committed only once durable; so everything from it
        on is read again, and the replays put the lost writes back in the changelog (see
        streams/processor.py BatchOutput.replayed). What this process made durable itself is
        known without the commit, which lags on a partition's first batches."""
        if stored is None:
            return None
        done = min(stored, (committed or 0) - 1)
        return max(done, self._durable.get(partition, done))

    def stalled(self, partition: int, done: int | None, end: int | None) -> bool:
        """True when a partition was behind its end (stored progress `done`, end offset `end`)
        at this check and the one before, with neither moving: what the stream still had to
        deliver would have come by now. Two checks, so a record that is on its way through
        Faust's queues when the first check runs is not read twice."""
        behind = done is not None and end is not None and done + 1 < end
        seen = self._behind.pop(partition, None)
        if behind:
            self._behind[partition] = (done, end)
        return behind and seen == (done, end)

    async def complete(self, records: list[RawRecord],
                       last_done: Callable[[int, Any], int | None]) -> list[RawRecord]:
        """`records` plus any records the stream skipped before them, in offset order per
        partition (partitions hold disjoint users, so their relative order is free).
        `last_done(partition, ref)` is the partition's stored progress (None: unknown)."""
        by_partition: dict[int, list[RawRecord]] = defaultdict(list)
        for rec in records:
            by_partition[rec.partition].append(rec)
        out: list[RawRecord] = []
        self.contiguous = set()
        for p, recs in by_partition.items():
            recs.sort(key=lambda r: r.offset)
            done = last_done(p, recs[0].ref)
            expected = None if done is None else done + 1
            if done is not None:
                self.contiguous.add(p)
            for rec in recs:
                if expected is not None and rec.offset > expected:
                    got = await self._read(p, expected, rec.offset, rec.ref)
                    self.filled += got
                    out += got
                out.append(rec)
                expected = rec.offset + 1 if expected is None else max(expected, rec.offset + 1)
        return out

    async def tail(self, partition: int, start: int, end: int, ref: Any) -> list[RawRecord]:
        """Records [start, end) of a partition whose stream went quiet below its end: Faust
        skipped them (after a restart it can drop what it fetched before seeking) and there is
        no later record whose batch would reveal the hole to `complete`."""
        got = await self._read(partition, start, end, ref, "were skipped at the partition's end")
        self.filled += got
        return got

    async def _read(self, partition: int, start: int, end: int, ref: Any,
                    why: str = "were not delivered") -> list[RawRecord]:
        """Records [start, end) of one partition. `ref` (a Faust event of the same partition)
        routes their table reads and writes to that partition's state."""
        return await read_records(self._factory, self.topic, partition, start, end, ref, why,
                                  self.timeout_s)


async def read_records(consumer_factory: Callable[[], Any], topic: str, partition: int,
                       start: int, end: int, ref: Any, why: str,
                       timeout_s: float = 60.0) -> list[RawRecord]:
    """Records [start, end) of one partition of `topic`, read straight from Kafka with a
    group-less consumer from `consumer_factory` (each carries `ref`), counted as refetched."""
    from aiokafka import TopicPartition

    log.warning("%s[%d]: offsets %d..%d %s; reading them from Kafka",
                topic, partition, start, end - 1, why)
    tp = TopicPartition(topic, partition)
    consumer = consumer_factory()
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, start)
        got: list[RawRecord] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while await consumer.position(tp) < end:
            if loop.time() > deadline:
                raise TimeoutError(f"could not read {tp} {start}..{end - 1}")
            for msg in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                if msg.offset < end:
                    got.append(RawRecord(msg.key, msg.value, partition, msg.offset,
                                         msg.timestamp or 0, ref))
    finally:
        await consumer.stop()
    m.REFETCHED.labels(topic=topic).inc(len(got))
    return got


def commit_offsets(records: list[RawRecord], partitions: set[int]) -> dict[Any, int]:
    """Where to commit `partitions` after `records`: past their newest record of them. Safe
    only because each of `partitions` was applied contiguously from its stored progress and
    the batch's effects are durable before the commit (streams/faust_internals.py
    commit_past)."""
    newest = progress([r for r in records if r.partition in partitions])
    return {rec.ref.message.tp: rec.offset + 1 for rec in newest.values()}
