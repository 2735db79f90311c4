"""Catalog path: item-catalog -> (validate, embed once) -> item-vectors -> every worker.

The catalog agent is partitioned like any agent, so each item is validated (bad ones to the
DLQ once, not once per worker) and embedded once cluster-wide. `item-vectors` is compacted and
every worker reads all of it (no consumer group) into its learner and index: items are
global, users are partitioned.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import orjson
import xxhash

from streams.records import RawRecord, isolate_failures
from streams.schemas import InvalidRecord, Reason, parse_item

log = logging.getLogger("streamrec.catalog")


# ------------------------------------------------------------------ item-vectors wire form
#: 1: {"item_id", "title", "v": base64 float32 vector, "s": scenarios or null, "h": text
#: fingerprint}; records written before a field existed lack it ("format": 1; "s":
#: everywhere; "h": unknown, so the item is embedded again when it is published again).
ITEM_VECTOR_FORMAT = 1


class ItemVector(NamedTuple):
    vector: np.ndarray
    scenarios: list[str] | None  # where the item may be recommended (None: everywhere)
    fingerprint: int = 0  # text_fingerprint of what `vector` was made from (0: unknown)


def text_fingerprint(encoder: str, text: str) -> int:
    """A non-zero 64-bit fingerprint of `text` as embedded by the encoder `encoder` (its
    TextEncoder.identity): equal fingerprints, the same vector (to float rounding)."""
    return xxhash.xxh64_intdigest(f"{encoder}\0{text}".encode("utf-8", "surrogatepass")) or 1


def encode_item_vector(item_id: str, title: str, vec: np.ndarray,
                       scenarios: list[str] | None = None, fingerprint: int = 0) -> bytes:
    v = base64.b64encode(np.ascontiguousarray(vec, dtype="<f4").tobytes()).decode("ascii")
    return orjson.dumps({"format": ITEM_VECTOR_FORMAT, "item_id": item_id, "title": title,
                         "v": v, "s": scenarios, "h": fingerprint})


def decode_item_vector(raw: bytes) -> tuple[str, ItemVector]:
    d = orjson.loads(raw)
    if d.get("format", 1) != ITEM_VECTOR_FORMAT:
        raise ValueError(f"item-vector format {d.get('format')!r}, expected {ITEM_VECTOR_FORMAT}")
    return d["item_id"], ItemVector(np.frombuffer(base64.b64decode(d["v"]), dtype="<f4"),
                                    d.get("s"), d.get("h") or 0)


def upsert_args(upserts: dict[str, ItemVector]
                ) -> tuple[list[str], np.ndarray, list[list[str] | None]]:
    """(ids, stacked vectors, scenarios): what `upsert_items` takes."""
    ids = list(upserts)
    return (ids, np.stack([upserts[i].vector for i in ids]),
            [upserts[i].scenarios for i in ids])


# ------------------------------------------------------------------ the catalog agent's work
@dataclass
class CatalogOutput:
    vectors: list[tuple[bytes, bytes | None]]  # (item key, item-vector record or None = delete)
    rejected: list[tuple[RawRecord, InvalidRecord]]
    embedded: int = 0  # items the encoder embedded
    unchanged: int = 0  # items whose known vector was reused (`CatalogEncoder.embed`)


@dataclass
class CatalogWork:
    """A catalog batch, parsed: what needs no encoder (`out`), and the items to embed."""

    out: CatalogOutput
    items: list[tuple[RawRecord, Any]]  # (record, parsed item)
    texts: list[str]  # each item's embedding text
    fingerprints: np.ndarray  # uint64, one per item: text_fingerprint of its text

    @property
    def item_ids(self) -> list[str]:
        return [item.item_id for _, item in self.items]


class CatalogEncoder:
    """Validates catalog records and embeds their text in one encoder call per batch,
    except the texts whose vector the caller already has (`embed`'s `known`): a catalog
    published again unchanged (a nightly full dump) costs no encoder pass. The record is
    written again either way, so item-vectors ends with the catalog's last word for every
    item, whatever order the two topics were read in."""

    def __init__(self, encode: Callable[[Sequence[str]], np.ndarray], max_item_bytes: int,
                 encoder: str = ""):
        self.encode = encode
        self.max_item_bytes = max_item_bytes
        self.encoder = encoder  # its identity (TextEncoder.identity), in every fingerprint

    def process(self, records: Sequence[RawRecord]) -> CatalogOutput:
        """`embed(parse(records))`: every item through the encoder."""
        return self.embed(self.parse(records))

    def parse(self, records: Sequence[RawRecord]) -> CatalogWork:
        """Deletes and rejections, and the items to embed with their text fingerprints."""
        work = CatalogWork(CatalogOutput([], []), [], [], np.zeros(0, np.uint64))
        for rec in records:
            if rec.value is None:  # tombstone: the key is the item id
                if rec.key:
                    work.out.vectors.append((rec.key, None))
                else:
                    work.out.rejected.append((rec, InvalidRecord(Reason.MISSING_FIELD,
                                                                 "tombstone without a key")))
                continue
            try:
                item = parse_item(rec.value, self.max_item_bytes)
            except InvalidRecord as exc:
                work.out.rejected.append((rec, exc))
                continue
            if item.deleted:
                work.out.vectors.append((item.item_id.encode(), None))
            else:
                work.items.append((rec, item))
        work.texts = [it.embedding_text() for _, it in work.items]
        work.fingerprints = np.fromiter((text_fingerprint(self.encoder, t) for t in work.texts),
                                        np.uint64, count=len(work.texts))
        return work

    def embed(self, work: CatalogWork, known: dict[int, np.ndarray] | None = None
              ) -> CatalogOutput:
        """Each item's vector record: `known[k]` for item k where given (its text's vector,
        e.g. SharedModel.known_text_vectors), the encoder's for the rest."""
        known = known or {}
        out, fps = work.out, work.fingerprints.tolist()
        todo = [k for k in range(len(work.items)) if k not in known]
        good, bad = isolate_failures(
            lambda batch: list(self.encode([work.texts[k] for k in batch])), todo)
        out.embedded, out.unchanged = len(good), len(known)
        vectors = known | dict(good)
        for k in sorted(vectors):  # in the records' order: an item's last record wins
            item, vec = work.items[k][1], vectors[k]
            out.vectors.append((item.item_id.encode(), encode_item_vector(
                item.item_id, item.title, vec, item.scenarios, fps[k])))
        for k, exc in bad:
            rec = work.items[k][0]
            out.rejected.append((rec, InvalidRecord(Reason.PROCESSING_ERROR,
                                                    f"encoder failed: {exc!r}"[:300])))
        return out


# ------------------------------------------------------------------ every worker's copy
def collapse_item_vectors(messages: list[Any]) -> tuple[dict[str, ItemVector], list[str]]:
    """item-vectors records (in order) -> the last change per item: (upserts, deletes)."""
    upserts: dict[str, ItemVector] = {}
    deletes: dict[str, None] = {}
    for m in messages:
        item_id = m.key.decode("utf-8", "replace") if m.key else None
        if m.value is None:
            if item_id is not None:
                upserts.pop(item_id, None)
                deletes[item_id] = None
            continue
        try:
            item_id, vec = decode_item_vector(m.value)
        except (ValueError, KeyError, orjson.JSONDecodeError) as exc:  # written by us; log only
            log.error("unreadable item-vector record at %s:%s: %r", m.partition, m.offset, exc)
            continue
        deletes.pop(item_id, None)
        upserts[item_id] = vec
    return upserts, list(deletes)


# ------------------------------------------------------------------ catalog agent's progress
class CatalogBacklog:
    """How far the catalog agents (on any worker) are behind the item-catalog topic.

    An event naming an item published a moment earlier must not be dead-lettered as
    `unknown_item` while the catalog agent is still embedding the catalog (~100-200 items/s
    on one CPU core: a MovieLens catalog takes seconds, and every event published meanwhile
    went to the DLQ). The agents' progress is the app's committed offsets on item-catalog,
    read with the admin API (OffsetFetch: no group membership, no rebalance). Records this
    worker has embedded itself (`caught_up`, see Runtime.catch_up_catalog) are not waited for
    again."""

    def __init__(self, admin_factory: Callable[[], Any], topic: str, group: str):
        self._factory = admin_factory
        self._admin: Any = None
        self.topic, self.group = topic, group
        self.caught_up: dict[int, int] = {}  # partition -> next offset this worker embedded

    def lag(self) -> dict[int, tuple[int, int]]:
        """partition -> [start, end) of the records no catalog agent has committed and this
        worker has not embedded, for each partition behind (blocking)."""
        from kafka import TopicPartition
        from kafka.admin import OffsetSpec

        if self._admin is None:
            self._admin = self._factory()
        (desc,) = self._admin.describe_topics([self.topic])
        tps = [TopicPartition(self.topic, p["partition_index"]) for p in desc["partitions"]]
        if not tps:
            return {}
        ends = self._admin.list_partition_offsets({tp: OffsetSpec.LATEST for tp in tps})
        done = self._admin.list_group_offsets({self.group: tps}).get(self.group, {})
        out = {}
        for tp in tps:  # a partition without a commit reads -1: nothing done
            start = max(0, done[tp].offset if tp in done else 0,
                        self.caught_up.get(tp.partition, 0))
            if ends[tp].offset > start:
                out[tp.partition] = (start, ends[tp].offset)
        return out

    def behind(self) -> int:
        """Records of item-catalog that no catalog agent has committed yet (blocking)."""
        return sum(end - start for start, end in self.lag().values())

    async def wait(self, stall_s: float = 10.0) -> int:
        """Until the agents have caught up, or made no progress for `stall_s` (no worker is
        embedding: the events are then judged against the catalog as it is). Returns the
        records still behind."""
        loop = asyncio.get_running_loop()
        last, since = await asyncio.to_thread(self._behind), loop.time()
        while last is None or last:
            if loop.time() - since > stall_s:
                log.warning("catalog agents stalled %s records behind item-catalog for %.0f s",
                            "?" if last is None else last, stall_s)
                break
            await asyncio.sleep(0.25)
            now = await asyncio.to_thread(self._behind)
            if now is not None and (last is None or now < last):
                last, since = now, loop.time()
        return last or 0

    def _behind(self) -> int | None:
        """`behind`, or None while the broker cannot say (e.g. the group's coordinator is
        not elected yet on a fresh cluster): waited on like no progress."""
        from kafka.errors import KafkaError

        try:
            return self.behind()
        except KafkaError as exc:
            log.debug("catalog backlog unknown: %r", exc)
            return None

    def close(self) -> None:
        if self._admin is not None:
            self._admin.close()
