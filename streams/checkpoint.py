"""Shared-parameter checkpoints on a compacted Kafka topic, chunked, all-or-nothing.

Layout per model name N (the app id): chunks under keys `N/v<version>/<i>`, then a manifest
under `N/manifest` naming the version, chunk count and SHA-256. The manifest is written only
after every chunk is acknowledged, so a crash mid-write leaves the previous manifest pointing
at its own, complete chunks. After a new manifest lands, the previous version's chunks are
tombstoned so compaction can drop them. The interval (settings.checkpoint_interval_s) bounds
what a crash can cost: shared learning since the last checkpoint; user state is exact.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

log = logging.getLogger("streamrec.checkpoint")

Send = Callable[[bytes, bytes | None], Awaitable[None]]  # (key, value) -> acknowledged


class CheckpointStore:
    def __init__(self, name: str, send: Send, chunk_bytes: int = 512 * 1024):
        self.name = name
        self.send = send
        self.chunk_bytes = chunk_bytes
        self._previous: tuple[int, int] | None = None  # (version, chunks) to tombstone

    def _key(self, version: int, i: int) -> bytes:
        return f"{self.name}/v{version}/{i}".encode()

    @property
    def manifest_key(self) -> bytes:
        return f"{self.name}/manifest".encode()

    async def save(self, data: bytes) -> int:
        """Write one checkpoint; returns its version (epoch ms, unique enough per app)."""
        version = int(time.time() * 1000)
        if self._previous and version <= self._previous[0]:
            version = self._previous[0] + 1  # versions must differ even within one ms
        chunks = [data[i : i + self.chunk_bytes] for i in range(0, len(data), self.chunk_bytes)]
        for i, chunk in enumerate(chunks):
            await self.send(self._key(version, i), chunk)
        manifest = {"version": version, "chunks": len(chunks), "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest()}
        await self.send(self.manifest_key, orjson.dumps(manifest))
        if self._previous:
            old_version, old_chunks = self._previous
            for i in range(old_chunks):
                await self.send(self._key(old_version, i), None)
        self._previous = (version, len(chunks))
        return version

    def assemble(self, records: dict[bytes, bytes | None]) -> bytes | None:
        """Latest complete checkpoint from {key: newest value} of the topic, or None."""
        raw = records.get(self.manifest_key)
        if raw is None:
            return None
        m = orjson.loads(raw)
        parts = [records.get(self._key(m["version"], i)) for i in range(m["chunks"])]
        if any(p is None for p in parts):
            log.error("checkpoint v%s incomplete: ignoring it", m["version"])
            return None
        data = b"".join(parts)  # type: ignore[arg-type]
        if hashlib.sha256(data).hexdigest() != m["sha256"]:
            log.error("checkpoint v%s fails its checksum: ignoring it", m["version"])
            return None
        self._previous = (m["version"], m["chunks"])
        return data


async def read_topic(consumer: Any) -> dict[bytes, bytes | None]:
    """Newest value per key of a whole topic, read by a started-here, group-less consumer
    subscribed to it: for compacted state topics."""
    from streams.clients import reached, wait_assignment

    await consumer.start()
    try:
        tps = await wait_assignment(consumer)
        end = await consumer.end_offsets(list(tps))
        latest: dict[bytes, bytes | None] = {}
        while not await reached(consumer, end):
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                for msg in msgs:
                    if msg.key is not None:
                        latest[msg.key] = msg.value
        return latest
    finally:
        await consumer.stop()
