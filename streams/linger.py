"""Adaptive linger: how long Faust waits for the events agent's next micro-batch to fill, so
that a light load arrives in fuller batches and a backlog in full ones.

A batch costs a fixed part (a search over the catalog, a gradient step, the delivery and
commit round trips) plus a part per event. At a quarter of the maximum rate the fixed part
dominated: 2.50 ms of worker CPU per event in 30-event batches against 1.72 in 57-event ones
(docs/performance.md). Faust's `take_events(max, within)` hands a batch over as soon as its
buffer holds `max` events, else `within` seconds after the previous batch returned. One
fixed `within` cannot suit every load: a long one costs latency, a short one hands a light
load over in small batches and, measured, a backlog too (272 events of 500 with 0.02 s:
735 events/s against 856-953 in full batches). With the linger on, the wait before each
hand-over is instead

    L = max_s                                   if lag ≥ full (a backlog)
    L = clamp(target / r − p, within, max_s)    otherwise

where lag is how many records of the batch's partitions are in Kafka beyond it, r the
events' arrival rate (events per second between hand-overs) and p a batch's processing time
(from hand-over to return), both smoothed. The events that arrived during p enter the
buffer as soon as it reopens, so at the current rate the next batch holds about `target`.
Smoothing p keeps a load whose batches already hold `target` from lingering after each batch
that happened to be quick. A backlog is given the longest wait because its buffer fills
first: the wait ends at `full` events, not at L. `max_s` bounds the latency the linger adds
to an event; at most `within` turns it off (L = within, Faust's own behaviour).

>>> linger = Linger(target=64, max_s=0.2, within=0.02, full=500)
>>> linger.wait(30, at=0.0, now=0.07, lag=0)                 # no rate known yet
0.02
>>> round(linger.wait(60, at=0.15, now=0.22, lag=0), 3)      # 400 events/s: 64 take 0.16 s
0.09
>>> round(linger.wait(90, at=0.35, now=0.45, lag=0), 3)      # 415/s smoothed; p 0.079
0.075
>>> linger.wait(500, at=0.9, now=1.2, lag=20_000)            # a backlog: wait for a full one
0.2
"""

from __future__ import annotations

#: Weight of the newest batch in the smoothed rate and processing time (one batch of 30
#: Poisson arrivals is off by ±18%).
SMOOTHING = 0.3


def smoothed(old: float | None, new: float) -> float:
    """An exponentially weighted mean: the first value as it is, then `SMOOTHING` of each."""
    return new if old is None else SMOOTHING * new + (1 - SMOOTHING) * old


class Linger:
    """The module doc's rule, fed one batch at a time (`wait`)."""

    def __init__(self, target: int, max_s: float, within: float, full: int):
        """`within`: the shortest wait (Faust's `within` when the linger is off); `full`: the
        batch size (Faust's `max`), which also caps `target`."""
        self.target, self.max_s, self.within, self.full = min(target, full), max_s, within, full
        self.rate: float | None = None  # smoothed events per second
        self.busy: float | None = None  # smoothed seconds from hand-over to return
        self._last: float | None = None  # when the previous batch was handed over

    @property
    def on(self) -> bool:
        return self.max_s > self.within

    def wait(self, n: int, at: float, now: float, lag: int) -> float:
        """Seconds Faust may wait for the next batch to fill, after a batch of `n` events
        handed over at `at` returned at `now` (both from one monotonic clock), with `lag`
        records of its partitions still in Kafka."""
        if not self.on:
            return self.within
        if self._last is not None and at > self._last:
            self.rate = smoothed(self.rate, n / (at - self._last))
        self._last = at
        self.busy = smoothed(self.busy, now - at)
        if lag >= self.full:
            return self.max_s
        if not self.rate:
            return self.within
        return min(max(self.target / self.rate - self.busy, self.within), self.max_s)
