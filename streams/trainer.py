"""`streamrec trainer`: the one process that trains the shared model, and publishes it.

    training-examples ──► Trainer.train (models/trainer.py) ──► model-snapshots ──► workers
            ▲                       │
      serving workers               └──► model-checkpoints (only the trainer writes there)

Start-up: catalog (item-vectors) -> the snapshot log (newest base + deltas: rows, counts, the
last version and what its counts cover) -> the newest checkpoint (parameters, optimizer
moments, progress, and where to resume each training-examples partition) -> consume.

Exactly once: an example whose source (partition, offset) was trained is skipped
(`Trainer.progress`, checkpointed with the consumer positions), and its co-visitation pairs
are counted only past what the newest snapshot's counts cover (`Trainer.counted`, from the
snapshot log), so a restart neither loses nor repeats training or counts. For that a
checkpoint is written only right after a publish: its progress never passes what the
snapshot log counts. Versions go on from the newest published one.

K ranks (`--ranks K`, or RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT as torchrun sets them):
rank r consumes the training-examples partitions p with p % K == r; the ranks step in
lockstep (models/distributed.py), and rank 0 publishes snapshots and writes checkpoints,
with every rank's positions gathered into them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from models.encoder import encoder_dim
from models.examples import TrainingExample
from models.model import SharedModel
from models.snapshot import SnapshotMeta, apply_base, apply_delta, encode_base, encode_delta
from models.trainer import Sync, Trainer, checkpoint, restore
from streams import acls
from streams import metrics as m
from streams.catalog import collapse_item_vectors, upsert_args
from streams.checkpoint import CheckpointStore, read_topic
from streams.clients import aio_options, reached, wait_assignment, wait_for_broker
from streams.logs import configure_logging
from streams.off_loop import OffLoop
from streams.process import configure_process
from streams.replica import TopicReplica
from streams.settings import Settings
from streams.snapshots import SnapshotLog, SnapshotWriter, reachable
from streams.topics import ensure_topics, topic_partitions

log = logging.getLogger("streamrec.trainer")


class TrainerService:
    def __init__(self, settings: Settings, sync: Sync | None = None):
        s = self.s = settings
        self.sync = sync or Sync()
        self.model = SharedModel(s.learner, text_dim=encoder_dim(s.encoder_path))
        self.trainer = Trainer(self.model, self.sync)
        self.model_steps = OffLoop()  # training, catalog changes, snapshots, checkpoints
        self.items = TopicReplica(self._consumer, s.topic(s.item_vectors_topic),
                                  lambda msgs: self.model_steps.run(self._apply_items, msgs))
        self.version = 0  # newest published
        self.positions: dict[int, int] = {}  # training-examples partition -> next offset
        self._producer: Any = None
        self._consumer_ex: Any = None
        self._dirty = False  # learned something since the last snapshot
        self._steps_seen = 0
        self._checkpointed = -1  # trainer steps at the last checkpoint
        self._next_snapshot = self._next_base = self._next_checkpoint = 0.0
        self.stopping = asyncio.Event()

    @property
    def leader(self) -> bool:
        return self.sync.rank == 0

    def _consumer(self, *topics: str) -> Any:
        from aiokafka import AIOKafkaConsumer

        return AIOKafkaConsumer(*topics, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=4 << 20,
                                **aio_options(self.s))

    async def _send(self, key: bytes, value: bytes | None, topic: str) -> None:
        await (await self._producer.send(topic, key=key, value=value))

    # ------------------------------------------------------------------ start-up
    async def start(self) -> None:
        from aiokafka import AIOKafkaProducer

        s = self.s
        # No compression: snapshots and checkpoints are mostly float32 weights, which gzip
        # shrank by 13% at ~20 MB/s, on the event loop (0.4 s per 7 MB delta; README,
        # Performance).
        self._producer = AIOKafkaProducer(acks="all", max_request_size=4 << 20,
                                          **aio_options(s))
        await self._producer.start()
        await self.items.start()
        await self.items.caught_up.wait()
        self.checkpoints = CheckpointStore(f"{s.app_id}/trainer", lambda k, v: self._send(
            k, v, s.topic(s.checkpoints_topic)), s.checkpoint_chunk_bytes)
        snap_log = await self._read_snapshots()
        meta = await self._read_checkpoint()
        positions = json.loads(meta.get("positions", "{}")) if meta else {}
        self.writer = SnapshotWriter(s.app_id, lambda k, v: self._send(
            k, v, s.topic(s.snapshots_topic)), s.checkpoint_chunk_bytes)
        self.writer.written = dict(snap_log.versions)
        await self._assign(positions)
        self._steps_seen = self.trainer.steps
        m.TRAINER_TRAINED.set(self.trainer.trained)
        m.MODEL_VERSION.set(self.version)
        now = time.monotonic()
        self._next_snapshot = now + s.snapshot_interval_s
        self._next_base = now + s.snapshot_base_interval_s
        self._next_checkpoint = now + s.checkpoint_interval_s
        if self.version == 0:  # nothing published ever: workers wait for it (every rank
            await self._publish(base=True)  # the same log, so all take part in its gather)
        log.info("trainer rank %d/%d ready: %d items, version %d, %d examples trained, "
                 "partitions %s", self.sync.rank, self.sync.world, self.model.n_items,
                 self.version, self.trainer.trained, sorted(self.positions))

    async def _read_snapshots(self) -> SnapshotLog:
        """Rows, counts and the newest version from the snapshot log (what workers serve)."""
        snap_log, found = SnapshotLog(self.s.app_id), []
        consumer = self._consumer(self.s.topic(self.s.snapshots_topic))
        for key, value in await _read_in_order(consumer):
            snap = snap_log.feed(key, value)
            if snap is not None:
                found.append(snap)
        last: SnapshotMeta | None = None
        for snap in reachable(found):
            last = await self.model_steps.run(
                apply_base if snap.kind == "base" else apply_delta, self.model, snap.data)
        self.version = max([self.model.version, snap_log.heartbeat_version, *snap_log.versions])
        if last is not None:
            self.trainer.counted = dict(last.covered)
        return snap_log

    async def _read_checkpoint(self) -> dict[str, str] | None:
        """The newest checkpoint (the store then tombstones its chunks after the next one);
        without one, the previous release's worker checkpoint, if any (an upgrade)."""
        records = await read_topic(self._consumer(self.s.topic(self.s.checkpoints_topic)))
        data = self.checkpoints.assemble(records)
        if data is None:
            data = CheckpointStore(self.s.app_id, self._send).assemble(records)
            if data is not None:
                log.info("importing the previous release's worker checkpoint (parameters, "
                         "optimizer, co-visitation counts)")
        if data is None:
            log.info("no trainer checkpoint: starting from fresh parameters")
            return None
        try:
            meta = await self.model_steps.run(restore, self.trainer, data)
        except ValueError as exc:  # shape config changed: start fresh, loudly
            m.CHECKPOINTS.labels(outcome="incompatible").inc()
            log.error("checkpoint not restored: %s", exc)
            return None
        m.CHECKPOINTS.labels(outcome="restored").inc()
        if not self.leader:  # the count is all ranks': rank 0 carries it on, the others add
            self.trainer.trained = 0
        return meta

    async def _assign(self, positions: dict[str, int]) -> None:
        """This rank's share of the training-examples partitions, from the checkpoint's
        positions (the beginning where it has none)."""
        from aiokafka import TopicPartition

        topic = self.s.topic(self.s.training_examples_topic)
        self._consumer_ex = self._consumer()
        await self._consumer_ex.start()
        parts = await asyncio.to_thread(topic_partitions, self.s, topic)
        mine = [TopicPartition(topic, p) for p in parts if p % self.sync.world == self.sync.rank]
        self._consumer_ex.assign(mine)
        for tp in mine:
            if str(tp.partition) in positions:
                self._consumer_ex.seek(tp, positions[str(tp.partition)])
                self.positions[tp.partition] = positions[str(tp.partition)]
            else:
                await self._consumer_ex.seek_to_beginning(tp)
                self.positions[tp.partition] = 0

    def _apply_items(self, messages: list[Any]) -> None:
        upserts, deletes = collapse_item_vectors(messages)
        if upserts:
            self.trainer.upsert_items(*upsert_args(upserts))
        if deletes:
            self.model.delete_items(deletes)

    # ------------------------------------------------------------------ the loop
    async def run(self) -> None:
        """Poll, train, publish and checkpoint on schedule, until `stopping` (rank 0 decides
        for all ranks: they stop in the same round)."""
        while True:
            batches = await self._consumer_ex.getmany(timeout_ms=200,
                                                      max_records=self.s.trainer_batch)
            examples = self._decode([msg for msgs in batches.values() for msg in msgs])
            if any(not self.model.has_item(ex.target) for ex in examples):
                await self.items.sync(timeout=2.0)  # an item whose vector is on its way
            t0 = time.perf_counter()
            result = await self.model_steps.run(self.trainer.train, examples)
            m.TRAINER_SECONDS.observe(time.perf_counter() - t0)
            self._account(batches, result)
            now = time.monotonic()
            decision = self._decide(now)
            if decision["snapshot"]:
                await self._publish(base=decision["base"])
            if decision["checkpoint"]:
                await self._checkpoint(final=decision["stop"])
            if decision["stop"]:
                return

    def _decode(self, messages: list[Any]) -> list[TrainingExample]:
        out = []
        for msg in messages:
            try:
                out.append(TrainingExample.from_bytes(msg.value))
            except (ValueError, KeyError, TypeError) as exc:  # written by workers
                m.TRAINER_EXAMPLES.labels(outcome="invalid").inc()
                log.error("unreadable training example at %s:%s: %r", msg.partition,
                          msg.offset, exc)
        return out

    def _account(self, batches: dict, result: Any) -> None:
        for tp, msgs in batches.items():
            if msgs:
                self.positions[tp.partition] = msgs[-1].offset + 1
        m.TRAINER_EXAMPLES.labels(outcome="trained").inc(result.trained)
        m.TRAINER_EXAMPLES.labels(outcome="duplicate").inc(result.duplicates)
        m.TRAINER_EXAMPLES.labels(outcome="dropped").inc(result.dropped)
        m.TRAINER_STEPS.inc(self.trainer.steps - self._steps_seen)
        self._steps_seen = self.trainer.steps
        m.TRAINER_TRAINED.set(self.trainer.trained)
        if result.trained:
            self._dirty = True
        lag = 0
        for tp in self._consumer_ex.assignment():
            high = self._consumer_ex.highwater(tp)
            if high is not None:
                lag += max(0, high - self.positions.get(tp.partition, 0))
        m.TRAINER_LAG.set(lag)

    def _decide(self, now: float) -> dict[str, bool]:
        """Rank 0's schedule, the same on every rank."""
        decision = {"snapshot": now >= self._next_snapshot,
                    "base": now >= self._next_base, "checkpoint": now >= self._next_checkpoint,
                    "stop": self.stopping.is_set()}
        if decision["stop"]:
            decision.update(snapshot=True, checkpoint=True)
        if decision["checkpoint"]:  # a checkpoint's progress never passes what a snapshot
            decision["snapshot"] = True  # counts cover (see `_checkpoint`)
        if self.sync.world > 1:
            decision = self.sync.broadcast(decision)  # type: ignore[attr-defined]
        if decision["snapshot"]:
            self._next_snapshot = now + self.s.snapshot_interval_s
        if decision["base"]:
            self._next_base = now + self.s.snapshot_base_interval_s
        if decision["checkpoint"]:
            self._next_checkpoint = now + self.s.checkpoint_interval_s
        return decision

    # ------------------------------------------------------------------ publishing
    async def _publish(self, base: bool = False) -> None:
        """A new version (a delta, or a base when due), or a heartbeat when nothing moved."""
        pending = self.trainer.take_pending()  # every rank: they all hold the same counts
        changed = self._dirty or pending.touched or pending.covis
        covered, trained = dict(self.trainer.counted), self.trainer.trained
        if self.sync.world > 1:  # each rank counts its own source partitions and examples
            trained = 0
            for counted, n in self.sync.all_gather((covered, trained)):  # type: ignore
                covered.update(counted)
                trained += n
        if not self.leader:
            self._dirty = False
            return
        if not changed and not base:
            await self.writer.heartbeat(self.version, int(time.time() * 1000))
            return
        t0 = time.perf_counter()
        self.version += 1
        self.model.version = self.version
        if base:
            data = await self.model_steps.run(encode_base, self.model, covered, trained)
        else:
            data = await self.model_steps.run(encode_delta, self.model, self.version,
                                           pending.touched, pending.covis, covered, trained)
        await self.writer.publish(self.version, "base" if base else "delta", data)
        self._dirty = False
        m.MODEL_VERSION.set(self.version)
        m.SNAPSHOT_BYTES.labels(kind="base" if base else "delta").set(len(data))
        m.SNAPSHOT_SECONDS.observe(time.perf_counter() - t0)
        log.info("published %s v%d (%d bytes)", "base" if base else "delta", self.version,
                 len(data))

    async def _checkpoint(self, final: bool = False) -> None:
        """Every rank's positions and progress in rank 0's checkpoint (when anything moved).

        Always right after a publish (`_decide`): a restart takes its counts from the snapshot
        log and skips what the checkpoint's progress says was trained, so an example trained
        after the newest snapshot but before the checkpoint would never be counted (every
        worker one short for its pairs)."""
        if self.trainer.steps == self._checkpointed and not final:
            return  # the same on every rank (steps are in lockstep, `final` is rank 0's)
        self._checkpointed = self.trainer.steps
        positions = {str(p): o for p, o in self.positions.items()}
        progress, trained = dict(self.trainer.progress), self.trainer.trained
        if self.sync.world > 1:  # every rank's partitions and count into rank 0's checkpoint
            gathered = self.sync.all_gather((positions, progress, trained))  # type: ignore
            trained = 0
            for pos, prog, n in gathered:
                positions.update(pos)
                progress.update(prog)
                trained += n
        if not self.leader:
            return
        own = self.trainer.progress, self.trainer.trained
        self.trainer.progress, self.trainer.trained = progress, trained
        try:
            data = await self.model_steps.run(checkpoint, self.trainer,
                                           {"positions": json.dumps(positions)})
        finally:
            self.trainer.progress, self.trainer.trained = own
        version = await self.checkpoints.save(data)
        m.CHECKPOINTS.labels(outcome="saved").inc()
        log.info("checkpoint v%d saved (%d examples trained, %d bytes)", version, trained,
                 len(data))

    async def stop(self) -> None:
        await self.items.stop()
        if self._consumer_ex is not None:
            await self._consumer_ex.stop()
        if self._producer is not None:
            await self._producer.stop()


async def _read_in_order(consumer: Any) -> list[tuple[bytes | None, bytes | None]]:
    """Every record of a one-partition topic, in order (the snapshot log)."""
    await consumer.start()
    try:
        tps = await wait_assignment(consumer)
        end = await consumer.end_offsets(list(tps))
        out = []
        while not await reached(consumer, end):
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                out += [(msg.key, msg.value) for msg in msgs]
        return out
    finally:
        await consumer.stop()


# ---------------------------------------------------------------------- entry points
def run_ranks(settings: Settings, ranks: int) -> None:
    """`streamrec trainer`: one rank as torchrun describes it (RANK, WORLD_SIZE in the
    environment, e.g. one pod per rank), else `ranks` local processes (rank 0 here)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # one rank per host or pod
        run_trainer(settings, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                    port_per_rank=False)
        return
    if ranks == 1:
        run_trainer(settings)
        return
    import multiprocessing as mp

    from streams.ports import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    ctx = mp.get_context("spawn")
    verbose = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    others = [ctx.Process(target=_local_rank, args=(settings, r, ranks, verbose), daemon=True)
              for r in range(1, ranks)]
    for proc in others:
        proc.start()
    try:
        run_trainer(settings, 0, ranks)
    finally:
        for proc in others:
            proc.join(timeout=settings.shutdown_timeout_s)


def _local_rank(settings: Settings, rank: int, world: int, verbose: bool) -> None:
    """A local rank ≥ 1: a spawned interpreter, so its logging is set up as the CLI's."""
    configure_logging(verbose)
    run_trainer(settings, rank, world)


def run_trainer(settings: Settings, rank: int = 0, world: int = 1,
                port_per_rank: bool = True) -> None:
    """One trainer rank until SIGTERM/SIGINT (then a last snapshot and checkpoint). Local
    ranks serve /metrics on trainer_metrics_port + rank (`port_per_rank`); a rank with a host
    or pod of its own serves it on trainer_metrics_port."""
    wait_for_broker(settings)
    acls.check(settings, "trainer")
    if rank == 0:
        ensure_topics(settings, role="trainer")
    configure_process(settings.compute_threads, settings.index.blas_threshold)
    sync: Sync = Sync()
    if world > 1:
        from models.distributed import init

        sync = init(rank, world)
    asyncio.run(_serve(settings, sync, metrics_port(settings, rank, port_per_rank)))


def metrics_port(settings: Settings, rank: int, port_per_rank: bool) -> int:
    """Where a rank serves /metrics: + rank for local ranks sharing a host."""
    return settings.trainer_metrics_port + (rank if port_per_rank else 0)


async def _serve(settings: Settings, sync: Sync, port: int) -> None:
    from prometheus_client import start_http_server

    start_http_server(port, settings.metrics_host)
    service = TrainerService(settings, sync)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stopper(service, settings.shutdown_timeout_s))
    await service.start()
    try:
        await service.run()
    finally:
        await service.stop()


def _stopper(service: TrainerService, timeout_s: float) -> Callable[[], None]:
    def stop() -> None:
        if service.stopping.is_set():
            return
        log.info("stopping (last snapshot and checkpoint; at most %.0f s)", timeout_s)
        service.stopping.set()
        timer = threading.Timer(timeout_s, lambda: os._exit(3))
        timer.daemon = True
        timer.start()

    return stop
