"""The snapshot log on Kafka: the trainer's versions of the shared model, for every server.

Records of the compacted, single-partition `model-snapshots` topic (one partition keeps the
trainer's order):

    <app>/v<version>/<i>        chunk i of that version (models/snapshot.py bytes, split)
    <app>/v<version>/manifest   {"version", "kind", "chunks", "bytes", "sha256"}, after them
    <app>/heartbeat             {"version", "ms"}: the trainer is alive with nothing new

A version counts once its manifest is read and its chunks match the checksum. After a new
base the trainer tombstones every older version, so compaction leaves the newest base and
the deltas after it: what a server (or a restarted trainer) needs to reach the newest
version. Versions are never reused: a restarted trainer continues after the newest one.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson

log = logging.getLogger("streamrec.snapshots")

Send = Callable[[bytes, bytes | None], Awaitable[None]]  # (key, value) -> acknowledged


@dataclass(frozen=True)
class Snapshot:
    version: int
    kind: str  # base | delta
    data: bytes


class SnapshotWriter:
    """The trainer's side: publish versions, a heartbeat, and tombstones of old versions."""

    def __init__(self, app_id: str, send: Send, chunk_bytes: int = 512 * 1024):
        self.prefix, self.send, self.chunk_bytes = app_id, send, chunk_bytes
        self.written: dict[int, int] = {}  # version -> chunks, still in the topic

    def _key(self, version: int, part: int | str) -> bytes:
        return f"{self.prefix}/v{version}/{part}".encode()

    async def publish(self, version: int, kind: str, data: bytes) -> None:
        chunks = [data[i : i + self.chunk_bytes] for i in range(0, len(data), self.chunk_bytes)]
        for i, chunk in enumerate(chunks):
            await self.send(self._key(version, i), chunk)
        manifest = {"version": version, "kind": kind, "chunks": len(chunks), "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest()}
        await self.send(self._key(version, "manifest"), orjson.dumps(manifest))
        self.written[version] = len(chunks)
        if kind == "base":
            await self.forget_before(version)

    async def forget_before(self, version: int) -> None:
        """Tombstone every version below `version` (a base that includes them all)."""
        for old in sorted(v for v in self.written if v < version):
            for i in range(self.written[old]):
                await self.send(self._key(old, i), None)
            await self.send(self._key(old, "manifest"), None)
            del self.written[old]

    async def heartbeat(self, version: int, now_ms: int) -> None:
        await self.send(f"{self.prefix}/heartbeat".encode(),
                        orjson.dumps({"version": version, "ms": now_ms}))


class SnapshotLog:
    """The reading side: feed it the topic's records in order; it hands back each version
    as soon as it is complete, and remembers the latest heartbeat."""

    def __init__(self, app_id: str):
        self.prefix = f"{app_id}/".encode()
        self._chunks: dict[bytes, bytes] = {}
        self.versions: dict[int, int] = {}  # version -> chunks, of manifests not tombstoned
        self.heartbeat_ms = 0
        self.heartbeat_version = 0

    def feed(self, key: bytes | None, value: bytes | None) -> Snapshot | None:
        if key is None or not key.startswith(self.prefix):
            return None
        name = key[len(self.prefix):]
        if name == b"heartbeat":
            if value is not None:
                beat = orjson.loads(value)
                self.heartbeat_ms, self.heartbeat_version = beat["ms"], beat["version"]
            return None
        if not name.endswith(b"/manifest"):
            if value is None:
                self._chunks.pop(key, None)
            else:
                self._chunks[key] = value
            return None
        stem = name[: -len(b"/manifest")]
        if value is None:
            self.versions.pop(int(stem[1:]), None)
            return None
        m = orjson.loads(value)
        self.versions[m["version"]] = m["chunks"]
        return self._assemble(stem, m)

    def _assemble(self, stem: bytes, m: dict) -> Snapshot | None:
        keys = [self.prefix + stem + b"/%d" % i for i in range(m["chunks"])]
        parts = [self._chunks.get(k) for k in keys]
        if any(p is None for p in parts):
            log.error("snapshot v%s incomplete: ignoring it", m["version"])
            return None
        data = b"".join(parts)  # type: ignore[arg-type]
        for k in keys:
            del self._chunks[k]
        if hashlib.sha256(data).hexdigest() != m["sha256"]:
            log.error("snapshot v%s fails its checksum: ignoring it", m["version"])
            return None
        return Snapshot(m["version"], m["kind"], data)


def reachable(snapshots: list[Snapshot]) -> list[Snapshot]:
    """What a starting reader applies: the newest base, then the deltas right after it in
    version order (up to the first gap)."""
    bases = [s for s in snapshots if s.kind == "base"]
    if not bases:
        return []
    base = max(bases, key=lambda s: s.version)
    deltas = {s.version: s for s in snapshots if s.kind == "delta" and s.version > base.version}
    out, v = [base], base.version + 1
    while v in deltas:
        out.append(deltas[v])
        v += 1
    return out
