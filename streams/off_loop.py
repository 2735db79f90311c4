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
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from models.compute_threads import cap_this_thread

T = TypeVar("T")


class OffLoop:
    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        # its own thread, so that the entry point's thread cap applies to it
        self._thread = ThreadPoolExecutor(1, "model-steps", initializer=cap_this_thread)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the model-steps thread, after every call made before it has
        finished (in the caller's context, as `asyncio.to_thread` runs it)."""
        async with self._lock:
            ctx = contextvars.copy_context()
            return await asyncio.get_running_loop().run_in_executor(
                self._thread, functools.partial(ctx.run, fn, *args))
