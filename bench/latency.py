"""Latency benchmark: event -> recommendation latency at 25/50/75 % of the worker's maximum rate.

    .venv/bin/python -m bench.latency [--max-eps EPS] [--seconds 60] [--loads 0.25,0.5,0.75]
                                      [--items N] [--users N] [--warmup-s 5] [--out bench/out]
                                      [--probe-events 20000] [--worker-env K=V ...]
                                      [--requests SHARE]

The maximum rate is --max-eps if given, else `pipeline_eps` of <out>/throughput.json (whose
--items/--users then become the defaults, so the workload matches), else measured here: after
the worker is ready, --probe-events are published as fast as possible and the worker's
`streamrec_events_total` is sampled while it drains them (as bench/throughput.py does).

Starts the embedded Apache Kafka broker and one worker, loads a synthetic catalog (evaluation/
synthetic.py) and waits until the index holds it. Then, for each load level in turn, publishes
events paced at load × max rate for --seconds (same event stream as bench/throughput.py: user
ids round-robin over --users, see bench/_common.py), each event stamped with the wall clock
(ms) just before it is sent (kafka-python, the project's producer settings: acks=all,
linger 5 ms). A separate consumer of the recommendations topic (a thread of this process,
group-less, like streams/tail.py) records, per recommendation, its receive time minus its
`source_event_ts` (the newest event it used: streams/processor.py sets it from the user
state's last event ts, streams/tail.py and the demo measure latency the same way). A level's
latencies are those of events sent in its window after --warmup-s; after each level the worker
and the consumer are allowed to catch up before the next starts. Reports p50/p99/p999 (ms),
the achieved rate and the count per level, plus the worker's own view (its
`streamrec_event_to_recommendation_seconds` histogram: record timestamp -> emit) and its CPU.
Prints whether p99 <= 100 ms at 50 % load and <= 250 ms at 75 %; writes latency.json and
latency.png to --out. With --requests SHARE, that share of the paced events are `request`
events instead (a recommendation asked for, no behaviour), and each level also reports the
p50/p99 of the requests' answers and of the other events' apart.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
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
    Sample,
    drain,
    first_snapshot,
    hist_max,
    hist_quantile,
    machine,
    rss_mb,
    save_figure,
    start_worker,
    take_sample,
    worker_env,
)
from evaluation.progress import Progress
from evaluation.synthetic import make_world
from streams.clients import kafka_consumer, kafka_producer
from streams.ports import free_port
from streams.publish import publish_items
from streams.settings import Settings
from streams.supervisor import WorkerProcess
from streams.topics import ensure_topics

console = Console()
TARGETS_P99_MS = {0.5: 100.0, 0.75: 250.0}
DEFAULT_ITEMS, DEFAULT_USERS = 50_000, 100_000


class LatencyTail(threading.Thread):
    """Group-less consumer of the recommendations topic from its beginning: for every
    recommendation, (receive wall-clock ms, its source_event_ts). Only those two numbers are
    kept (streams/tail.py's RecommendationTail also keeps the newest record per user)."""

    def __init__(self, settings: Settings):
        super().__init__(daemon=True, name="latency-tail")
        self.settings = settings
        self.recv_ms: list[float] = []
        self.src_ms: list[int] = []
        self.users: list[str] = []
        self.assigned = threading.Event()
        self.error: BaseException | None = None
        self._halt = threading.Event()

    @property
    def count(self) -> int:
        return len(self.recv_ms)

    def run(self) -> None:
        try:
            consumer = kafka_consumer(self.settings,
                                      self.settings.topic(self.settings.recommendations_topic),
                                      auto_offset_reset="earliest", enable_auto_commit=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
            return
        try:
            while not self._halt.is_set():
                polled = consumer.poll(timeout_ms=100)
                if consumer.assignment():
                    self.assigned.set()
                for msgs in polled.values():
                    now = time.time() * 1000
                    for msg in msgs:
                        rec = orjson.loads(msg.value)
                        self.recv_ms.append(now)  # list.append: atomic under the GIL
                        self.src_ms.append(rec["source_event_ts"])
                        self.users.append(rec["user_id"])
        except BaseException as exc:  # noqa: BLE001
            self.error = exc
        finally:
            consumer.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


# --------------------------------------------------------------------------- phases


def probe_max(s: Settings, worker: WorkerProcess, tail: LatencyTail, events: BenchEvents,
              n: int, broker_pid: int | None, bar: Progress) -> dict:
    """Publish `n` events as fast as possible and time the worker draining them; returns
    once the worker is idle again (so the first level does not inherit its backlog)."""
    task = bar.add_task("max rate", total=n, info="publishing")
    failures: list[BaseException] = []
    pids = {"worker": worker.proc.pid, "broker": broker_pid}
    start = take_sample(worker, pids)
    before, i0 = start.events, tail.count

    def publish_all() -> None:
        producer = kafka_producer(s)
        topic = s.topic(s.events_topic)
        try:
            for ev in events.take(n, now_ms=lambda: time.time() * 1000):
                producer.send(topic, key=ev["user_id"].encode(),
                              value=orjson.dumps(ev)).add_errback(failures.append)
            producer.flush()
        finally:
            producer.close()

    pub = threading.Thread(target=publish_all, daemon=True, name="probe-publisher")
    pub.start()
    t0 = time.monotonic()

    def show(smp: Sample) -> None:
        el = time.monotonic() - t0
        bar.update(task, completed=smp.events - before,
                   info=f"{(smp.events - before) / max(el, 1e-9):,.0f}/s")

    d = drain(worker, before + n, max_seconds=600, pids=pids, on_sample=show)
    pub.join()
    if failures:
        raise RuntimeError(f"{len(failures)} probe events not acknowledged: {failures[0]!r}")
    bar.update(task, completed=n, info=f"{d.eps:,.0f}/s; settling")
    settle(worker, tail, i0, start, pids)
    bar.update(task, info=f"{d.eps:,.0f}/s")
    return {"events": n, "seconds": round(d.seconds, 2), "eps": round(d.eps, 1),
            "cpu_pct": d.cpu_percent(), "batch_size_mean": round(d.batch_size_mean, 1)}


def run_level(s: Settings, worker: WorkerProcess, tail: LatencyTail, producer: Any,
              events: BenchEvents, load: float, max_eps: float, seconds: float,
              warmup_s: float, broker_pid: int | None, bar: Progress,
              requests: float = 0.0) -> dict:
    rate = load * max_eps
    n = max(1, int(rate * seconds))
    task = bar.add_task(f"{load:.0%} load", total=n, info=f"{rate:,.0f}/s")
    pids = {"worker": worker.proc.pid, "broker": broker_pid}
    before = take_sample(worker, pids)
    i0 = tail.count
    wall0, wall1, send_s, asked = _send_paced(s, worker, producer, events, n, rate, bar, task,
                                              requests)
    at_end = take_sample(worker, pids)
    # let the worker finish this level's events and the tail read their recommendations
    bar.update(task, completed=n, info="draining")
    t_drain = time.monotonic()
    worker.wait_for("streamrec_events_total", before.events + n, timeout=120 + n / max_eps)
    after = settle(worker, tail, i0, before, pids)
    drain_s = time.monotonic() - t_drain
    i1 = tail.count
    recv = np.array(tail.recv_ms[i0:i1])
    src = np.array(tail.src_ms[i0:i1], dtype=np.float64)
    keep = (src >= wall0 + warmup_s * 1000) & (src <= wall1)
    lat = recv[keep] - src[keep]
    result = _level_result(load, rate, n, send_s, drain_s, lat, i1 - i0, before, at_end, after,
                           worker)
    if requests:  # the answers to requests apart from the recommendations after behaviour
        is_req = np.array([(u, int(t)) in asked for u, t in zip(
            tail.users[i0:i1], tail.src_ms[i0:i1], strict=True)], bool)[keep]
        for name, part in (("request", lat[is_req]), ("event", lat[~is_req])):
            result |= {f"{name}_p50_ms": _pct(part, 50), f"{name}_p99_ms": _pct(part, 99),
                       f"{name}_n": int(len(part))}
    bar.update(task, info=f"{result['eps']:,.0f}/s, p99 {result['p99_ms']:.0f} ms")
    return result


def _send_paced(s: Settings, worker: WorkerProcess, producer: Any, events: BenchEvents, n: int,
                rate: float, bar: Progress, task: Any, requests: float = 0.0
                ) -> tuple[float, float, float, set[tuple[str, int]]]:
    """A level's publishing phase: `n` events paced at `rate`/s, stamped as sent, a share
    `requests` of them turned into requests (returned as (user, ts) pairs)."""
    topic = s.topic(s.events_topic)
    failures: list[BaseException] = []
    asked: set[tuple[str, int]] = set()
    rng = np.random.default_rng(n)
    it = events.take(n, now_ms=lambda: time.time() * 1000)
    wall0 = time.time() * 1000
    start = time.monotonic()
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        ev = next(it)  # stamped now, after the pacing sleep: ts = send time
        if requests and rng.random() < requests:
            ev = {"user_id": ev["user_id"], "event_type": "request", "ts": ev["ts"]}
            asked.add((ev["user_id"], ev["ts"]))
        producer.send(topic, key=ev["user_id"].encode(),
                      value=orjson.dumps(ev)).add_errback(failures.append)
        if i % 100 == 0:
            bar.update(task, completed=i)
            if worker.proc.poll() is not None:
                raise RuntimeError(f"worker exited\n{worker.log_tail()}")
    producer.flush()
    send_s = time.monotonic() - start
    wall1 = time.time() * 1000
    if failures:
        raise RuntimeError(f"{len(failures)} events not acknowledged: {failures[0]!r}")
    return wall0, wall1, send_s, asked


def _pct(lat: np.ndarray, q: float) -> float:
    return round(float(np.percentile(lat, q)), 1) if len(lat) else float("nan")


def _level_result(load: float, rate: float, n: int, send_s: float, drain_s: float,
                  lat: np.ndarray, recommendations: int, before: Sample, at_end: Sample,
                  after: Sample, worker: WorkerProcess) -> dict:
    """A level's row of latency.json: the latency percentiles and the worker's own view."""

    def worker_q(q: float) -> float:
        return round(hist_quantile(before.e2r_buckets, after.e2r_buckets, q) * 1000, 1)

    wall = max(at_end.t - before.t, 1e-9)
    return {
        "load": load,
        "target_eps": round(rate, 1),
        "eps": round(n / send_s, 1),
        "sent": n,
        "seconds": round(send_s, 2),
        "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99), "p999_ms": _pct(lat, 99.9),
        "mean_ms": round(float(lat.mean()), 1) if len(lat) else float("nan"),
        "max_ms": round(float(lat.max()), 1) if len(lat) else float("nan"),
        "n": int(len(lat)),
        "recommendations": int(recommendations),
        "processed_eps": round((at_end.events - before.events) / wall, 1),
        "backlog_at_end": int(before.events + n - at_end.events),
        "drain_s": round(drain_s, 2),
        "worker_p50_ms": worker_q(0.5), "worker_p99_ms": worker_q(0.99),
        # the longest event-loop stall of the level, as its histogram bucket's upper bound
        "loop_stall_max_ms": round(hist_max(before.stall_buckets, after.stall_buckets) * 1000,
                                   1),
        "worker_cpu_pct": round((at_end.cpu["worker"] - before.cpu["worker"]) / wall * 100, 1),
        "broker_cpu_pct": round((at_end.cpu["broker"] - before.cpu["broker"]) / wall * 100, 1)
        if "broker" in before.cpu else None,
        "worker_rss_mb": round(rss_mb(worker.proc.pid), 1),
        "dlq": int(after.dlq - before.dlq),
        **batch_cost(before, at_end),
    }


def batch_cost(before: Sample, after: Sample) -> dict:
    """What a level's micro-batches held and cost: the mean batch, the worker's CPU per
    event (which must fall as batches grow: a batch's fixed cost is paid however few events
    it holds) and each stage's wall time per batch."""
    batches = after.batches - before.batches
    events = after.batch_events - before.batch_events  # >= batches: none is empty
    if batches < 1:
        return {"batch_size_mean": float("nan"), "worker_cpu_ms_per_event": float("nan"),
                "stage_ms_per_batch": {}}
    cpu_s = after.cpu["worker"] - before.cpu["worker"]
    return {
        "batch_size_mean": round(events / batches, 1),
        "worker_cpu_ms_per_event": round(cpu_s * 1000 / events, 3),
        "stage_ms_per_batch": {
            s: round((after.stage_sum[s] - before.stage_sum[s]) * 1000 / batches, 1)
            for s in before.stage_sum},
    }


def settle(worker: WorkerProcess, tail: LatencyTail, i0: int, before: Sample,
           pids: dict[str, int | None], quiet_s: float = 2.0, timeout: float = 60.0) -> Sample:
    """After the worker has counted every event: wait until its recommendation counter has
    been still for `quiet_s` (a batch counts its events before it emits, and learns after)
    and the tail has read that many recommendations since index `i0`. Returns the last
    worker sample."""
    deadline = time.monotonic() + timeout
    last = take_sample(worker, pids)
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        if tail.error:
            raise RuntimeError(f"recommendation consumer failed: {tail.error!r}")
        time.sleep(0.25)
        now = take_sample(worker, pids)
        if now.recs != last.recs:
            still_since = time.monotonic()
        last = now
        if (time.monotonic() - still_since >= quiet_s
                and tail.count - i0 >= last.recs - before.recs):
            break
    return last


# --------------------------------------------------------------------------- report


def print_table(doc: dict) -> None:
    t = Table(title=f"Event -> recommendation latency, ms (max rate {doc['max_eps']:,.0f}/s "
                    f"from {doc['max_eps_source']}; {doc['seconds']:g} s per level)",
              box=box.SIMPLE_HEAD)
    for col in ("load", "ev/s", "p50", "p99", "p99.9", "n", "wkr p99", "stall", "CPU%",
                "p99 target"):
        t.add_column(col, justify="right", no_wrap=True)
    for lv in doc["levels"]:
        target = TARGETS_P99_MS.get(lv["load"])
        verdict = "" if target is None else f"{target:.0f}: {_verdict(lv['p99_ms'], target)}"
        t.add_row(f"{lv['load']:.0%}", f"{lv['eps']:,.0f}", f"{lv['p50_ms']:.1f}",
                  f"{lv['p99_ms']:.1f}", f"{lv['p999_ms']:.1f}", f"{lv['n']:,}",
                  f"{lv['worker_p99_ms']:.0f}", f"<={lv['loop_stall_max_ms']:g}",
                  f"{lv['worker_cpu_pct']:.0f}", verdict)
    t.caption = ("wkr p99: the worker's own histogram (record ts -> emit, bucketed, whole "
                 "level); stall: the longest event-loop stall (its histogram bucket); CPU%: "
                 "the worker's, 100 = one core")
    console.print(t)
    print_stages(doc["levels"])
    for lv in doc["levels"]:
        if "request_n" in lv:
            console.print(f"{lv['load']:.0%}: requests p50/p99 {lv['request_p50_ms']:.1f}/"
                          f"{lv['request_p99_ms']:.1f} ms (n {lv['request_n']:,}); other "
                          f"events {lv['event_p50_ms']:.1f}/{lv['event_p99_ms']:.1f} ms "
                          f"(n {lv['event_n']:,})")


def print_stages(levels: list[dict]) -> None:
    """Each level's mean micro-batch, the worker's CPU per event and each stage's wall time
    per batch (the worker's stage histogram)."""
    stages = list(levels[0]["stage_ms_per_batch"]) if levels else []
    t = Table(title="Per micro-batch: events, CPU ms per event, ms by stage",
              box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("load", "batch", "CPU/ev", *stages):
        t.add_column(col, justify="right", no_wrap=True)
    for lv in levels:
        t.add_row(f"{lv['load']:.0%}", f"{lv['batch_size_mean']:.0f}",
                  f"{lv['worker_cpu_ms_per_event']:.2f}",
                  *(f"{lv['stage_ms_per_batch'].get(s, float('nan')):.1f}" for s in stages))
    console.print(t)


def _verdict(p99: float, limit: float) -> str:
    if p99 != p99:  # nan: no recommendation counted
        return "no data"
    return "met" if p99 <= limit else "not met"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = doc["levels"]
    x = [lv["load"] * 100 for lv in levels]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for key, label, style in (("p50_ms", "p50", "o-"), ("p99_ms", "p99", "s-"),
                              ("p999_ms", "p99.9", "^-")):
        ax.plot(x, [lv[key] for lv in levels], style, label=label)
    for load, ms in TARGETS_P99_MS.items():
        ax.plot([load * 100], [ms], "rx", markersize=10, mew=2)
        ax.annotate(f"p99 target {ms:.0f} ms", (load * 100, ms), textcoords="offset points",
                    xytext=(6, 6), color="red", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel(f"offered load: share of the max rate ({doc['max_eps']:,.0f} events/s) and "
                  "achieved rate")
    ax.set_ylabel("event -> recommendation latency (ms)")
    ax.set_title(f"streamrec latency vs load ({doc['seconds']:g} s per level)")
    ax.set_xticks(x, [f"{lv['load']:.0%}\n{lv['eps']:,.0f}/s" for lv in levels])
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save_figure(fig, path)


# --------------------------------------------------------------------------- main


def _parse_args() -> tuple[argparse.Namespace, dict[str, str], list[float]]:
    """The command line: the options, the worker's extra environment and the load levels."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-eps", type=float, default=None,
                    help="the worker's maximum rate (default: throughput.json, else measured)")
    ap.add_argument("--seconds", type=float, default=60.0, help="publishing time per level")
    ap.add_argument("--loads", default="0.25,0.5,0.75", help="fractions of the maximum rate")
    ap.add_argument("--items", type=int, default=None, help=f"catalog size (default: "
                    f"throughput.json's, else {DEFAULT_ITEMS})")
    ap.add_argument("--users", type=int, default=None, help=f"distinct users (default: "
                    f"throughput.json's, else {DEFAULT_USERS})")
    ap.add_argument("--warmup-s", type=float, default=5.0,
                    help="events of a level's first seconds are not counted (capped at a "
                    "quarter of --seconds)")
    ap.add_argument("--probe-events", type=int, default=20_000,
                    help="backlog drained to measure the maximum rate when it is not known")
    ap.add_argument("--worker-env", action="append", metavar="KEY=VALUE",
                    help="extra environment of the worker (repeatable), e.g. "
                    "OMP_NUM_THREADS=1; default: none")
    ap.add_argument("--requests", type=float, default=0.0,
                    help="share of the paced events sent as `request` events (0..1)")
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    try:
        extra_env = worker_env(args.worker_env)
    except ValueError as exc:
        ap.error(str(exc))
    loads = [float(x) for x in args.loads.split(",") if x.strip()]
    if not loads or any(not 0 < x for x in loads):
        ap.error("--loads: positive fractions, e.g. 0.25,0.5,0.75")
    return args, extra_env, loads


def _workload(args: argparse.Namespace, out: Path) -> tuple[float | None, str, int, int]:
    """Max rate, items and users: the options, else throughput.json's, else defaults."""
    max_eps, source, tp_doc = args.max_eps, "--max-eps", None
    if max_eps is None and (out / "throughput.json").exists():
        tp_doc = orjson.loads((out / "throughput.json").read_bytes())
        if tp_doc.get("pipeline_eps"):
            max_eps, source = float(tp_doc["pipeline_eps"]), str(out / "throughput.json")
        else:
            tp_doc = None
    items = args.items or (tp_doc or {}).get("items") or DEFAULT_ITEMS
    users = args.users or (tp_doc or {}).get("users") or DEFAULT_USERS
    return max_eps, source, items, users


def _measure(args: argparse.Namespace, out: Path, info: dict, items: int, users: int,
             extra_env: dict[str, str], loads: list[float], warmup_s: float,
             max_eps: float | None, source: str
             ) -> tuple[float | None, str, dict | None, list[dict]]:
    """The measured part: broker, worker, catalog and consumer up, then every level."""
    from streams.broker import EmbeddedKafka

    stamp = f"{int(time.time())}"
    levels: list[dict] = []
    probe: dict | None = None
    with tempfile.TemporaryDirectory(prefix="streamrec-latency-") as tmp, \
            EmbeddedKafka() as kafka:
        s = Settings(broker=kafka.url, app_id=f"lat-{stamp}", topic_prefix="lat.",
                     data_dir=Path(tmp) / "worker", metrics_port=free_port(),
                     log_level="warning")
        ensure_topics(s)
        world = make_world(items, n_topics=16, seed=1)
        events = BenchEvents(world, users, seed=2)
        console.print(f"broker {kafka.bootstrap}; load average {info['loadavg_1m_at_start']}; "
                      f"worker starting (encoder, catalog of {items:,} items) ...")
        first_snapshot(s, out / "latency-trainer.log")
        worker = WorkerProcess(s, out / "latency-worker.log", extra_env).start()
        tail = LatencyTail(s)
        producer = None
        try:
            publish_items(s, world.items, quiet=True)
            start_worker(worker, items, timeout=max(900, items / 20))
            tail.start()
            if not tail.assigned.wait(60):
                raise RuntimeError(f"recommendation consumer not assigned: {tail.error!r}")
            # one producer for every level, connected before the first event is stamped
            producer = kafka_producer(s)
            producer.partitions_for(s.topic(s.events_topic))
            max_eps, source, probe = _run_levels(s, worker, tail, producer, events, kafka.pid,
                                                 args, loads, warmup_s, max_eps, source, levels)
        finally:
            if producer is not None:
                producer.close()
            tail.stop()
            worker.stop()
    return max_eps, source, probe, levels


def _run_levels(s: Settings, worker: WorkerProcess, tail: LatencyTail, producer: Any,
                events: BenchEvents, broker_pid: int | None, args: argparse.Namespace,
                loads: list[float], warmup_s: float, max_eps: float | None, source: str,
                levels: list[dict]) -> tuple[float, str, dict | None]:
    """Under one progress display: the max-rate probe if needed, then each level."""
    probe: dict | None = None
    columns = (TextColumn("{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        if max_eps is None:
            probe = probe_max(s, worker, tail, events, args.probe_events, broker_pid, bar)
            max_eps, source = probe["eps"], f"a {args.probe_events:,}-event drain"
        for load in loads:
            levels.append(run_level(s, worker, tail, producer, events, load, max_eps,
                                    args.seconds, warmup_s, broker_pid, bar, args.requests))
    return max_eps, source, probe


def _document(args: argparse.Namespace, max_eps: float | None, source: str,
              probe: dict | None, levels: list[dict], warmup_s: float,
              extra_env: dict[str, str], items: int, users: int, info: dict,
              t_begin: float) -> dict:
    """The contents of latency.json, the targets' verdicts included."""
    return {
        "benchmark": "latency",
        "max_eps": max_eps,
        "max_eps_source": source,
        "probe": probe,
        "levels": levels,
        "loop_stall_max_ms": max((lv["loop_stall_max_ms"] for lv in levels), default=None),
        "targets": {
            f"p99_ms_at_{load:g}": {"limit": ms, "met": next(
                (lv["p99_ms"] <= ms if lv["n"] else None for lv in levels
                 if lv["load"] == load), None)}
            for load, ms in TARGETS_P99_MS.items()
        },
        "seconds": args.seconds,
        "warmup_s": warmup_s,
        "worker_env": extra_env,
        "items": items,
        "users": users,
        "machine": info,
        "wall_s": round(time.monotonic() - t_begin, 1),
    }


def _report(doc: dict, out: Path) -> None:
    """Results out: latency.json and latency.png written, the table and the verdicts printed."""
    levels = doc["levels"]
    (out / "latency.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    plot(doc, out / "latency.png")
    print_table(doc)
    for load, ms in TARGETS_P99_MS.items():
        lv = next((lv for lv in levels if lv["load"] == load), None)
        if lv is None:
            console.print(f"target p99 <= {ms:.0f} ms at {load:.0%} load: not measured")
        else:
            console.print(f"target p99 <= {ms:.0f} ms at {load:.0%} load "
                          f"({lv['eps']:,.0f} events/s): {lv['p99_ms']:.1f} ms -> "
                          f"{_verdict(lv['p99_ms'], ms).upper()}")
    console.print(f"wall time {doc['wall_s']:.0f}s; results in {out}/latency.json, "
                  f"{out}/latency.png")


def main() -> None:
    args, extra_env, loads = _parse_args()
    warmup_s = min(args.warmup_s, args.seconds / 4)
    # The publisher and the recommendation consumer are threads of this process: hand the GIL
    # over sooner than the default 5 ms so a receive time is taken close to the arrival.
    sys.setswitchinterval(0.001)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    max_eps, source, items, users = _workload(args, out)
    t_begin = time.monotonic()
    info = machine()
    max_eps, source, probe, levels = _measure(args, out, info, items, users, extra_env, loads,
                                              warmup_s, max_eps, source)
    doc = _document(args, max_eps, source, probe, levels, warmup_s, extra_env, items, users,
                    info, t_begin)
    _report(doc, out)


if __name__ == "__main__":
    main()
