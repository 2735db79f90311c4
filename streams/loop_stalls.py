"""How long the event loop is blocked: a timer due every `PERIOD` that measures how late it
runs. While the loop is blocked nothing else of the worker runs (no fetch, no delivery, no
/metrics page), so this is the worker's own responsiveness, apart from any batch's latency.
Exported as `streamrec_event_loop_stall_seconds` and `..._stall_max_seconds`.
"""

from __future__ import annotations

import asyncio

from streams import metrics as m

PERIOD = 0.02  # s


async def watch_loop() -> None:
    """Observe each wake-up's lateness, forever (an app task: it takes no arguments, or
    Faust would pass it the app)."""
    loop = asyncio.get_running_loop()
    longest = 0.0
    while True:
        due = loop.time() + PERIOD
        await asyncio.sleep(PERIOD)
        stall = max(loop.time() - due, 0.0)
        m.LOOP_STALL.observe(stall)
        if stall > longest:
            longest = stall
            m.LOOP_STALL_MAX.set(stall)
