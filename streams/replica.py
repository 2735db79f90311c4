"""A whole topic, read by every worker (no consumer group), applied in order.

For state that every worker must hold in full — the catalog's item vectors, the
co-visitation pairs — while users stay partitioned. `apply(messages)` is awaited for each
fetched chunk, one at a time, in order; where it runs is the owner's choice (the worker and
the trainer run it off the loop, streams/off_loop.py: a 1M-item catalog's chunk can take
seconds). `start(offsets)` may resume from known positions (e.g. those a checkpoint
recorded); `caught_up` is set once the end offsets of the start are applied, and `sync`
waits for those of its call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from streams.clients import reached, wait_assignment

log = logging.getLogger("streamrec.replica")

CHUNK = 5000  # records per apply
TAKE = 250  # records per fetch from the consumer's buffer


class TopicReplica:
    def __init__(self, consumer_factory: Callable[[str], Any], topic: str,
                 apply: Callable[[list[Any]], Awaitable[None]]):
        self._factory = consumer_factory
        self.topic = topic
        self.apply = apply
        self.consumer: Any = None
        self.caught_up = asyncio.Event()
        self._idle = asyncio.Event()  # no fetched chunk waits to be applied
        self._idle.set()
        self.records = 0
        self._task: asyncio.Task | None = None

    async def start(self, offsets: dict[int, int] | None = None) -> None:
        """Assign every partition; start at `offsets` (partition -> next offset) or the
        beginning, and read until the end offsets of this moment before `caught_up`."""
        self.consumer = self._factory(self.topic)
        await self.consumer.start()
        self.tps = sorted(await wait_assignment(self.consumer))
        for tp in self.tps:
            if offsets and tp.partition in offsets:
                self.consumer.seek(tp, offsets[tp.partition])
        self._target = await self.consumer.end_offsets(self.tps)
        self._task = asyncio.create_task(self._run(), name=f"replica-{self.topic}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.consumer:
            await self.consumer.stop()

    async def _run(self) -> None:
        while True:
            messages = await self._fetch()
            if messages:
                self.records += len(messages)
                try:
                    await self.apply(messages)
                finally:
                    self._idle.set()
            if not self.caught_up.is_set() and await reached(self.consumer, self._target):
                log.info("replica of %s caught up: %d records", self.topic, self.records)
                self.caught_up.set()

    async def _fetch(self) -> list[Any]:
        """Up to `CHUNK` records for one `apply`, taken `TAKE` at a time with the event loop
        let go between takes: aiokafka unpacks the records it hands out on the loop, and a
        1M-item replay's 5,000-record takes held it for 0.22-0.26 s each (asyncio debug
        mode), while one `apply` per 5,000 keeps the catalog's merges few."""
        messages: list[Any] = []
        while len(messages) < CHUNK:
            batches = await self.consumer.getmany(timeout_ms=0 if messages else 200,
                                                  max_records=TAKE)
            took = [m for msgs in batches.values() for m in msgs]
            if not took:
                break
            # Busy from the first take: the position already counts these records, so
            # `sync` must not see "reached and idle" between takes (a CI run did).
            self._idle.clear()
            messages += took
            await asyncio.sleep(0)
        return messages

    async def sync(self, timeout: float = 2.0) -> bool:
        """Wait (bounded) until everything written to the topic so far is applied."""
        target = await self.consumer.end_offsets(self.tps)
        deadline = asyncio.get_running_loop().time() + timeout
        while not (await reached(self.consumer, target) and self._idle.is_set()):
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True
