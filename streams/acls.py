"""The least privilege of each role: which ACLs a serving worker, the trainer, a publisher and
a downstream consumer need, granting them, and checking them at start-up.

A broker with an authorizer and allow.everyone.if.no.acl.found=false lets a principal do
only what an ACL grants. `grants(settings, role)` is the whole list per role (topics named
with the settings' prefix and names; Faust's own topics, the changelog and the assignor's,
by the prefix `<app_id>-`); docs/operations.md prints it (tests keep the two in sync);
`streamrec acls ROLE PRINCIPAL --apply` creates it with an admin's credentials; and
`missing(settings, role)` asks the broker which of them the running principal lacks, so a
worker without, say, WRITE on recommendations stops at start-up saying so instead of
failing on its first batch.

Topics are created by an operator (or `ensure_topics` with an admin's credentials): no role
has CREATE on the cluster. Faust creates the tables' changelog topics itself, hence CREATE
on the `<app_id>-` prefix for workers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from streams.settings import Settings

Role = Literal["worker", "trainer", "publisher", "consumer"]
ROLES: tuple[Role, ...] = ("worker", "trainer", "publisher", "consumer")


@dataclass(frozen=True)
class Grant:
    resource: Literal["topic", "group"]
    name: str
    operations: tuple[str, ...]  # READ, WRITE, DESCRIBE, CREATE
    prefixed: bool = False
    why: str = ""


def grants(s: Settings, role: Role, group: str | None = None) -> list[Grant]:
    """Every ACL `role` needs under settings `s` (`group`: a consumer's own group)."""
    t = s.topic
    read = ("READ", "DESCRIBE")
    write = ("WRITE", "DESCRIBE")
    read_write = ("READ", "WRITE", "DESCRIBE")
    if role == "worker":
        return [
            Grant("topic", t(s.events_topic), read, why="events, and the gap filler's reads"),
            Grant("topic", t(s.catalog_topic), read, why="the catalog agent"),
            Grant("topic", t(s.item_vectors_topic), read_write,
                  why="the catalog agent writes, every worker reads all of it"),
            Grant("topic", t(s.snapshots_topic), read, why="the trainer's model versions"),
            Grant("topic", t(s.recommendations_topic), write, why="the output"),
            Grant("topic", t(s.events_dlq_topic), write, why="rejected events"),
            Grant("topic", t(s.catalog_dlq_topic), write, why="rejected items"),
            Grant("topic", t(s.training_examples_topic), write, why="for the trainer"),
            Grant("topic", f"{s.app_id}-", ("CREATE", "READ", "WRITE", "DESCRIBE"),
                  prefixed=True, why="Faust's changelog and assignor topics"),
            Grant("group", s.app_id, read, why="the consumer group (and catalog progress)"),
        ]
    if role == "trainer":
        return [
            Grant("topic", t(s.training_examples_topic), read, why="the examples"),
            Grant("topic", t(s.item_vectors_topic), read, why="the catalog's text vectors"),
            Grant("topic", t(s.snapshots_topic), read_write,
                  why="publishes versions; reads them back at start"),
            Grant("topic", t(s.checkpoints_topic), read_write,
                  why="its checkpoints (no other role may write here)"),
        ]
    if role == "publisher":
        return [Grant("topic", t(s.events_topic), write, why="`streamrec publish`"),
                Grant("topic", t(s.catalog_topic), write, why="`streamrec catalog load`")]
    if role == "consumer":
        return [Grant("topic", t(s.recommendations_topic), read, why="the recommendations"),
                Grant("group", group or "recommendations-reader", read,
                      why="its own consumer group")]
    raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")


def acl_objects(principal: str, items: Iterable[Grant]) -> list:
    """kafka-python ACL objects allowing `principal` (e.g. "User:worker") the grants."""
    from kafka.admin import (
        ACL,
        ACLOperation,
        ACLPermissionType,
        ACLResourcePatternType,
        ResourcePattern,
        ResourceType,
    )

    out = []
    for g in items:
        pattern = ResourcePattern(
            ResourceType.TOPIC if g.resource == "topic" else ResourceType.GROUP, g.name,
            ACLResourcePatternType.PREFIXED if g.prefixed else ACLResourcePatternType.LITERAL)
        out += [ACL(principal, "*", ACLOperation[op], ACLPermissionType.ALLOW, pattern)
                for op in g.operations]
    return out


def apply(admin_settings: Settings, principal: str, items: Iterable[Grant]) -> int:
    """Create the ACLs (with an admin's credentials); returns how many."""
    from streams.topics import admin_client

    acls = acl_objects(principal, items)
    admin = admin_client(admin_settings.bootstrap, 30, **admin_settings.kafka_security())
    try:
        result = admin.create_acls(acls)
    finally:
        admin.close()
    failed = result.get("failed") or []
    if failed:
        raise RuntimeError(f"{len(failed)} ACLs were refused: {failed[:3]}")
    return len(acls)


def missing(s: Settings, role: Role) -> list[str]:
    """What of `role`'s grants the broker says this principal lacks (its authorized
    operations per topic, KIP-430; empty where the broker has no authorizer). Prefixed
    grants, for topics Faust creates later, and groups are not checked here."""
    from streams.topics import admin_client

    wanted = {g.name: g for g in grants(s, role) if g.resource == "topic" and not g.prefixed}
    admin = admin_client(s.bootstrap, 30, **s.kafka_security())
    try:
        topics = admin.describe_topics(list(wanted))
    finally:
        admin.close()
    out = []
    for topic in topics:
        g = wanted.get(topic.get("topic") or topic.get("name"))
        ops = topic.get("authorized_operations")
        if g is None:
            continue
        if topic.get("error_code") == 29:  # TOPIC_AUTHORIZATION_FAILED: not even DESCRIBE
            out.append(f"{', '.join(g.operations)} on topic {g.name!r}")
        elif ops:
            lacks = [op for op in g.operations if op not in ops and "ALL" not in ops]
            if lacks:
                out.append(f"{', '.join(lacks)} on topic {g.name!r}")
    return out


def markdown(s: Settings) -> str:
    """The roles' ACLs as a Markdown table (docs/operations.md)."""
    rows = ["| role | resource | name | operations | why |", "|---|---|---|---|---|"]
    for role in ROLES:
        for g in grants(s, role):
            name = f"`{g.name}*` (prefix)" if g.prefixed else f"`{g.name}`"
            rows.append(f"| {role} | {g.resource} | {name} | {', '.join(g.operations)} | "
                        f"{g.why} |")
    return "\n".join(rows)


def check(s: Settings, role: Role) -> None:
    """Stop with one line naming what is missing when this principal lacks an ACL its role
    needs (a worker without WRITE on recommendations would otherwise fail every batch)."""
    from streams.errors import UserError
    from streams.topics import principal

    lacks = missing(s, role)
    if lacks:
        raise UserError(f"{principal(s)} lacks {'; '.join(lacks)}, which a {role} needs: "
                        f"grant them (docs/operations.md#acls, or `streamrec acls {role} "
                        f"{principal(s)} --apply` with an admin's credentials)")
