"""One micro-batch of behavior events, from the records Faust hands the agent to committed
offsets. The steps, in order (`EventBatches.run`):

    fill_gaps         records the stream skipped before these are read from Kafka first
    process           decode, then serve every user of the batch (off the event loop)
    emit              recommendations and dead letters to the producer
    learn             the per-user step (off the event loop)
    send_examples     training examples, acknowledged (during learn) before any state is
                      written
    write_state       one table write per user, plus each partition's progress
    deliver           everything produced is acknowledged by the broker
    commit            acknowledge what Faust skipped, commit past the batch

A batch runs under the batch lock (one at a time: the stream's, or a skipped tail's) and the
group lease (streams/group_lease.py: it finishes while this worker surely owns its
partitions, or the process exits). A batch that raises is retried record by record; a
record that raises alone goes to the DLQ, so no input stops the worker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from typing import Any

import faust

from streams import metrics as m
from streams.dead_letters import dlq_headers
from streams.faust_internals import (
    DurableTable,
    acknowledge,
    commit_past,
    committed_offset,
    current_event,
    partition_event,
)
from streams.gaps import commit_offsets, progress, progress_key
from streams.group_lease import GroupLease
from streams.linger import Linger
from streams.processor import BatchOutput
from streams.records import RawRecord
from streams.runtime import Runtime
from streams.schemas import InvalidRecord, Reason
from streams.settings import Settings

log = logging.getLogger("streamrec.app")


def record_of(ev: Any) -> RawRecord:
    """A Faust event as the record the batch steps take."""
    msg = ev.message
    return RawRecord(ev.key, ev.value, msg.partition, msg.offset,
                     int((msg.timestamp or 0) * 1000), ev)


def lag(consumer: Any, records: list[RawRecord]) -> int:
    """Records of the batch's partitions in Kafka beyond it, by the consumer's high-water
    marks as of its last fetch: a hint for the linger, so a partition whose mark is unknown
    (not fetched yet, or revoked since: aiokafka then raises) counts none."""
    total = 0
    for rec in progress(records).values():
        try:
            end = consumer.highwater(rec.ref.message.tp)
        except Exception:  # noqa: BLE001 - see the docstring
            continue
        total += 0 if end is None else max(end - 1 - rec.offset, 0)
    return total


async def send_dead_letters(topic: Any, source: str,
                            rejected: list[tuple[RawRecord, InvalidRecord]]) -> None:
    """Each rejected record to `topic` with its reason and source position, counted."""
    for rec, exc in rejected:
        headers = dlq_headers(exc.reason, exc.detail, source, rec.partition, rec.offset)
        await topic.send(key=rec.key, value=rec.value, headers=headers, force=True)
        m.DLQ.labels(topic=source, reason=exc.reason.value).inc()


class EventBatches:
    """The events agent's batches (module docstring); state lives in the `users` table."""

    def __init__(self, settings: Settings, app: faust.App, runtime: Runtime,
                 users: DurableTable, dead_letters: Any, lease: GroupLease):
        self.s, self.app, self.runtime = settings, app, runtime
        self.users, self.dead_letters, self.lease = users, dead_letters, lease
        self.lock = asyncio.Lock()
        self.linger = Linger(settings.linger_target_events, settings.linger_max_s,
                             settings.batch_wait_s, settings.batch_size)
        self.next_wait = settings.batch_wait_s  # Faust's wait for the next batch to fill
        self.last_delivery = time.monotonic()  # when the stream last handed over a batch
        # which process produced a record (recommendations, examples): tracing and the tests
        self.headers = [("streamrec.worker", f"{socket.gethostname()}:{os.getpid()}".encode())]

    # -- entry points -----------------------------------------------------------------------
    async def from_stream(self, events: list[Any]) -> None:
        """A batch as `take_batches` delivers it; then how long Faust may wait for the next
        one to fill (`next_wait`, streams/linger.py)."""
        self.last_delivery = handed_over = time.monotonic()
        records = [record_of(ev) for ev in events]
        async with self.lock:
            await self.lease.hold("a batch", self.run(records))
        if self.linger.on:  # (off, Faust's wait stays `batch_wait_s`: no lag to read)
            self.next_wait = self.linger.wait(len(records), handed_over, time.monotonic(),
                                              lag(self.app.consumer, records))
            m.LINGER_SECONDS.observe(self.next_wait)

    async def skipped_tails(self) -> None:
        """When the stream has been quiet, compare each assigned partition's stored progress
        with its end: records below the end that it has not delivered over two checks are
        read from Kafka and run as a batch (streams/gaps.py GapFiller.stalled, .tail). Not
        while it delivers: under a backlog a partition can wait its turn for seconds."""
        quiet = time.monotonic() - self.last_delivery >= self.s.skipped_tail_check_s
        if not (quiet and self.runtime.ready.is_set()) or self.app.rebalancing \
                or self.lock.locked():
            return
        async with self.lock:
            events_topic = self.s.topic(self.s.events_topic)
            for tp in self.app.consumer.assignment():
                if tp.topic == events_topic:
                    await self._tail(tp)

    async def _tail(self, tp: Any) -> None:
        gaps = self.runtime.gaps
        ref = partition_event(self.app, tp)
        done, end = self.last_done(tp.partition, ref), self.app.consumer.highwater(tp)
        if not gaps.stalled(tp.partition, done, end):
            return
        try:
            records = await gaps.tail(tp.partition, done + 1,
                                      min(end, done + 1 + self.s.batch_size), ref)
        except Exception as exc:  # noqa: BLE001 - retried at the next check
            log.error("reading %s's skipped tail failed: %r", tp, exc)
            return
        await self.lease.hold("a skipped tail", self.run(records))

    async def between_batches(self) -> None:
        """Swap in a finished snapshot while no batch runs (a quiet worker too)."""
        if self.runtime.ready.is_set() and not self.lock.locked():
            async with self.lock:
                await self.runtime.swap_snapshot()

    # -- the steps ----------------------------------------------------------------------------
    async def run(self, records: list[RawRecord]) -> None:
        """Every step of one batch, in order (module docstring). Hold `lock`."""
        with m.BATCHES_IN_FLIGHT.track_inprogress():
            records = await self.fill_gaps(records)
            try:
                await self.handle(await self.process(records), records)
            except Exception as exc:  # noqa: BLE001 - no input may stop the worker
                await self.one_by_one(records, exc)
            await self.commit(records)

    async def fill_gaps(self, records: list[RawRecord]) -> list[RawRecord]:
        return await self.runtime.gaps.complete(records, self.last_done)

    async def process(self, records: list[RawRecord]) -> BatchOutput:
        return await self.runtime.process_events(records, self.read_state)

    async def handle(self, out: BatchOutput, records: list[RawRecord]) -> None:
        """Emit, send the training examples, take the per-user step while the broker
        acknowledges them, persist state and the partitions' progress, deliver: one processed
        batch."""
        await self.emit(out)
        examples = await self.send_examples(out)  # acknowledged while the step runs
        await self.runtime.learn(out)  # serve first, then learn: latency excludes the step
        with m.STAGE_SECONDS.labels(stage="state").time():
            if examples:
                await asyncio.gather(*examples)
            self.write_state(out, records)
        with m.STAGE_SECONDS.labels(stage="commit").time():  # durable before acked/committed
            await self.deliver()

    async def emit(self, out: BatchOutput) -> None:
        """Recommendations and dead letters: straight to the Kafka producer (Faust's
        Topic.send wraps every record in futures and callbacks, which cost more than the
        record itself at ~500 per batch)."""
        with m.STAGE_SECONDS.labels(stage="emit").time():
            topic = self.s.topic(self.s.recommendations_topic)
            for user, upd in out.users.items():
                for rec in upd.recommendations:
                    await self.app.producer.send(topic, user.encode(), rec, None, None,
                                                 self.headers)
            await send_dead_letters(self.dead_letters, self.s.topic(self.s.events_topic),
                                    out.rejected)
        self.runtime.observe_emit(out)

    async def send_examples(self, out: BatchOutput) -> list[asyncio.Future]:
        """The batch's training examples, to the producer; `handle` awaits their
        acknowledgement before any state of the batch is written: a state in the store (even
        on local disk only) implies its examples are in Kafka, so a crash can repeat examples
        (the trainer skips them by source) but never lose one. Each goes to its source
        event's partition number, so one source partition's examples stay in offset order."""
        topic = self.s.topic(self.s.training_examples_topic)
        return [await self.app.producer.send(topic, ex.user_id.encode(), ex.to_bytes(),
                                             ex.partition, None, self.headers)
                for ex in out.examples]

    def write_state(self, out: BatchOutput, records: list[RawRecord]) -> None:
        """Each user's state incl. its applied offsets, one write per user (replayed users
        too: see BatchOutput), then each partition's progress."""
        for user, upd in itertools.chain(out.users.items(), out.replayed.items()):
            with current_event(upd.record.ref):
                self.users[user.encode()] = upd.state.to_bytes()
        self.mark_progress(records)

    async def deliver(self) -> None:
        """Wait until the broker has acknowledged everything produced so far.

        Table writes only enqueue changelog records in Faust's producer buffer, and Faust's
        own pre-commit flush gives up after 0.1 s without progress, so it can commit source
        offsets whose state never reached the changelog; a crash then lost those events
        (tests/test_restart.py). The changelog records are awaited through their futures
        (streams/faust_internals.py DurableTable); a flush of the producer then covers what
        went straight to the Kafka client (recommendations, DLQ records, examples)."""
        await self.users.wait_acked()
        await self.app.producer.flush()

    async def one_by_one(self, records: list[RawRecord], exc: Exception) -> None:
        """A batch that raised is retried record by record; a record that raises alone goes
        to the DLQ (`processing_error`). Never re-raise: Faust acks a batch even when its
        agent crashes, so raising would lose the batch."""
        log.error("batch of %d events failed (%r); retrying one by one", len(records), exc)
        for rec in records:
            try:
                await self.handle(await self.process([rec]), [rec])
            except Exception as exc1:  # noqa: BLE001 - isolated to the DLQ below
                log.error("event %s:%s failed alone: %r", rec.partition, rec.offset, exc1)
                m.EVENTS.labels(event_type="unknown", outcome="dlq").inc()
                reason = InvalidRecord(Reason.PROCESSING_ERROR,
                                       f"processing this event raised: {exc1!r}"[:500])
                await send_dead_letters(self.dead_letters, self.s.topic(self.s.events_topic),
                                        [(rec, reason)])
                self.mark_progress([rec])
                await self.deliver()

    async def commit(self, records: list[RawRecord]) -> None:
        """Applied and durable by now: acknowledge what Faust skipped, and commit the
        partitions applied contiguously past the batch."""
        gaps = self.runtime.gaps
        gaps.made_durable(records)
        with m.STAGE_SECONDS.labels(stage="commit").time():
            acknowledge(self.app.consumer, [(r.ref.message.tp, r.offset) for r in gaps.filled])
            gaps.filled.clear()
            await commit_past(self.app.consumer, commit_offsets(records, gaps.contiguous))

    # -- state in the table --------------------------------------------------------------------
    def read_state(self, user: str, rec: RawRecord) -> bytes | None:
        """A user's stored state (`UserState.from_bytes` reads it; None: a new user)."""
        with current_event(rec.ref):
            return self.users.get(user.encode())

    def last_done(self, partition: int, ref: Any) -> int | None:
        """The partition's last offset whose effect is surely in the changelog (GapFiller)."""
        with current_event(ref):
            value = self.users.get(progress_key(partition))
        committed = committed_offset(self.app.consumer, ref.message.tp)
        return self.runtime.gaps.last_durable(
            partition, None if value is None else int(value), committed)

    def mark_progress(self, records: list[RawRecord]) -> None:
        for p, rec in progress(records).items():
            with current_event(rec.ref):
                self.users[progress_key(p)] = str(rec.offset).encode()
