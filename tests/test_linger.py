"""The adaptive linger (streams/linger.py) on a simulated stream: events arrive at a steady
rate, Faust hands over what arrived since the last hand-over `within` after the agent
returns, and a batch of n events takes a + b·n seconds to process."""

from __future__ import annotations

import pytest

from streams.linger import Linger
from streams.settings import Settings

WITHIN, FULL = 0.05, 500


def simulate(rate: float, linger: Linger, batches: int = 40, a: float = 0.05,
             b: float = 0.0009, start: float = 0.0, swing: float = 0.0
             ) -> tuple[list[int], list[float]]:
    """Batch sizes and waits of `batches` consecutive batches at `rate` events/s from
    time `start`; `swing`: batches alternately take that much less and more time."""
    sizes, waits, handed, backlog = [], [], start, 0.0
    for k in range(batches):
        n = min(linger.full, int(backlog))
        backlog -= n
        now = handed + a + b * n + (swing if k % 2 else -swing)
        wait = linger.after(n, handed, now)
        sizes.append(n)
        waits.append(wait)
        nxt = now + wait + WITHIN
        backlog += rate * (nxt - handed)
        handed = nxt
    return sizes, waits


def test_a_light_load_fills_batches_to_the_target_and_waits_at_most_max_s():
    sizes, waits = simulate(229.0, Linger(64, 0.2, WITHIN, FULL))
    plain, _ = simulate(229.0, Linger(64, 0.0, WITHIN, FULL))
    assert all(0 <= w <= 0.2 for w in waits)
    assert max(waits[10:]) > 0
    assert all(abs(n - 64) <= 4 for n in sizes[10:]), sizes
    assert max(plain[10:]) < 40  # without it: batches of about 30, each paying the fixed cost


def test_at_most_max_s_however_sparse_the_events():
    _, waits = simulate(2.0, Linger(64, 0.2, WITHIN, FULL))
    assert max(waits) == pytest.approx(0.2)


def test_a_load_that_fills_batches_by_itself_never_waits():
    sizes, waits = simulate(600.0, Linger(64, 0.2, WITHIN, FULL))
    assert min(sizes[5:]) >= 64
    assert waits[5:] == [0.0] * len(waits[5:])


def test_a_quick_batch_under_a_load_that_fills_batches_does_not_wait():
    """Batches of 56 events or more on average at 458 events/s, alternately 40 ms quicker
    and slower: the rule reads the smoothed processing time, so a quick one is no reason to
    wait."""
    sizes, waits = simulate(458.0, Linger(56, 0.2, WITHIN, FULL), a=0.035, b=0.0008,
                            swing=0.04)
    assert sum(sizes[10:]) / len(sizes[10:]) >= 56
    assert max(waits[10:]) == 0.0


def test_a_backlog_never_waits():
    linger = Linger(64, 0.2, WITHIN, FULL)
    linger.after(10, 0.0, 0.1)
    linger.after(10, 10.0, 10.1)  # a slow rate so far ...
    assert linger.after(FULL, 10.2, 10.5) == 0.0  # ... but a full batch means a backlog


def test_the_wait_follows_a_rising_load():
    linger = Linger(64, 0.2, WITHIN, FULL)
    sizes, light = simulate(150.0, linger)
    sizes, heavy = simulate(600.0, linger, batches=12, start=100.0)
    assert light[-1] > 0.1
    assert heavy[-1] == 0.0 and sizes[-1] < FULL  # no backlog: the rate alone ends the wait


def test_off_when_max_s_is_zero():
    _, waits = simulate(50.0, Linger(64, 0.0, WITHIN, FULL))
    assert set(waits) == {0.0}


def test_a_target_above_the_batch_size_aims_at_the_batch_size():
    """Settings(batch_size=20) keeps the default target (56, so no setting has to change
    with the batch size): the linger aims at 20 events, the most Faust hands over."""
    s = Settings(batch_size=20, linger_max_s=0.2)
    linger = Linger(s.linger_target_events, s.linger_max_s, WITHIN, s.batch_size)
    sizes, waits = simulate(100.0, linger, a=0.02, b=0.0005)
    plain, _ = simulate(100.0, Linger(20, 0.0, WITHIN, 20), a=0.02, b=0.0005)
    assert linger.target == 20
    assert max(sizes) == 20 and max(waits) <= s.linger_max_s
    assert sum(sizes[10:]) > 1.5 * sum(plain[10:])
