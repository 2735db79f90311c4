"""How long this worker surely still owns its partitions: its lease on the consumer group.

A worker cut off from the broker keeps running. Once its session expires, the group gives
its partitions to another worker; whatever the cut-off one writes after that (a batch it
finishes when the link heals, records that waited in its producer) lands after the new
owner's writes, and the changelog ends on a stale user state: events lost. Seen in
tests/test_faults_network.py: 390 of 20,000 events lost after an 18 s cut. Kafka fences
such zombies only through transactions, which streamrec does not use (README, Guarantees).

The broker evicts a member no sooner than a session timeout after the last heartbeat it
received, which is no sooner than when this process sent it. So a successful heartbeat or
SyncGroup *sent* at t proves membership until t + session timeout: a lease. Each lease
belongs to a group generation; a successful request of a later generation does not extend
an earlier one (the partitions may have moved in between).

A rebalance (a worker joins or leaves) answers heartbeats REBALANCE_IN_PROGRESS. Those
still renew the session, and the group cannot complete the rebalance without this member's
JoinGroup (which Faust sends only once the batch in flight is done) before the rebalance
timeout, counted from a start later than the last successful heartbeat. So during a
rebalance the lease runs to min(last answered heartbeat + session timeout, last successful
one + rebalance timeout), and it ends when this member sends its JoinGroup. (Counting only
successful heartbeats fenced a healthy worker whose first batch outlasted a session while
a second worker joined.)

When membership was proved comes from aiokafka's internals (streams/faust_internals.py
on_membership_proved).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from streams.faust_internals import on_membership_proved

log = logging.getLogger("streamrec.lease")

T = TypeVar("T")

#: Exit status of a worker whose lease ran out while it held a batch.
EXIT_FENCED = 4

_lock = threading.Lock()


@dataclass
class _Proofs:
    """When requests of one generation that bound its lease were sent (monotonic s)."""

    stable: float = float("-inf")  # the newest successful heartbeat or SyncGroup
    answered: float = float("-inf")  # the newest heartbeat answered at all (incl. rebalancing)
    joining: float = float("inf")  # this member's JoinGroup: the rebalance may complete

    def end(self, session_s: float, rebalance_s: float) -> float:
        return min(self.answered + session_s, self.stable + rebalance_s, self.joining)


#: group id -> generation -> its proofs
_proofs: dict[str, dict[int, _Proofs]] = {}


def install() -> None:
    """Record, process-wide, when each group's membership was last proved (idempotent)."""
    on_membership_proved(_prove)


def _prove(group: str, generation: int, sent: float, proof: str) -> None:
    with _lock:
        gens = _proofs.setdefault(group, {})
        p = gens.setdefault(generation, _Proofs())
        if proof == "joining":
            p.joining = min(p.joining, sent)
            return
        p.answered = max(p.answered, sent)
        if proof == "stable":
            p.stable = max(p.stable, sent)
        for old in sorted(gens)[:-4]:
            del gens[old]


class GroupLease:
    """The lease of one group's member in this process (see the module docstring)."""

    def __init__(self, group: str, session_timeout_s: float, rebalance_timeout_s: float,
                 margin_s: float):
        self.group = group
        self.session_timeout_s = session_timeout_s
        self.rebalance_timeout_s = max(rebalance_timeout_s, session_timeout_s)
        self.margin_s = margin_s

    def newest(self) -> tuple[int, float] | None:
        """(generation, end) of the newest generation's lease; None before any."""
        with _lock:
            gens = {g: p for g, p in _proofs.get(self.group, {}).items() if g >= 0}
        if not gens:
            return None
        gen = max(gens)
        return gen, self.end(gen)

    def end(self, generation: int) -> float:
        """When the lease of `generation` ends (monotonic seconds)."""
        with _lock:
            p = _proofs.get(self.group, {}).get(generation)
            if p is None:
                return float("-inf")
            return p.end(self.session_timeout_s, self.rebalance_timeout_s) - self.margin_s

    def ended_by(self, generation: int) -> str:
        """Which bound ends the lease of `generation`, in words."""
        with _lock:
            p = _proofs.get(self.group, {}).get(generation, _Proofs())
        bounds = {
            f"no heartbeat was answered for {self.session_timeout_s:.0f} s":
                p.answered + self.session_timeout_s,
            f"the group rebalanced for {self.rebalance_timeout_s:.0f} s":
                p.stable + self.rebalance_timeout_s,
            "this worker sent its JoinGroup": p.joining,
        }
        return min(bounds, key=bounds.__getitem__)

    async def hold(self, what: str, aw: Awaitable[T]) -> T:
        """Run `aw` (a batch) inside the lease, or exit the process (module docstring)."""
        generation = await self._current(what)
        task = asyncio.ensure_future(aw)
        while True:
            left = self.end(generation) - time.monotonic()
            if left <= 0:
                task.cancel()
                fence(f"{what} was not done when the lease on group {self.group} ran out "
                      f"({self.ended_by(generation)})")
            done, _ = await asyncio.wait({task}, timeout=left)
            if done:
                return task.result()

    async def _current(self, what: str) -> int:
        """The generation whose lease holds now, after waiting up to a session timeout for a
        renewal if it has run out (a broker restart, a brief cut)."""
        newest = self.newest()
        if newest is None:
            fence(f"{what}: this worker never proved membership of group {self.group}")
        generation, end = newest
        deadline = time.monotonic() + self.session_timeout_s
        while time.monotonic() >= self.end(generation):
            latest = self.newest()
            if latest is not None and latest[0] != generation:
                fence(f"{what}: the group moved on to generation {latest[0]} while this "
                      f"worker held records of generation {generation}")
            if time.monotonic() > deadline:
                fence(f"{what}: the lease on group {self.group} ran out and no heartbeat "
                      f"renewed it within {self.session_timeout_s:.0f} s")
            await asyncio.sleep(0.1)
        return generation


def fence(why: str) -> None:
    """Exit now: nothing of this process may reach Kafka any more (module docstring)."""
    log.critical("%s; exiting so that nothing lands late: the partitions' next owner "
                 "replays the uncommitted batch", why)
    logging.shutdown()
    os._exit(EXIT_FENCED)
