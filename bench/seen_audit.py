"""Downstream audit: do recommendations hold items their user already interacted with?

    .venv/bin/python -m bench.seen_audit [ML_100K_DIR] [--events 45000] [--out bench/out]

Embedded broker, one worker, the MovieLens 100K catalog and its first N ratings (timestamps
made unique per event, keeping the order, so "before this list" is exact), then an
independent kafka-python consumer reads every recommendation and every event and checks
each list against all of its user's events up to the list's `source_event_ts`. Prints the
counts and writes seen-audit.json. Uses only long-standing APIs, so the same file measures
older checkouts too (run it from their directory).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import orjson
from kafka import KafkaConsumer

from evaluation.datasets import movielens_events, movielens_items
from streams.broker import EmbeddedKafka
from streams.ports import free_port
from streams.publish import publish_events, publish_items
from streams.settings import Settings
from streams.supervisor import WorkerProcess, total
from streams.topics import ensure_topics

try:  # a checkout with the trainer tier (older ones train inside the worker)
    from streams.supervisor import TrainerProcess
except ImportError:
    TrainerProcess = None

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


def read_topic(s: Settings, topic: str) -> list:
    consumer = KafkaConsumer(topic, bootstrap_servers=s.bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=5000)
    try:
        return list(consumer)
    finally:
        consumer.close()


def audit(events: list[dict], recs: list[dict], history_len: int) -> dict:
    by_user: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for ev in events:
        by_user[ev["user_id"]].append((ev["ts"], ev["item_id"]))
    with_seen = seen_items = old_only = 0
    for rec in recs:
        before = [i for ts, i in by_user[rec["user_id"]] if ts <= rec["source_event_ts"]]
        listed = {it["item_id"] for it in rec["items"]}
        hit = listed & set(before)
        with_seen += bool(hit)
        seen_items += len(hit)
        old_only += bool(hit - set(before[-history_len:]))
    return {"recommendations": len(recs), "with_a_seen_item": with_seen,
            "seen_items": seen_items, "with_an_item_older_than_the_history": old_only,
            "users": len({r["user_id"] for r in recs})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ml_dir", nargs="?", default=str(DEFAULT_DIR))
    ap.add_argument("--events", type=int, default=45_000)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items = movielens_items(args.ml_dir)
    events, last = [], 0
    for ev in movielens_events(args.ml_dir)[: args.events]:
        last = max(ev["ts"], last + 1)  # unique, same order: "up to this list" is exact
        events.append({**ev, "ts": last})
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="seen-audit-") as tmp, EmbeddedKafka() as kafka:
        s = Settings(broker=kafka.url, data_dir=Path(tmp) / "worker",
                     metrics_port=free_port(), app_id="audit", topic_prefix="audit.")
        ensure_topics(s)
        trainer = None if TrainerProcess is None else \
            TrainerProcess(s, Path(tmp) / "trainer.log").start()
        worker = WorkerProcess(s, Path(tmp) / "worker.log").start()
        try:
            publish_items(s, items, quiet=True)
            worker.wait_for("streamrec_index_version", 1, timeout=300)
            worker.wait_for("streamrec_index_items", len(items), timeout=300)
            publish_events(s, events)
            worker.wait_for("streamrec_events_total", len(events), timeout=1800)
            applied = total(worker.metrics(), "streamrec_events_total", outcome="applied")
        finally:
            worker.stop()
            if trainer is not None:
                trainer.stop()
        recs = [orjson.loads(m.value) for m in read_topic(s, s.topic(s.recommendations_topic))]
    doc = {"events": len(events), "applied": int(applied),
           "seconds": round(time.monotonic() - started), **audit(events, recs,
                                                                 s.learner.history_len)}
    print(json.dumps(doc, indent=2))
    (out / "seen-audit.json").write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
