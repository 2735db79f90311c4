"""Publishing catalogs and event streams with kafka-python (CLI, demo, tests, benchmarks).

Producers use acks=all with retries and one request in flight, so a record is either on the
broker or the call fails loudly, and per-key order is kept.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

from evaluation.datasets import SourceLine, source_lines
from evaluation.progress import Progress
from streams.clients import kafka_producer
from streams.schemas import InvalidRecord, Reason, parse_event, parse_item
from streams.settings import Settings

log = logging.getLogger("streamrec.publish")


def progress(quiet: bool = False) -> Progress:
    """A progress bar on stderr (stdout carries the tools' results)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), disable=quiet,
                    console=Console(stderr=True))


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
            quiet: bool = False, producer: Any = None,
            on_ack: Callable[[Any], None] | None = None) -> int:
    """Send (key, value) records to `topic`; returns how many were acknowledged.

    Raises PublishError if the broker refused any record (after the producer's retries), so
    a caller never believes records landed that did not. `on_ack` runs for each record the
    broker acknowledged.
    """
    own = producer is None
    producer = producer or kafka_producer(settings)
    sent = 0
    failures: list[BaseException] = []
    start = time.monotonic()
    with progress(quiet) as bar:
        task = bar.add_task(label, total=total, rate="")
        for key, value in _paced(records, rate):
            fut = producer.send(topic, key=key, value=value).add_errback(failures.append)
            if on_ack is not None:
                fut.add_callback(on_ack)
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


# ------------------------------------------------------------------ files (the CLI tools)
@dataclass
class CheckedFile:
    """A whole input file checked against the worker's schema before anything is sent."""

    good: list[tuple[bytes, bytes]] = field(default_factory=list)  # (key, value) to send
    bad: list[tuple[SourceLine, str, str]] = field(default_factory=list)  # (line, reason, detail)


def check_file(settings: Settings, path: str | Path, what: str,
               limit: int | None = None) -> CheckedFile:
    """Every record of `path` (the first `limit`) validated as the worker will: events by
    `parse_event` (keyed by user_id), items by `parse_item` (keyed by item_id)."""
    out = CheckedFile()
    for line in itertools.islice(source_lines(path, what), limit):
        if line.value is None:
            out.bad.append((line, Reason.INVALID_VALUE.value, line.problem))
            continue
        try:
            if what == "events":
                key = parse_event(line.value, settings.max_event_bytes).user_id
            else:
                key = parse_item(line.value, settings.max_item_bytes).item_id
        except InvalidRecord as exc:
            out.bad.append((line, exc.reason.value, exc.detail))
            continue
        out.good.append((key.encode(), line.value))
    return out


def rejected_path(path: str | Path) -> Path:
    """Where `--skip-invalid` writes the lines it did not send: beside the input."""
    p = Path(path)
    stem = p.stem if p.suffix in (".jsonl", ".ndjson") else p.name
    return p.with_name(f"{stem}.rejected.jsonl")


def write_rejected(path: str | Path, bad: list[tuple[SourceLine, str, str]]) -> Path:
    """The rejected lines, byte for byte as in the input (fix them and publish that file)."""
    out = rejected_path(path)
    out.write_bytes(b"".join(line.raw + b"\n" for line, _, _ in bad))
    return out


def publish_checked(settings: Settings, topic: str, records: list[tuple[bytes, bytes]],
                    rate: float | None = None, label: str = "publish") -> tuple[int, int]:
    """Send records; returns (sent, acknowledged by the broker). Does not raise when the
    broker refuses some: the caller reports the two numbers."""
    from kafka.errors import KafkaError

    acked = [0]
    producer = kafka_producer(settings)
    try:
        publish(settings, topic, records, total=len(records), rate=rate, label=label,
                producer=producer, on_ack=lambda *_: acked.__setitem__(0, acked[0] + 1))
    except (PublishError, KafkaError) as exc:  # the two counts tell the caller what landed
        log.error("publishing to %s failed: %s", topic, exc)
    finally:
        producer.close(timeout=10)
    return len(records), acked[0]
