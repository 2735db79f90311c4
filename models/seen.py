"""Every item a user has interacted with, kept compactly, and the one rule for what not to
recommend again.

A user's history ring holds only the last `history_len` events, so "drop what is in the
history" recommends again an item consumed 51 events ago (seen: 39% of lists on ML-100K held
one). `SeenItems` keeps all of them by their stable 63-bit key (index/ids.py `item_hash`):
exactly, as a sorted int64 array, up to `EXACT_MAX` keys (8 KB); beyond that as a Bloom
filter of `BLOOM_BITS` bits with `BLOOM_HASHES` probes, into which the exact keys are moved.
A Bloom filter has no false negatives, so a seen item is never recommended; its false
positives hide a few unseen items: the share is (1 - e^(-k·n/m))^k, 0.00004 at n = 5,000,
0.002 at 10,000 and 0.05 at 20,000 for the defaults (users that large usually want repeats,
`recent`, anyway).

`exclusions(state, mode)` is the rule serving and the offline evaluator both apply
(`exclude_seen` in the settings): `all` (default) every item ever seen, `recent` only the
history ring (for catalogs where repeats are wanted: groceries, music), `none` nothing.

>>> s = SeenItems()
>>> s.add(np.array([7, 3, 7]))
>>> len(s), s.contains(np.array([3, 4, 7])).tolist()
(2, [True, False, True])
>>> SeenItems.from_wire(s.to_wire()).contains(np.array([3, 7, 9])).tolist()
[True, True, False]
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from index.ids import item_hash
from models.items import find_sorted, unique_ints

if TYPE_CHECKING:
    from models.items import KeyIndex
    from models.user_state import UserState

ExcludeSeen = Literal["all", "recent", "none"]

EXACT_MAX = 1024
BLOOM_BITS = 1 << 17  # 16 KB
BLOOM_HASHES = 7
_I64 = np.dtype("<i8")


def item_keys(item_ids: list[str | None]) -> np.ndarray:
    """Stable int64 keys of item ids (None entries, text-only events, are dropped)."""
    return np.fromiter((item_hash(i) for i in item_ids if i is not None), dtype=np.int64)


class SeenItems:
    """A set of item keys: exact while small, a Bloom filter once large (see module doc)."""

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
            return {"keys": base64.b64encode(self.keys.astype(_I64).tobytes()).decode("ascii")}
        return {"bloom": base64.b64encode(self.bloom.tobytes()).decode("ascii"), "n": self.n}

    @classmethod
    def from_wire(cls, d: dict) -> SeenItems:
        s = cls()
        if "bloom" in d:
            s.bloom = np.frombuffer(base64.b64decode(d["bloom"]), np.uint8).copy()
            s.n = int(d["n"])
        else:
            s.keys = np.frombuffer(base64.b64decode(d["keys"]), _I64).astype(np.int64)
            s.n = len(s.keys)
        return s


def _probes(keys: np.ndarray) -> np.ndarray:
    """(len(keys), BLOOM_HASHES) bit positions by double hashing the (already uniform) key."""
    k = keys.astype(np.uint64)
    h1, h2 = k & np.uint64(0xFFFFFFFF), (k >> np.uint64(32)) | np.uint64(1)
    i = np.arange(BLOOM_HASHES, dtype=np.uint64)
    return ((h1[..., None] + i * h2[..., None]) % np.uint64(BLOOM_BITS)).astype(np.int64)


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
