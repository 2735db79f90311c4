"""Everything streamrec remembers about one user, bounded in size, its wire form, and the
one rule for what not to recommend to them again.

Bounded: the history is a ring of the last H events; every item ever interacted with is a
compact set (`SeenItems`: exact keys up to 1,024, then a 16 KB Bloom filter); the residual
is one `dim` vector; the rest are scalars. The state also carries the last applied offset
per source partition, so a replayed event (at-least-once delivery) is recognised and
skipped: the offsets are written in the same changelog record as the effect they guard.

**Seen items.** A user's history ring holds only the last `history_len` events, so "drop
what is in the history" recommends again an item consumed 51 events ago (seen: 39% of lists
on ML-100K held one). `SeenItems` keeps all of them by their stable 63-bit key (index/ids.py
`item_hash`): exactly, as a sorted int64 array, up to `EXACT_MAX` keys (8 KB); beyond that
as a Bloom filter of `BLOOM_BITS` bits with `BLOOM_HASHES` probes, into which the exact keys
are moved. A Bloom filter has no false negatives, so a seen item is never recommended; its
false positives hide a few unseen items: the share is (1 - e^(-k·n/m))^k, 0.00004 at n =
5,000, 0.002 at 10,000 and 0.05 at 20,000 for the defaults (users that large usually want
repeats, `recent`, anyway).

`exclusions(state, mode)` is the rule serving and the offline evaluator both apply
(`exclude_seen` in the settings): `all` (default) every item ever seen, `recent` only the
history ring (for catalogs where repeats are wanted: groceries, music), `none` nothing.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import orjson

from index.ids import item_hash
from models.items import find_sorted, unique_ints
from models.lr_rules import RuleRecord

if TYPE_CHECKING:
    from models.items import ItemRows, KeyIndex

#: 1: history, residual, rule state, offsets. 2: + `seen` (every item interacted with).
FORMAT_VERSION = 2
_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_I64 = np.dtype("<i8")
ExcludeSeen = Literal["all", "recent", "none"]

EXACT_MAX = 1024
BLOOM_BITS = 1 << 17  # 16 KB
BLOOM_HASHES = 7


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


def item_keys(item_ids: list[str | None]) -> np.ndarray:
    """Stable int64 keys of item ids (None entries, text-only events, are dropped)."""
    return np.fromiter((item_hash(i) for i in item_ids if i is not None), dtype=np.int64)


class SeenItems:
    """A set of item keys: exact while small, a Bloom filter once large (see the module
    doc).

    >>> s = SeenItems()
    >>> s.add(np.array([7, 3, 7]))
    >>> len(s), s.contains(np.array([3, 4, 7])).tolist()
    (2, [True, False, True])
    >>> SeenItems.from_wire(s.to_wire()).contains(np.array([3, 7, 9])).tolist()
    [True, True, False]
    """

    __slots__ = ("keys", "bloom", "n")

    def __init__(self) -> None:
        self.keys = np.zeros(0, np.int64)  # sorted; unused once `bloom` exists
        self.bloom: np.ndarray | None = None  # uint8 bit array of BLOOM_BITS bits
        self.n = 0  # distinct keys added (exact while exact; counted adds once a Bloom filter)

    def __len__(self) -> int:
        return self.n

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SeenItems):
            return NotImplemented
        return self.n == other.n and np.array_equal(self.keys, other.keys) and (
            (self.bloom is None and other.bloom is None) or (
                self.bloom is not None and other.bloom is not None
                and np.array_equal(self.bloom, other.bloom)))

    __hash__ = None  # type: ignore[assignment]  # mutable

    def copy(self) -> SeenItems:
        out = SeenItems()
        out.keys, out.n = self.keys.copy(), self.n
        out.bloom = None if self.bloom is None else self.bloom.copy()
        return out

    @property
    def exact(self) -> bool:
        return self.bloom is None

    def add(self, keys: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        if not len(keys):
            return
        if self.bloom is not None:
            new = keys[~self.contains(keys)]
            self.n += len(np.unique(new))
            self._set_bits(new)
            return
        self.keys = unique_ints(np.concatenate((self.keys, keys)))
        self.n = len(self.keys)
        if self.n > EXACT_MAX:
            self.bloom = np.zeros(BLOOM_BITS // 8, np.uint8)
            self._set_bits(self.keys)
            self.keys = np.zeros(0, np.int64)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Boolean mask: which of `keys` were added (Bloom: or a rare false positive)."""
        keys = np.asarray(keys, dtype=np.int64)
        if self.bloom is None:
            return find_sorted(self.keys, keys)[1]
        bits = _probes(keys)
        return np.all((self.bloom[bits >> 3] >> (bits & 7)) & 1, axis=-1).astype(bool)

    def _set_bits(self, keys: np.ndarray) -> None:
        bits = _probes(keys).ravel()
        np.bitwise_or.at(self.bloom, bits >> 3, (1 << (bits & 7)).astype(np.uint8))

    # -- wire form (inside the user state's JSON) -------------------------------------------
    def to_wire(self) -> dict:
        if self.bloom is None:
            return {"keys": b64(self.keys, _I64)}
        return {"bloom": b64(self.bloom, np.uint8), "n": self.n}

    @classmethod
    def from_wire(cls, d: dict) -> SeenItems:
        s = cls()
        if "bloom" in d:
            s.bloom, s.n = from_b64(d["bloom"], np.uint8), int(d["n"])
        else:
            s.keys = from_b64(d["keys"], _I64)
            s.n = len(s.keys)
        return s


def _probes(keys: np.ndarray) -> np.ndarray:
    """(len(keys), BLOOM_HASHES) bit positions by double hashing the (already uniform) key."""
    k = keys.astype(np.uint64)
    h1, h2 = k & np.uint64(0xFFFFFFFF), (k >> np.uint64(32)) | np.uint64(1)
    i = np.arange(BLOOM_HASHES, dtype=np.uint64)
    return ((h1[..., None] + i * h2[..., None]) % np.uint64(BLOOM_BITS)).astype(np.int64)


class History(NamedTuple):
    """One user's recent events as rows of a process's catalog, oldest first: what the towers
    read (models/two_tower.py `Seqs` pads a batch of them)."""

    rows: list[int]
    types: list[int]
    ts: list[int]
    texts: list[tuple[int, np.ndarray]]  # (position, text vector) of text-only events


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

    def append(self, item_id: str | None, etype: int, ts: int, text_vec: np.ndarray | None,
               max_len: int, key: int | None = None) -> None:
        """Add one event to the ring, dropping the oldest beyond `max_len`, and its item to
        the seen set. `key`: the item's key as the catalog holds it (models/items.py
        `key_of`), so that serving excludes by the same identity it ranks by; hashed from
        the id where no catalog is at hand (tools, tests)."""
        self.items.append(item_id)
        self.types.append(etype)
        self.ts.append(ts)
        self.texts.append(None if text_vec is None else b64(text_vec, _F16))
        if item_id is not None:
            self.seen.add(np.array([item_hash(item_id) if key is None else key], np.int64))
        if len(self.items) > max_len:
            cut = len(self.items) - max_len
            del self.items[:cut], self.types[:cut], self.ts[:cut], self.texts[:cut]
        self.n_events += 1

    def text_vector(self, i: int) -> np.ndarray | None:
        t = self.texts[i]
        return None if t is None else unb64(t)

    def history(self, catalog: ItemRows) -> History:
        """The last H events as rows of `catalog` (unknown items read as padding), as the
        towers read them (a training example's `history` is the same for the trainer)."""
        return History(catalog.rows_of(self.items), list(self.types), list(self.ts),
                       [(k, self.text_vector(k)) for k, t in enumerate(self.texts)
                        if t is not None])

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


class Exclusion:
    """The items one recommendation must not contain, as a key test."""

    __slots__ = ("_seen", "_recent")

    def __init__(self, seen: SeenItems | None = None, recent: np.ndarray | None = None):
        self._seen = None if seen is None else seen.copy()  # a snapshot: the state moves on
        self._recent = np.zeros(0, np.int64) if recent is None else np.unique(recent)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.int64)
        if self._seen is not None:
            return self._seen.contains(keys)
        return find_sorted(self._recent, keys)[1]

    def mask(self, catalog: KeyIndex) -> np.ndarray:
        """`contains(catalog.keys)`, cheaper while the set is exact: its keys are looked up
        in the catalog, O(excluded · log catalog), instead of every catalog key in the set,
        O(catalog · log excluded); a Bloom filter can only answer `contains`."""
        if self._seen is not None and not self._seen.exact:
            return self.contains(catalog.keys)
        keys = self._recent if self._seen is None else self._seen.keys
        out = np.zeros(len(catalog), bool)
        pos = catalog.positions(keys)
        out[pos[pos >= 0]] = True
        return out

    def __len__(self) -> int:
        return len(self._seen) if self._seen is not None else len(self._recent)


def exclusions(state: UserState, mode: ExcludeSeen) -> Exclusion:
    """What `state`'s user must not be recommended under `mode` (see the module doc)."""
    if mode == "all":
        return Exclusion(seen=state.seen)
    if mode == "recent":
        return Exclusion(recent=item_keys(state.items))
    if mode == "none":
        return Exclusion()
    raise ValueError(f"exclude_seen must be all, recent or none, not {mode!r}")


def first_unexcluded(keys: np.ndarray, excluded: Sequence[Exclusion], n: int) -> np.ndarray:
    """Mask over index results `keys` (rows best first; -1 = padding): the first `n` of each
    row that are real and not `excluded[row]`.

    >>> ex = Exclusion(recent=np.array([4]))
    >>> first_unexcluded(np.array([[4, 9, 2, 5], [4, -1, 3, 5]]), [ex, Exclusion()], 2).tolist()
    [[False, True, True, False], [True, False, True, False]]
    """
    ok = keys >= 0
    for row, ex in enumerate(excluded):
        if len(ex):
            ok[row] &= ~ex.contains(keys[row])
    return ok & (np.cumsum(ok, axis=1) <= n)
