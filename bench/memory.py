"""Memory benchmark: bytes of user state per user, and one worker's RSS with many users' state.

    .venv/bin/python -m bench.memory [--users 1000000] [--items 100000] [--events 20000]
                                     [--baseline] [--worker-env K=V ...] [--out bench/out]

Part 1 (no broker): the wire size of `UserState.to_bytes()`, which is what the user-state
table stores per user (changelog record and RocksDB value), for full states of
`LearnerConfig().history_len` events with a residual of the learner's per-user size: without
search texts, and with --text-share of the history being searches (each keeps its 384-d text
vector as float16, base64).

Part 2: the embedded Kafka broker and one worker holding --users users and --items items.
Embedding the catalog would take ~100 items/s, so random unit vectors of the encoder's
dimension are published straight to the item-vectors topic (the worker's own catalog input:
it replays that topic into its learner and FAISS index at start-up). --users states (20-50
catalog items of history, a residual) are produced to the user-state table's changelog, so
that the worker's Faust table recovers them into RocksDB at start-up, as after a restart or a
partition move. Records: start-up time (to index ready and table recovered), RSS when ready,
the RocksDB and changelog sizes on disk; then --events events of random pre-loaded users go
through the worker (their state is read from RocksDB and written back) and RSS is read again,
with the longest event-loop stall: to ready (the index build included), and during the events
(the upper bound of its histogram bucket).
With --baseline, a worker with the same catalog and no users runs first, for the RSS that the
users add. Prints the tables; writes memory.json and memory.png (RSS over time) to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench._common import (
    BenchEvents,
    first_snapshot,
    hist_max,
    machine,
    peak_rss_mb,
    rss_mb,
    save_figure,
    take_sample,
    worker_env,
)
from evaluation.progress import Progress
from evaluation.synthetic import SyntheticWorld, make_world
from models.config import EVENT_TYPE_IDS, LearnerConfig
from models.lr_rules import RuleRecord
from models.user_state import UserState
from streams.catalog import encode_item_vector
from streams.clients import aio_options
from streams.ports import free_port
from streams.publish import event_records, publish
from streams.settings import Settings
from streams.supervisor import Samples, WorkerProcess, scrape, total
from streams.topics import create_topics, ensure_topics

console = Console()
TYPES = [EVENT_TYPE_IDS[t] for t in ("view", "click", "add_to_cart", "purchase", "rate")]
TYPE_P = np.array([0.6, 0.2, 0.07, 0.05, 0.05]) / 0.97  # evaluation/synthetic.py's event mix
SEARCH = EVENT_TYPE_IDS["search"]
STALL_MAX = "streamrec_event_loop_stall_max_seconds"  # since the worker started
# Faust reports a finished rebalance, table recovery included, with this histogram
RECOVERED = "streamrec_faust_rebalance_done_latency_count"


# --------------------------------------------------------------------------- state sizes


def model_dims(cfg: LearnerConfig) -> tuple[int, int]:
    """(per-user residual size, text dimension) of the default worker: the residual is the
    learner's `n_user` (vector dim + the user's blend-weight corrections), read off a learner
    rather than re-derived; the text dimension is the bundled encoder's hidden size."""
    from models.encoder import default_model_path
    from models.learner import OnlineLearner

    text_dim = int(orjson.loads((Path(default_model_path()) / "config.json").read_bytes())
                   ["hidden_size"])
    learner = OnlineLearner(cfg.model_copy(update={"device": "cpu"}), text_dim=text_dim)
    return learner.model.n_user, text_dim


def unit(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    v = rng.standard_normal(shape).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def make_state(rng: np.random.Generator, item_ids: Sequence[str], n_hist: int,
               text_share: float, dims: tuple[int, int], history_len: int,
               offsets: dict[str, int]) -> UserState:
    """A state as the worker would have written it after `n_hist` (or more) events."""
    st = UserState()
    ts = int(time.time() * 1000) - int(rng.integers(86_400_000, 30 * 86_400_000))
    for _ in range(n_hist):
        ts += int(rng.integers(1_000, 3_600_000))
        if rng.random() < text_share:
            st.append(None, SEARCH, ts, unit(rng, (dims[1],)), history_len)
        else:
            st.append(item_ids[int(rng.integers(len(item_ids)))],
                      int(rng.choice(TYPES, p=TYPE_P)), ts, None, history_len)
    st.residual = (rng.standard_normal(dims[0]) * 0.05).astype(np.float32)
    st.n_events += int(rng.integers(0, 500))
    st.rule = RuleRecord(alpha=float(rng.uniform(0.005, 0.05)), accum=float(rng.uniform(0, 1)),
                         loss_ema=float(rng.uniform(4.0, 9.0)),
                         loss_var=float(rng.uniform(0.0, 2.0)), steps=st.n_events)
    st.offsets = dict(offsets)
    return st


def stats(sizes: Sequence[int]) -> dict[str, float]:
    return {"min": int(min(sizes)), "mean": round(float(np.mean(sizes)), 1),
            "max": int(max(sizes))}


def state_sizes(item_ids: Sequence[str], cfg: LearnerConfig, dims: tuple[int, int],
                text_share: float, n: int, partitions: int) -> dict[str, dict[str, float]]:
    """Wire sizes of full-history states, with no search texts and with `text_share` of them;
    each carries one applied offset (one events partition, a 7-digit offset)."""
    rng = np.random.default_rng(7)
    out = {}
    for name, share in (("no_texts", 0.0), ("with_texts", text_share)):
        out[name] = stats([len(make_state(
            rng, item_ids, cfg.history_len, share, dims, cfg.history_len,
            {str(int(rng.integers(partitions))): int(rng.integers(10**6, 10**7))}).to_bytes())
            for _ in range(n)])
    return out


# --------------------------------------------------------------------------- Kafka loading


def load(s: Settings, topic: str, records: Iterable[tuple[bytes, bytes]], n: int,
         label: str) -> tuple[int, float]:
    """Send (key, value) records with the default (murmur2, Java-compatible) partitioner;
    returns (payload bytes, seconds); raises if the broker refused any. aiokafka, not
    kafka-python: without the optional `crc32c` package kafka-python checksums record
    batches in pure Python (~7 MB/s here), which would make loading 1M states take many
    minutes; aiokafka builds batches in C. Large batches; the records have distinct keys,
    so their relative order does not matter."""
    return asyncio.run(_load(s, topic, records, n, label))


async def _load(s: Settings, topic: str, records: Iterable[tuple[bytes, bytes]], n: int,
                label: str) -> tuple[int, float]:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(acks="all", linger_ms=50, max_batch_size=512 * 1024,
                                **aio_options(s))
    await producer.start()
    payload = sent = 0
    t0 = time.monotonic()
    cols = (TextColumn(f"{label:<12}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    try:
        with Progress(*cols, console=console) as bar:
            task = bar.add_task(label, total=n, info="")
            acks: list[asyncio.Future] = []
            for key, value in records:
                acks.append(await producer.send(topic, value, key=key))
                payload += len(key) + len(value)
                sent += 1
                if sent % 10_000 == 0:
                    await asyncio.gather(*acks)  # raises on a refused record
                    acks.clear()
                    rate = sent / max(time.monotonic() - t0, 1e-9)
                    bar.update(task, completed=sent,
                               info=f"{rate:,.0f}/s, {payload / 2**20:,.0f} MB")
            await producer.flush()
            await asyncio.gather(*acks)
            bar.update(task, completed=sent, info=f"{payload / 2**20:,.0f} MB")
    finally:
        await producer.stop()
    return payload, time.monotonic() - t0


def item_vector_records(items: list[dict], dim: int) -> Iterator[tuple[bytes, bytes]]:
    """item-vectors records of random unit vectors (what the catalog agent would write)."""
    rng = np.random.default_rng(3)
    for start in range(0, len(items), 4096):
        chunk = items[start:start + 4096]
        for item, vec in zip(chunk, unit(rng, (len(chunk), dim)), strict=True):
            yield item["item_id"].encode(), encode_item_vector(item["item_id"], item["title"],
                                                               vec)


def state_records(user_ids: Sequence[str], templates: Sequence[bytes]
                  ) -> Iterator[tuple[bytes, bytes]]:
    """One changelog record per user. The value holds no user id, so a few thousand
    distinct states (different items, types, times, residuals) are cycled over the users."""
    for n, user in enumerate(user_ids):
        yield user.encode(), templates[n % len(templates)]


# --------------------------------------------------------------------------- measuring


def disk_mb(path: Path, prefix: str = "") -> float:
    """Allocated size (blocks, not apparent size: Kafka pre-sizes its index files) of the
    files under `path` whose top-level entry starts with `prefix`, MB."""
    blocks = 0
    for top in path.iterdir() if path.is_dir() else []:
        if top.name.startswith(prefix):
            files = [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file()]
            for f in files:
                try:
                    blocks += f.stat().st_blocks
                except OSError:  # a RocksDB file compacted away meanwhile
                    pass
    return blocks * 512 / 2**20


def try_scrape(worker: WorkerProcess) -> Samples | None:
    """/metrics, or None while the worker is not answering. Generous timeout: the page is
    served by the event loop, which recovery and index builds keep busy."""
    if worker.proc is not None and worker.proc.poll() is not None:
        raise RuntimeError(f"worker exited with {worker.proc.returncode}\n{worker.log_tail()}")
    try:
        return scrape(worker.metrics_url, timeout=30)
    except OSError:
        return None


def start_worker(worker: WorkerProcess, label: str, timeout: float,
                 trace: list[list]) -> dict[str, float]:
    """Start the worker and wait until its index is served and its table recovered (the
    events agent consumes only after both). Times are from process start: `web_s` is the
    first /metrics answer (Faust app started, recovery about to begin)."""
    t0 = time.monotonic()
    worker.start()
    assert worker.proc is not None
    pid, data_dir = worker.proc.pid, worker.settings.data_dir
    marks: dict[str, float] = {}
    cols = (TextColumn(f"{label:<12}"), TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with Progress(*cols, console=console) as bar:
        task = bar.add_task(label, total=None, info="starting")
        while not {"index_s", "recovered_s"} <= marks.keys():
            m = try_scrape(worker)
            el = time.monotonic() - t0
            rss = rss_mb(pid)
            trace.append([round(el, 1), round(rss, 1), label])
            if m is not None:
                marks.setdefault("web_s", el)
                if total(m, "streamrec_index_version") >= 1:
                    marks.setdefault("index_s", el)
                if total(m, RECOVERED) >= 1:
                    marks.setdefault("recovered_s", el)
            bar.update(task, info=(
                f"RSS {rss:,.0f} MB, RocksDB {disk_mb(data_dir):,.0f} MB, index "
                f"{'ready' if 'index_s' in marks else 'loading'}, table "
                f"{'recovered' if 'recovered_s' in marks else 'recovering'}"))
            if el > timeout:
                raise TimeoutError(f"{label}: not ready after {timeout:.0f}s\n"
                                   f"{worker.log_tail()}")
            time.sleep(1.0)
    return {k: round(v, 1) for k, v in marks.items()}


def run_events(s: Settings, worker: WorkerProcess, events: BenchEvents, n: int,
               timeout: float, trace: list[list], t_offset: float) -> dict[str, Any]:
    """Publish `n` events, then follow the worker's counters until it consumed them all (or
    `timeout`). Returns counts, seconds and the index rebuilds meanwhile."""
    assert worker.proc is not None
    pid = worker.proc.pid
    m0 = worker.metrics()
    t0 = time.monotonic()
    publish(s, s.topic(s.events_topic), event_records(
        events.take(n, now_ms=lambda: time.time() * 1000)), total=n, label="events")
    cols = (TextColumn(f"{'consuming':<12}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    m = m0
    with Progress(*cols, console=console) as bar:
        task = bar.add_task("consume", total=n, info="")
        while time.monotonic() - t0 < timeout:
            m = try_scrape(worker) or m
            rss = rss_mb(pid)
            trace.append([round(time.monotonic() - t0 + t_offset, 1), round(rss, 1), "events"])
            done = total(m, "streamrec_events_total")
            bar.update(task, completed=done, info=f"RSS {rss:,.0f} MB, index v"
                                                  f"{total(m, 'streamrec_index_version'):.0f}")
            if done >= n:
                break
            time.sleep(1.0)
    return {
        "events_sent": n,
        "events_consumed": int(total(m, "streamrec_events_total")),
        "events_applied": int(total(m, "streamrec_events_total", outcome="applied")),
        "events_dlq": int(total(m, "streamrec_events_total", outcome="dlq")),
        "events_duplicate": int(total(m, "streamrec_events_total", outcome="duplicate")),
        "events_complete": total(m, "streamrec_events_total") >= n,
        "events_s": round(time.monotonic() - t0, 1),
        "index_rebuilds": int(total(m, "streamrec_index_version")
                              - total(m0, "streamrec_index_version")),
    }


def index_kind(s: Settings, n_items: int) -> str:
    """The kind the worker's index has: IndexConfig's 'auto' rule (index/faiss_index.py
    `_choose_kind`; the worker neither logs it at level warning nor exports it), on the CPU."""
    kind = s.index.kind
    if kind == "auto":
        kind = "hnsw" if n_items >= s.index.hnsw_threshold else "flat"
    return kind


# --------------------------------------------------------------------------- report


def print_tables(doc: dict) -> None:
    t = Table(title=f"Bytes of state per user (UserState.to_bytes, history "
                    f"{doc['history_len']}, residual {doc['residual_dim']} x float32)",
              box=box.SIMPLE_HEAD)
    for col in ("state", "min", "mean", "max"):
        t.add_column(col, justify="left" if col == "state" else "right")
    names = {"no_texts": "full history, no search texts",
             "with_texts": f"full history, {doc['text_share']:.0%} searches "
                           f"({doc['text_dim']}-d text as float16)",
             "preloaded": "pre-loaded users (20-50 events, 2% searches)"}
    for key, name in names.items():
        v = doc["state_bytes"][key]
        t.add_row(name, f"{v['min']:,}", f"{v['mean']:,.0f}", f"{v['max']:,}")
    console.print(t)
    w = Table(title=f"One worker: {doc['users']:,} users, {doc['items']:,} items",
              box=box.SIMPLE_HEAD)
    w.add_column("measure")
    w.add_column("value", justify="right")

    def mb(x: float | None) -> str:
        return "-" if x is None else f"{x:,.0f} MB"

    rows = [
        ("users / items", f"{doc['users']:,} / {doc['items']:,}"),
        ("index kind", doc["index_kind"]),
        ("bytes/user in the store (mean)", f"{doc['bytes_per_user_mean']:,.0f}"),
        ("changelog payload", f"{doc['changelog_bytes'] / 2**20:,.0f} MB"),
        ("changelog on the broker's disk", mb(doc["changelog_disk_mb"])),
        ("RocksDB on disk (ready / end)", f"{mb(doc['rocksdb_mb'])} / {mb(doc['rocksdb_mb_end'])}"),
        ("worker RSS, no users (--baseline)", mb(doc["baseline_rss_mb"])),
        ("worker RSS after ready", mb(doc["rss_ready_mb"])),
        ("RSS added per user (vs --baseline)", "-" if doc["rss_per_user_bytes"] is None
         else f"{doc['rss_per_user_bytes']:,.0f} bytes"),
        ("worker RSS after events", mb(doc["rss_after_events_mb"])),
        ("worker peak RSS (baseline)",
         f"{mb(doc['peak_rss_mb'])} ({mb(doc['baseline_peak_rss_mb'])})"),
        ("start-up s: index / table ready",
         f"{doc['index_ready_s']:.0f} / {doc['startup_s']:.0f}"),
        ("table recovery", f"{doc['recovery_s']:.0f} s, "
                           f"{doc['recovery_records_per_s']:,.0f} records/s"
         + (f" (empty: {b['recovered_s'] - b.get('web_s', 0):.0f} s)"
            if (b := doc["baseline_startup"]) else "")),
        ("events consumed / applied / sent",
         f"{doc['events_consumed']:,} / {doc['events_applied']:,} / {doc['events_sent']:,}"
         f" in {doc['events_s']:.0f} s"),
        ("index rebuilds during the events", f"{doc['index_rebuilds']}"),
        ("longest loop stall: to ready / events",
         f"{doc['loop_stall_max_ms_ready']:,.0f} / <= {doc['loop_stall_max_ms_events']:g} ms"),
    ]
    for k, v in rows:
        w.add_row(k, v)
    w.caption = ("start-up times from process start; recovery: first /metrics answer -> "
                 "Faust rebalance done")
    console.print(w)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for phase in dict.fromkeys(p for _, _, p in doc["rss_trace"]):
        pts = [(t, r) for t, r, p in doc["rss_trace"] if p == phase]
        ax.plot([t for t, _ in pts], [r for _, r in pts], marker=".", label=phase)
    for key, label, y in (("index_ready_s", "index ready", 0.02),
                          ("startup_s", "table recovered", 0.5)):
        ax.axvline(doc[key], color="grey", linestyle="--", linewidth=1)
        ax.annotate(label, (doc[key], y), xycoords=("data", "axes fraction"), rotation=90,
                    fontsize=8)
    ax.set_xlabel("seconds since the worker started")
    ax.set_ylabel("RSS (MB)")
    ax.set_title(f"Worker RSS: {doc['users']:,} users, {doc['items']:,} items "
                 f"({doc['index_kind']}), then {doc['events_sent']:,} events")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


# --------------------------------------------------------------------------- main


def _parse_args() -> tuple[argparse.Namespace, dict[str, str]]:
    """The command line: the options and the worker's extra environment."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1_000_000, help="users with pre-loaded state")
    ap.add_argument("--items", type=int, default=100_000,
                    help="catalog size (from IndexConfig.hnsw_threshold = 500,000 the index "
                    "is HNSW, whose build takes minutes on 2 cores)")
    ap.add_argument("--events", type=int, default=20_000, help="events of random users")
    ap.add_argument("--text-share", type=float, default=0.1,
                    help="share of searches in the 'with texts' state size")
    ap.add_argument("--samples", type=int, default=500, help="states per size variant")
    ap.add_argument("--templates", type=int, default=4096,
                    help="distinct pre-loaded states cycled over the users")
    ap.add_argument("--baseline", action="store_true",
                    help="first run a worker with the catalog and no users (RSS baseline)")
    ap.add_argument("--startup-timeout", type=float, default=3600.0)
    ap.add_argument("--events-timeout", type=float, default=3600.0)
    ap.add_argument("--worker-env", action="append", metavar="KEY=VALUE",
                    help="extra environment of the worker (repeatable)")
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    try:
        extra_env = worker_env(args.worker_env)
    except ValueError as exc:
        ap.error(str(exc))
    return args, extra_env


def _part1_state_sizes(args: argparse.Namespace, info: dict) -> tuple[
        LearnerConfig, tuple[int, int], SyntheticWorld, dict, list[bytes]]:
    """Part 1 (no broker): state sizes, and the pre-loaded states of part 2."""
    cfg = LearnerConfig()
    dims = model_dims(cfg)
    world = make_world(args.items, n_topics=16, seed=1)
    item_ids = [it["item_id"] for it in world.items]
    partitions = Settings().partitions
    sizes = state_sizes(item_ids, cfg, dims, args.text_share, args.samples, partitions)
    # Pre-loaded states carry no applied offsets: the events topic starts empty, so any
    # stored offset would make the measured events count as replays (`duplicate`).
    rng = np.random.default_rng(11)
    templates = [make_state(rng, item_ids, int(rng.integers(20, 51)), 0.02, dims,
                            cfg.history_len, {}).to_bytes() for _ in range(args.templates)]
    sizes["preloaded"] = stats([len(t) for t in templates])
    console.print(f"state sizes: {sizes}; load average {info['loadavg_1m_at_start']}")
    return cfg, dims, world, sizes, templates


def _part2_worker(args: argparse.Namespace, out: Path, extra_env: dict[str, str],
                  world: SyntheticWorld, dims: tuple[int, int], templates: list[bytes],
                  trace: list[list]) -> tuple[Settings, dict[str, Any]]:
    """Part 2: broker, item vectors, --baseline, users' states, measured worker."""
    from streams.broker import EmbeddedKafka

    with tempfile.TemporaryDirectory(prefix="streamrec-memory-") as tmp_s, \
            EmbeddedKafka() as kafka:
        tmp = Path(tmp_s)
        common: dict[str, Any] = dict(broker=kafka.url, topic_prefix="mem.",
                                      log_level="warning")
        s = Settings(app_id="memory-bench", data_dir=tmp / "worker",
                     metrics_port=free_port(), **common)
        ensure_topics(s)
        changelog = f"{s.app_id}-user-state-changelog"  # Faust: {app id}-{table}-changelog
        create_topics(s.bootstrap, {changelog: {"partitions": s.partitions,
                                                "config": {"cleanup.policy": "compact"}}},
                      **s.kafka_security())
        console.print(f"broker {kafka.bootstrap} (pid {kafka.pid}); data {kafka.data_dir}")
        _, items_s = load(s, s.topic(s.item_vectors_topic),
                          item_vector_records(world.items, dims[1]), args.items, "item vectors")
        baseline_rss, baseline_peak, baseline = (
            _baseline(args, out, extra_env, tmp, common, trace) if args.baseline
            else (None, None, {}))
        events = BenchEvents(world, args.users, seed=2)
        changelog_bytes, preload_s = load(s, changelog,
                                          state_records(events.user_ids, templates),
                                          args.users, "user states")
        changelog_disk = disk_mb(kafka.data_dir / "logs", changelog)
        meas = _measured_worker(args, out, extra_env, s, events, trace)
        rocks_end = disk_mb(s.data_dir)
    return s, {**meas, "items_s": items_s, "baseline_rss": baseline_rss,
               "baseline_peak": baseline_peak, "baseline": baseline,
               "changelog_bytes": changelog_bytes, "preload_s": preload_s,
               "changelog_disk": changelog_disk, "rocks_end": rocks_end}


def _baseline(args: argparse.Namespace, out: Path, extra_env: dict[str, str], tmp: Path,
              common: dict[str, Any], trace: list[list]
              ) -> tuple[float, float, dict[str, float]]:
    """--baseline: a worker with the catalog and no users, for the RSS users add."""
    b = Settings(app_id="memory-baseline", data_dir=tmp / "baseline",
                 metrics_port=free_port(), **common)
    first_snapshot(b, out / "memory-baseline-trainer.log")
    bw = WorkerProcess(b, out / "memory-baseline-worker.log", extra_env)
    try:
        baseline = start_worker(bw, "baseline", args.startup_timeout, trace)
        assert bw.proc is not None
        baseline_rss = round(rss_mb(bw.proc.pid), 1)
        baseline_peak = round(peak_rss_mb(bw.proc.pid), 1)
    finally:
        bw.stop()
    return baseline_rss, baseline_peak, baseline


def _measured_worker(args: argparse.Namespace, out: Path, extra_env: dict[str, str],
                     s: Settings, events: BenchEvents, trace: list[list]) -> dict[str, Any]:
    """The measured worker: recovery of every state, RSS, then the events."""
    log_path = out / "memory-worker.log"
    log_path.unlink(missing_ok=True)
    first_snapshot(s, out / "memory-trainer.log")
    worker = WorkerProcess(s, log_path, extra_env)
    try:
        marks = start_worker(worker, "worker", args.startup_timeout, trace)
        assert worker.proc is not None
        pid = worker.proc.pid
        rss_ready = round(rss_mb(pid), 1)
        rocks_ready = disk_mb(s.data_dir)
        m = worker.metrics()
        n_index = int(total(m, "streamrec_index_items"))
        stall_ready, at_ready = total(m, STALL_MAX), take_sample(worker)
        console.print(f"ready: RSS {rss_ready:,.0f} MB, RocksDB {rocks_ready:,.0f} MB, "
                      f"{n_index:,} items in the index, marks {marks}")
        ev = run_events(s, worker, events, args.events, args.events_timeout, trace,
                        trace[-1][0] if trace else 0.0)
        rss_events = round(rss_mb(pid), 1)
        peak = round(peak_rss_mb(pid), 1)
        stall_events = hist_max(at_ready.stall_buckets, take_sample(worker).stall_buckets)
    finally:
        worker.stop()
    return {"marks": marks, "rss_ready": rss_ready, "rocks_ready": rocks_ready,
            "n_index": n_index, "ev": ev, "rss_events": rss_events, "peak": peak,
            "stall_ms": (round(stall_ready * 1000, 1), round(stall_events * 1000, 1))}


def _document(args: argparse.Namespace, cfg: LearnerConfig, dims: tuple[int, int],
              sizes: dict, s: Settings, m: dict[str, Any], extra_env: dict[str, str],
              trace: list[list], info: dict, t_begin: float) -> dict:
    """The contents of memory.json, from part 1's sizes and part 2's measurements `m`."""
    marks, baseline_rss = m["marks"], m["baseline_rss"]
    recovery_s = max(marks["recovered_s"] - marks.get("web_s", 0.0), 1e-9)
    return {
        "benchmark": "memory",
        "users": args.users,
        "items": args.items,
        "index_items": m["n_index"],
        "index_kind": index_kind(s, args.items),
        "history_len": cfg.history_len,
        "residual_dim": dims[0],
        "text_dim": dims[1],
        "text_share": args.text_share,
        "state_bytes": sizes,
        "bytes_per_user_mean": sizes["preloaded"]["mean"],
        "changelog_bytes": m["changelog_bytes"],
        "changelog_disk_mb": round(m["changelog_disk"], 1),
        "rocksdb_mb": round(m["rocks_ready"], 1),
        "rocksdb_mb_end": round(m["rocks_end"], 1),
        "baseline_rss_mb": baseline_rss,
        "baseline_peak_rss_mb": m["baseline_peak"],
        "baseline_startup": m["baseline"],
        "rss_ready_mb": m["rss_ready"],
        "rss_after_events_mb": m["rss_events"],
        "peak_rss_mb": m["peak"],
        "loop_stall_max_ms_ready": m["stall_ms"][0],
        "loop_stall_max_ms_events": m["stall_ms"][1],
        "rss_per_user_bytes": (round((m["rss_ready"] - baseline_rss) * 2**20 / args.users, 1)
                               if baseline_rss else None),
        "startup_s": marks["recovered_s"],
        "index_ready_s": marks["index_s"],
        "web_s": marks.get("web_s"),
        "recovery_s": round(recovery_s, 1),
        "recovery_records_per_s": round(args.users / recovery_s, 1),
        "item_vectors_publish_s": round(m["items_s"], 1),
        "preload_s": round(m["preload_s"], 1),
        "preload_records_per_s": round(args.users / max(m["preload_s"], 1e-9), 1),
        **m["ev"],
        "worker_env": extra_env,
        "rss_trace": trace,
        "machine": info,
        "wall_s": round(time.monotonic() - t_begin, 1),
    }


def _report(doc: dict, ev: dict[str, Any], out: Path) -> None:
    """Results out: memory.json and memory.png written, the tables printed."""
    (out / "memory.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    plot(doc, out / "memory.png")
    print_tables(doc)
    if not ev["events_complete"] or ev["events_applied"] < ev["events_sent"]:
        console.print(f"[yellow]events: {ev['events_consumed']:,} consumed, "
                      f"{ev['events_applied']:,} applied of {ev['events_sent']:,} sent "
                      f"({ev['events_dlq']:,} DLQ, {ev['events_duplicate']:,} duplicate)[/]")
    console.print(f"wall time {doc['wall_s']:.0f}s; results in {out}/memory.json, "
                  f"{out}/memory.png")


def main() -> None:
    args, extra_env = _parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_begin = time.monotonic()
    info = machine()
    cfg, dims, world, sizes, templates = _part1_state_sizes(args, info)
    trace: list[list] = []
    s, m = _part2_worker(args, out, extra_env, world, dims, templates, trace)
    doc = _document(args, cfg, dims, sizes, s, m, extra_env, trace, info, t_begin)
    _report(doc, m["ev"], out)


if __name__ == "__main__":
    main()
