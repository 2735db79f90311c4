"""Publishing catalogs and event streams with kafka-python (CLI, demo, tests, benchmarks).

Producers use acks=all with retries and one request in flight, so a record is either on the
broker or the call fails loudly, and per-key order is kept.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from streams.clients import kafka_producer
from streams.settings import Settings


def progress(quiet: bool = False) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), disable=quiet)


def _paced(records: Iterable[Any], rate: float | None) -> Iterator[Any]:
    """Yield records no faster than `rate` per second (None: as fast as possible)."""
    start = time.monotonic()
    for n, rec in enumerate(records):
        if rate:
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        yield rec


def publish(settings: Settings, topic: str, records: Iterable[tuple[bytes | None, bytes | None]],
            total: int | None = None, rate: float | None = None, label: str = "publish",
            quiet: bool = False, producer: Any = None) -> int:
    """Send (key, value) records to `topic`; returns how many were acknowledged.

    Raises PublishError if the broker refused any record (after the producer's retries), so
    a caller never believes records landed that did not.
    """
    own = producer is None
    producer = producer or kafka_producer(settings)
    sent = 0
    failures: list[BaseException] = []
    start = time.monotonic()
    with progress(quiet) as bar:
        task = bar.add_task(label, total=total, rate="")
        for key, value in _paced(records, rate):
            producer.send(topic, key=key, value=value).add_errback(failures.append)
            sent += 1
            if sent % 500 == 0:
                eps = sent / max(time.monotonic() - start, 1e-9)
                bar.update(task, completed=sent, rate=f"{eps:,.0f}/s")
        producer.flush()
        eps = sent / max(time.monotonic() - start, 1e-9)
        bar.update(task, completed=sent, rate=f"{eps:,.0f}/s")
    if own:
        producer.close()
    if failures:
        raise PublishError(f"{len(failures)} of {sent} records to {topic} failed: {failures[0]!r}")
    return sent


class PublishError(RuntimeError):
    """The broker did not acknowledge some records."""


def item_records(items: Iterable[dict]) -> Iterator[tuple[bytes, bytes]]:
    for item in items:
        yield str(item["item_id"]).encode(), orjson.dumps(item)


def event_records(events: Iterable[dict]) -> Iterator[tuple[bytes, bytes]]:
    """Keyed by user id: a user's events stay in order on one partition."""
    for ev in events:
        yield str(ev["user_id"]).encode(), orjson.dumps(ev)


def publish_items(settings: Settings, items: list[dict], quiet: bool = False) -> int:
    return publish(settings, settings.topic(settings.catalog_topic), item_records(items),
                   total=len(items), label="catalog", quiet=quiet)


def publish_events(settings: Settings, events: Iterable[dict], rate: float | None = None,
                   quiet: bool = False) -> int:
    return publish(settings, settings.topic(settings.events_topic), event_records(events),
                   total=len(events) if isinstance(events, list) else None, rate=rate,
                   label="events", quiet=quiet)
