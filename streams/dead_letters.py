"""Dead-letter records: the original bytes, untouched, plus why and where they came from.

The value is the source record's value byte for byte (it may not even be UTF-8), so a fixed
record can be replayed as is; reason, detail and source position travel in headers, the way
Kafka Connect's DLQ does it.
"""

from __future__ import annotations

import time

from streams.schemas import Reason

H_REASON = "streamrec.reason"
H_DETAIL = "streamrec.detail"
H_TOPIC = "streamrec.source.topic"
H_PARTITION = "streamrec.source.partition"
H_OFFSET = "streamrec.source.offset"
H_TS = "streamrec.dlq.ts"


def dlq_headers(reason: Reason, detail: str, topic: str, partition: int,
                offset: int) -> list[tuple[str, bytes]]:
    return [
        (H_REASON, reason.value.encode()),
        (H_DETAIL, detail.encode("utf-8", "replace")[:1000]),
        (H_TOPIC, topic.encode()),
        (H_PARTITION, str(partition).encode()),
        (H_OFFSET, str(offset).encode()),
        (H_TS, str(int(time.time() * 1000)).encode()),
    ]


def read_headers(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """Headers of a DLQ record as a dict of str (for tools and tests)."""
    return {k: v.decode("utf-8", "replace") for k, v in (headers or [])}
