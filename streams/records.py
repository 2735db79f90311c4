"""A consumed Kafka record, and how a batch of records survives a poison one.

Both belong to every path that consumes (events, catalog, the gap filler), not to one of
them: the agents hand the batch code `RawRecord`s whatever client fetched them, and a batch
whose processing raises is bisected by `isolate_failures` until the record that raises is
alone (it goes to the DLQ; the rest of the batch is applied).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RawRecord:
    """A consumed Kafka record, independent of the client library that fetched it."""

    key: bytes | None
    value: bytes | None
    partition: int
    offset: int
    timestamp_ms: int = 0
    ref: Any = None  # the Faust event, for table routing


def isolate_failures(fn: Callable[[list], list], items: list) -> tuple[list, list[tuple]]:
    """Run `fn` on `items` as one batch; if it raises, bisect until the poison items are alone.

    Returns (results for the good items in order, [(item, exception)] for the bad ones); a
    single poison record costs log2(n) extra calls, and the rest of the batch still goes through.
    """
    try:
        return list(zip(items, fn(items), strict=True)), []
    except Exception as exc:  # noqa: BLE001 - any failure of the batch is isolated
        if len(items) == 1:
            return [], [(items[0], exc)]
    mid = len(items) // 2
    good_a, bad_a = isolate_failures(fn, items[:mid])
    good_b, bad_b = isolate_failures(fn, items[mid:])
    return good_a + good_b, bad_a + bad_b
