"""`streamrec demo`: the whole product on one machine, with users whose tastes we know.

Embedded Kafka (unless a broker is given) -> a trainer and a worker process -> a synthetic
catalog whose item titles come from latent topics -> a paced stream of users whose interest
topic drifts (plus a few malformed events for the DLQ) -> live recommendations, scored two
ways: against each user's *current* true topic, and against what the user does next (was
the next event's item in the user's latest top 10?). Live output goes to stderr; with --exit
the last stdout line is a JSON summary.

The two scores can move apart. The first trained versions raise the ranker's popularity
weight fast (popular items are what users touch next), and the most popular items of other
topics enter many lists: the topic score dips while the next-event score rises above the
untrained model's. Later versions recover the topic score (README, Quickstart).
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from rich.console import Console

from evaluation.synthetic import (
    SyntheticStream,
    SyntheticWorld,
    bad_events,
    make_world,
    topic_hit_rate,
)
from streams.ports import free_port
from streams.publish import event_records, publish, publish_items
from streams.schemas import scores_a_list
from streams.settings import Settings
from streams.supervisor import TrainerProcess, WorkerProcess, total
from streams.tail import RecommendationTail
from streams.topics import ensure_topics

console = Console(stderr=True)


class NextEventHits:
    """Of the events sent for users who already had a recommendation, the share whose item
    was in the user's latest top `k` at that moment: the online hit rate a deployment would
    count. Searches (no item) and dislikes (not wanted) are not counted."""

    def __init__(self, tail: RecommendationTail, k: int = 10):
        self.tail, self.k = tail, k
        self.events = self.hits = 0

    def observe(self, event: dict) -> None:
        if not scores_a_list(event["event_type"], event["item_id"]):
            return
        with self.tail.lock:
            rec = self.tail.latest.get(event["user_id"])
        if rec is not None:
            self.events += 1
            self.hits += any(it["item_id"] == event["item_id"] for it in rec["items"][: self.k])

    @property
    def rate(self) -> float:
        return self.hits / self.events if self.events else 0.0


def _observed(events: Iterator[dict], hits: NextEventHits) -> Iterator[dict]:
    for ev in events:
        hits.observe(ev)
        yield ev


def _stream_records(stream: SyntheticStream, n: int | None, n_bad: int, hits: NextEventHits
                    ) -> Iterator[tuple[bytes | None, bytes | None]]:
    """Good events stamped with the wall clock as they are sent (and scored against the
    user's latest recommendation just before), bad ones sprinkled in."""
    bad = bad_events(n_bad, seed=2) if n_bad else []
    rng = random.Random(3)
    bad_at = set(rng.sample(range(n), len(bad))) if n else set()
    bad_iter = iter(bad)
    now = lambda: int(time.time() * 1000)  # noqa: E731
    count = 0
    while n is None or count < n:
        chunk = stream.events(100 if n is None else min(100, n - count), now_ms=now)
        for key_value in event_records(_observed(chunk, hits)):
            if count in bad_at:
                yield b"bad-event", next(bad_iter)[0]
            yield key_value
            count += 1


class _Publisher(threading.Thread):
    def __init__(self, settings: Settings, records: Iterator, rate: float,
                 hits: NextEventHits):
        super().__init__(daemon=True, name="demo-publisher")
        self.settings, self.records, self.rate = settings, records, rate
        self.hits = hits  # what `records` scored as it sent them
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.sent = publish(self.settings, self.settings.topic(self.settings.events_topic),
                                self._count(), rate=self.rate, quiet=True)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc

    def _count(self) -> Iterator:
        for rec in self.records:
            self.sent += 1
            yield rec


def _show_user(world: SyntheticWorld, stream: SyntheticStream, rec: dict) -> None:
    titles = {it["item_id"]: it["title"] for it in world.items}
    topic = world.topic_names[stream.current_topic(rec["user_id"])]
    console.print(f"[bold]{rec['user_id']}[/] (true interest now: [green]{topic}[/], "
                  f"α={rec['learning_rate']:.4f}, index v{rec['model']['index_version']})")
    for it in rec["items"][:5]:
        mark = "✓" if world.topic_names[world.item_topic[it["item_id"]]] == topic else " "
        because = titles.get(it["reason_item_id"] or "", "-")
        console.print(f"  {mark} {titles[it['item_id']]:<45} because: {because}")


def _summary(worker: WorkerProcess, tail: RecommendationTail, world: SyntheticWorld,
             stream: SyntheticStream, pub: _Publisher, elapsed: float) -> dict:
    samples = worker.metrics()
    processed = total(samples, "streamrec_events_total")
    with tail.lock:
        lat = np.array(tail.latencies_ms) if tail.latencies_ms else np.zeros(1)
        recs = {u: [i["item_id"] for i in r["items"]] for u, r in tail.latest.items()}
        count = tail.count
    return {
        "events_published": pub.sent,
        "events_processed": int(processed),
        "recommendations": count,
        "dlq": int(total(samples, "streamrec_dlq_total")),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 1),
                       "p99": round(float(np.percentile(lat, 99)), 1)},
        "events_per_s": round(processed / max(elapsed, 1e-9), 1),
        "topic_hit_rate": round(topic_hit_rate(world, recs, stream.current_topic), 4),
        "chance_hit_rate": round(stream.chance_hit_rate(), 4),
        "next_event_hit_rate": round(pub.hits.rate, 4),
        "next_event_chance": round(pub.hits.k / len(world.items), 4),
        # the same score as the worker counts it (streamrec_next_event_hits_total): against
        # the list it served last, which the publisher may not have read back yet
        "worker_next_event_hit_rate": round(
            total(samples, "streamrec_next_event_hits_total")
            / max(total(samples, "streamrec_next_events_total"), 1), 4),
    }


def run_demo(broker: str | None = None, n_events: int = 20_000, exit_after: bool = False,
             rate: float = 300.0, n_items: int = 2000, n_users: int = 500) -> dict | None:
    broker = broker or os.environ.get("STREAMREC_BROKER")
    run_id = f"{int(time.time())}"
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="streamrec-demo-")))
        if broker is None:
            from streams.broker import EmbeddedKafka

            console.print("starting the embedded Apache Kafka broker ...")
            kafka = EmbeddedKafka(data_dir=tmp / "kafka").start()
            stack.callback(kafka.stop)
            broker, prefix = kafka.url, ""
        else:
            prefix = f"demo-{run_id}."
        s = Settings(broker=broker, app_id=f"streamrec-demo-{run_id}", topic_prefix=prefix,
                     data_dir=tmp / "worker", metrics_port=free_port(),
                     trainer_metrics_port=free_port())
        ensure_topics(s)
        trainer = TrainerProcess(s, tmp / "trainer.log").start()
        stack.callback(trainer.stop)
        worker = WorkerProcess(s, tmp / "worker.log").start()
        stack.callback(worker.stop)
        world = make_world(n_items, seed=0)
        publish_items(s, world.items, quiet=True)
        console.print(f"trainer and worker starting (encoder, catalog of {n_items} items); "
                      f"metrics: [link]{worker.metrics_url}[/link], "
                      f"[link]{trainer.metrics_url}[/link]")
        trainer.wait_ready()
        worker.wait_ready()
        worker.wait_for("streamrec_index_items", n_items, timeout=300)
        tail = RecommendationTail(s)
        tail.start()
        stack.callback(tail.stop)
        stream = SyntheticStream(world, n_users=n_users, seed=1)
        n_bad = max(1, n_events // 400)
        hits = NextEventHits(tail)
        pub = _Publisher(s, _stream_records(stream, n_events if exit_after else None, n_bad,
                                            hits), rate, hits)
        t0 = time.monotonic()
        pub.start()
        return _watch(worker, tail, pub, world, stream, exit_after, n_events + n_bad, t0)


def _watch(worker: WorkerProcess, tail: RecommendationTail, pub: _Publisher,
           world: SyntheticWorld, stream: SyntheticStream, exit_after: bool, expected: int,
           t0: float) -> dict | None:
    """Print progress every 2 s; with exit_after, stop once everything is processed."""
    last_show = 0.0
    done_at: float | None = None
    try:
        while True:
            time.sleep(2.0)
            if pub.error:
                raise pub.error
            samples = worker.metrics()
            processed = total(samples, "streamrec_events_total")
            emitted = total(samples, "streamrec_recommendations_total")
            summary = _summary(worker, tail, world, stream, pub, time.monotonic() - t0)
            console.print(
                f"published {pub.sent:>7,}  processed {int(processed):>7,}  "
                f"recs {tail.count:>7,}  dlq {summary['dlq']:>4}  "
                f"p50 {summary['latency_ms']['p50']:>6.1f} ms  "
                f"topic hit@10 {summary['topic_hit_rate']:.2f} "
                f"(chance {summary['chance_hit_rate']:.2f})  "
                f"next-event hit@10 {summary['next_event_hit_rate']:.3f} "
                f"(chance {summary['next_event_chance']:.3f})")
            if time.monotonic() - last_show > 10 and tail.latest:
                with tail.lock:
                    rec = tail.latest[max(tail.latest, key=lambda u: tail.latest[u]
                                          ["source_event_ts"])]
                _show_user(world, stream, rec)
                last_show = time.monotonic()
            if exit_after and processed >= expected and not pub.is_alive():
                done_at = done_at or time.monotonic()
                if tail.count >= emitted or time.monotonic() - done_at > 30:
                    return _summary(worker, tail, world, stream, pub, done_at - t0)
    except KeyboardInterrupt:
        console.print("stopping ...")
        return None
