"""The drift test's parts (evaluation/drift.py) on generated streams: the splice, the
position mapping and the recovery count, so the ML-100K benchmark (bench/drift.py) reads
the right events."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from evaluation.drift import (
    GAP_MS,
    Pair,
    by_user,
    choose_pairs,
    drift_report,
    gains,
    recovery,
    splice,
)
from evaluation.evaluate import Event, Result, prequential

CUT, AFTER, PRE = 4, 5, 2


def _stream() -> list[Event]:
    """Users a (10 events), b (12, its 2nd item also one of a's first 4) and c (8),
    interleaved in time; b starts before a ends, so B's part must be shifted."""
    items = {"a": list(range(0, 10)), "b": [20, 2, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30],
             "c": list(range(40, 48))}
    start = {"a": 0, "b": 1_000, "c": 500}
    events = [(u, item, start[u] + 10_000 * n, "default")
              for u, its in items.items() for n, item in enumerate(its)]
    return sorted(events, key=lambda e: e[2])


def _of(events: Sequence[Event], user: str) -> list[Event]:
    return [e for e in events if e[0] == user]


def test_splice_puts_a_then_b_under_one_id_at_the_cut():
    events = _stream()
    out = splice(events, [Pair("s0", "a", "b")], CUT, AFTER, PRE).events
    shared = _of(out, "s0")
    assert [e[1] for e in shared] == [0, 1, 2, 3, 20, 21, 22, 23, 24]  # b's item 2 dropped
    a_ts = [e[2] for e in _of(events, "a")][:CUT]
    assert [e[2] for e in shared[:CUT]] == a_ts  # A's part keeps its timestamps
    assert shared[CUT][2] == a_ts[-1] + GAP_MS  # B's first event right after A's last
    b_orig = {e[1]: e[2] for e in _of(events, "b")}
    shift = shared[CUT][2] - b_orig[20]
    assert all(e[2] == b_orig[e[1]] + shift for e in shared[CUT:])  # B's spacing kept
    assert all(x[2] < y[2] for x, y in zip(shared, shared[1:], strict=False))


def test_splice_leaves_the_rest_alone_and_keeps_time_order():
    events = _stream()
    out = splice(events, [Pair("s0", "a", "b")], CUT, AFTER, PRE).events
    assert _of(out, "c") == _of(events, "c")
    assert _of(out, "a") == _of(events, "a")[CUT:]  # A's later events under A's own id
    assert _of(out, "b") == [e for e in _of(events, "b") if e[1] not in (20, 2, 21, 22, 23,
                                                                            24)]
    assert [e[2] for e in out] == sorted(e[2] for e in out)
    assert len(out) == len(events) - 1  # only b's event on a's item is gone


def test_control_relabels_a_only():
    events = _stream()
    out = splice(events, [Pair("s0", "a", "b")], CUT, AFTER, PRE, control=True).events
    assert [e[1:] for e in _of(out, "s0")] == [e[1:] for e in _of(events, "a")[:CUT + AFTER]]
    assert _of(out, "b") == _of(events, "b")
    assert sorted(out, key=lambda e: e[2]) == out and len(out) == len(events)


def test_marks_point_at_the_events_around_the_switch():
    marked = splice(_stream(), [Pair("s0", "a", "b")], CUT, AFTER, PRE)
    assert [marked.events[n][1] for n in marked.pre["s0"]] == [2, 3]
    assert [marked.events[n][1] for n in marked.post["s0"]] == [20, 21, 22, 23, 24]


def test_gains_maps_ranks_by_stream_position():
    res = Result("m", 64, ranks=np.array([0, 3, 12]), positions=np.array([5, 9, 11]),
                 n_events=12, seconds=1.0)
    g = gains(res, [9, 5, 11, 7])
    assert g[:3].tolist() == [1 / np.log2(5), 1.0, 0.0]
    assert np.isnan(g[3])  # position 7 was not evaluated


def test_report_reads_k_after_the_switch():
    marked = splice(_stream(), [Pair("s0", "a", "b")], CUT, AFTER, PRE)
    post = marked.post["s0"]
    ranks = {n: 0 for n in marked.pre["s0"]} | {n: 0 if k >= 3 else 50
                                                  for k, n in enumerate(post)}
    res = Result("m", 64, np.array(list(ranks.values())), np.array(list(ranks)),
                 len(marked.events), 1.0)
    rep = drift_report(res, marked, window=2)
    assert rep["curve"] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert rep["pre_level"] == 1.0 and rep["recovery_k"] == 5 and rep["not_evaluated"] == 0


@pytest.mark.parametrize(("curve", "k"), [
    ([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1], 7),  # mean of k-3..k reaches 0.5 at k = 7
    ([1] * 12, 4),  # never dropped: the first full window
    ([0] * 12, None),  # never recovers
])
def test_recovery_on_hand_made_curves(curve, k):
    assert recovery(np.array(curve, dtype=float), 0.5, window=4) == k


def test_choose_pairs_is_seeded_and_distinct():
    events = _stream() + [("d", 60 + n, 5 + 10_000 * n, "default") for n in range(12)]
    events.sort(key=lambda e: e[2])
    pairs = choose_pairs(events, 2, CUT, AFTER, min_b=8, seed=3)
    assert pairs == choose_pairs(events, 2, CUT, AFTER, min_b=8, seed=3)
    users = [u for p in pairs for u in (p.a, p.b)]
    assert len(set(users)) == 4 and [p.user for p in pairs] == ["drift-0", "drift-1"]
    counts = {u: len(r) for u, r in by_user(events).items()}
    assert all(counts[p.a] >= CUT + AFTER for p in pairs)
    with pytest.raises(ValueError):
        choose_pairs(events, 3, CUT, AFTER, min_b=8)


class _Constant:
    """A model that scores every item 0: enough to see which events are evaluated."""

    name = "constant"

    def step(self, batch, which, excluded=None):
        return np.zeros((len(which), 50))


def test_every_event_around_the_switch_is_evaluated():
    """B's items that A had rated are dropped, so with the default seen rule none of the
    post-switch events is skipped, and the spliced id is not a new user at the switch."""
    marked = splice(_stream(), [Pair("s0", "a", "b")], CUT, AFTER, PRE)
    res = prequential(_Constant(), marked.events, batch_size=3)
    assert drift_report(res, marked, window=2)["not_evaluated"] == 0
