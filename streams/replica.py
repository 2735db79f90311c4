"""A whole topic, read by every worker (no consumer group), applied in order.

For state that every worker must hold in full — the catalog's item vectors, the
co-visitation pairs — while users stay partitioned. `apply(messages)` gets each fetched
chunk; `start(offsets)` may resume from known positions (e.g. those a checkpoint recorded).
Until `caught_up` (the end offsets of the start), chunks are applied in a thread: the owner
reads nothing before then, and a large replay's chunks take seconds (a 1M-item catalog's
tables double on the way: 16 s for the last copy here), which on the event loop stopped the
group's heartbeats. After that, on the loop, between whatever else it runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from streams.clients import reached, wait_assignment

log = logging.getLogger("streamrec.replica")


class TopicReplica:
    def __init__(self, consumer_factory: Callable[[str], Any], topic: str,
                 apply: Callable[[list[Any]], None]):
        self._factory = consumer_factory
        self.topic = topic
        self.apply = apply
        self.consumer: Any = None
        self.caught_up = asyncio.Event()
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
            batches = await self.consumer.getmany(timeout_ms=200, max_records=5000)
            messages = [m for msgs in batches.values() for m in msgs]
            if messages:
                self.records += len(messages)
                if self.caught_up.is_set():
                    self.apply(messages)
                else:
                    await asyncio.to_thread(self.apply, messages)
            if not self.caught_up.is_set() and await reached(self.consumer, self._target):
                log.info("replica of %s caught up: %d records", self.topic, self.records)
                self.caught_up.set()

    async def positions(self) -> dict[int, int]:
        """Next offset per partition: everything before it has been applied."""
        return {tp.partition: await self.consumer.position(tp) for tp in self.tps}

    async def sync(self, timeout: float = 2.0) -> bool:
        """Wait (bounded) until everything written to the topic so far is applied."""
        target = await self.consumer.end_offsets(self.tps)
        deadline = asyncio.get_running_loop().time() + timeout
        while not await reached(self.consumer, target):
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True
