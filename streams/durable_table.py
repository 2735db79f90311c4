"""A Faust Table whose changelog writes can be awaited until the broker has them.

Why: a table write only puts its changelog record in Faust's producer buffer, which a
background task hands to the Kafka client one record at a time. An empty buffer does not mean
the client has every record: the task may be holding one while it waits on the client. Flushing
the client then misses that record, and committing the batch's source offsets afterwards loses
its event if the worker dies before the record is sent (counted in the SIGKILL test of
tests/test_faults_workers.py: 21 and 27 times in two runs, one record each time). Keeping
each write's future and awaiting them all has no such gap.
"""

from __future__ import annotations

import asyncio
from typing import Any

import faust
from faust.types.tuples import FutureMessage


class DurableTable(faust.Table):
    """`faust.Table` + `wait_acked()`; install with `faust.App(..., Table=DurableTable)`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unacked: list[FutureMessage] = []

    def send_changelog(self, *args: Any, **kwargs: Any) -> FutureMessage:
        fut = super().send_changelog(*args, **kwargs)
        self._unacked.append(fut)
        return fut

    async def wait_acked(self) -> None:
        """Return once the broker has acknowledged every changelog record written so far
        (raises what a failed send raised)."""
        pending, self._unacked = self._unacked, []
        if pending:
            await asyncio.gather(*pending)
