"""Reading the recommendations topic: `streamrec tail`, the demo's live view and latency.

Latency here is end to end as a downstream service sees it: the moment a recommendation is
received minus `source_event_ts` (the newest event it used; the demo stamps events with the
wall clock when it publishes them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson

from streams.clients import kafka_consumer
from streams.settings import Settings


def iter_recommendations(settings: Settings, from_beginning: bool = False,
                         timeout_s: float | None = None, **kw: Any) -> Iterator[dict]:
    """Yield recommendation dicts as they arrive (until `timeout_s` of silence, if given)."""
    consumer = kafka_consumer(
        settings, settings.topic(settings.recommendations_topic),
        auto_offset_reset="earliest" if from_beginning else "latest",
        enable_auto_commit=False,
        consumer_timeout_ms=int(timeout_s * 1000) if timeout_s else float("inf"),
        **kw,
    )
    try:
        for msg in consumer:
            yield orjson.loads(msg.value)
    finally:
        consumer.close()


class RecommendationTail(threading.Thread):
    """Background reader: the latest recommendation per user, counts and latencies."""

    def __init__(self, settings: Settings):
        super().__init__(daemon=True, name="recommendation-tail")
        self.settings = settings
        self.latest: dict[str, dict] = {}
        self.latencies_ms: list[float] = []
        self.count = 0
        self.stale = 0  # recommendations that arrived older than one already seen for the user
        self._halt = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        consumer = kafka_consumer(self.settings,
                                  self.settings.topic(self.settings.recommendations_topic),
                                  auto_offset_reset="earliest", enable_auto_commit=False)
        try:
            while not self._halt.is_set():
                for msgs in consumer.poll(timeout_ms=200).values():
                    now = time.time() * 1000
                    for msg in msgs:
                        self._add(orjson.loads(msg.value), now)
        finally:
            consumer.close()

    def _add(self, rec: dict, now_ms: float) -> None:
        with self.lock:
            self.count += 1
            self.latencies_ms.append(now_ms - rec["source_event_ts"])
            prev = self.latest.get(rec["user_id"])
            if prev is not None and prev["source_event_ts"] > rec["source_event_ts"]:
                self.stale += 1
                return
            self.latest[rec["user_id"]] = rec

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
