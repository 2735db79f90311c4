"""A worker's live parts and their start-up order, apart from Faust's wiring.

Start-up: restore shared parameters from the last checkpoint -> replay item-vectors until
caught up (learner rows + text vectors) -> replay the co-visitation pairs since the
checkpoint -> build the first index -> `ready`. The event agent waits for `ready`, so no
event is judged against a half-loaded catalog.

Co-visitation counts are global state built from every worker's events: each worker
publishes its batches' pairs to the covisits topic and every worker (itself included)
applies all of them from there, in the same order, so all workers hold the same counts and
a checkpoint taken by any of them (counts + the topic positions they include) serves all.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson

from models.encoder import TextEncoder
from models.learner import OnlineLearner
from models.serving import Server
from streams import metrics as m
from streams.catalog import CatalogBacklog, CatalogEncoder, RawRecord, collapse_item_vectors
from streams.checkpoint import CheckpointStore, read_topic
from streams.clients import aio_options
from streams.gaps import GapFiller
from streams.processor import BatchOutput, EventProcessor
from streams.replica import TopicReplica
from streams.settings import Settings
from streams.topics import admin_client

log = logging.getLogger("streamrec.runtime")

Send = Callable[[bytes | None, bytes | None], Awaitable[None]]
PAIRS_PER_RECORD = 200  # keeps a covisits record well below Kafka's 1 MB default


class Runtime:
    def __init__(self, settings: Settings, encoder: TextEncoder | None = None):
        s = self.s = settings
        _limit_threads(s.compute_threads)
        _return_large_allocations()
        self.encoder = encoder or TextEncoder(s.encoder_path, s.encoder_device,
                                              s.encoder_batch_size)
        self.learner = OnlineLearner(s.learner, text_dim=self.encoder.dim)
        self.server = Server(self.learner, s.index, s.index_refresh_batches, s.index_refresh_s,
                             s.serving_candidates, s.exclude_seen)
        self.processor = EventProcessor(s, self.learner, self.server, self.encoder)
        self.catalog = CatalogEncoder(self.encoder.encode, s.max_item_bytes)
        self.items = TopicReplica(self._consumer, s.topic(s.item_vectors_topic),
                                  self._apply_item_vectors)
        self.covisits = TopicReplica(self._consumer, s.topic(s.covisits_topic),
                                     self._apply_covisits)
        self.gaps = GapFiller(lambda: self._consumer(), s.topic(s.events_topic))
        self.catalog_backlog = CatalogBacklog(
            lambda: admin_client(s.bootstrap, 10, **s.kafka_security()),
            s.topic(s.catalog_topic), s.app_id)
        self.checkpoints: CheckpointStore | None = None
        self.send_covisits: Send | None = None
        self.ready = asyncio.Event()
        self._saved_steps = -1

    def _consumer(self, *topics: str) -> Any:
        """Group-less consumer of whole topics from their beginning (none: assign later)."""
        from aiokafka import AIOKafkaConsumer

        return AIOKafkaConsumer(*topics, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", **aio_options(self.s))

    # ------------------------------------------------------------------ start-up
    async def start(self, send_checkpoint_record: Send, send_covisits: Send) -> None:
        s = self.s
        self.checkpoints = CheckpointStore(s.app_id, send_checkpoint_record,
                                           s.checkpoint_chunk_bytes)
        self.send_covisits = send_covisits
        meta = await self.restore_checkpoint()
        await self.items.start()
        await self.items.caught_up.wait()
        if self.learner.covis is not None:
            offsets = orjson.loads(meta.get("covisit_offsets", "{}"))
            await self.covisits.start({int(p): o for p, o in offsets.items()})
            await self.covisits.caught_up.wait()
        self.server.refresh()
        m.INDEX_ITEMS.set(self.server.n_items)
        m.INDEX_VERSION.set(self.server.version)
        log.info("worker ready: %d items, index v%d", self.server.n_items, self.server.version)
        _freeze_startup_objects()
        self.ready.set()

    async def restore_checkpoint(self) -> dict[str, str]:
        assert self.checkpoints is not None
        records = await read_topic(self._consumer(self.s.topic(self.s.checkpoints_topic)))
        data = self.checkpoints.assemble(records)
        if data is None:
            log.info("no checkpoint found: starting from fresh shared parameters")
            return {}
        try:
            meta = self.learner.restore(data)
        except ValueError as exc:  # shape config changed: start fresh, loudly
            m.CHECKPOINTS.labels(outcome="incompatible").inc()
            log.error("checkpoint not restored: %s", exc)
            return {}
        self._saved_steps = self.learner.steps
        m.CHECKPOINTS.labels(outcome="restored").inc()
        log.info("restored checkpoint (%d bytes, %d steps)", len(data), self.learner.steps)
        return meta

    async def save_checkpoint(self, force: bool = False) -> int | None:
        """Checkpoint if anything was learned since the last one."""
        if self.checkpoints is None or not self.ready.is_set():
            return None
        if self.learner.steps == self._saved_steps and not force:
            return None
        steps = self.learner.steps
        extra = {}
        if self.learner.covis is not None:  # the counts include everything before these
            positions = {str(p): o for p, o in (await self.covisits.positions()).items()}
            extra["covisit_offsets"] = orjson.dumps(positions).decode()
        data = self.learner.checkpoint(extra)  # synchronous: counts and positions agree
        version = await self.checkpoints.save(data)
        self._saved_steps = steps
        m.CHECKPOINTS.labels(outcome="saved").inc()
        log.info("checkpoint v%d saved (%d steps, %d bytes)", version, steps, len(data))
        return version

    async def stop(self) -> None:
        await self.items.stop()
        await self.covisits.stop()
        self.catalog_backlog.close()

    # ------------------------------------------------------------------ replicated state
    def _apply_item_vectors(self, messages: list[Any]) -> None:
        """Catalog changes reach learner and serving index together."""
        upserts, deletes = collapse_item_vectors(messages)
        if upserts:
            ids = list(upserts)
            self.learner.upsert_items(ids, np.stack([upserts[i] for i in ids]))
            self.server.add_items(ids)
        if deletes:
            self.learner.delete_items(deletes)
            self.server.remove_items(deletes)
        m.CATALOG_ITEMS.labels(outcome="upserted").inc(len(upserts))
        m.CATALOG_ITEMS.labels(outcome="deleted").inc(len(deletes))
        m.INDEX_ITEMS.set(self.server.n_items)

    def _apply_covisits(self, messages: list[Any]) -> None:
        pairs = []
        for msg in messages:
            try:
                pairs.extend(orjson.loads(msg.value)["pairs"])
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:  # written by us
                log.error("unreadable covisits record at %s:%s: %r", msg.partition,
                          msg.offset, exc)
        self.learner.apply_covisits(pairs)
        if self.learner.covis is not None:
            m.COVISIT_BYTES.set(self.learner.covis.nbytes)

    async def publish_covisits(self, out: BatchOutput) -> None:
        """This batch's pairs, for every worker (this one too) to apply from the topic."""
        if out.pending is None or self.send_covisits is None:
            return
        pairs = self.learner.covisit_pairs(out.pending)
        for i in range(0, len(pairs), PAIRS_PER_RECORD):
            await self.send_covisits(None, orjson.dumps({"pairs": pairs[i:i + PAIRS_PER_RECORD]}))

    # ------------------------------------------------------------------ events
    async def process_events(self, records: list[RawRecord], load_state: Any) -> BatchOutput:
        good, bad = self.processor.decode(records)
        if self.processor.unknown_items(good):  # published just before its events?
            await self.catalog_backlog.wait()
            await self.items.sync(timeout=2.0)
        return self.processor.process(good, bad, load_state)

    @staticmethod
    def observe_emit(out: BatchOutput) -> None:
        now_ms = time.time() * 1000
        for upd in out.users.values():
            if upd.recommendation is not None:
                m.RECOMMENDATIONS.inc()
                if upd.newest_kafka_ts:
                    m.EVENT_TO_REC.observe(max(0.0, now_ms - upd.newest_kafka_ts) / 1000)


def _freeze_startup_objects() -> None:
    """Exclude everything alive at start-up (encoder, tokenizer, Faust, ~0.5 M objects) from
    Python's cyclic GC: a full collection over them stops the event loop for ~0.3 s, which
    showed as the p99 of event -> recommendation latency. Collected once first, so only live
    objects are frozen; what is created afterwards is collected as usual."""
    gc.collect()
    gc.freeze()


def _limit_threads(n: int) -> None:
    """Cap torch's and FAISS's thread pools (both OpenMP-based) at `n`."""
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def _return_large_allocations(threshold: int = 1 << 20) -> None:
    """glibc only: serve allocations >= `threshold` bytes by mmap, so freeing them gives the
    memory back to the OS. By default glibc raises this threshold to the largest block freed
    so far (up to 32 MB), after which the checkpoint's transient copies (several MB, growing
    with the co-visitation counts) come from the heap and leave it fragmented: in
    bench/soak.py RSS rose in steps at every checkpoint."""
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3  # from malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(m_mmap_threshold, threshold)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        log.debug("mallopt not available; allocator left as is")
