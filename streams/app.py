"""The Faust app: topics, the user-state table, the two agents, timers and /metrics.

Agents
- `catalog`: item-catalog -> validate + embed (once per item, cluster-wide) -> item-vectors.
- `events`: behavior-events in micro-batches (`take_events`) -> Runtime.process_events ->
  one recommendation per user, DLQ records, the per-user step, training examples, table
  writes (one per user per batch), commit.
Pages: /metrics (Prometheus), /ready (readiness), /covisit (the served counts).
Every record a batch rejects goes to its DLQ with a reason; nothing raises out of an agent
for bad input.
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
from faust.sensors.prometheus import setup_prometheus_sensors

from models.user_state import UserState
from streams import acls, group_lease
from streams import metrics as m
from streams.catalog import RawRecord
from streams.clients import faust_credentials, wait_for_broker
from streams.dead_letters import dlq_headers
from streams.errors import UserError
from streams.faust_internals import (
    DurableTable,
    Worker,
    acknowledge,
    commit_past,
    committed_offset,
    current_event,
    partition_event,
    shorten_fetch_wait,
)
from streams.gaps import commit_offsets, progress, progress_key
from streams.local_store import discard_unreadable
from streams.process import configure_process
from streams.runtime import Runtime
from streams.schemas import InvalidRecord, Reason
from streams.settings import Settings
from streams.topics import ensure_topics, topic_partitions

log = logging.getLogger("streamrec.app")


def _record(ev: Any) -> RawRecord:
    msg = ev.message
    return RawRecord(ev.key, ev.value, msg.partition, msg.offset,
                     int((msg.timestamp or 0) * 1000), ev)


async def deliver(app: faust.App, table: DurableTable) -> None:
    """Wait until the broker has acknowledged everything produced so far.

    Table writes only enqueue changelog records in Faust's producer buffer. Faust's own
    pre-commit flush gives up after 0.1 s without progress, so it can commit source offsets
    whose state never reached the changelog; a crash then loses those events (seen in
    tests/test_restart.py before this). Waiting here, before `take_events` acks the batch,
    makes the order state-durable -> offsets-committable. The changelog records are awaited
    through their futures (streams/faust_internals.py DurableTable); a flush of the producer
    then covers what went straight to the Kafka client (recommendations, DLQ records).
    """
    await table.wait_acked()
    await app.producer.flush()


def rocksdb_options(s: Settings) -> dict[str, Any] | None:
    """Per-partition RocksDB memory bounds: worker memory for table state is then at most
    partitions x (2 memtables + block cache), instead of growing toward Faust's defaults
    (3 x 64 MB memtables and a 2 GB block cache per partition)."""
    if s.store != "rocksdb":
        return None
    mb = 1024 * 1024
    return {"write_buffer_size": s.rocksdb_write_buffer_mb * mb, "max_write_buffer_number": 2,
            "block_cache_size": s.rocksdb_block_cache_mb * mb}


def create_app(settings: Settings, runtime: Runtime) -> faust.App:
    s = settings
    app = faust.App(
        s.app_id,
        broker=s.broker,
        broker_credentials=faust_credentials(s),
        store="rocksdb://" if s.store == "rocksdb" else "memory://",
        datadir=str(s.data_dir),
        topic_partitions=s.partitions,
        topic_replication_factor=s.replication_factor,
        table_standby_replicas=s.table_standby_replicas,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_session_timeout=s.session_timeout_s,
        broker_heartbeat_interval=s.heartbeat_s,
        broker_rebalance_timeout=max(30.0, 3 * s.session_timeout_s),
        web_enabled=True,
        web_bind=s.metrics_host,
        web_port=s.metrics_port,
        web_host=s.metrics_host,
        autodiscover=False,
        Table=DurableTable,
    )
    setup_prometheus_sensors(app, pattern="/metrics", name_prefix="streamrec_faust")

    def topic(name: str, **kw: Any) -> Any:
        return app.topic(s.topic(name), key_type=bytes, value_type=bytes, **kw)

    events_t = topic(s.events_topic)
    catalog_t = topic(s.catalog_topic)
    vectors_t = topic(s.item_vectors_topic)
    events_dlq = topic(s.events_dlq_topic)
    catalog_dlq = topic(s.catalog_dlq_topic)
    shorten_fetch_wait(s.fetch_max_wait_ms)
    users = app.Table("user-state", default=None, partitions=s.partitions,
                      key_type=bytes, value_type=bytes, options=rocksdb_options(s))
    # which process produced a record (recommendations, examples): for tracing and the tests
    worker_headers = [("streamrec.worker", f"{socket.gethostname()}:{os.getpid()}".encode())]
    group_lease.install()
    lease = group_lease.GroupLease(s.app_id, s.session_timeout_s, margin_s=s.heartbeat_s)

    async def dead_letter(t: Any, source: str,
                          rejected: list[tuple[RawRecord, InvalidRecord]]) -> None:
        for rec, exc in rejected:
            headers = dlq_headers(exc.reason, exc.detail, source, rec.partition, rec.offset)
            await t.send(key=rec.key, value=rec.value, headers=headers, force=True)
            m.DLQ.labels(topic=source, reason=exc.reason.value).inc()

    def load_state(user: str, rec: RawRecord) -> UserState:
        with current_event(rec.ref):
            return UserState.from_bytes(users.get(user.encode()))

    @app.agent(catalog_t)
    async def catalog(stream: Any) -> None:
        async for events in stream.take_events(256, within=0.5):
            records = [_record(ev) for ev in events]
            out = await asyncio.to_thread(runtime.catalog.process, records)
            for key, value in out.vectors:
                await vectors_t.send(key=key, value=value, force=True)
            await dead_letter(catalog_dlq, s.topic(s.catalog_topic), out.rejected)
            m.CATALOG_ITEMS.labels(outcome="rejected").inc(len(out.rejected))

    def last_done(partition: int, ref: Any) -> int | None:
        with current_event(ref):
            value = users.get(progress_key(partition))
        committed = committed_offset(app.consumer, ref.message.tp)
        return runtime.gaps.last_durable(partition, None if value is None else int(value),
                                         committed)

    def mark_progress(records: list[RawRecord]) -> None:
        for p, rec in progress(records).items():
            with current_event(rec.ref):
                users[progress_key(p)] = str(rec.offset).encode()

    async def emit(out: Any) -> None:
        """Recommendations and dead letters: straight to the Kafka producer (Faust's
        Topic.send wraps every record in futures and callbacks, which cost more than the
        record itself at ~500 per batch)."""
        with m.STAGE_SECONDS.labels(stage="emit").time():
            recs_topic = s.topic(s.recommendations_topic)
            for user, upd in out.users.items():
                if upd.recommendation is not None:
                    await app.producer.send(recs_topic, user.encode(), upd.recommendation,
                                            None, None, worker_headers)
            await dead_letter(events_dlq, s.topic(s.events_topic), out.rejected)
        runtime.observe_emit(out)

    async def publish_examples(out: Any) -> None:
        """The batch's training examples, acknowledged before any state of the batch is
        written: a state in the store (even on local disk only) implies its examples are
        in Kafka, so a crash can repeat examples (the trainer skips them by source) but
        never lose one. Each goes to its source event's partition number, so one source
        partition's examples stay in offset order."""
        topic = s.topic(s.training_examples_topic)
        futs = [await app.producer.send(topic, ex.user_id.encode(), ex.to_bytes(),
                                        ex.partition, None, worker_headers) for ex in out.examples]
        if futs:
            await asyncio.gather(*futs)

    async def handle(out: Any, records: list[RawRecord]) -> None:
        """Emit, take the per-user step, publish the training examples, persist state and
        the partitions' progress: one processed batch."""
        await emit(out)
        await runtime.learn(out)  # serve first, then learn: latency excludes the step
        with m.STAGE_SECONDS.labels(stage="state").time():
            await publish_examples(out)
            # state incl. applied offsets, one write per user (replayed ones: see BatchOutput)
            for user, upd in itertools.chain(out.users.items(), out.replayed.items()):
                with current_event(upd.record.ref):
                    users[user.encode()] = upd.state.to_bytes()
            mark_progress(records)
        with m.STAGE_SECONDS.labels(stage="commit").time():  # durable before acked/committed
            await deliver(app, users)

    async def one_by_one(records: list[RawRecord], exc: Exception) -> None:
        """A batch that raised is retried record by record; a record that raises alone goes
        to the DLQ (`processing_error`). Never re-raise: Faust acks a batch even when its
        agent crashes, so raising would lose the batch."""
        log.error("batch of %d events failed (%r); retrying one by one", len(records), exc)
        for rec in records:
            try:
                await handle(await runtime.process_events([rec], load_state), [rec])
            except Exception as exc1:  # noqa: BLE001 - isolated to the DLQ below
                log.error("event %s:%s failed alone: %r", rec.partition, rec.offset, exc1)
                m.EVENTS.labels(event_type="unknown", outcome="dlq").inc()
                await dead_letter(events_dlq, s.topic(s.events_topic), [(rec, InvalidRecord(
                    Reason.PROCESSING_ERROR, f"processing this event raised: {exc1!r}"[:500]))])
                mark_progress([rec])
                await deliver(app, users)

    batch_lock = asyncio.Lock()  # one batch at a time: the agent's, or a skipped tail's
    last_delivery = [time.monotonic()]  # when the stream last handed the agent a batch

    async def run_batch(records: list[RawRecord]) -> None:
        """Fill what the stream skipped, process, make durable, then commit. Hold batch_lock."""
        with m.BATCHES_IN_FLIGHT.track_inprogress():
            records = await runtime.gaps.complete(records, last_done)
            try:
                await handle(await runtime.process_events(records, load_state), records)
            except Exception as exc:  # noqa: BLE001 - no input may stop the worker
                await one_by_one(records, exc)
            # applied and durable by now: acknowledge what Faust skipped, commit what we know
            runtime.gaps.made_durable(records)
            with m.STAGE_SECONDS.labels(stage="commit").time():
                filled = [(r.ref.message.tp, r.offset) for r in runtime.gaps.filled]
                acknowledge(app.consumer, filled)
                runtime.gaps.filled.clear()
                await commit_past(app.consumer, commit_offsets(records, runtime.gaps.contiguous))

    @app.agent(events_t)
    async def events(stream: Any) -> None:
        await runtime.ready.wait()
        async for batch in stream.take_events(s.batch_size, within=s.batch_wait_s):
            last_delivery[0] = time.monotonic()
            async with batch_lock:
                await lease.hold("a batch", run_batch([_record(ev) for ev in batch]))

    @app.timer(s.skipped_tail_check_s)
    async def skipped_tails() -> None:
        """When the stream has been quiet, compare each assigned partition's stored progress
        with its end: records below the end that it has not delivered over two checks are
        read from Kafka and run as a batch (streams/gaps.py GapFiller.stalled, .tail). Not
        while it delivers: under a backlog a partition can wait its turn for seconds."""
        quiet = time.monotonic() - last_delivery[0] >= s.skipped_tail_check_s
        if not (quiet and runtime.ready.is_set()) or app.rebalancing or batch_lock.locked():
            return
        async with batch_lock:
            for tp in app.consumer.assignment():
                if tp.topic != events_t.get_topic_name():
                    continue
                ref = partition_event(app, tp)
                done, end = last_done(tp.partition, ref), app.consumer.highwater(tp)
                if not runtime.gaps.stalled(tp.partition, done, end):
                    continue
                try:
                    records = await runtime.gaps.tail(tp.partition, done + 1,
                                                      min(end, done + 1 + s.batch_size), ref)
                except Exception as exc:  # noqa: BLE001 - retried at the next check
                    log.error("reading %s's skipped tail failed: %r", tp, exc)
                    continue
                await lease.hold("a skipped tail", run_batch(records))

    @app.timer(1.0)
    async def between_batches() -> None:
        """Swap in a finished snapshot while no batch runs (a quiet worker too), and keep
        the snapshot age current."""
        if runtime.ready.is_set() and not batch_lock.locked():
            async with batch_lock:
                if runtime.follower.maybe_swap():
                    runtime._observe_model()
        age = runtime.snapshot_age_s()
        if age is not None:
            m.SNAPSHOT_AGE.set(age)

    @app.task
    async def start_runtime() -> None:
        await runtime.start()

    @app.timer(10.0)
    async def users_active() -> None:
        runtime.processor.prune_active()

    @app.page("/ready")
    async def ready(web: Any, request: Any) -> Any:
        """200 once user state is restored, a snapshot is served and its index built; 503
        with what is missing otherwise (the Kubernetes readiness probe)."""
        missing = [what for what, ok in (
            ("state restored", not (app.rebalancing or app.in_recovery)
             and app.tables.recovery.completed.is_set()),
            ("catalog and index", runtime.ready.is_set() and runtime.server.n_items > 0),
            ("a snapshot from the trainer", runtime.model.version > 0)) if not ok]
        body = {"ready": not missing, "missing": missing, "model_version": runtime.model.version}
        return web.json(body, status=503 if missing else 200)

    @app.page("/covisit")
    async def covisit(web: Any, request: Any) -> Any:
        """The served co-visitation counts, by item id (tests compare servers by them)."""
        model = runtime.model
        if model.covis is None:
            return web.json({"version": model.version, "n": {}, "f": []})
        F = model.covis.F.tocoo()
        ids = model.catalog.ids
        n = {ids[r]: float(v) for r, v in enumerate(model.covis.n[: len(ids)]) if v}
        f = [[ids[j], ids[i], float(w)] for j, i, w in zip(F.row.tolist(), F.col.tolist(),
                                                          F.data.tolist(), strict=True)]
        return web.json({"version": model.version, "n": n, "f": f})

    @app.on_before_shutdown.connect
    async def stop_runtime(app: Any, **_: Any) -> None:
        await runtime.stop()

    return app


def _data_dir(settings: Settings) -> None:
    """Create the worker's local state directory, or say in one line why it cannot be."""
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the data directory {settings.data_dir}: "
                        f"{exc.strerror or exc}. Set --data-dir or STREAMREC_DATA_DIR to a "
                        f"writable directory") from None


def _metrics_port(settings: Settings) -> None:
    """Fail in one line, not a 45-line traceback from aiohttp, when /metrics cannot bind."""
    if settings.metrics_port == 0:
        return
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((settings.metrics_host, settings.metrics_port))
        except OSError as exc:
            raise UserError(
                f"cannot serve /metrics on {settings.metrics_host}:{settings.metrics_port}: "
                f"{exc.strerror or exc} (another worker on this host?). Set "
                f"STREAMREC_METRICS_PORT to a free port") from None


def _examples_partitions(settings: Settings) -> None:
    """A training example goes to its source event's partition number (so one source
    partition's examples keep their order): training-examples needs as many partitions."""
    s = settings
    events = topic_partitions(s, s.topic(s.events_topic))
    examples = topic_partitions(s, s.topic(s.training_examples_topic))
    if len(examples) < len(events):
        raise UserError(f"topic {s.topic(s.training_examples_topic)} has {len(examples)} "
                        f"partitions, {s.topic(s.events_topic)} {len(events)}: it needs at least "
                        "as many (add partitions with kafka-topics.sh --alter)")


def run_worker(settings: Settings) -> None:
    """Create the data directory and topics, load the encoder and learner, and run a Faust
    worker until stopped."""
    _data_dir(settings)
    discard_unreadable(settings.data_dir)
    _metrics_port(settings)
    wait_for_broker(settings)
    acls.check(settings, "worker")
    ensure_topics(settings, role="worker")
    _examples_partitions(settings)
    configure_process(settings.compute_threads)
    runtime = Runtime(settings)
    app = create_app(settings, runtime)
    worker = Worker(app, loglevel=settings.log_level, override_logging=False,
                    shutdown_timeout_s=settings.shutdown_timeout_s)
    worker.execute_from_commandline()
