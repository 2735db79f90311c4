"""Every use of faust-streaming's, mode's and aiokafka's private internals, in one place.

streamrec's guarantees rest on a few behaviours Faust does not offer publicly: writing a
table from a batch, awaiting changelog writes, acknowledging records Faust never delivered,
committing past them, a shorter broker fetch wait and a fetch minimum, a wait for each
batch that follows the load, a bounded stop, and knowing when group membership was last
proved. Each lives here with the upstream code it depends on and the upstream change that
would retire it; tests/test_faust_internals.py fails fast when one of those internals
changes shape, and greps that no other module names them.
The versions they were checked on are pinned in pyproject.toml (faust-streaming 0.15.3,
aiokafka 0.14.0, mode-streaming 0.7.1): treat any upgrade as a change the fault tests must
pass.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import faust
from faust import streams as _faust_streams
from faust.types import TP, EventT, Message
from faust.types.tuples import FutureMessage

log = logging.getLogger("streamrec.app")


# -- tables ----------------------------------------------------------------------------------
@contextmanager
def current_event(event: EventT) -> Iterator[None]:
    """`with current_event(ev): table[key] = value` routes the write to ev's partition.

    Faust routes a table read/write to the partition of the *current event*, a context
    variable (`faust.streams._current_event`) that `take_events` batches never set, so a
    write raises "Cannot modify table key from outside of stream iteration" (faust-streaming
    issue #497, open). Retired by: batches that set it per event, or a Table API taking the
    partition."""
    token = _faust_streams._current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _faust_streams._current_event.reset(token)


def partition_event(app: faust.App, tp: TP) -> EventT:
    """An event of partition `tp` that Faust never delivered, for `current_event` when the
    records at hand were read from Kafka directly (streams/gaps.py)."""
    msg = Message(tp.topic, tp.partition, -1, 0.0, 0, None, None, None, None, tp=tp)
    return faust.Event(app, None, None, None, msg)


class DurableTable(faust.Table):
    """`faust.Table` whose changelog writes can be awaited until the broker has them
    (`wait_acked`); install with `faust.App(..., Table=DurableTable)`.

    A table write only puts its changelog record in Faust's producer buffer, which a task
    hands to the Kafka client one record at a time: an empty buffer does not mean the client
    has every record, so a flush can miss the one the task holds, and a commit after it lost
    that event on SIGKILL (21 and 27 times in two runs of tests/test_faults_workers.py).
    Overrides `Table.send_changelog` (faust/tables/base.py) to keep each write's future.
    Retired by: table writes that return their future, or a flush that covers the buffer's
    drain task."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unacked: list[FutureMessage] = []

    def send_changelog(self, *args: Any, **kwargs: Any) -> FutureMessage:
        fut = super().send_changelog(*args, **kwargs)
        self._unacked.append(fut)
        return fut

    async def wait_acked(self) -> None:
        """Return once the broker has acknowledged every changelog record written so far
        (raises what a failed send raised)."""
        pending, self._unacked = self._unacked, []
        if pending:
            await asyncio.gather(*pending)


# -- the consumer's offsets --------------------------------------------------------------------
def committed_offset(consumer: Any, tp: TP) -> int | None:
    """The offset Faust last committed for `tp` (next to read; None: none yet), from
    `faust.transport.consumer.Consumer._committed_offset`. Retired by a public accessor."""
    return consumer._committed_offset.get(tp)


def acknowledge(consumer: Any, offsets: list[tuple[TP, int]]) -> None:
    """Tell Faust's consumer that records it never delivered have been processed, so its
    commit can move past them (it commits the longest run of acknowledged offsets). Call
    only once their effect is durable. Mirrors `faust.transport.consumer.Consumer.ack` on its
    bookkeeping (`_committed_offset`, `_acked_index`, `_acked`, `_n_acked`): Faust can skip
    records across a rebalance (faust-streaming #216/#221) and `ack` needs an Event it never
    made. Retired by: no skipped records, or an `ack` taking (tp, offset)."""
    for tp, offset in offsets:
        committed = consumer._committed_offset[tp]
        index = consumer._acked_index[tp]
        if (committed is None or offset >= committed) and offset not in index:
            index.add(offset)
            consumer._acked[tp].append(offset)
            consumer._n_acked += 1


async def commit_past(consumer: Any, offsets: dict[TP, int]) -> None:
    """Commit each tp at `offsets[tp]` (next to read) through Faust's consumer, so its own
    bookkeeping knows, never backwards (`Consumer._should_commit`, `._commit_offsets`).
    Faust's commit follows what its stream acked, and the records it skipped are never acked
    by it: left alone it would stall at the first of them for good. Retired with
    `acknowledge`."""
    offsets = {tp: o for tp, o in offsets.items() if consumer._should_commit(tp, o)}
    if offsets:
        await consumer._commit_offsets(offsets)


def tune_stream_fetch(max_wait_ms: int, min_bytes: int) -> None:
    """Give the stream consumer's broker fetches a wait of `max_wait_ms` instead of Faust's
    hard-coded 1,500 ms, and a minimum of `min_bytes` (aiokafka's default 1).

    The wait: aiokafka leaves a partition whose records are still buffered out of the next
    fetch request, and waits for the request in flight, which the broker holds up to this
    long when its other partitions have nothing new: records behind it waited up to 1.5 s
    (measured: 1.0-1.3 s gaps between batches with events waiting, p99 ~1.8 s at a quarter
    of the maximum rate). The minimum: under a light load every fetch returned one or two
    records as soon as they arrived, and the fetches and their dispatch held the GIL more
    than the whole batch path did (docs/performance.md); with a minimum the broker gathers
    records for up to `max_wait_ms`, so a light load arrives in fewer, fuller fetches and a
    backlog is not slowed at all. Wraps `AIOKafkaConsumerThread._create_worker_consumer`
    (faust/transport/drivers/aiokafka.py) and sets aiokafka's `_fetch_max_wait_ms` and
    `_fetch_min_bytes`, read by `AIOKafkaConsumer.start()`. Retired by: Faust settings for
    both."""
    from faust.transport.drivers import aiokafka as driver

    cls = driver.AIOKafkaConsumerThread
    original = getattr(cls._create_worker_consumer, "__wrapped__", cls._create_worker_consumer)

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = max_wait_ms
        consumer._fetch_min_bytes = min_bytes
        return consumer

    create.__wrapped__ = original  # type: ignore[attr-defined]
    cls._create_worker_consumer = create


# -- batching ---------------------------------------------------------------------------------
async def take_batches(stream: faust.Stream, max_: int, within: Callable[[], float]
                       ) -> AsyncIterator[list[EventT]]:
    """`stream.take_events(max_, within)` whose `within` is asked again (`within()`) before
    each wait for the buffer to fill: batches the moment it holds `max_` events, else after
    that many seconds (streams/linger.py chooses them by the load).

    `take_events` (faust/streams.py) reads `within` once, into a local it passes as
    `timeout` to every `self.wait_for_stopped(buffer_full, timeout=...)`; this shadows the
    stream's `wait_for_stopped` (a mode `Service` method, used by nothing else while the
    stream is taken) to pass `within()` instead. Retired by: a `take_events` that accepts a
    callable `within`."""
    plain = stream.wait_for_stopped

    async def wait_for_stopped(*coros: Any, timeout: float | None = None) -> Any:
        return await plain(*coros, timeout=within())

    stream.wait_for_stopped = wait_for_stopped  # type: ignore[method-assign]
    try:
        async for events in stream.take_events(max_, within=within()):
            yield events
    finally:
        del stream.wait_for_stopped  # the class's method again


# -- group membership -------------------------------------------------------------------------
#: The broker's error code for a heartbeat while the group rebalances (REBALANCE_IN_PROGRESS).
_REBALANCING = 27


def on_membership_proved(callback: Callable[[str, int, float, str], None]) -> None:
    """Call `callback(group_id, generation, sent, proof)` (sent: time.monotonic) for each
    group request that bounds when this member's partitions can move
    (streams/group_lease.py):

    - "stable": a heartbeat or SyncGroup sent then succeeded; the broker knew this member
      in that generation;
    - "rebalancing": a heartbeat sent then was answered REBALANCE_IN_PROGRESS; the broker
      still knows the member, and the rebalance waits for its JoinGroup;
    - "joining": a JoinGroup is about to be sent; the rebalance may complete from now on.

    Wraps aiokafka's `GroupCoordinator._send_req`, the one path of these requests, reading
    the coordinator's `.group_id` and `.generation`. Process wide; a second call replaces
    the callback. Retired by: a membership listener in aiokafka (it keeps its last
    successful heartbeat in a local variable)."""
    from aiokafka.consumer.group_coordinator import GroupCoordinator

    send = getattr(GroupCoordinator._send_req, "__wrapped__", GroupCoordinator._send_req)

    async def send_req(self: Any, request: Any) -> Any:
        sent, generation, name = time.monotonic(), self.generation, type(request).__name__
        if name == "JoinGroupRequest":
            callback(self.group_id, generation, sent, "joining")
        resp = await send(self, request)
        if name in ("HeartbeatRequest", "SyncGroupRequest") and resp.error_code == 0:
            callback(self.group_id, generation, sent, "stable")
        elif name == "HeartbeatRequest" and resp.error_code == _REBALANCING:
            callback(self.group_id, generation, sent, "rebalancing")
        return resp

    send_req.__wrapped__ = send  # type: ignore[attr-defined]
    GroupCoordinator._send_req = send_req


# -- stopping ------------------------------------------------------------------------------------
#: Exit status when the clean stop was abandoned at its deadline.
EXIT_ABANDONED = 3


class Worker(faust.Worker):
    """faust.Worker that exits within `shutdown_timeout_s` of SIGTERM or SIGINT, whether or
    not the broker answers.

    Faust's stop waits on the broker (final commits, producer flush, consumer leave); with
    the broker gone it retried for as long as it took (seen: still running 32 minutes after
    SIGTERM). A watchdog thread, armed by the signal, ends the process when the deadline
    passes: what was not durable by then is replayed by the partitions' next owner, exactly
    as after a crash. mode installs its handlers on the loop; ours are installed after them
    and call mode's own (`mode.Worker._on_sigterm`, `._on_sigint`) once armed. Retired by: a
    stop timeout in mode."""

    def __init__(self, *args: Any, shutdown_timeout_s: float = 30.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shutdown_timeout_s = shutdown_timeout_s
        self._deadline: threading.Timer | None = None

    def install_signal_handlers(self) -> None:
        super().install_signal_handlers()
        self.loop.add_signal_handler(signal.SIGTERM, self._stop_within_deadline, self._on_sigterm)
        self.loop.add_signal_handler(signal.SIGINT, self._stop_within_deadline, self._on_sigint)

    def _stop_within_deadline(self, stop: Any) -> None:
        if self._deadline is None:
            log.info("stopping (at most %.0f s)", self.shutdown_timeout_s)
            self._deadline = threading.Timer(self.shutdown_timeout_s, self._give_up)
            self._deadline.daemon = True
            self._deadline.start()
        stop()

    def _give_up(self) -> None:
        log.error("clean stop did not finish within %.0f s (is the broker reachable?): exiting "
                  "now; events not yet durable will be replayed by the next owner of their "
                  "partitions", self.shutdown_timeout_s)
        logging.shutdown()
        os._exit(EXIT_ABANDONED)
