"""Soak benchmark: one worker on the embedded broker under a steady synthetic stream.

    .venv/bin/python -m bench.soak [--minutes 10] [--rate 200] [--no-trainer] [--out bench/out]

Starts the embedded Apache Kafka broker, the trainer and one worker process, loads a
synthetic catalog, then replays a synthetic event stream (evaluation/synthetic.py, wall-clock
timestamps) at a steady rate for --minutes. The trainer runs throughout, as deployed, so the
worker swaps in every snapshot it publishes, with its co-visitation counts: the paths a leak
would most likely hide in. `--no-trainer` stops it after the first snapshot (the worker then
serves that one alone, and its co-visitation counts stay as they were).

Every --sample-s seconds it records the worker's resident memory (VmRSS from /proc) and its
counters. Prints the RSS after warm-up and at the end, and the least-squares slope of RSS
over the post-warm-up samples (MB/hour): a leak shows as a slope that stays positive run
after run. Writes soak.json and soak.png (RSS over time) to --out.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import orjson
from rich.progress import (
    BarColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from bench._common import save_figure, start_worker
from evaluation.progress import Progress
from evaluation.synthetic import SyntheticStream, make_world
from streams.broker import EmbeddedKafka
from streams.clients import kafka_producer
from streams.ports import free_port
from streams.publish import publish_items
from streams.settings import Settings
from streams.supervisor import Samples, TrainerProcess, WorkerProcess, total
from streams.topics import ensure_topics


def rss_mb(pid: int) -> float:
    """Resident set size of `pid` in MB (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB/hour (nan with < 2 points)."""
    if len(points) < 2:
        return float("nan")
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx == 0:
        return float("nan")
    sxy = sum((t - mx) * (v - my) for t, v in points)
    return sxy / sxx * 3600.0


def plot(samples: list[dict], warmup_s: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot([p["t_s"] / 60 for p in samples], [p["rss_mb"] for p in samples], marker=".",
            label="worker RSS")
    ax.axvline(warmup_s / 60, color="grey", linestyle="--", label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def _parse_args() -> argparse.Namespace:
    """The command line: duration, rate, sampling, workload size and --out."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="stream duration")
    ap.add_argument("--rate", type=float, default=200.0, help="events per second")
    ap.add_argument("--sample-s", type=float, default=10.0, help="RSS sampling period")
    ap.add_argument("--warmup-s", type=float, default=60.0,
                    help="samples before this are warm-up (capped at a quarter of the run)")
    ap.add_argument("--items", type=int, default=1000, help="catalog size")
    ap.add_argument("--users", type=int, default=2000, help="distinct users")
    ap.add_argument("--trainer", action=argparse.BooleanOptionalAction, default=True,
                    help="keep the trainer running (the worker swaps snapshots)")
    ap.add_argument("--out", default="bench/out")
    return ap.parse_args()


def _soak(args: argparse.Namespace, out: Path, n_events: int, t_begin: float
          ) -> tuple[list[dict], float, Samples, bool]:
    """The run: broker, catalog and worker up, the paced stream, then the drain."""
    with tempfile.TemporaryDirectory(prefix="streamrec-soak-") as tmp, EmbeddedKafka() as kafka:
        s = Settings(broker=kafka.url, app_id="soak", topic_prefix="soak.",
                     data_dir=Path(tmp) / "worker", metrics_port=free_port(),
                     log_level="warning")
        ensure_topics(s)
        world = make_world(args.items, n_topics=12, seed=1)
        stream = SyntheticStream(world, n_users=args.users, seed=2)
        log_path = out / "soak-worker.log"
        log_path.unlink(missing_ok=True)
        trainer = TrainerProcess(s, out / "soak-trainer.log").start()
        worker = WorkerProcess(s, log_path)
        try:
            trainer.wait_ready(timeout=600)  # a worker is ready once it serves a snapshot
            if not args.trainer:
                trainer.stop()
            worker.start()
            publish_items(s, world.items, quiet=True)
            start_worker(worker, len(world.items), timeout=300)
            pid = worker.proc.pid
            print(f"broker {kafka.bootstrap}, worker pid {pid} ready after "
                  f"{time.monotonic() - t_begin:.0f}s; streaming {n_events} events at "
                  f"{args.rate:g}/s for {args.minutes:g} min")
            samples = run_stream(s, worker, stream, n_events, args.rate, args.sample_s)
            # drain: let the worker finish what was sent (bounded wait), one last sample
            drain_start = time.monotonic()
            try:
                worker.wait_for("streamrec_events_total", n_events, timeout=120)
            except TimeoutError:
                pass
            drain_s = time.monotonic() - drain_start
            final = worker.metrics()
            alive = worker.proc.poll() is None
        finally:
            worker.stop()
            trainer.stop()
    return samples, drain_s, final, alive


def _rss_trend(samples: list[dict], warmup_s: float, duration: float) -> dict:
    """The leak analysis: RSS after warm-up and at the end, and the slopes over the run."""
    post = [(p["t_s"], p["rss_mb"]) for p in samples if p["t_s"] >= warmup_s]
    start_rss = post[0][1] if post else float("nan")
    end_rss = samples[-1]["rss_mb"] if samples else float("nan")
    slope = slope_per_hour(post)
    # co-visitation counts grow with traffic by design (toward the co-visited item pairs):
    # RSS net of them is what a leak would show in
    net = [(p["t_s"], p["rss_mb"] - p["covisit_mb"]) for p in samples if p["t_s"] >= warmup_s]
    net_slope = slope_per_hour(net)
    covis = [p["covisit_mb"] for p in samples if p["t_s"] >= warmup_s] or [float("nan")]
    # caches that fill up (RocksDB memtables and block cache, allocator pools) make the early
    # slope steep; a leak keeps its slope, so the second half is the telling part
    late = [(t, v) for t, v in post if t >= duration / 2]
    late_slope = slope_per_hour(late)
    return {"post": post, "start_rss": start_rss, "end_rss": end_rss, "slope": slope,
            "net_slope": net_slope, "covis": covis, "late": late, "late_slope": late_slope}


def _document(args: argparse.Namespace, n_events: int, final: Samples, drain_s: float,
              alive: bool, warmup_s: float, samples: list[dict], r: dict,
              t_begin: float) -> dict:
    """The contents of soak.json, from the run and its RSS trend `r`."""
    late = r["late"]
    return {
        "benchmark": "soak",
        "minutes": args.minutes,
        "rate_per_s": args.rate,
        "events_sent": n_events,
        "events_consumed": total(final, "streamrec_events_total"),
        "events_applied": total(final, "streamrec_events_total", outcome="applied"),
        "events_dlq": total(final, "streamrec_events_total", outcome="dlq"),
        "drain_s": round(drain_s, 1),
        "worker_alive_at_end": alive,
        "warmup_s": warmup_s,
        "sample_s": args.sample_s,
        "rss_start_mb": round(r["start_rss"], 1),
        "rss_end_mb": round(r["end_rss"], 1),
        "rss_max_mb": round(max((p["rss_mb"] for p in samples), default=float("nan")), 1),
        "rss_slope_mb_per_hour": round(r["slope"], 1),
        "rss_slope_second_half_mb_per_hour": round(r["late_slope"], 1),
        "rss_second_half_mb": [late[0][1], late[-1][1]] if late else None,
        "trainer": args.trainer,
        "model_version_start": samples[0]["model_version"] if samples else float("nan"),
        "model_version_end": samples[-1]["model_version"] if samples else float("nan"),
        "covisit_mb_start": r["covis"][0],
        "covisit_mb_end": r["covis"][-1],
        "rss_net_of_covisit_slope_mb_per_hour": round(r["net_slope"], 1),
        "samples": samples,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "wall_s": round(time.monotonic() - t_begin, 1),
    }


def _report(args: argparse.Namespace, doc: dict, r: dict, n_events: int, drain_s: float,
            alive: bool, warmup_s: float, out: Path) -> None:
    """Results out: soak.json and soak.png written, the events and the RSS trend printed."""
    samples, slope, late, covis = doc["samples"], r["slope"], r["late"], r["covis"]
    (out / "soak.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    plot(samples, warmup_s, out / "soak.png",
         f"Worker RSS, {args.rate:g} events/s for {args.minutes:g} min "
         f"(slope {slope:+.1f} MB/h after warm-up)")
    print(f"events: sent {n_events}, consumed {doc['events_consumed']:.0f}, applied "
          f"{doc['events_applied']:.0f} (drain {drain_s:.0f}s); worker alive: {alive}")
    print(f"RSS after warm-up ({warmup_s:.0f}s): {r['start_rss']:.1f} MB; at end: "
          f"{r['end_rss']:.1f} MB; max {doc['rss_max_mb']} MB; slope {slope:+.1f} MB/hour "
          f"({len(r['post'])} samples)")
    if late:
        print(f"second half ({late[0][0] / 60:.0f}-{late[-1][0] / 60:.0f} min): RSS "
              f"{late[0][1]:.1f} -> {late[-1][1]:.1f} MB, slope {r['late_slope']:+.1f} MB/hour")
    print(f"co-visitation counts: {covis[0]:.1f} MB after warm-up, {covis[-1]:.1f} MB at end; "
          f"RSS net of them: slope {r['net_slope']:+.1f} MB/hour")
    print(f"snapshots served: versions {doc['model_version_start']:.0f} -> "
          f"{doc['model_version_end']:.0f} (trainer running: {args.trainer})")
    print(f"wall time {doc['wall_s']:.0f}s; results in {out}/soak.json, {out}/soak.png")


def main() -> None:
    args = _parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    duration = args.minutes * 60
    warmup_s = min(args.warmup_s, duration / 4)
    n_events = int(duration * args.rate)
    t_begin = time.monotonic()
    samples, drain_s, final, alive = _soak(args, out, n_events, t_begin)
    r = _rss_trend(samples, warmup_s, duration)
    doc = _document(args, n_events, final, drain_s, alive, warmup_s, samples, r, t_begin)
    _report(args, doc, r, n_events, drain_s, alive, warmup_s, out)


def run_stream(s: Settings, worker: WorkerProcess, stream: SyntheticStream, n_events: int,
               rate: float, sample_s: float) -> list[dict]:
    """Send `n_events` paced at `rate`/s, sampling the worker every `sample_s` seconds."""
    producer = kafka_producer(s)
    topic = s.topic(s.events_topic)
    samples: list[dict] = []
    failures: list[BaseException] = []
    start = time.monotonic()
    next_sample = start

    def sample(sent: int) -> None:
        m = worker.metrics()
        samples.append({
            "t_s": round(time.monotonic() - start, 2),
            "rss_mb": round(rss_mb(worker.proc.pid), 1),
            "sent": sent,
            "consumed": total(m, "streamrec_events_total"),
            "applied": total(m, "streamrec_events_total", outcome="applied"),
            "covisit_mb": round(total(m, "streamrec_covisit_bytes") / 2**20, 2),
            "model_version": total(m, "streamrec_model_version"),
        })

    columns = (TextColumn("soak"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns) as bar:
        task = bar.add_task("soak", total=n_events, info="")
        events = stream.events(n_events, now_ms=lambda: time.time() * 1000)
        for n, ev in enumerate(events):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            producer.send(topic, key=ev["user_id"].encode(),
                          value=orjson.dumps(ev)).add_errback(failures.append)
            if time.monotonic() >= next_sample:
                if worker.proc.poll() is not None:
                    raise RuntimeError(f"worker exited\n{worker.log_tail()}")
                sample(n)
                next_sample += sample_s
                last = samples[-1]
                bar.update(task, info=f"RSS {last['rss_mb']:.0f} MB, consumed "
                                      f"{last['consumed']:.0f}")
            if n % 50 == 0:
                bar.update(task, completed=n)
        producer.flush()
        bar.update(task, completed=n_events)
        sample(n_events)
    producer.close()
    if failures:
        raise RuntimeError(f"{len(failures)} events not acknowledged: {failures[0]!r}")
    return samples


if __name__ == "__main__":
    main()
