"""Users' recent events as the towers read them: one `History` per user, padded into `Seqs`.

A `History` holds item rows of this process (models/items.py; 0 = padding, a text-only
event or an unknown item), event types, timestamps and the text vectors of text-only events
by position. `Seqs` stacks histories left-padded to a common length L, so position L-1 is
always the newest event.

>>> s = Seqs.pad([History([3, 4], [1, 1], [0, 2000], []), History([5], [2], [0], [])])
>>> s.rows.tolist(), s.gaps.tolist()
([[3, 4], [0, 5]], [[0, 1], [0, 0]])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

import numpy as np

N_GAP_BUCKETS = 24  # log2 buckets of seconds: 0 s ... ~97 days


def gap_buckets(gap_ms: np.ndarray) -> np.ndarray:
    """Time gaps (ms) -> bucket ids floor(log2(1 + seconds)), clipped."""
    sec = np.maximum(np.asarray(gap_ms, dtype=np.float64), 0.0) / 1000.0
    return np.minimum(N_GAP_BUCKETS - 1, np.floor(np.log2(1.0 + sec))).astype(np.int64)


def _flat(lists: Iterable[list[int]], total: int) -> np.ndarray:
    """The lists end to end, as int64 (`total` values in all)."""
    return np.fromiter(chain.from_iterable(lists), np.int64, total)


class History(NamedTuple):
    rows: list[int]
    types: list[int]
    ts: list[int]
    texts: list[tuple[int, np.ndarray]]  # (position, text vector) of text-only events


@dataclass
class Seqs:
    """A padded batch of histories (left-padded to a common length)."""

    rows: np.ndarray  # (P, L) int64 item rows, 0 = pad or text-only event
    types: np.ndarray  # (P, L) int64
    gaps: np.ndarray  # (P, L) int64 gap buckets
    texts: list[tuple[int, int, np.ndarray]]  # (pair, position, text vector)
    seen: np.ndarray | None = None  # (P, S) rows of the seen set the example carried, 0 = pad

    @classmethod
    def pad(cls, hists: Sequence[History], seen: Sequence[np.ndarray] | None = None) -> Seqs:
        """Every history at once: one flat array per field, scattered into the padded
        matrices (`seen`: each pair's carried seen rows, `seen_matrix`). Numpy calls per
        history took 6.7 ms for 457 histories of up to 50 events, this 1.2 ms (the same
        arrays)."""
        lens = np.fromiter((len(h.rows) for h in hists), np.int64, len(hists))
        L, P, total = max(1, int(lens.max(initial=0))), len(hists), int(lens.sum())
        rows, types, gaps = (np.zeros((P, L), dtype=np.int64) for _ in range(3))
        first = np.cumsum(lens) - lens  # where each history starts in the flat arrays
        pair = np.repeat(np.arange(P), lens)
        at = np.arange(total) - np.repeat(first - (L - lens), lens)  # its padded position
        rows[pair, at] = _flat((h.rows for h in hists), total)
        types[pair, at] = _flat((h.types for h in hists), total)
        ts = _flat((h.ts for h in hists), total)
        gap = np.diff(ts, prepend=ts[:1])
        gap[first[lens > 0]] = 0  # a history's oldest event has no gap
        gaps[pair, at] = gap_buckets(gap)
        texts = [(p, L - len(h.rows) + k, vec) for p, h in enumerate(hists) for k, vec in h.texts]
        return cls(rows, types, gaps, texts, seen_matrix(seen))

    def __len__(self) -> int:
        return len(self.rows)

    def newest(self, n: int) -> Seqs:
        """The newest `n` positions of every sequence."""
        off = max(0, self.rows.shape[1] - n)
        if off == 0:
            return self
        texts = [(p, pos - off, v) for p, pos, v in self.texts if pos >= off]
        return Seqs(self.rows[:, off:], self.types[:, off:], self.gaps[:, off:], texts,
                    self.seen)

    def take(self, idx: np.ndarray) -> Seqs:
        pos = {int(p): k for k, p in enumerate(idx)}
        texts = [(pos[p], at, v) for p, at, v in self.texts if p in pos]
        return Seqs(self.rows[idx], self.types[idx], self.gaps[idx], texts,
                    None if self.seen is None else self.seen[idx])

    def concat(self, other: Seqs) -> Seqs:
        """Stack two padded batches, re-padding the shorter one on the left."""
        L = max(self.rows.shape[1], other.rows.shape[1])

        def lpad(x: np.ndarray) -> np.ndarray:
            return np.pad(x, ((0, 0), (L - x.shape[1], 0)))

        shift = L - self.rows.shape[1]
        texts = [(p, at + shift, v) for p, at, v in self.texts] + [
            (p + len(self), at + L - other.rows.shape[1], v) for p, at, v in other.texts]
        seen = seen_matrix([*self.seen_rows(), *other.seen_rows()])
        return Seqs(np.concatenate([lpad(self.rows), lpad(other.rows)]),
                    np.concatenate([lpad(self.types), lpad(other.types)]),
                    np.concatenate([lpad(self.gaps), lpad(other.gaps)]), texts, seen)

    def seen_rows(self) -> list[np.ndarray]:
        """Each pair's carried seen rows (none where not carried)."""
        if self.seen is None:
            return [np.zeros(0, np.int64)] * len(self)
        return [row[row > 0] for row in self.seen]

    def interacted(self) -> np.ndarray:
        """(P, L + S) the rows each pair's user interacted with before it: its history and,
        where the example carried it, its seen set (0 = padding)."""
        return self.rows if self.seen is None else np.concatenate([self.rows, self.seen], 1)


def seen_matrix(lists: Sequence[np.ndarray] | None) -> np.ndarray | None:
    """`Seqs.seen` of per-pair seen rows: None where no pair carries any (the mask then
    needs no extra columns)."""
    return padded_rows(lists) if lists is not None and any(len(r) for r in lists) else None


def padded_rows(lists: Sequence[np.ndarray]) -> np.ndarray:
    """Right-padded (len(lists), longest) int64 matrix of row lists, 0 = padding.

    >>> padded_rows([np.array([3, 1]), np.array([], np.int64)]).tolist()
    [[3, 1], [0, 0]]
    """
    out = np.zeros((len(lists), max(map(len, lists), default=0)), np.int64)
    for p, rows in enumerate(lists):
        out[p, : len(rows)] = rows
    return out
