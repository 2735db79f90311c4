"""The group lease's bounds (streams/group_lease.py): offline from recorded proofs, and on
the real broker the premise behind its rebalance bound: heartbeats answered
REBALANCE_IN_PROGRESS keep a member whose JoinGroup waits on a batch in the group past its
session timeout."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener

from streams import faust_internals as fi
from streams import group_lease
from streams.group_lease import GroupLease
from streams.topics import create_topics

SESSION, REBALANCE, MARGIN = 6.0, 30.0, 1.0


def _lease(group: str) -> GroupLease:
    return GroupLease(group, SESSION, REBALANCE, margin_s=MARGIN)


def test_successful_heartbeats_renew_the_lease_of_their_generation_only():
    g = f"lease-{time.monotonic_ns()}"
    group_lease._prove(g, 1, 100.0, "stable")
    group_lease._prove(g, 1, 103.0, "stable")
    assert _lease(g).end(1) == 103.0 + SESSION - MARGIN
    group_lease._prove(g, 2, 110.0, "stable")
    assert _lease(g).end(1) == 103.0 + SESSION - MARGIN  # a later generation renews not gen 1
    assert _lease(g).newest() == (2, 110.0 + SESSION - MARGIN)
    assert _lease(g).end(7) == float("-inf")


def test_a_rebalance_extends_the_lease_up_to_the_rebalance_timeout_until_the_joingroup():
    g = f"lease-{time.monotonic_ns()}"
    lease = _lease(g)
    group_lease._prove(g, 1, 100.0, "stable")
    for sent in (101.0, 104.0, 108.0):  # answered REBALANCE_IN_PROGRESS
        group_lease._prove(g, 1, sent, "rebalancing")
    assert lease.end(1) == 108.0 + SESSION - MARGIN
    assert "no heartbeat was answered" in lease.ended_by(1)
    group_lease._prove(g, 1, 128.0, "rebalancing")  # the rebalance timeout bounds it
    assert lease.end(1) == 100.0 + REBALANCE - MARGIN
    assert "rebalanced for 30 s" in lease.ended_by(1)
    group_lease._prove(g, 1, 112.0, "joining")  # from now on the rebalance may complete
    assert lease.end(1) == 112.0 - MARGIN
    assert lease.ended_by(1) == "this worker sent its JoinGroup"
    group_lease._prove(g, -1, 90.0, "joining")  # a first join has no generation: no lease
    assert lease.newest() == (1, 112.0 - MARGIN)


class _SlowRevoke(ConsumerRebalanceListener):
    """Revokes as Faust does with a batch in flight: only when it is done, here after longer
    than a session timeout."""

    def __init__(self) -> None:
        self.revoked_for: list[float] = []

    async def on_partitions_revoked(self, revoked):  # noqa: ANN001, ANN201
        if revoked:
            t0 = time.monotonic()
            await asyncio.sleep(SESSION + 3)
            self.revoked_for.append(time.monotonic() - t0)

    async def on_partitions_assigned(self, assigned):  # noqa: ANN001, ANN201
        pass


async def _wait_until(cond, timeout: float = 60.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def _join_during_a_slow_revoke(bootstrap: str, group: str) -> tuple[str, str]:
    """c1 holds the group's partitions; c2 joins while c1's revocation takes longer than a
    session. c1's member id before and after (aiokafka's coordinator, read by the test only)."""

    def consumer() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                session_timeout_ms=int(SESSION * 1000),
                                heartbeat_interval_ms=500, rebalance_timeout_ms=30_000)

    slow = _SlowRevoke()
    c1, c2 = consumer(), consumer()
    c1.subscribe([group], listener=slow)
    await c1.start()
    try:
        await _wait_until(lambda: c1.assignment())
        member = c1._coordinator.member_id
        c2.subscribe([group])
        await c2.start()
        await _wait_until(lambda: slow.revoked_for and c1.assignment() is not None
                          and c1._coordinator.generation > 1 and c2.assignment())
        return member, c1._coordinator.member_id
    finally:
        await c2.stop()
        await c1.stop()


@pytest.mark.kafka
def test_a_member_whose_joingroup_waits_on_a_batch_stays_in_the_group_past_its_session(kafka):
    """c1 holds its partitions; c2 joins; c1's revocation (as Faust's, waiting for its batch)
    takes longer than a session timeout. Its heartbeats, answered REBALANCE_IN_PROGRESS,
    keep it in the group: it rejoins with the same member id, and the lease its proofs give
    covers the whole wait."""
    group = f"lease-{time.monotonic_ns()}"
    create_topics(kafka.bootstrap, {group: {"partitions": 2, "replication": 1, "config": {}}})
    proofs: list[tuple[int, float, str]] = []
    fi.on_membership_proved(lambda g, gen, sent, proof: g == group and proofs.append(
        (gen, sent, proof)))
    try:
        before, after = asyncio.run(_join_during_a_slow_revoke(kafka.bootstrap, group))
    finally:
        group_lease.install()  # the worker's callback again, for later tests in this process
    assert before == after  # not evicted
    gen1 = [(sent, proof) for gen, sent, proof in proofs if gen == 1]
    last_stable = max(sent for sent, proof in gen1 if proof == "stable")
    joining = min(sent for sent, proof in gen1 if proof == "joining")
    assert joining - last_stable > SESSION, gen1  # no successful heartbeat for a session
    answered = [sent for sent, proof in gen1 if proof != "joining" and sent <= joining]
    gaps = [b - a for a, b in zip(answered, answered[1:], strict=False)]
    assert max(gaps) < SESSION - MARGIN, gen1  # yet the lease never lapsed until the join
    assert any(gen == 2 and proof == "stable" for gen, _, proof in proofs)
