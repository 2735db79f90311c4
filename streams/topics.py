"""Topic names, their specs, and creating them (idempotently) with kafka-python's admin client.

Catalog, item-vector and checkpoint topics are compacted: the newest record per key *is* the
state. Event, recommendation and DLQ topics keep a time-based retention.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streams.settings import Settings

log = logging.getLogger("streamrec.topics")

_WEEK_MS = 7 * 24 * 3600 * 1000
_COMPACT = {"cleanup.policy": "compact"}


def topic_specs(s: Settings) -> dict[str, dict[str, Any]]:
    """Every topic streamrec reads or writes (Faust declares its changelogs itself)."""
    parts, rf = s.partitions, s.replication_factor
    keep = {"retention.ms": str(_WEEK_MS)}
    big = {"max.message.bytes": str(max(2 * s.checkpoint_chunk_bytes, 1_048_588))}
    return {
        s.topic(s.events_topic): {"partitions": parts, "replication": rf, "config": keep},
        s.topic(s.catalog_topic): {"partitions": parts, "replication": rf, "config": _COMPACT},
        s.topic(s.item_vectors_topic): {"partitions": parts, "replication": rf,
                                        "config": _COMPACT},
        s.topic(s.recommendations_topic): {"partitions": parts, "replication": rf,
                                           "config": keep},
        s.topic(s.events_dlq_topic): {"partitions": parts, "replication": rf, "config": keep},
        s.topic(s.catalog_dlq_topic): {"partitions": parts, "replication": rf, "config": keep},
        s.topic(s.training_examples_topic): {"partitions": parts, "replication": rf,
                                             "config": keep},
        s.topic(s.snapshots_topic): {"partitions": 1, "replication": rf,
                                     "config": {**_COMPACT, **big}},
        s.topic(s.checkpoints_topic): {"partitions": 1, "replication": rf,
                                       "config": {**_COMPACT, **big}},
    }


def admin_client(bootstrap: list[str], timeout: float = 30, **client: Any) -> Any:
    """A KafkaAdminClient with short timeouts (and the security options in `client`)."""
    from kafka.admin import KafkaAdminClient

    ms = max(int(timeout * 1000), 1000)
    return KafkaAdminClient(bootstrap_servers=bootstrap, client_id="streamrec-admin",
                            request_timeout_ms=ms, bootstrap_timeout_ms=ms, **client)


def create_topics(bootstrap: list[str], topics: dict[str, dict], timeout: float = 30,
                  **client: Any) -> None:
    """Create the missing ones of `topics` (name -> {partitions, replication, config}).

    Existing topics are left alone, not altered: at startup a concurrent creator or a rerun is
    normal. Returns once every new topic has leaders, so producers can use it at once.
    """
    from kafka.errors import TopicAlreadyExistsError

    admin = admin_client(bootstrap, timeout, **client)
    try:
        missing = {n: t for n, t in topics.items() if n not in set(admin.list_topics())}
        for name, spec in missing.items():
            log.info("creating topic %s %s", name, spec)
            new = {"num_partitions": int(spec.get("partitions", 1)),
                   "replication_factor": int(spec.get("replication", 1)),
                   "configs": {k: str(v) for k, v in (spec.get("config") or {}).items()}}
            try:
                admin.create_topics({name: new}, timeout_ms=int(timeout * 1000))
            except TopicAlreadyExistsError:
                log.debug("topic %s was created concurrently", name)
        if missing:
            admin.wait_for_topics(list(missing), timeout_ms=int(timeout * 1000))
    finally:
        admin.close()


def ensure_topics(s: Settings, timeout: float = 30, role: str | None = None) -> None:
    """Create the missing ones of streamrec's topics (all, or those `role` uses: a worker
    with least privilege can neither see nor create the trainer's checkpoints topic)."""
    from kafka.errors import ClusterAuthorizationFailedError, TopicAuthorizationFailedError

    specs = topic_specs(s)
    if role is not None:
        from streams.acls import grants

        used = {g.name for g in grants(s, role) if g.resource == "topic" and not g.prefixed}
        specs = {name: spec for name, spec in specs.items() if name in used}
    try:
        create_topics(s.bootstrap, specs, timeout, **s.kafka_security())
    except (ClusterAuthorizationFailedError, TopicAuthorizationFailedError) as exc:
        from streams.errors import UserError

        raise UserError(f"a topic is missing and {principal(s)} may not create it ({exc}): "
                        "create the topics first, as an admin (deploy/kafka/create-topics.sh, "
                        "or any streamrec command with an admin's credentials)") from None


def principal(s: Settings) -> str:
    """How the broker names this client (for messages)."""
    return f"User:{s.sasl_username}" if "SASL" in s.security_protocol else "this client"


def topic_partitions(s: Settings, topic: str) -> list[int]:
    """The partition numbers of `topic` (admin API: no consumer group involved)."""
    admin = admin_client(s.bootstrap, 30, **s.kafka_security())
    try:
        (desc,) = admin.describe_topics([topic])
    finally:
        admin.close()
    parts = sorted(p["partition_index"] for p in desc["partitions"])
    if not parts:
        raise RuntimeError(f"topic {topic} has no partitions (not created?)")
    return parts
