"""The Faust app: topics, the user-state table, the two agents, timers and pages.

Agents
- `catalog`: item-catalog -> validate + embed (once per item, cluster-wide) -> item-vectors.
- `events`: behavior-events in micro-batches (`take_batches`, Faust's `take_events` with
  a wait that follows the load: streams/linger.py) -> streams/batch.py: one
  recommendation per user, DLQ records, the per-user step, training examples, table
  writes (one per user per batch), commit.
Pages: /metrics (Prometheus), /ready (readiness), /covisit (the served counts).
Every record a batch rejects goes to its DLQ with a reason; nothing raises out of an agent
for bad input.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import faust
from faust.sensors.prometheus import FaustMetrics, PrometheusMonitor
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from streams import acls, group_lease
from streams import metrics as m
from streams.batch import EventBatches, record_of, send_dead_letters
from streams.clients import faust_credentials, wait_for_broker
from streams.errors import UserError
from streams.faust_internals import DurableTable, Worker, take_batches, tune_stream_fetch
from streams.local_store import discard_unreadable
from streams.loop_stalls import watch_loop
from streams.process import configure_process, freeze_heap
from streams.runtime import Runtime
from streams.settings import Settings
from streams.topics import ensure_topics, topic_partitions

log = logging.getLogger("streamrec.app")


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
    """The Faust app: topics, the user-state table, the two agents, timers and pages. The
    event path itself is streams/batch.py."""
    s = settings
    app = faust.App(s.app_id, **faust_config(s))
    add_metrics(app)
    tune_stream_fetch(s.fetch_max_wait_ms, s.fetch_min_bytes)
    group_lease.install()

    def topic(name: str) -> Any:
        return app.topic(s.topic(name), key_type=bytes, value_type=bytes)

    users = app.Table("user-state", default=None, partitions=s.partitions,
                      key_type=bytes, value_type=bytes, options=rocksdb_options(s))
    lease = group_lease.GroupLease(s.app_id, s.session_timeout_s, s.rebalance_timeout_s,
                                    margin_s=s.heartbeat_s)
    batches = EventBatches(s, app, runtime, users, topic(s.events_dlq_topic), lease)
    vectors_t, catalog_dlq = topic(s.item_vectors_topic), topic(s.catalog_dlq_topic)

    @app.agent(topic(s.catalog_topic))
    async def catalog(stream: Any) -> None:
        async for events in stream.take_events(256, within=0.5):
            out = await runtime.embed_catalog([record_of(ev) for ev in events])
            for key, value in out.vectors:
                await vectors_t.send(key=key, value=value, force=True)
            await send_dead_letters(catalog_dlq, s.topic(s.catalog_topic), out.rejected)
            m.CATALOG_ITEMS.labels(outcome="rejected").inc(len(out.rejected))

    @app.agent(topic(s.events_topic))
    async def events(stream: Any) -> None:
        await runtime.ready.wait()
        async for batch in take_batches(stream, s.batch_size, lambda: batches.next_wait):
            await batches.from_stream(batch)

    @app.timer(s.skipped_tail_check_s)
    async def skipped_tails() -> None:
        await batches.skipped_tails()

    @app.timer(1.0)
    async def between_batches() -> None:
        await batches.between_batches()
        age = runtime.snapshot_age_s()
        if age is not None:
            m.SNAPSHOT_AGE.set(age)

    @app.timer(10.0)
    async def users_active() -> None:
        await runtime.prune_active()

    @app.task
    async def start_runtime() -> None:
        await runtime.start()

    @app.on_before_shutdown.connect
    async def stop_runtime(app: Any, **_: Any) -> None:
        await runtime.stop()

    add_pages(app, runtime)
    return app


def add_metrics(app: faust.App) -> None:
    """Faust's own Prometheus sensors (as `streamrec_faust_*`), the event-loop stall watch,
    and /metrics. The page is rendered in a thread, not on the loop as Faust's own
    (`setup_prometheus_sensors`) does: scrapes of it held a 1M-item worker's event loop for
    45 ms or more each (seen: 45, 53, 61 ms)."""
    app.monitor = PrometheusMonitor(metrics=FaustMetrics.create(REGISTRY, "streamrec_faust"))
    app.task(watch_loop)

    @app.page("/metrics")
    async def metrics(web: Any, request: Any) -> Any:
        body = await asyncio.to_thread(generate_latest, REGISTRY)
        return web.bytes(body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_pages(app: faust.App, runtime: Runtime) -> None:
    """/ready (the readiness probe) and /covisit, beside Faust's /metrics."""

    @app.page("/ready")
    async def ready(web: Any, request: Any) -> Any:
        """200 once user state is restored, a snapshot is served and its index built; 503
        with what is missing otherwise (the Kubernetes readiness probe)."""
        missing = not_ready(app, runtime)
        body = {"ready": not missing, "missing": missing, "model_version": runtime.model.version}
        return web.json(body, status=503 if missing else 200)

    @app.page("/covisit")
    async def covisit(web: Any, request: Any) -> Any:
        """The served co-visitation counts, by item id (tests compare servers by them); read
        as a model step, not while one changes them."""
        return web.json(await runtime.model_steps.run(covisit_counts, runtime.model))


def faust_config(s: Settings) -> dict[str, Any]:
    """faust.App's settings: raw bytes everywhere, acks from every replica and the
    producer's batch size, the group timings and the web server of /metrics, /ready and
    /covisit."""
    return dict(
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
        producer_max_batch_size=s.producer_batch_bytes,
        broker_session_timeout=s.session_timeout_s,
        broker_heartbeat_interval=s.heartbeat_s,
        broker_rebalance_timeout=s.rebalance_timeout_s,
        web_enabled=True,
        web_bind=s.metrics_host,
        web_port=s.metrics_port,
        web_host=s.metrics_host,
        autodiscover=False,
        Table=DurableTable,
    )


def not_ready(app: faust.App, runtime: Runtime) -> list[str]:
    """What keeps the worker from serving: empty once ready."""
    return [what for what, ok in (
        ("state restored", not (app.rebalancing or app.in_recovery)
         and app.tables.recovery.completed.is_set()),
        ("catalog and index", runtime.ready.is_set() and runtime.server.n_items > 0),
        ("a snapshot from the trainer", runtime.model.version > 0)) if not ok]


def covisit_counts(model: Any) -> dict[str, Any]:
    """The co-visitation counts a worker serves, by item id."""
    if model.covis is None:
        return {"version": model.version, "n": {}, "f": []}
    F = model.covis.F.tocoo()
    ids = model.catalog.ids
    n = {ids[r]: float(v) for r, v in enumerate(model.covis.n[: len(ids)]) if v}
    f = [[ids[j], ids[i], float(w)] for j, i, w in zip(F.row.tolist(), F.col.tolist(),
                                                      F.data.tolist(), strict=True)]
    return {"version": model.version, "n": n, "f": f}


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
    configure_process(settings.compute_threads, settings.index.blas_threshold,
                      settings.index.search_threads)
    # start-up's end freezes what it built; the rest is frozen before the loop runs
    runtime = Runtime(settings, on_ready=lambda: freeze_heap(young_only=True))
    app = create_app(settings, runtime)
    worker = Worker(app, loglevel=settings.log_level, override_logging=False,
                    shutdown_timeout_s=settings.shutdown_timeout_s)
    freeze_heap()  # before the event loop runs
    worker.execute_from_commandline()
