"""Adaptive linger: how long the events agent waits after a micro-batch before it takes the
next one, so that a light load arrives in fuller batches and a backlog never waits.

A batch costs a fixed part (a search over the catalog, a gradient step, the delivery and
commit round trips) plus a part per event. At a quarter of the maximum rate the fixed part
dominated: 2.50 ms of worker CPU per event in 30-event batches against 1.72 in 57-event ones
(README, Performance). Faust's `take_events(max, within)` waits the same `within` after
every batch, whatever the load, so a longer `within` saves CPU under a light load and costs
latency under every load. After a batch of n events handed over at time a, the agent
instead waits

    L = clamp(target / r − p − within, 0, max_s)

where r is the events' arrival rate (events per second between hand-overs) and p a batch's
processing time (from hand-over to return), both smoothed: at the current rate the next
batch then holds about `target` events. Smoothing p keeps a load whose batches already hold
`target` from lingering after each batch that happened to be quick. A full batch (a backlog)
never lingers; `max_s` bounds the latency the linger adds to an event, and 0 turns it off.

>>> linger = Linger(target=64, max_s=0.2, within=0.05, full=500)
>>> linger.after(30, at=0.0, now=0.07)                     # no rate known yet
0.0
>>> round(linger.after(30, at=0.15, now=0.22), 3)          # 200 events/s: 64 take 0.32 s
0.2
>>> round(linger.after(60, at=0.45, now=0.6), 3)           # 200/s; 0.15 s, smoothed 0.094
0.176
>>> linger.after(500, at=0.9, now=1.2)                     # a full batch: a backlog
0.0
"""

from __future__ import annotations

#: Weight of the newest batch in the smoothed rate and processing time (one batch of 30
#: Poisson arrivals is off by ±18%).
SMOOTHING = 0.3


def smoothed(old: float | None, new: float) -> float:
    """An exponentially weighted mean: the first value as it is, then `SMOOTHING` of each."""
    return new if old is None else SMOOTHING * new + (1 - SMOOTHING) * old


class Linger:
    """The module doc's rule, fed one batch at a time (`after`)."""

    def __init__(self, target: int, max_s: float, within: float, full: int):
        """`full`: the batch size (Faust's `max`), which also caps `target`."""
        self.target, self.max_s, self.within, self.full = min(target, full), max_s, within, full
        self.rate: float | None = None  # smoothed events per second
        self.busy: float | None = None  # smoothed seconds from hand-over to return
        self._last: float | None = None  # when the previous batch was handed over

    def after(self, n: int, at: float, now: float) -> float:
        """Seconds to wait after a batch of `n` events handed over at `at`, returned at
        `now` (both from one monotonic clock)."""
        if self._last is not None and at > self._last:
            self.rate = smoothed(self.rate, n / (at - self._last))
        self._last = at
        self.busy = smoothed(self.busy, now - at)
        if n >= self.full or not self.max_s or not self.rate:
            return 0.0
        wait = self.target / self.rate - self.busy - self.within
        return min(max(wait, 0.0), self.max_s)
