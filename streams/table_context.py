"""Make one event Faust's *current event*, so a Table read/write inside `take_events` works.

Faust routes a table write to the changelog partition of the "current event" (a context
variable in `faust.streams`). Inside `stream.take_events()` batches no event is current, and
`table[k] = v` raises "Cannot modify table key from outside of stream iteration". Setting the
context variable to the event that carried the key routes reads and writes to that event's
partition (tables are co-partitioned with their source topic). This is the one place that
touches Faust's private name; tests/test_table_context.py pins its behaviour.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import faust
from faust import streams as _faust_streams
from faust.types import TP, EventT, Message


@contextmanager
def current_event(event: EventT) -> Iterator[None]:
    """`with current_event(ev): table[key] = value` — the write goes to ev's partition."""
    token = _faust_streams._current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _faust_streams._current_event.reset(token)


def partition_event(app: faust.App, tp: TP) -> EventT:
    """An event of partition `tp` that Faust never delivered, for `current_event` when the
    records at hand were read from Kafka directly (streams/gaps.py)."""
    msg = Message(tp.topic, tp.partition, -1, 0.0, 0, None, None, None, None, tp=tp)
    return faust.Event(app, None, None, None, msg)
