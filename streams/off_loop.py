"""One model's reads and changes, off the event loop, one at a time, in call order.

A worker's batches and a trainer's steps run in a thread (torch, faiss and numpy release the
GIL, so the loop keeps heartbeats and /metrics going); so must every change to the model they
read: a catalog chunk that grows the tables copies gigabytes at 1M items (seconds), and a
change made on the loop while a step runs in a thread can lose the step's work (before this,
the trainer's catalog replica could grow E, copying it, and re-make the optimizers on the
loop while a training step in a thread still wrote the old E). Every caller that touches
the model goes through one `OffLoop`, and asyncio's lock is FIFO, so the changes keep the
order the topics gave them.

>>> import asyncio, threading
>>> async def main():
...     guard, ran = OffLoop(), []
...     def step(k):
...         ran.append((k, threading.current_thread() is threading.main_thread()))
...     await asyncio.gather(*(guard.run(step, k) for k in range(3)))
...     return ran
>>> asyncio.run(main())
[(0, False), (1, False), (2, False)]
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class OffLoop:
    def __init__(self) -> None:
        self._lock = asyncio.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a thread, after every call made before it has finished."""
        async with self._lock:
            return await asyncio.to_thread(fn, *args)
