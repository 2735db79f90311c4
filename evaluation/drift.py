"""Drift test: a shared account changing hands, spliced from real users' histories.

Why: on plain MovieLens the per-user learning-rate rules (models/lr_rules.py) tie, because
a real user's taste moves slowly. The rules differ in how fast a user's own parameters
follow a *sudden* change, so this module makes one from real data: user A's first
`cut` events, then (under the same new id) user B's first `after` events, B's timestamps
shifted to start just after A's last one. Everything else in the stream is left as it was,
so the shared model trains as usual, and the prequential evaluator (evaluation/evaluate.py)
ranks every event. The spliced ids' ranks are then read back by stream position:
k = 1..after after the switch, and the last `pre` events before it (the pre-switch level).

Choices, and why:
- B's events on items A already rated (within A's `cut` events) are dropped from the
  stream: with the default serving rule (exclude every seen item) such an event is never
  evaluated, so keeping it would leave holes in k = 1..after; B's first `after` events are
  counted after this drop. It drops a few events per pair (about 1-2% of ML-100K in all).
- A's events after the cut stay in the stream under A's own id, and B's events after its
  first `after` ones under B's id, at their own timestamps: the shared model sees almost
  the same events as without the splice (A and B then look like new users there).
- The control is the same new ids without the splice: A's first `cut + after` events
  relabelled, unshifted (k = 1..after are then A's own events cut+1 .. cut+after).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from evaluation.evaluate import Event, Result

GAP_MS = 60_000  # B's first event comes this long after A's last one (one minute)


@dataclass(frozen=True)
class Pair:
    """One shared account: `user` (the new id) is `a` up to the switch, then `b`."""

    user: str
    a: str
    b: str


@dataclass
class Marked:
    """A stream with, per new id, the stream positions of its pre-switch window (oldest
    first) and of its events k = 1..after after the switch."""

    events: list[Event]
    pre: dict[str, list[int]] = field(default_factory=dict)
    post: dict[str, list[int]] = field(default_factory=dict)


def by_user(events: Sequence[Event]) -> dict[str, list[int]]:
    """Stream indexes of each user's events, in stream order."""
    out: dict[str, list[int]] = {}
    for n, e in enumerate(events):
        out.setdefault(e[0], []).append(n)
    return out


def choose_pairs(events: Sequence[Event], n_pairs: int, cut: int = 40, after: int = 50,
                 min_b: int = 60, seed: int = 0) -> list[Pair]:
    """`n_pairs` (A, B) of distinct users, seeded: A with at least `cut + after` events (so
    the control has A's own `after` events after the cut), B with at least `min_b` and at
    least `after` events on items outside A's first `cut`. New ids are "drift-<k>"."""
    counts = Counter(e[0] for e in events)
    rows = by_user(events)
    rng = random.Random(seed)
    a_pool = sorted(u for u, c in counts.items() if c >= cut + after)
    rng.shuffle(a_pool)
    chosen_a = a_pool[:n_pairs]
    taken = set(chosen_a)
    b_pool = sorted(u for u, c in counts.items() if c >= min_b and u not in taken)
    rng.shuffle(b_pool)
    pairs = []
    for a in chosen_a:
        seen = {events[n][1] for n in rows[a][:cut]}
        for j, b in enumerate(b_pool):
            if sum(events[n][1] not in seen for n in rows[b]) >= after:
                pairs.append(Pair(f"drift-{len(pairs)}", a, b_pool.pop(j)))
                break
    if len(pairs) < n_pairs:
        raise ValueError(f"only {len(pairs)} pairs with enough events (asked {n_pairs})")
    return pairs


def splice(events: Sequence[Event], pairs: Sequence[Pair], cut: int = 40, after: int = 50,
           pre: int = 20, control: bool = False) -> Marked:
    """The stream with each pair spliced (see the module doc), time-ordered; other users'
    events keep their order and fields. `control=True`: A's first `cut + after` events under
    the new id, nothing of B's moved (the same ids without the splice)."""
    rows = by_user(events)
    keyed: dict[int, tuple[int, Event]] = {n: (e[2], e) for n, e in enumerate(events)}
    for p in pairs:
        a_rows = rows[p.a][:cut + after] if control else rows[p.a][:cut]
        for n in a_rows:
            keyed[n] = (events[n][2], (p.user, *events[n][1:]))
        if not control:
            _move_b(events, keyed, p, rows[p.a][:cut], rows[p.b], after)
    order = sorted(keyed, key=lambda n: (keyed[n][0], n))  # ties: the original order
    out = Marked([keyed[n][1] for n in order])
    at = by_user(out.events)
    for p in pairs:
        out.pre[p.user] = at[p.user][cut - pre:cut]
        out.post[p.user] = at[p.user][cut:cut + after]
    return out


def _move_b(events: Sequence[Event], keyed: dict[int, tuple[int, Event]], p: Pair,
            a_rows: list[int], b_rows: list[int], after: int) -> None:
    """B's first `after` events on items A has not rated go under the new id, shifted to
    start GAP_MS after A's last event; B's events on A's items before them are dropped."""
    seen = {events[n][1] for n in a_rows}
    mine = [n for n in b_rows if events[n][1] not in seen][:after]
    for n in b_rows:
        if n > mine[-1]:
            break
        if events[n][1] in seen:
            del keyed[n]
    shift = events[a_rows[-1]][2] + GAP_MS - events[mine[0]][2]
    for n in mine:
        ts = events[n][2] + shift
        keyed[n] = (ts, (p.user, events[n][1], ts, *events[n][3:]))


def gains(res: Result, positions: Sequence[int]) -> np.ndarray:
    """NDCG@10 of the events at these stream positions (NaN: not evaluated)."""
    at = dict(zip(res.positions.tolist(), res.ranks.tolist(), strict=True))
    r = np.array([at.get(n, -1) for n in positions], dtype=np.float64)
    g = np.where((r >= 0) & (r < 10), 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0)
    return np.where(r < 0, np.nan, g)


def recovery(curve: np.ndarray, level: float, window: int = 10) -> int | None:
    """First k (1-based) whose trailing mean over `window` events (k-window+1 .. k) reaches
    `level`; None if none does. So a curve that never dropped recovers at k = window."""
    for k in range(window, len(curve) + 1):
        if np.nanmean(curve[k - window:k]) >= level:
            return k
    return None


def drift_report(res: Result, marked: Marked, window: int = 10) -> dict:
    """Per-k NDCG@10 after the switch (mean over the new ids), its overall mean, the
    pre-switch level (the ids' last `pre` events before the switch, pooled), recovery (see
    `recovery`), and how many events were not evaluated (should be none)."""
    users = sorted(marked.post)
    post = np.array([gains(res, marked.post[u]) for u in users])
    before = np.array([gains(res, marked.pre[u]) for u in users])
    curve = np.nanmean(post, axis=0)
    level = float(np.nanmean(before))
    return {"ids": len(users), "pre_level": level,
            "post_mean": float(np.nanmean(post)),
            "post_first10": float(np.nanmean(post[:, :10])),
            "recovery_k": recovery(curve, level, window),
            "not_evaluated": int(np.isnan(post).sum() + np.isnan(before).sum()),
            "curve": [round(float(c), 5) for c in curve]}
