"""Throughput benchmark: the streamrec worker against a raw aiokafka loop and a bare Faust agent.

    .venv/bin/python -m bench.throughput [--events 200000] [--users 100000] [--items 50000]
                                         [--max-seconds 600] [--out bench/out]
                                         [--skip-raw] [--skip-faust] [--worker-env K=V ...]
                                         [--profile]

Starts the embedded Apache Kafka broker and loads ONE backlog of synthetic events (evaluation/
synthetic.py items and event types, user ids remapped round-robin onto --users users: see
bench/_common.py BenchEvents) into the worker's events topic before anything is timed. Then
three consumers each drain that same backlog with a fresh consumer group:

  (a) raw: a plain aiokafka loop in its own process: group consumer getmany(max_records=500)
      -> orjson.loads each -> orjson.dumps a small record -> producer.send per event to a
      scratch topic -> flush + commit per batch. The ceiling of Kafka + Python on this box.
  (b) faust: a minimal faust-streaming app in its own process (value_serializer='raw', one
      consume-only agent counting events). The ceiling of the streaming layer.
  (c) pipeline: a streamrec worker (WorkerProcess, fresh app id). A first, untimed worker
      embeds the catalog (publish_items) into the item-vectors topic and is stopped; the
      measured worker reads the vectors, builds its index, reports ready, and only then is
      it timed, from its `streamrec_events_total` counter sampled every 0.5 s (window: first
      progress -> backlog consumed, or --max-seconds). Its catalog agent is pointed at an
      empty topic so it does not re-embed the catalog while it is measured. The first
      worker's time from the catalog's publication to an index holding every item is
      reported too (`catalog_s`, `catalog_items_per_s`): the pace of the text encoder in a
      worker. It then publishes the same catalog again and times its items' return to the
      worker's index (`catalog_republish_s`, with the counts of the items whose vector was
      reused and embedded): a catalog dump sent again unchanged.

(a) and (b) time first event -> last event (start-up and group join excluded), as (c) does.
Per run: events/s, CPU % of the process and of the broker (utime+stime from /proc over the
window; 100 % = one core, the machine has 2) and RSS. For (c) also the stage breakdown from
`streamrec_stage_seconds` (seconds per batch and share of the window's wall time; `other` is
everything outside the five stages: Faust, table writes, delivery waits) and the mean batch
size. Prints the tables and whether pipeline >= 30 % of Faust consume-only (target; 60 % the
direction after it) and >= 25 % of raw (stretch); writes throughput.json and throughput.png to
--out. `--profile` samples the measured worker with py-spy over the drain
(throughput-profile.txt, collapsed stacks) and adds its top frames to the JSON and the output.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from bench._common import (
    BenchEvents,
    CpuWindow,
    Drain,
    Sample,
    cpu_seconds,
    drain,
    first_snapshot,
    machine,
    peak_rss_mb,
    rss_mb,
    save_figure,
    start_worker,
    worker_env,
)
from bench.profile import Profiler, py_spy, top_frames
from evaluation.progress import Progress
from evaluation.synthetic import SyntheticWorld, make_world
from streams.clients import aio_options, faust_credentials
from streams.metrics import STAGES
from streams.ports import free_port
from streams.publish import event_records, publish, publish_items
from streams.settings import Settings
from streams.supervisor import WorkerProcess, scrape, total
from streams.topics import create_topics, ensure_topics

console = Console()
TARGET_FAUST = 0.30  # pipeline >= 30 % of Faust consume-only (issue 16; 60 % next)
STRETCH_RAW = 0.25  # pipeline >= 25 % of the raw aiokafka loop
STAGE_ORDER = (*STAGES, "other")


# =========================================================================== child processes
# (a) and (b) run in their own processes (this file with the hidden --stage option), so their
# CPU and RSS are theirs alone. Each writes progress and, at the end, a result JSON file.


def _write_json(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_bytes(orjson.dumps(doc))
    os.replace(tmp, path)


class _Window:
    """First event -> last event of a child stage, with CPU of itself and of the broker."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.n = 0
        self.t0: float | None = None
        self.cpu: CpuWindow | None = None
        self.last_progress = 0.0
        self.done = False

    def first(self) -> None:
        self.t0 = time.monotonic()
        self.cpu = CpuWindow({"process": os.getpid(), "broker": self.cfg.get("broker_pid")})
        self.cpu.start()

    def progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_progress >= 0.5:
            self.last_progress = now
            _write_json(self.cfg["progress"], {"n": self.n})

    def expired(self) -> bool:
        return self.t0 is not None and time.monotonic() - self.t0 >= self.cfg["max_seconds"]

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        t1 = time.monotonic()
        assert self.cpu is not None and self.t0 is not None
        self.cpu.stop()
        seconds = t1 - self.t0
        self.progress(force=True)
        _write_json(self.cfg["result"], {
            "events": self.n, "seconds": round(seconds, 3),
            "eps": round(self.n / seconds, 1) if seconds > 0 else None,
            "complete": self.n >= self.cfg["expected"],
            "cpu_pct": self.cpu.percent(),
            "rss_mb": round(rss_mb(os.getpid()), 1),
            "peak_rss_mb": round(peak_rss_mb(os.getpid()), 1),
        })


def raw_stage(cfg: dict) -> None:
    """(a): getmany(500) -> orjson.loads -> orjson.dumps -> send per event -> flush + commit."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    s = Settings(broker=cfg["broker"])
    win = _Window(cfg)

    async def run() -> None:
        consumer = AIOKafkaConsumer(cfg["topic"], group_id=cfg["group"],
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    **aio_options(s))
        producer = AIOKafkaProducer(acks="all", **aio_options(s))
        await producer.start()
        await consumer.start()
        try:
            out_topic, expected = cfg["out_topic"], cfg["expected"]
            while win.n < expected and not win.expired():
                batches = await consumer.getmany(timeout_ms=1000, max_records=500)
                if not batches:
                    continue
                if win.t0 is None:
                    win.first()
                for msgs in batches.values():
                    for msg in msgs:
                        ev = orjson.loads(msg.value)
                        rec = orjson.dumps({"user_id": ev["user_id"], "item_id": ev["item_id"],
                                            "event_type": ev["event_type"], "ts": ev["ts"]})
                        await producer.send(out_topic, rec, key=msg.key)
                        win.n += 1
                await producer.flush()
                await consumer.commit()
                win.progress()
            win.finish()
        finally:
            await consumer.stop()
            await producer.stop()

    asyncio.run(run())


def faust_stage(cfg: dict) -> None:
    """(b): a faust.App with one consume-only agent over the events topic, counting events."""
    import faust

    s = Settings(broker=cfg["broker"])
    app = faust.App(
        cfg["group"],
        broker=s.broker,
        broker_credentials=faust_credentials(s),
        datadir=cfg["datadir"],
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        topic_partitions=s.partitions,
        table_standby_replicas=0,
        broker_session_timeout=s.session_timeout_s,
        broker_heartbeat_interval=s.heartbeat_s,
        web_enabled=False,
        autodiscover=False,
    )
    topic = app.topic(cfg["topic"], key_type=bytes, value_type=bytes)
    win = _Window(cfg)

    def finish() -> None:
        win.finish()
        os.kill(os.getpid(), signal.SIGTERM)  # the faust.Worker's orderly shutdown

    @app.agent(topic)
    async def count(stream):  # noqa: ANN001, ANN202
        async for _value in stream:
            if win.t0 is None:
                win.first()
            win.n += 1
            if win.n >= cfg["expected"] and not win.done:
                finish()

    @app.timer(0.5)
    async def report() -> None:
        win.progress()
        if win.expired() and not win.done:
            finish()

    sys.argv = [sys.argv[0]]  # the Faust worker must not see our options
    faust.Worker(app, loglevel="warning").execute_from_commandline()


def run_child(stage: str, cfg: dict, tmp: Path, log_path: Path, bar: Progress,
              timeout: float) -> dict:
    """Run one child stage to completion; returns its result (raises with its log tail)."""
    cfg = {**cfg, "result": str(tmp / f"{stage}.result.json"),
           "progress": str(tmp / f"{stage}.progress.json")}
    task = bar.add_task(stage, total=cfg["expected"], info="starting")
    cmd = [sys.executable, "-m", "bench.throughput", "--stage", stage,
           "--stage-config", orjson.dumps(cfg).decode()]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    started = time.monotonic()
    try:
        while not Path(cfg["result"]).exists():
            if proc.poll() is not None:
                if Path(cfg["result"]).exists():
                    break
                raise RuntimeError(f"{stage} exited with {proc.returncode}\n{_tail(log_path)}")
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{stage}: no result after {timeout:.0f}s\n{_tail(log_path)}")
            try:
                n = orjson.loads(Path(cfg["progress"]).read_bytes())["n"]
                el = time.monotonic() - started
                bar.update(task, completed=n, info=f"{n / max(el, 1e-9):,.0f}/s incl. start-up")
            except (OSError, orjson.JSONDecodeError, KeyError):
                pass
            time.sleep(0.25)
        result = orjson.loads(Path(cfg["result"]).read_bytes())
        bar.update(task, completed=result["events"], info=f"{result['eps']:,.0f}/s")
        return result
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# =========================================================================== the pipeline


def embed_catalog(prep: Settings, items: list, out: Path, extra_env: dict[str, str]
                  ) -> dict[str, float]:
    """Seconds an untimed worker takes from the catalog's publication to an index holding
    every item (`catalog_s`), then from the same catalog's publication again to every item
    applied again (`catalog_republish_s`: the known texts skip the encoder, and the counts
    of both kinds). It leaves the item vectors in their topic for the timed worker."""
    first_snapshot(prep, out / "throughput-catalog-trainer.log")
    worker = WorkerProcess(prep, out / "throughput-catalog-worker.log", extra_env).start()
    n = len(items)
    try:
        start = time.monotonic()
        publish_items(prep, items, quiet=True)
        start_worker(worker, n, timeout=max(900, n / 20))
        catalog_s, start = time.monotonic() - start, time.monotonic()
        publish_items(prep, items, quiet=True)
        done = worker.wait_for("streamrec_catalog_items_total", 2 * n,
                               timeout=max(900, n / 20), outcome="upserted")
        again_s = time.monotonic() - start
        return {"catalog_s": round(catalog_s, 1),
                "catalog_items_per_s": round(n / catalog_s, 1),
                "catalog_republish_s": round(again_s, 1),
                "catalog_republish_items_per_s": round(n / again_s, 1),
                **{f"catalog_{k}": round(total(done, "streamrec_catalog_items_total",
                                               outcome=k)) for k in ("embedded", "unchanged")}}
    finally:
        worker.stop()


def run_pipeline(broker_pid: int | None, pipe: Settings, prep: Settings, world,
                 n_events: int, max_seconds: float, out: Path, bar: Progress,
                 extra_env: dict[str, str], profile: bool = False) -> dict:
    """(c): embed the catalog with an untimed worker, then time a fresh worker's drain."""
    n_items = len(world.items)
    task = bar.add_task("pipeline", total=n_events, info="embedding the catalog")
    catalog = embed_catalog(prep, world.items, out, extra_env)
    first_snapshot(pipe, out / "throughput-trainer.log")
    bar.update(task, info="starting the worker")
    worker = WorkerProcess(pipe, out / "throughput-worker.log", extra_env).start()
    try:
        start_worker(worker, n_items, timeout=600)
        pid = worker.proc.pid
        bar.update(task, info="ready; draining")
        t_ready = time.monotonic()

        def show(s: Sample) -> None:
            el = time.monotonic() - t_ready
            bar.update(task, completed=s.events, info=f"{s.events / max(el, 1e-9):,.0f}/s")

        spy = Profiler(pid, out / "throughput-profile.txt") if profile else None
        try:
            d: Drain = drain(worker, n_events, max_seconds,
                             {"worker": pid, "broker": broker_pid}, on_sample=show)
        finally:
            if spy is not None:
                spy.stop()
        bar.update(task, completed=d.final.events, info=f"{d.eps:,.0f}/s")
        final = scrape(worker.metrics_url, timeout=60)
        result = {
            "events": round(d.events), "seconds": round(d.seconds, 3),
            "eps": round(d.eps, 1), "complete": d.complete,
            "consumed_total": round(d.final.events),
            "applied": round(total(final, "streamrec_events_total", outcome="applied")),
            "dlq": round(total(final, "streamrec_events_total", outcome="dlq")),
            "duplicate": round(total(final, "streamrec_events_total", outcome="duplicate")),
            "recommendations": round(total(final, "streamrec_recommendations_total")),
            "cpu_pct": {"process": d.cpu_percent()["worker"],
                        "broker": d.cpu_percent().get("broker")},
            "rss_mb": round(rss_mb(pid), 1),
            "peak_rss_mb": round(peak_rss_mb(pid), 1),
            "stages": d.stages(),
            "batch_size_mean": round(d.batch_size_mean, 1),
            "batches": round(d.last.batches - d.first.batches),
            "index_rebuilds": round(d.last.index_version - d.first.index_version),
            "max_metrics_scrape_s": d.max_scrape_s,
            # the untimed worker's catalog: published, embedded, indexed (its encoder's
            # pace); then published again unchanged
            **catalog,
        }
        if spy is not None:
            result["profile"] = top_frames(spy.path)
        return result
    finally:
        worker.stop()


# =========================================================================== report


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None


def print_tables(doc: dict) -> None:
    runs = doc["runs"]
    t = Table(title=f"Throughput: {doc['events']:,} backlogged events, {doc['users']:,} users, "
                    f"{doc['items']:,} items", box=box.SIMPLE_HEAD)
    for col in ("run", "events", "s", "ev/s", "/Faust", "/raw", "CPU%", "broker%", "RSS MB"):
        t.add_column(col, justify="left" if col == "run" else "right", no_wrap=True)
    names = {"raw": "raw loop", "faust": "Faust", "pipeline": "streamrec"}
    for key, name in names.items():
        r = runs.get(key)
        if r is None:
            t.add_row(name, "skipped", *[""] * 7)
            continue
        events = f"{r['events']:,}" + ("" if r["complete"] else "*")
        t.add_row(name, events, f"{r['seconds']:.1f}", f"{r['eps']:,.0f}",
                  _pct(ratio(r["eps"], doc["faust_eps"])), _pct(ratio(r["eps"], doc["raw_eps"])),
                  f"{r['cpu_pct']['process']:.0f}", f"{r['cpu_pct'].get('broker') or 0:.0f}",
                  f"{r['rss_mb']:.0f}")
    if any(r and not r["complete"] for r in runs.values()):
        t.caption = "* stopped at --max-seconds: the rate so far"
    t.caption = ((t.caption + "; ") if t.caption else "") + "CPU% 100 = one core"
    console.print(t)
    p = runs.get("pipeline")
    if p:
        st = Table(title=f"streamrec stages: mean batch {p['batch_size_mean']:.0f} events, "
                         f"{p['batches']} batches, {p['index_rebuilds']} index rebuilds",
                   box=box.SIMPLE_HEAD)
        for col in ("stage", "ms per batch", "share of wall time"):
            st.add_column(col, justify="left" if col == "stage" else "right")
        for name in STAGE_ORDER:
            v = p["stages"][name]
            st.add_row(name, f"{v['seconds_per_batch'] * 1000:.1f}", f"{v['share']:.1%}")
        console.print(st)
    if p and p.get("profile"):
        print_profile(p["profile"])


def print_profile(prof: dict) -> None:
    """The worker's top frames by own time (py-spy samples over the drain)."""
    t = Table(title=f"worker profile: top frames by own time ({prof['samples']:,} samples)",
              box=box.SIMPLE_HEAD)
    for col in ("frame", "self", "total"):
        t.add_column(col, justify="left" if col == "frame" else "right")
    for f in prof["self"]:
        t.add_row(f["frame"], f"{f['self']:.1%}", f"{f['total']:.1%}")
    console.print(t)


def _pct(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}%}"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8),
                                   gridspec_kw={"width_ratios": [1, 1.2]})
    labels, values = [], []
    for key, label in (("raw", "raw aiokafka"), ("faust", "Faust consume-only"),
                       ("pipeline", "streamrec")):
        if doc["runs"].get(key):
            labels.append(label)
            values.append(doc["runs"][key]["eps"])
    bars = ax1.bar(labels, values, color=["#888888", "#4c72b0", "#dd8452"][:len(values)])
    for b, v in zip(bars, values, strict=True):
        ax1.annotate(f"{v:,.0f}", (b.get_x() + b.get_width() / 2, v), ha="center",
                     va="bottom", fontsize=9)
    if doc["faust_eps"]:
        ax1.axhline(TARGET_FAUST * doc["faust_eps"], color="#4c72b0", linestyle="--",
                    linewidth=1, label=f"target: {TARGET_FAUST:.0%} of Faust")
        ax1.legend(fontsize=8)
    if values and min(values) > 0 and max(values) / min(values) > 30:
        ax1.set_yscale("log")
    ax1.set_ylabel("events / s (draining a backlog)")
    ax1.set_title(f"{doc['events']:,} events")
    ax1.grid(axis="y", alpha=0.3)
    p = doc["runs"].get("pipeline")
    if p:
        shares = [p["stages"][s]["share"] * 100 for s in STAGE_ORDER]
        ax2.barh(list(STAGE_ORDER), shares, color="#dd8452")
        for y, v in enumerate(shares):
            ax2.annotate(f"{v:.1f}%", (v, y), va="center", fontsize=9,
                         xytext=(3, 0), textcoords="offset points")
        ax2.invert_yaxis()
        ax2.set_xlabel("share of the pipeline's wall time (%)")
        ax2.set_title(f"streamrec stages (mean batch {p['batch_size_mean']:.0f})")
        ax2.grid(axis="x", alpha=0.3)
    else:
        ax2.axis("off")
    save_figure(fig, path)


# =========================================================================== main


def _parse_args() -> tuple[argparse.Namespace, dict[str, str]]:
    """The command line (--stage: a child) and the worker's extra environment."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000, help="backlog size")
    ap.add_argument("--users", type=int, default=100_000, help="distinct users in the backlog")
    ap.add_argument("--items", type=int, default=50_000,
                    help="catalog size (embedded once before timing: 50k items took 7.5 min "
                    "on 2 cores without AMX, 5.1 min with AMX's bfloat16; "
                    "from 500,000 = IndexConfig.hnsw_threshold the worker's index is HNSW)")
    ap.add_argument("--max-seconds", type=float, default=600.0,
                    help="per consumer: stop timing after this and report the rate so far")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--skip-raw", action="store_true", help="skip (a)")
    ap.add_argument("--skip-faust", action="store_true", help="skip (b)")
    ap.add_argument("--profile", action="store_true",
                    help="sample the worker's drain with py-spy (throughput-profile.txt, "
                    "top frames in the JSON)")
    ap.add_argument("--worker-env", action="append", metavar="KEY=VALUE",
                    help="extra environment of the worker (repeatable), e.g. "
                    "OMP_NUM_THREADS=1 or STREAMREC_BATCH_SIZE=1000; default: none")
    ap.add_argument("--stage", choices=("raw", "faust"), help=argparse.SUPPRESS)
    ap.add_argument("--stage-config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:  # a child stage (a) or (b): no worker
        return args, {}
    try:
        extra_env = worker_env(args.worker_env)
    except ValueError as exc:
        ap.error(str(exc))
    return args, extra_env


def _measure(args: argparse.Namespace, out: Path, info: dict, stamp: str,
             extra_env: dict[str, str]
             ) -> tuple[dict[str, dict | None], int, float | None, float | None]:
    """The measured part: broker, topics and the backlog, then the three drains."""
    from streams.broker import EmbeddedKafka

    with tempfile.TemporaryDirectory(prefix="streamrec-throughput-") as tmp_s, \
            EmbeddedKafka() as kafka:
        tmp = Path(tmp_s)
        common = dict(broker=kafka.url, topic_prefix="tp.", log_level="warning")
        pipe = Settings(app_id=f"tp-pipeline-{stamp}", catalog_topic="item-catalog-idle",
                        data_dir=tmp / "worker", metrics_port=free_port(), **common)
        prep = Settings(app_id=f"tp-catalog-{stamp}", events_topic="behavior-events-idle",
                        data_dir=tmp / "catalog-worker", metrics_port=free_port(), **common)
        ensure_topics(pipe)
        ensure_topics(prep)
        events_topic = pipe.topic(pipe.events_topic)
        scratch = pipe.topic("raw-loop-out")
        create_topics(pipe.bootstrap, {scratch: {"partitions": pipe.partitions}},
                      **pipe.kafka_security())
        console.print(f"broker {kafka.bootstrap} (pid {kafka.pid}); load average "
                      f"{info['loadavg_1m_at_start']}")

        world = make_world(args.items, n_topics=16, seed=1)
        events = BenchEvents(world, args.users, seed=2)
        sent = publish(pipe, events_topic, event_records(events.take(args.events)),
                       total=args.events, label="backlog")
        console.print(f"backlog: {sent:,} events in {events_topic} "
                      f"({min(args.events, args.users):,} distinct users)")
        runs = _run_all(args, out, tmp, stamp, kafka.url, kafka.pid, pipe, prep, world, sent,
                        scratch, extra_env)
        broker_rss = round(rss_mb(kafka.pid), 1) if kafka.pid else None
        broker_cpu_s = round(cpu_seconds(kafka.pid), 1) if kafka.pid else None
    return runs, sent, broker_rss, broker_cpu_s


def _run_all(args: argparse.Namespace, out: Path, tmp: Path, stamp: str, broker_url: str,
             broker_pid: int | None, pipe: Settings, prep: Settings, world: SyntheticWorld,
             sent: int, scratch: str, extra_env: dict[str, str]) -> dict[str, dict | None]:
    """The drains under one progress display: (a) and (b) unless skipped, then (c)."""
    runs: dict[str, dict | None] = {"raw": None, "faust": None, "pipeline": None}
    child = {"broker": broker_url, "broker_pid": broker_pid, "topic": pipe.topic(pipe.events_topic),
             "expected": sent, "max_seconds": args.max_seconds}
    child_timeout = args.max_seconds + 180
    columns = (TextColumn("{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        if not args.skip_raw:
            runs["raw"] = run_child("raw", {**child, "group": f"tp-raw-{stamp}",
                                            "out_topic": scratch},
                                    tmp, out / "throughput-raw.log", bar, child_timeout)
        if not args.skip_faust:
            runs["faust"] = run_child("faust", {**child, "group": f"tp-faust-{stamp}",
                                                "datadir": str(tmp / "faust")},
                                      tmp, out / "throughput-faust.log", bar,
                                      child_timeout)
        runs["pipeline"] = run_pipeline(broker_pid, pipe, prep, world, sent,
                                        args.max_seconds, out, bar, extra_env, args.profile)
    return runs


def _document(args: argparse.Namespace, sent: int, runs: dict[str, dict | None],
              broker_rss: float | None, broker_cpu_s: float | None,
              extra_env: dict[str, str], info: dict, t_begin: float) -> dict:
    """The contents of throughput.json: the rates, their ratios and the targets' verdicts."""
    raw_eps = runs["raw"]["eps"] if runs["raw"] else None
    faust_eps = runs["faust"]["eps"] if runs["faust"] else None
    pipe_r = runs["pipeline"]
    pipeline_eps = pipe_r["eps"]
    return {
        "benchmark": "throughput",
        "events": sent,
        "users": args.users,
        "distinct_users": min(sent, args.users),
        "items": args.items,
        "max_seconds": args.max_seconds,
        "worker_env": extra_env,
        "raw_eps": raw_eps,
        "faust_eps": faust_eps,
        "pipeline_eps": pipeline_eps,
        "ratio_faust": ratio(pipeline_eps, faust_eps),
        "ratio_raw": ratio(pipeline_eps, raw_eps),
        "targets": {
            "pipeline_vs_faust": TARGET_FAUST,
            "pipeline_vs_raw_stretch": STRETCH_RAW,
            "met_faust": None if not faust_eps else pipeline_eps >= TARGET_FAUST * faust_eps,
            "met_raw_stretch": None if not raw_eps else pipeline_eps >= STRETCH_RAW * raw_eps,
        },
        "stages": {k: {"seconds_per_batch": v["seconds_per_batch"], "share": v["share"]}
                   for k, v in pipe_r["stages"].items()},
        "batch_size_mean": pipe_r["batch_size_mean"],
        "cpu": {k: r["cpu_pct"] for k, r in runs.items() if r},
        "rss_mb": {**{k: r["rss_mb"] for k, r in runs.items() if r}, "broker": broker_rss},
        "broker_cpu_seconds_total": broker_cpu_s,
        "runs": runs,
        "machine": info,
        "wall_s": round(time.monotonic() - t_begin, 1),
    }


def _report(doc: dict, out: Path) -> None:
    """Results out: throughput.json and .png written, tables and verdicts printed."""
    sent, pipe_r = doc["events"], doc["runs"]["pipeline"]
    faust_eps, raw_eps = doc["faust_eps"], doc["raw_eps"]
    (out / "throughput.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    plot(doc, out / "throughput.png")
    print_tables(doc)
    console.print(f"catalog: {doc['items']:,} items published, embedded and indexed by a worker "
                  f"in {pipe_r['catalog_s']:,.1f} s ({pipe_r['catalog_items_per_s']:,.1f} "
                  "items/s); published again unchanged, applied again in "
                  f"{pipe_r['catalog_republish_s']:,.1f} s "
                  f"({pipe_r['catalog_republish_items_per_s']:,.1f} items/s; "
                  f"{pipe_r['catalog_unchanged']:,} reused, {pipe_r['catalog_embedded']:,} "
                  "embedded in all)")
    if pipe_r["dlq"] or not pipe_r["complete"]:
        console.print(f"[yellow]pipeline: {pipe_r['consumed_total']:,} of {sent:,} consumed, "
                      f"{pipe_r['applied']:,} applied, {pipe_r['dlq']:,} to the DLQ"
                      f"{'' if pipe_r['complete'] else ' (stopped at --max-seconds)'}[/]")
    if faust_eps:
        ok = doc["targets"]["met_faust"]
        console.print(f"target  pipeline >= {TARGET_FAUST:.0%} of Faust consume-only: "
                      f"{_pct(doc['ratio_faust'], 1)} -> {'MET' if ok else 'NOT MET'}")
    if raw_eps:
        ok = doc["targets"]["met_raw_stretch"]
        console.print(f"stretch pipeline >= {STRETCH_RAW:.0%} of raw aiokafka: "
                      f"{_pct(doc['ratio_raw'], 1)} -> {'MET' if ok else 'NOT MET'}")
    console.print(f"wall time {doc['wall_s']:.0f}s; results in {out}/throughput.json, "
                  f"{out}/throughput.png")


def main() -> None:
    args, extra_env = _parse_args()
    if args.stage:
        cfg = orjson.loads(args.stage_config)
        (raw_stage if args.stage == "raw" else faust_stage)(cfg)
        return
    if args.profile:
        py_spy()  # fail now, not after the backlog
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_begin = time.monotonic()
    info = machine()
    stamp = f"{int(time.time())}"
    runs, sent, broker_rss, broker_cpu_s = _measure(args, out, info, stamp, extra_env)
    doc = _document(args, sent, runs, broker_rss, broker_cpu_s, extra_env, info, t_begin)
    _report(doc, out)


if __name__ == "__main__":
    main()
