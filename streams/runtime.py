"""A worker's live parts and their start-up order, apart from Faust's wiring.

Start-up: restore shared parameters from the last checkpoint -> replay item-vectors until
caught up (learner rows + text vectors) -> build the first index -> `ready`. The event agent
waits for `ready`, so no event is judged against a half-loaded catalog.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np

from models.encoder import TextEncoder
from models.learner import OnlineLearner
from models.serving import Server
from streams import metrics as m
from streams.catalog import CatalogEncoder, CatalogReplica, RawRecord
from streams.checkpoint import CheckpointStore, read_topic
from streams.clients import aio_options
from streams.processor import BatchOutput, EventProcessor
from streams.settings import Settings

log = logging.getLogger("streamrec.runtime")


class Runtime:
    def __init__(self, settings: Settings, encoder: TextEncoder | None = None):
        s = self.s = settings
        self.encoder = encoder or TextEncoder(s.encoder_path, s.encoder_device,
                                              s.encoder_batch_size)
        self.learner = OnlineLearner(s.learner, text_dim=self.encoder.dim)
        self.server = Server(self.learner, s.index, s.index_refresh_batches, s.index_refresh_s)
        self.processor = EventProcessor(s, self.learner, self.server, self.encoder)
        self.catalog = CatalogEncoder(self.encoder.encode, s.max_item_bytes)
        self.replica = CatalogReplica(self._consumer, s.topic(s.item_vectors_topic),
                                      self.apply_catalog)
        self.checkpoints: CheckpointStore | None = None
        self.ready = asyncio.Event()
        self._saved_steps = -1

    def _consumer(self, topic: str) -> Any:
        """Group-less consumer of a whole topic from its beginning."""
        from aiokafka import AIOKafkaConsumer

        return AIOKafkaConsumer(topic, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", **aio_options(self.s))

    # ------------------------------------------------------------------ start-up
    async def start(self, send_checkpoint_record: Any) -> None:
        s = self.s
        self.checkpoints = CheckpointStore(s.app_id, send_checkpoint_record,
                                           s.checkpoint_chunk_bytes)
        await self.restore_checkpoint()
        await self.replica.start()
        await self.replica.caught_up.wait()
        self.server.refresh()
        m.INDEX_ITEMS.set(self.server.n_items)
        m.INDEX_VERSION.set(self.server.version)
        log.info("worker ready: %d items, index v%d", self.server.n_items, self.server.version)
        self.ready.set()

    async def restore_checkpoint(self) -> None:
        assert self.checkpoints is not None
        records = await read_topic(self._consumer(self.s.topic(self.s.checkpoints_topic)))
        data = self.checkpoints.assemble(records)
        if data is None:
            log.info("no checkpoint found: starting from fresh shared parameters")
            return
        try:
            self.learner.restore(data)
            self._saved_steps = self.learner.steps
            m.CHECKPOINTS.labels(outcome="restored").inc()
            log.info("restored checkpoint (%d bytes, %d steps)", len(data), self.learner.steps)
        except ValueError as exc:  # shape config changed: start fresh, loudly
            m.CHECKPOINTS.labels(outcome="incompatible").inc()
            log.error("checkpoint not restored: %s", exc)

    async def save_checkpoint(self, force: bool = False) -> int | None:
        """Checkpoint if anything was learned since the last one."""
        if self.checkpoints is None or not self.ready.is_set():
            return None
        if self.learner.steps == self._saved_steps and not force:
            return None
        steps = self.learner.steps
        version = await self.checkpoints.save(self.learner.checkpoint())
        self._saved_steps = steps
        m.CHECKPOINTS.labels(outcome="saved").inc()
        log.info("checkpoint v%d saved (%d steps)", version, steps)
        return version

    async def stop(self) -> None:
        await self.replica.stop()

    # ------------------------------------------------------------------ catalog
    def apply_catalog(self, upserts: dict[str, np.ndarray], deletes: list[str]) -> None:
        """Called by the replica: catalog changes reach learner and serving index together."""
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

    # ------------------------------------------------------------------ events
    async def process_events(self, records: list[RawRecord], load_state: Any) -> BatchOutput:
        good, bad = self.processor.decode(records)
        if self.processor.unknown_items(good):
            await self.replica.sync(timeout=2.0)  # an item published just before its events
        return self.processor.process(good, bad, load_state)

    @staticmethod
    def observe_emit(out: BatchOutput) -> None:
        now_ms = time.time() * 1000
        for upd in out.users.values():
            if upd.recommendation is not None:
                m.RECOMMENDATIONS.inc()
                if upd.newest_kafka_ts:
                    m.EVENT_TO_REC.observe(max(0.0, now_ms - upd.newest_kafka_ts) / 1000)
