"""The adaptive linger (streams/linger.py) on a simulated stream: events arrive at a steady
rate; after the agent returns, Faust's buffer reopens, the events waiting enter it at most
`DISPATCH` per second (Faust's own pace) and new ones as they arrive, and it is handed over
once it holds `FULL` events or the linger's wait is up; a batch of n events takes a + b·n
seconds to process."""

from __future__ import annotations

import pytest

from streams.linger import Linger
from streams.settings import Settings

WITHIN, FULL, DISPATCH = 0.02, 500, 13_600.0


def simulate(rate: float, linger: Linger, batches: int = 40, a: float = 0.05,
             b: float = 0.0009, start: float = 0.0, swing: float = 0.0, queued: float = 0.0
             ) -> tuple[list[int], list[float]]:
    """Batch sizes and the waits chosen after them, for `batches` consecutive batches at
    `rate` events/s from time `start` with `queued` events already waiting; `swing`:
    batches alternately take that much less and more time."""
    sizes, waits, now, wait = [], [], start, linger.within
    for k in range(batches):
        fills = max((linger.full - queued) / rate, linger.full / DISPATCH)
        t = min(wait, fills)
        n = int(min(linger.full, queued + rate * t, DISPATCH * t))
        handed = now + t
        reopened, now = now, handed + a + b * n + (swing if k % 2 else -swing)
        queued += rate * (now - reopened) - n  # lag: arrived, not yet handed over
        wait = linger.wait(n, handed, now, lag=int(queued))
        sizes.append(n)
        waits.append(wait)
    return sizes, waits


def test_a_light_load_fills_batches_to_the_target_and_waits_at_most_max_s():
    sizes, waits = simulate(229.0, Linger(64, 0.2, WITHIN, FULL))
    plain, _ = simulate(229.0, Linger(64, 0.0, WITHIN, FULL))
    assert all(WITHIN <= w <= 0.2 for w in waits)
    assert max(waits[10:]) > WITHIN
    assert all(abs(n - 64) <= 4 for n in sizes[10:]), sizes
    assert max(plain[10:]) < 25  # without it: batches of about 16, each paying the fixed cost


def test_at_most_max_s_however_sparse_the_events():
    _, waits = simulate(2.0, Linger(64, 0.2, WITHIN, FULL))
    assert max(waits) == pytest.approx(0.2)


def test_a_load_that_fills_batches_by_itself_waits_the_least():
    sizes, waits = simulate(600.0, Linger(64, 0.2, WITHIN, FULL))
    assert min(sizes[5:]) >= 64
    assert waits[5:] == [WITHIN] * len(waits[5:])


def test_a_quick_batch_under_a_load_that_fills_batches_does_not_wait_longer():
    """Batches of 56 events or more on average at 458 events/s, alternately 40 ms quicker
    and slower: the rule reads the smoothed processing time, so a quick one is no reason to
    wait."""
    sizes, waits = simulate(458.0, Linger(56, 0.2, WITHIN, FULL), a=0.07, b=0.0008,
                            swing=0.04)
    assert sum(sizes[10:]) / len(sizes[10:]) >= 56
    assert max(waits[10:]) == WITHIN


def test_a_backlog_is_handed_over_in_full_batches():
    """60,000 events waiting: Faust's short `within` alone hands them over as fast as its
    buffer fills in that time (272 of 500); the linger waits for full ones from the second
    batch on (the first is taken before any lag is known)."""
    sizes, waits = simulate(300.0, Linger(56, 0.2, WITHIN, FULL), queued=60_000.0)
    plain, _ = simulate(300.0, Linger(56, 0.0, WITHIN, FULL), queued=60_000.0)
    assert sizes[1:] == [FULL] * (len(sizes) - 1) and waits == [0.2] * len(waits)
    assert max(plain) == int(DISPATCH * WITHIN)


def test_the_wait_follows_a_rising_load():
    linger = Linger(64, 0.2, WITHIN, FULL)
    sizes, light = simulate(150.0, linger)
    sizes, heavy = simulate(600.0, linger, batches=12, start=100.0)
    assert light[-1] > 0.1
    assert heavy[-1] == WITHIN and sizes[-1] < FULL  # no backlog: the rate alone ends the wait


def test_off_waits_within_whatever_the_load():
    for max_s in (0.0, WITHIN):
        _, waits = simulate(50.0, Linger(64, max_s, WITHIN, FULL))
        _, backlog = simulate(50.0, Linger(64, max_s, WITHIN, FULL), queued=60_000.0)
        assert set(waits) == set(backlog) == {WITHIN}


def test_a_target_above_the_batch_size_aims_at_the_batch_size():
    """Settings(batch_size=20) keeps the default target (56, so no setting has to change
    with the batch size): the linger aims at 20 events, the most Faust hands over."""
    s = Settings(batch_size=20)
    linger = Linger(s.linger_target_events, s.linger_max_s, s.batch_wait_s, s.batch_size)
    sizes, waits = simulate(100.0, linger, a=0.02, b=0.0005)
    plain, _ = simulate(100.0, Linger(20, 0.0, s.batch_wait_s, 20), a=0.02, b=0.0005)
    assert linger.target == 20
    assert max(sizes) == 20 and max(waits) <= s.linger_max_s
    assert sum(sizes[10:]) > 1.5 * sum(plain[10:])
