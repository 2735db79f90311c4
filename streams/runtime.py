"""A serving worker's live parts and their start-up order, apart from Faust's wiring.

Start-up: replay item-vectors until caught up (catalog rows + text vectors) -> read the
snapshot log and apply the newest base and the deltas after it (waiting `snapshot_wait_s`
for the trainer's first one) -> build the first index -> `ready`. The event agent waits for
`ready`, so no event is judged against a half-loaded catalog.

Then each batch runs off the event loop (`process_events`, `learn`: torch, faiss and numpy
release the GIL, so /metrics and the consumers stay responsive), and between batches a
snapshot built in the background (a fork of the model with the new version applied, and
its FAISS index) is swapped in (`SnapshotFollower`). Catalog changes, snapshot records and
swaps run off the loop too, one at a time with the batches' steps (streams/off_loop.py):
the model is never changed under a step, and never grown on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from index.faiss_index import FaissIndex
from models.compute_threads import cap_this_thread
from models.encoder import TextEncoder
from models.model import SharedModel
from models.personal import PersonalStep
from models.serving import Server
from models.snapshot import SnapshotMeta, apply_base, apply_delta
from models.user_state import UserState
from streams import metrics as m
from streams.catalog import (
    CatalogBacklog,
    CatalogEncoder,
    CatalogOutput,
    collapse_item_vectors,
    upsert_args,
)
from streams.clients import aio_options, kafka_producer
from streams.gaps import GapFiller, read_records
from streams.off_loop import OffLoop
from streams.processor import BatchOutput, Decoded, EventProcessor, Rejected
from streams.records import RawRecord
from streams.replica import TopicReplica
from streams.settings import Settings
from streams.snapshots import Snapshot, SnapshotLog, reachable
from streams.topics import admin_client

log = logging.getLogger("streamrec.runtime")


class SnapshotFollower:
    """Keeps a server on the trainer's newest snapshot, swapping between batches.

    A new version is applied to a fork of the served model (models/model.py `fork`: own
    parameters and counts, shared catalog rows) and its index is built, in a thread; the
    swap then only re-applies the catalog changes made meanwhile. Versions are applied in
    order, each once (models/snapshot.py), so every server's counts equal the trainer's."""

    def __init__(self, server: Server, app_id: str):
        self.server = server
        self.log = SnapshotLog(app_id)
        self.meta: SnapshotMeta | None = None  # of the version being served
        self._queue: list[Snapshot] = []
        self._pool = ThreadPoolExecutor(1, "snapshot", initializer=cap_this_thread)
        self._build: Future | None = None
        self._changes: list[tuple] = []  # catalog changes since the fork (catalog_changed)

    @property
    def version(self) -> int:
        return self.server.model.version

    def feed(self, messages: list[Any]) -> None:
        """Records of the snapshot topic (the replica's apply)."""
        for msg in messages:
            snap = self.log.feed(msg.key, msg.value)
            if snap is not None:
                self._queue.append(snap)

    def start(self) -> int:
        """At start-up (nothing served yet): the newest base and the deltas after it."""
        todo, self._queue = reachable(self._queue), []
        for snap in todo:
            self.meta = _apply(self.server.model, snap)
        return len(todo)

    def catalog_changed(self, ids: list[str], vectors: np.ndarray | None,
                        scenarios: list[list[str] | None] | None = None,
                        fingerprints: np.ndarray | None = None) -> None:
        """A catalog change applied to the served model, to re-apply to a fork in the works."""
        if self._build is not None:
            self._changes.append((ids, vectors, scenarios, fingerprints))

    @property
    def has_work(self) -> bool:
        """A finished build to swap in, or versions waiting to be built. Read on the loop:
        most batches have neither, and skip the model step `maybe_swap` would take."""
        return self._build.done() if self._build is not None else bool(self._queue)

    def maybe_swap(self) -> bool:
        """Between batches: swap a finished build in, or start building the next version."""
        if self._build is not None:
            if not self._build.done():
                return False
            return self._finish()
        ready = [s for s in self._queue if s.kind == "base" or s.version > self.version]
        self._queue = []
        if not ready:
            return False
        self._build = self._pool.submit(_fork_and_apply, self.server, ready)
        return False

    def _finish(self) -> bool:
        build, self._build = self._build, None
        changes, self._changes = self._changes, []
        try:
            model, index, meta = build.result()
        except Exception:  # noqa: BLE001 - keep serving the current version; logged
            log.exception("applying a snapshot failed; serving v%d on", self.version)
            return False
        if meta is None:  # nothing applicable (e.g. a delta behind a gap: wait for a base)
            return False
        for ids, vectors, scenarios, fingerprints in changes:  # the catalog moved on meanwhile
            if vectors is None:
                model.delete_items(ids)
                index.remove(model.catalog.keys_of_ids(ids))
            else:
                model.upsert_items(ids, vectors, scenarios, fingerprints)
                rows = np.array([model.catalog.rows[i] for i in ids], np.int64)
                index.upsert(model.catalog.keys[rows], model.item_vectors(rows)[1])
        self.server.swap(model, index)
        self.meta = meta
        log.info("serving model v%d (index v%d)", model.version, self.server.version)
        return True


def _apply(model: SharedModel, snap: Snapshot) -> SnapshotMeta:
    return (apply_base if snap.kind == "base" else apply_delta)(model, snap.data)


def _fork_and_apply(server: Server, snaps: list[Snapshot]
                    ) -> tuple[SharedModel, FaissIndex, SnapshotMeta | None]:
    """(In a thread) the served model forked, the snapshots applied in order (a delta that
    does not follow is skipped until a base brings the model past it), and its index."""
    model, meta = server.model.fork(), None
    for snap in sorted(snaps, key=lambda s: (s.version, s.kind != "base")):
        if snap.kind == "base" or snap.version == model.version + 1:
            meta = _apply(model, snap)
        else:
            log.warning("snapshot v%d %s does not follow v%d: skipped", snap.version,
                        snap.kind, model.version)
    return model, server.build_index(model), meta


class Runtime:
    def __init__(self, settings: Settings, encoder: TextEncoder | None = None,
                 on_ready: Callable[[], None] | None = None):
        """`on_ready`: the entry point's process-wide step at the end of start-up (the
        worker's GC freeze, streams/process.py), run just before `ready` is set."""
        s = self.s = settings
        self.on_ready = on_ready
        self.encoder = encoder or s.text_encoder()
        self.server = Server(SharedModel(s.learner, text_dim=self.encoder.dim), s.index,
                             exclude_seen=s.exclude_seen)
        self.processor = EventProcessor(s, self.server, PersonalStep.from_config(s.learner),
                                        self.encoder)
        self.catalog = CatalogEncoder(self.encoder.encode, s.max_item_bytes,
                                      self.encoder.identity)
        self.follower = SnapshotFollower(self.server, s.app_id)
        self.model_steps = OffLoop()  # every read and change of the served model
        self.items = TopicReplica(self._consumer, s.topic(s.item_vectors_topic),
                                  lambda msgs: self.model_steps.run(
                                      self._apply_item_vectors, msgs))
        self.snapshots = TopicReplica(self._consumer, s.topic(s.snapshots_topic),
                                      lambda msgs: self.model_steps.run(
                                          self.follower.feed, msgs))
        self.gaps = GapFiller(lambda: self._consumer(), s.topic(s.events_topic))
        self._vectors_producer: Any = None  # catch_up_catalog's, made on first use
        self.catalog_backlog = CatalogBacklog(
            lambda: admin_client(s.bootstrap, 10, **s.kafka_security()),
            s.topic(s.catalog_topic), s.app_id)
        self.ready = asyncio.Event()

    @property
    def model(self) -> SharedModel:
        return self.server.model

    def _consumer(self, *topics: str) -> Any:
        """Group-less consumer of whole topics from their beginning (none: assign later)."""
        from aiokafka import AIOKafkaConsumer

        return AIOKafkaConsumer(*topics, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", **aio_options(self.s))

    # ------------------------------------------------------------------ start-up
    async def start(self) -> None:
        await self.items.start()
        await self.items.caught_up.wait()
        await self.snapshots.start()
        await self.snapshots.caught_up.wait()
        if not await self.model_steps.run(self.follower.start):
            await self._wait_first_snapshot()
        await self.model_steps.run(self.server.refresh)  # HNSW over 1M items: minutes
        self._observe_model()
        log.info("worker ready: %d items, model v%d, index v%d", self.server.n_items,
                 self.model.version, self.server.version)
        if self.on_ready is not None:
            self.on_ready()
        self.ready.set()

    async def _wait_first_snapshot(self) -> None:
        deadline = time.monotonic() + self.s.snapshot_wait_s
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            if await self.model_steps.run(self.follower.start):
                return
        log.warning("no snapshot from the trainer after %.0f s: serving the initial model "
                    "(version 0) and not /ready until one arrives; is `streamrec trainer` "
                    "running?", self.s.snapshot_wait_s)

    @property
    def is_ready(self) -> bool:
        """Catalog loaded, a snapshot served, index built (Faust's side: see app.py)."""
        return self.ready.is_set() and self.model.version > 0 and self.server.n_items > 0

    async def stop(self) -> None:
        await self.items.stop()
        await self.snapshots.stop()
        self.catalog_backlog.close()
        if self._vectors_producer is not None:
            self._vectors_producer.close()

    # ------------------------------------------------------------------ replicated state
    def _apply_item_vectors(self, messages: list[Any]) -> None:
        """Catalog changes reach model and serving index together (a model step). An item
        sent again unchanged (live, with the same text fingerprint and scenarios) changes
        neither: a catalog published again costs no index work."""
        upserts, deletes = collapse_item_vectors(messages)
        ids = list(upserts)
        fps = np.array([upserts[i].fingerprint for i in ids], np.uint64)
        new = ~self.model.catalog.unchanged(ids, fps, [upserts[i].scenarios for i in ids])
        changed = {i: upserts[i] for i, keep in zip(ids, new.tolist(), strict=True) if keep}
        if changed:
            ids, vectors, scenarios = upsert_args(changed)
            fingerprints = fps[new]
            self.model.upsert_items(ids, vectors, scenarios, fingerprints)
            self.server.add_items(ids)
            self.follower.catalog_changed(ids, vectors, scenarios, fingerprints)
        if deletes:
            self.model.delete_items(deletes)
            self.server.remove_items(deletes)
            self.follower.catalog_changed(deletes, None)
        m.CATALOG_ITEMS.labels(outcome="upserted").inc(len(upserts))
        m.CATALOG_ITEMS.labels(outcome="deleted").inc(len(deletes))
        m.INDEX_ITEMS.set(self.server.n_items)

    async def swap_snapshot(self) -> None:
        """Serve the newest finished snapshot, if one is waiting (call between batches; a
        model step: the swap re-applies the catalog changes made since the fork)."""
        if self.follower.has_work and await self.model_steps.run(self.follower.maybe_swap):
            self._observe_model()

    def _observe_model(self) -> None:
        m.MODEL_VERSION.set(self.model.version)
        m.INDEX_VERSION.set(self.server.version)
        m.INDEX_ITEMS.set(self.server.n_items)
        if self.model.covis is not None:
            m.COVISIT_BYTES.set(self.model.covis.nbytes)

    def snapshot_age_s(self) -> float | None:
        """Seconds since the trainer last published (a version or a heartbeat); None before
        the first snapshot."""
        meta = self.follower.meta
        if meta is None:
            return None
        return max(0.0, time.time() - max(meta.created_ms, self.follower.log.heartbeat_ms) / 1000)

    # ------------------------------------------------------------------ events
    async def process_events(self, records: list[RawRecord],
                             read: Callable[[str, RawRecord], bytes | None]) -> BatchOutput:
        """Decode, then the batch against its users' states, off the event loop. `read`
        gives a user's stored state (a table read: on the loop, before the computing
        starts); it is decoded off the loop with the rest (0.011 ms for a 2.9 KB state,
        ~5 ms of a 500-user batch)."""
        good, bad = self.processor.decode(records)
        if self.processor.unknown_items(good):  # published just before its events?
            if await self.catalog_backlog.wait():
                try:
                    await self.catch_up_catalog()
                except Exception as exc:  # noqa: BLE001 - judged against the catalog as is
                    log.error("embedding the catalog's backlog here failed: %r", exc)
            await self.items.sync(timeout=2.0)
        await self.swap_snapshot()
        stored: dict[str, bytes | None] = {}
        for rec, ev in good:
            if ev.user_id not in stored:
                stored[ev.user_id] = read(ev.user_id, rec)
        return await self.model_steps.run(self._process, good, bad, stored)

    def _process(self, good: list[Decoded], bad: list[Rejected],
                 stored: dict[str, bytes | None]) -> BatchOutput:
        states = {user: UserState.from_bytes(value) for user, value in stored.items()}
        return self.processor.process(good, bad, states)

    async def embed_catalog(self, records: list[RawRecord]) -> CatalogOutput:
        """Catalog records to item-vector records (the catalog agent's work), off the loop:
        the items whose text this worker already holds a vector of (its replica of
        item-vectors: a model step, so that no catalog change interleaves) skip the
        encoder (streams/catalog.py CatalogEncoder)."""
        work = await asyncio.to_thread(self.catalog.parse, records)
        known = await self.model_steps.run(
            lambda: self.model.known_text_vectors(work.item_ids, work.fingerprints))
        out = await asyncio.to_thread(self.catalog.embed, work, known)
        m.CATALOG_ITEMS.labels(outcome="embedded").inc(out.embedded)
        m.CATALOG_ITEMS.labels(outcome="unchanged").inc(out.unchanged)
        return out

    async def catch_up_catalog(self) -> None:
        """Embed here the catalog records no catalog agent has got to, and publish their
        vectors as the agent would.

        Faust feeds the catalog agent from the same fetch loop as the events agent, and hands
        a fetch's records over one by one: under an event backlog, the events agent's full
        buffer blocks the loop, so a batch waiting for the catalog starves the very agent
        it waits for (seen after a rebalance: 144 items not embedded for minutes, and their
        events dead-lettered as unknown). The agent embeds them again once it gets them: the
        same bytes per item, which the compacted item-vectors topic keeps once."""
        lag = await asyncio.to_thread(self.catalog_backlog.lag)
        records: list[RawRecord] = []
        for p, (start, end) in lag.items():
            records += await read_records(self._consumer, self.catalog_backlog.topic, p,
                                          start, end, None,
                                          "were not embedded by a catalog agent")
        out = await self.embed_catalog(records)
        await asyncio.to_thread(self._publish_vectors, out.vectors)
        self.catalog_backlog.caught_up.update({p: end for p, (_, end) in lag.items()})

    def _publish_vectors(self, vectors: list[tuple[bytes, bytes | None]]) -> None:
        if self._vectors_producer is None:
            self._vectors_producer = kafka_producer(self.s)
        topic = self.s.topic(self.s.item_vectors_topic)
        for key, value in vectors:
            self._vectors_producer.send(topic, key=key, value=value)
        self._vectors_producer.flush(timeout=30)

    async def learn(self, out: BatchOutput) -> None:
        """The batch's per-user step, off the event loop."""
        await self.model_steps.run(self.processor.learn, out)

    async def prune_active(self) -> int:
        """The active-users gauge's pruning, a model step: the batches' steps add users to
        the processor's `last_seen` in the model-steps thread, and a prune on the loop that
        iterated it meanwhile crashed a worker ('dictionary changed size during iteration',
        bench.latency at 300 events/s and 30,000 users)."""
        return await self.model_steps.run(self.processor.prune_active)

    @staticmethod
    def observe_emit(out: BatchOutput) -> None:
        now_ms = time.time() * 1000
        for upd in out.users.values():
            if upd.recommendations:
                m.RECOMMENDATIONS.inc(len(upd.recommendations))
                if upd.newest_kafka_ts:
                    m.EVENT_TO_REC.observe(max(0.0, now_ms - upd.newest_kafka_ts) / 1000)

