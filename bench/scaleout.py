"""Scale-out benchmarks: serving workers + the trainer on the embedded broker.

    .venv/bin/python -m bench.scaleout [throughput|trainer|snapshot|ready|failover|all]
                                       [--out bench/out] [options of each, see --help]

- throughput: a backlog drained by 1, then 2 serving workers plus the trainer: events/s
  applied (all workers), the trainer's examples/s meanwhile, and how long the first
  worker's /metrics (the liveness probe) takes to answer during its 500-event batches.
- trainer: a backlog of training examples (cut from a synthetic stream as workers cut them)
  trained by `streamrec trainer --ranks K`, K = 1 and 2: examples/s.
- snapshot: the trainer's base snapshot at 100,000 items: bytes and encode + publish time,
  and the size of the deltas that follow.
- ready: a new serving worker's time from process start to /ready 200, with 10,000 and
  100,000 items (item vectors and the trainer's base snapshot already in Kafka).
- failover: two workers holding 100,000 users' state; one is SIGKILLed; the time until a
  probe event on each of its partitions gets a recommendation again, with
  table_standby_replicas 0 and 1.
Catalogs are random vectors written straight to item-vectors (the encoder is not what these
measure). Prints a table per part and writes scaleout.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import orjson
import xxhash
from rich.console import Console
from rich.table import Table

from bench._common import BenchEvents, cpu_seconds, machine
from evaluation.synthetic import make_world
from models.encoder import encoder_dim
from models.examples import Interaction, observe
from models.model import SharedModel
from models.user_state import UserState
from streams.catalog import encode_item_vector
from streams.clients import kafka_consumer, kafka_producer
from streams.ports import free_port
from streams.publish import event_records, publish
from streams.settings import Settings
from streams.supervisor import TrainerProcess, WorkerProcess, scrape, total
from streams.topics import ensure_topics

console = Console()


# ---------------------------------------------------------------------- shared parts
def settings(kafka, tmp: Path, name: str, **kw: object) -> Settings:
    return Settings(broker=kafka.url, app_id=f"so-{name}", topic_prefix=f"so-{name}.",
                    data_dir=tmp / name, metrics_port=free_port(),
                    trainer_metrics_port=free_port(), log_level="warning", **kw)


def publish_vectors(s: Settings, n_items: int, seed: int = 0,
                    ids: list[str] | None = None) -> list[str]:
    """`n_items` random unit text vectors on item-vectors (as the catalog agent writes them),
    for `ids` (default: item-0000000, ...)."""
    dim = encoder_dim(s.encoder_path)
    rng = np.random.default_rng(seed)
    ids = ids or [f"item-{k:07d}" for k in range(n_items)]

    def records() -> Iterator[tuple[bytes, bytes]]:
        for k in range(0, n_items, 10_000):
            vecs = rng.standard_normal((min(10_000, n_items - k), dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            for item_id, vec in zip(ids[k:k + 10_000], vecs, strict=True):
                yield item_id.encode(), encode_item_vector(item_id, item_id, vec)

    publish(s, s.topic(s.item_vectors_topic), records(), total=n_items, label="item vectors")
    return ids


@contextmanager
def running(*procs: WorkerProcess) -> Iterator[None]:
    for p in procs:
        p.start()
    try:
        yield
    finally:
        for p in procs:
            p.stop()


def rate_while(get, target: float, timeout: float, interval: float = 0.5
               ) -> tuple[float, float, float]:
    """Sample `get()` until it reaches `target`: (events/s over first progress -> target,
    seconds, final value)."""
    deadline = time.monotonic() + timeout
    start = get()
    t_first = v_first = None
    value = start
    while time.monotonic() < deadline:
        time.sleep(interval)
        value = get()
        if t_first is None and value > start:
            t_first, v_first = time.monotonic(), value
        if value >= target:
            break
    if t_first is None:
        return 0.0, 0.0, value
    took = time.monotonic() - t_first
    return (value - v_first) / max(took, 1e-9), took, value


@contextmanager
def probing(url: str, every_s: float = 0.2) -> Iterator[list[float]]:
    """Time a GET of `url` every `every_s` while the block runs (as a liveness probe would);
    yields the list the answer times go into (a probe that fails counts as 10 s)."""
    times: list[float] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every_s):
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - ours
                    resp.read()
                times.append(time.monotonic() - t0)
            except OSError:
                times.append(10.0)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield times
    finally:
        stop.set()
        thread.join()


def table(title: str, columns: list[str], rows: list[list]) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right" if c != columns[0] else "left")
    for r in rows:
        t.add_row(*[f"{x:,.1f}" if isinstance(x, float) else str(x) for x in r])
    console.print(t)


# ---------------------------------------------------------------------- parts
def throughput(kafka, tmp: Path, args: argparse.Namespace) -> dict:
    """1 then 2 serving workers + the trainer, each run its own topics and backlog."""
    out = {}
    world = make_world(args.items, n_topics=16, seed=1)
    for n in (1, 2):
        s = settings(kafka, tmp, f"tp{n}", batch_size=500)
        ensure_topics(s)
        publish_vectors(s, args.items, ids=[it["item_id"] for it in world.items])
        sent = publish(s, s.topic(s.events_topic), event_records(
            BenchEvents(world, args.users, seed=2).take(args.events)), total=args.events,
            label=f"backlog ({n} worker{'s' if n > 1 else ''})")
        trainer = TrainerProcess(s, tmp / f"tp{n}-trainer.log")
        workers = [WorkerProcess(s if k == 0 else s.model_copy(update={
            "metrics_port": free_port(), "data_dir": tmp / f"tp{n}-w{k}"}),
            tmp / f"tp{n}-worker{k}.log") for k in range(n)]
        with running(trainer, *workers):
            trainer.wait_ready(timeout=600)
            for w in workers:
                w.wait_ready(timeout=600)
            pids = [w.proc.pid for w in workers] + [trainer.proc.pid, kafka.pid]
            cpu0 = sum(cpu_seconds(p) for p in pids)
            with probing(workers[0].metrics_url) as answer_s:
                eps, took, done = rate_while(lambda ws=workers: sum(
                    total(w.metrics(), "streamrec_events_total") for w in ws), sent,
                    args.max_seconds)
            cpu = (sum(cpu_seconds(p) for p in pids) - cpu0) / max(took, 1e-9) * 100
            trained = total(trainer.metrics(), "streamrec_trainer_trained")
        out[f"workers_{n}"] = {"events_per_s": round(eps, 1), "seconds": round(took, 1),
                               "consumed": done, "trained_at_end": trained,
                               "trainer_examples_per_s": round(trained / max(took, 1e-9), 1),
                               "cpu_pct_all": round(cpu, 1),
                               "metrics_answer_s": {
                                   "probes": len(answer_s),
                                   "p99": round(float(np.quantile(answer_s, 0.99)), 3),
                                   "max": round(max(answer_s), 3)}}
    table("serving workers + trainer, one backlog each", ["workers", "events/s", "seconds",
          "trainer examples/s", "CPU % (all)", "/metrics p99 s", "/metrics max s"],
          [[n, o["events_per_s"], o["seconds"], o["trainer_examples_per_s"], o["cpu_pct_all"],
            o["metrics_answer_s"]["p99"], o["metrics_answer_s"]["max"]]
           for n, o in ((n, out[f"workers_{n}"]) for n in (1, 2))])
    return out


def examples_backlog(s: Settings, n_items: int, n: int, users: int) -> int:
    """`n` training examples as workers cut them, on their source partition."""
    model = SharedModel(s.learner, encoder_dim(s.encoder_path))
    ids = [f"item-{k:07d}" for k in range(n_items)]
    model.upsert_items(ids, np.zeros((n_items, model.text_dim), np.float32))
    rng = np.random.default_rng(3)
    states: dict[str, UserState] = {}
    offsets = [0] * s.partitions
    producer = kafka_producer(s, linger_ms=50)
    topic = s.topic(s.training_examples_topic)
    for k in range(n):
        u = f"u{int(rng.integers(users))}"
        p = xxhash.xxh64_intdigest(u.encode()) % s.partitions
        item = ids[int(rng.zipf(1.3)) % n_items]
        ev = Interaction(u, item, "view", 1_700_000_000_000 + 1000 * k, partition=p,
                         offset=offsets[p])
        offsets[p] += 1
        states.setdefault(u, UserState())
        for ex in observe(model, [ev], states).examples:
            producer.send(topic, key=u.encode(), value=ex.to_bytes(), partition=p)
    producer.flush()
    producer.close()
    return n


def trained_by_ranks(proc: TrainerProcess, ranks: int) -> float:
    """Examples trained by all `ranks` local ranks (rank r serves /metrics on port + r)."""
    base = proc.metrics_url.rsplit(":", 1)[0]
    return sum(total(scrape(f"{base}:{proc.port + r}/metrics"), "streamrec_trainer_trained")
               for r in range(ranks))


def trainer(kafka, tmp: Path, args: argparse.Namespace) -> dict:
    out = {}
    for k in (1, 2):
        s = settings(kafka, tmp, f"tr{k}")
        ensure_topics(s)
        publish_vectors(s, args.items)
        n = examples_backlog(s, args.items, args.examples, args.users)
        proc = TrainerProcess(s, tmp / f"tr{k}.log", args=["--ranks", str(k)])
        with running(proc):
            proc.wait_ready(timeout=600)
            eps, took, done = rate_while(lambda p=proc, k=k: trained_by_ranks(p, k), n,
                                         args.max_seconds)
        out[f"ranks_{k}"] = {"examples_per_s": round(eps, 1), "seconds": round(took, 1),
                             "trained": done}
    table("trainer examples/s", ["ranks", "examples/s", "seconds", "trained"],
          [[k, out[f"ranks_{k}"]["examples_per_s"], out[f"ranks_{k}"]["seconds"],
            out[f"ranks_{k}"]["trained"]] for k in (1, 2)])
    return out


def snapshot(kafka, tmp: Path, args: argparse.Namespace) -> dict:
    s = settings(kafka, tmp, "snap", snapshot_interval_s=2.0)
    ensure_topics(s)
    publish_vectors(s, args.big_items)
    proc = TrainerProcess(s, tmp / "snap-trainer.log")
    with running(proc):
        t0 = time.monotonic()
        samples = proc.wait_ready(timeout=900)
        base_bytes = total(samples, "streamrec_snapshot_bytes", kind="base")
        base_s = total(samples, "streamrec_snapshot_publish_seconds_sum")
        ready_s = time.monotonic() - t0
        examples_backlog(s, args.big_items, 20_000, args.users)
        proc.wait_for("streamrec_model_version", 3, timeout=600)
        samples = proc.metrics()
        deltas = total(samples, "streamrec_snapshot_publish_seconds_count") - 1
        delta_s = (total(samples, "streamrec_snapshot_publish_seconds_sum") - base_s) / deltas
        delta_bytes = total(samples, "streamrec_snapshot_bytes", kind="delta")
    out = {"items": args.big_items, "base_bytes": base_bytes, "base_publish_s": round(base_s, 2),
           "delta_bytes_last": delta_bytes, "delta_publish_s_mean": round(delta_s, 3),
           "trainer_start_to_first_snapshot_s": round(ready_s, 1)}
    table(f"snapshots at {args.big_items:,} items", ["kind", "bytes", "encode + publish s"],
          [["base", f"{base_bytes:,.0f}", round(base_s, 2)],
           ["delta (20k examples, last)", f"{delta_bytes:,.0f}", round(delta_s, 3)]])
    return out


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - ours
            return resp.status == 200
    except OSError:
        return False


def ready(kafka, tmp: Path, args: argparse.Namespace) -> dict:
    out = {}
    for n_items in (10_000, args.big_items):
        s = settings(kafka, tmp, f"ready{n_items}")
        ensure_topics(s)
        publish_vectors(s, n_items)
        proc = TrainerProcess(s, tmp / f"ready{n_items}-trainer.log")
        with running(proc):
            proc.wait_ready(timeout=900)
            worker = WorkerProcess(s, tmp / f"ready{n_items}-worker.log")
            t0 = time.monotonic()
            with running(worker):
                url = worker.metrics_url.rsplit("/", 1)[0] + "/ready"
                while not _ready(url):
                    worker._check_alive()
                    if time.monotonic() - t0 > 900:
                        raise TimeoutError(worker.log_tail())
                    time.sleep(0.2)
                took = time.monotonic() - t0
        out[f"items_{n_items}"] = round(took, 1)
    table("time to /ready of a new serving worker", ["items", "seconds"],
          [[f"{k[6:]}", v] for k, v in out.items()])
    return out


def failover(kafka, tmp: Path, args: argparse.Namespace) -> dict:
    out = {}
    for standby in (0, 1):
        s = settings(kafka, tmp, f"fo{standby}", table_standby_replicas=standby,
                     session_timeout_s=10.0)
        ensure_topics(s)
        publish_vectors(s, 2000)
        now = int(time.time() * 1000)
        users = [f"fo-{k:07d}" for k in range(args.failover_users)]
        publish(s, s.topic(s.events_topic), event_records(
            {"user_id": u, "item_id": f"item-{k % 2000:07d}", "event_type": "view",
             "ts": now + k} for k, u in enumerate(users)), total=len(users), label="state")
        trainer = TrainerProcess(s, tmp / f"fo{standby}-trainer.log")
        a = WorkerProcess(s, tmp / f"fo{standby}-a.log")
        b = WorkerProcess(s.model_copy(update={"metrics_port": free_port(),
                                               "data_dir": tmp / f"fo{standby}-b"}),
                          tmp / f"fo{standby}-b.log")
        with running(trainer, a, b):
            for w in (trainer, a, b):
                w.wait_ready(timeout=900)
            rate_while(lambda ws=(a, b): sum(total(w.metrics(), "streamrec_events_total")
                                             for w in ws), len(users), 1800)
            time.sleep(5 * s.session_timeout_s)  # standbys catch up, rebalances settle
            took = _kill_and_probe(s, b, users)
        out[f"standby_{standby}"] = round(took, 1)
    table(f"failover after SIGKILL, {args.failover_users:,} users", ["standby replicas",
          "seconds to serve the dead worker's partitions again"],
          [[k[8:], v] for k, v in out.items()])
    return out


def _kill_and_probe(s: Settings, victim: WorkerProcess, users: list[str]) -> float:
    """SIGKILL `victim`, then send one probe event per partition every 0.5 s until each
    partition's probe gets a recommendation; seconds from the kill to the last of them."""
    from kafka.partitioner import murmur2

    parts = list(range(s.partitions))
    probe = {}
    for u in users:  # a user (with state) on every partition
        probe.setdefault(parts[(murmur2(u.encode()) & 0x7FFFFFFF) % len(parts)], u)
    probe_users = set(probe.values())
    seen: dict[str, float] = {}
    stop = threading.Event()
    kill_ms = [float("inf")]  # set at the kill: recommendations after it count

    def watch() -> None:
        consumer = kafka_consumer(s, s.topic(s.recommendations_topic),
                                  auto_offset_reset="latest", enable_auto_commit=False)
        try:
            while not stop.is_set():
                for msgs in consumer.poll(timeout_ms=200).values():
                    for m in msgs:
                        user = orjson.loads(m.value)["user_id"]
                        if user in probe_users and user not in seen and \
                                m.timestamp > kill_ms[0]:
                            seen[user] = time.monotonic()
        finally:
            consumer.close()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(3)  # the watcher is at the end of the topic
    producer = kafka_producer(s)
    kill_ms[0] = int(time.time() * 1000)
    t_kill = time.monotonic()
    victim.kill()
    try:
        while len(seen) < len(probe_users) and time.monotonic() - t_kill < 600:
            for user in probe_users - set(seen):
                producer.send(s.topic(s.events_topic), key=user.encode(), value=orjson.dumps(
                    {"user_id": user, "item_id": "item-0000001", "event_type": "view",
                     "ts": int(time.time() * 1000)}))
            producer.flush()
            time.sleep(0.5)
    finally:
        stop.set()
        producer.close()
    return max(seen.values()) - t_kill if len(seen) == len(probe_users) else float("nan")


PARTS = {"throughput": throughput, "trainer": trainer, "snapshot": snapshot, "ready": ready,
         "failover": failover}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="*", default=["all"], choices=[*PARTS, "all"])
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--events", type=int, default=60_000, help="throughput backlog")
    ap.add_argument("--users", type=int, default=30_000)
    ap.add_argument("--items", type=int, default=2_000, help="catalog of throughput/trainer")
    ap.add_argument("--examples", type=int, default=30_000, help="trainer backlog")
    ap.add_argument("--big-items", type=int, default=100_000, help="snapshot/ready catalog")
    ap.add_argument("--failover-users", type=int, default=100_000)
    ap.add_argument("--max-seconds", type=float, default=900.0)
    args = ap.parse_args()
    parts = list(PARTS) if "all" in args.parts else args.parts
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scaleout.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc["machine"] = machine()
    from streams.broker import EmbeddedKafka

    with tempfile.TemporaryDirectory(prefix="streamrec-scaleout-") as tmp_s, \
            EmbeddedKafka(heap="1g") as kafka:
        for name in parts:
            t0 = time.monotonic()
            doc[name] = PARTS[name](kafka, Path(tmp_s), args) | {
                "wall_s": round(time.monotonic() - t0)}
            path.write_text(json.dumps(doc, indent=2))
    console.print(f"results in {path}")


if __name__ == "__main__":
    main()
