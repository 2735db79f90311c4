"""Everything streamrec remembers about one user, bounded in size, and its wire form.

Bounded: the history is a ring of the last H events; every item ever interacted with is a
compact set (models/seen.py: exact keys up to 1,024, then a 16 KB Bloom filter); the residual
is one `dim` vector; the rest are scalars. The state also carries the last applied offset
per source partition, so a replayed event (at-least-once delivery) is recognised and
skipped: the offsets are written in the same changelog record as the effect they guard.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field, fields

import numpy as np
import orjson

from index.ids import item_hash
from models.lr_rules import RuleRecord
from models.seen import SeenItems

#: 1: history, residual, rule state, offsets. 2: + `seen` (every item interacted with).
FORMAT_VERSION = 2
_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")


def b64(arr: np.ndarray, dtype: np.dtype) -> str:
    """`arr` as `dtype`'s bytes in base64 (the wire form of vectors and keys)."""
    return base64.b64encode(np.ascontiguousarray(arr, dtype=dtype).tobytes()).decode("ascii")


def from_b64(text: str | None, dtype: np.dtype) -> np.ndarray | None:
    """The inverse of `b64`: a writable array of `dtype` (None stays None: a field left
    out)."""
    return None if text is None else np.frombuffer(base64.b64decode(text), dtype=dtype).copy()


def unb64(text: str) -> np.ndarray:
    """A stored search-text vector (float16, base64) as float32."""
    return from_b64(text, _F16).astype(np.float32)


@dataclass
class UserState:
    """Per-user state. `items[i]` is None for text-only events (search); their text vector is
    kept (float16) in `texts[i]` so the sequence encoder can see what the user searched for.

    >>> st = UserState()
    >>> for k, item in enumerate(["a", "b", "c"]):
    ...     st.append(item, etype=1, ts=k, text_vec=None, max_len=2)
    >>> st.items, sorted(st.recent_items()), st.n_events   # a ring of the last 2
    (['b', 'c'], ['b', 'c'], 3)
    >>> st.mark_applied(partition=0, offset=41)
    >>> st.already_applied(0, 41), st.already_applied(0, 42)  # a replay, then a new event
    (True, False)
    >>> UserState.from_bytes(st.to_bytes()).items            # its changelog form
    ['b', 'c']
    """

    items: list[str | None] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    ts: list[int] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)
    residual: np.ndarray | None = None
    rule: RuleRecord = field(default_factory=RuleRecord)  # the LR rule's own state
    n_events: int = 0
    offsets: dict[str, int] = field(default_factory=dict)
    seen: SeenItems = field(default_factory=SeenItems)

    def append(
        self, item_id: str | None, etype: int, ts: int, text_vec: np.ndarray | None, max_len: int
    ) -> None:
        """Add one event to the ring, dropping the oldest beyond `max_len`."""
        self.items.append(item_id)
        self.types.append(etype)
        self.ts.append(ts)
        self.texts.append(None if text_vec is None else b64(text_vec, _F16))
        if item_id is not None:
            self.seen.add(np.array([item_hash(item_id)], np.int64))
        if len(self.items) > max_len:
            cut = len(self.items) - max_len
            del self.items[:cut], self.types[:cut], self.ts[:cut], self.texts[:cut]
        self.n_events += 1

    def text_vector(self, i: int) -> np.ndarray | None:
        t = self.texts[i]
        return None if t is None else unb64(t)

    @property
    def last_ts(self) -> int:
        return self.ts[-1] if self.ts else 0

    def recent_items(self) -> set[str]:
        """Items of the history ring (the last H events); `seen` holds all of them."""
        return {i for i in self.items if i is not None}

    # -- exactly-once effect -------------------------------------------------------------
    def already_applied(self, partition: int, offset: int) -> bool:
        last = self.offsets.get(str(partition))
        return last is not None and offset <= last

    def mark_applied(self, partition: int, offset: int) -> None:
        key = str(partition)
        if offset > self.offsets.get(key, -1):
            self.offsets[key] = offset

    # -- wire form -------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        d = {
            "v": FORMAT_VERSION,
            "items": self.items,
            "types": self.types,
            "ts": self.ts,
            "texts": self.texts,
            "residual": None if self.residual is None else b64(self.residual, _F32),
            **vars(self.rule),  # flat in the wire form (alpha, accum, ...); asdict deep-copies
            "n_events": self.n_events,
            "offsets": self.offsets,
            "seen": self.seen.to_wire(),
        }
        return orjson.dumps(d)

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> UserState:
        if not raw:
            return cls()
        d = orjson.loads(raw)
        if "seen" in d:
            seen = SeenItems.from_wire(d["seen"])
        else:  # version 1 kept no seen set: the history ring is all it knows
            seen = SeenItems()
            seen.add(np.array([item_hash(i) for i in d["items"] if i is not None], np.int64))
        return cls(
            items=d["items"],
            types=d["types"],
            ts=d["ts"],
            texts=d["texts"],
            residual=from_b64(d.get("residual"), _F32),
            rule=RuleRecord(**{f.name: d[f.name] for f in fields(RuleRecord)}),
            n_events=d["n_events"],
            offsets=d["offsets"],
            seen=seen,
        )
