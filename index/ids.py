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
The catalog (models/items.py ``ItemRows``) remembers every id it has hashed and raises
:class:`IdCollisionError` instead of merging two items.
"""

from __future__ import annotations

import xxhash

__all__ = ["ID_MASK", "IdCollisionError", "item_hash"]

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
