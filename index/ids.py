"""String item ids <-> stable 63-bit integer ids for FAISS.

Item ids arrive from Kafka as strings, but FAISS labels are ``int64`` and ``-1`` is its
"no result" marker.  We therefore map each item id to ``xxh64(utf-8 bytes) & (2**63 - 1)``:

* xxh64 is a fixed, published algorithm, so the value is the same in every process, on
  every worker and across library versions (unlike Python's salted ``hash``).  Workers can
  compute ids independently and a model checkpoint stays valid after a restart.
* Masking the top bit keeps the value a non-negative ``int64``, so it can never collide
  with FAISS's ``-1`` padding.

Two different strings can share a hash (about 50 % odds only after ~3 billion items,
but not impossible), and a silent collision would make one item shadow another.
:class:`IdMap` remembers every string it has hashed and raises :class:`IdCollisionError`
instead of merging two items.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import numpy as np
import xxhash

__all__ = ["ID_MASK", "IdCollisionError", "IdMap", "item_hash"]

#: Keeps the low 63 bits: the result is a non-negative int64.
ID_MASK = 0x7FFF_FFFF_FFFF_FFFF


def item_hash(item_id: str) -> int:
    """Return the stable 63-bit FAISS id of ``item_id`` (xxh64, seed 0, of its UTF-8 bytes)."""
    return xxhash.xxh64_intdigest(item_id.encode("utf-8")) & ID_MASK


class IdCollisionError(ValueError):
    """Two different item ids hash to the same integer; refusing to merge them."""

    def __init__(self, item_id: str, existing: str, key: int) -> None:
        super().__init__(f"item id {item_id!r} collides with {existing!r} (both hash to {key})")
        self.item_id = item_id
        self.existing = existing
        self.key = key


class IdMap:
    """Bidirectional ``str <-> int64`` map that detects hash collisions.

    ``hash_fn`` is injectable so tests can force collisions; production code uses the
    default :func:`item_hash`.  Methods are guarded by a lock because ``add`` is a
    check-then-insert and the map may be shared by a consumer and a search thread.
    """

    def __init__(self, hash_fn: Callable[[str], int] = item_hash) -> None:
        self._hash_fn = hash_fn
        self._to_int: dict[str, int] = {}
        self._to_str: dict[int, str] = {}
        self._lock = threading.Lock()

    def add(self, item_id: str) -> int:
        """Register ``item_id`` and return its integer id (idempotent for the same string).

        Raises :class:`IdCollisionError` when a *different* registered string already owns
        the same integer, and ``ValueError`` when ``hash_fn`` returns a value outside
        ``[0, 2**63)`` (it would not be a valid non-negative FAISS label).
        """
        with self._lock:
            known = self._to_int.get(item_id)
            if known is not None:
                return known
            key = self._checked_hash(item_id)
            owner = self._to_str.get(key)
            if owner is not None:
                raise IdCollisionError(item_id, owner, key)
            self._to_int[item_id] = key
            self._to_str[key] = item_id
            return key

    def add_many(self, item_ids: Iterable[str]) -> np.ndarray:
        """Register several ids; returns their integer ids as an ``int64`` array (same order)."""
        return np.fromiter((self.add(i) for i in item_ids), dtype=np.int64)

    def to_int(self, item_id: str) -> int | None:
        """Integer id of a registered item, or ``None`` if it was never added (or removed)."""
        return self._to_int.get(item_id)

    def to_str(self, key: int) -> str | None:
        """String id that owns ``key``, or ``None`` (e.g. for FAISS's ``-1`` padding)."""
        return self._to_str.get(int(key))

    def to_strs(self, keys: np.ndarray) -> list[str | None]:
        """`to_str` of many keys at once (one Python list pass, no numpy scalars)."""
        get = self._to_str.get
        return [get(k) for k in np.asarray(keys, dtype=np.int64).tolist()]

    def remove(self, item_id: str) -> None:
        """Forget ``item_id``; unknown ids are ignored because deletes may be replayed."""
        with self._lock:
            key = self._to_int.pop(item_id, None)
            if key is not None:
                del self._to_str[key]

    def __len__(self) -> int:
        return len(self._to_int)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._to_int

    def _checked_hash(self, item_id: str) -> int:
        key = int(self._hash_fn(item_id))
        if not 0 <= key <= ID_MASK:
            raise ValueError(f"hash of {item_id!r} is {key}, outside [0, 2**63)")
        return key
