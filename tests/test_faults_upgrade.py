"""A rolling restart from the previous release's user-state format (v1) loses nothing.

The previous release's code is not in this tree, so a fixture producer stands in for it:
phase 1 runs today's workers over the first half of the stream, then writes every user's
state back to the changelog in format v1 (the bytes the previous release wrote; `as_v1` is
checked against tests/fixtures/formats/user_state_v1.json), as if the previous release had
applied that half. Phase 2 is the rolling restart: two workers on fresh disks restore the
v1 states, take the second half while each is restarted in turn, and the fault-test audit
checks every user.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from faults import _check_final, _replay, _wait_applied, _wait_committed
from helpers import expected_states, make_settings, read_all, wait_states

from models.user_state import UserState
from streams.clients import kafka_producer
from streams.ports import free_port
from streams.publish import publish_events, publish_items
from streams.supervisor import TrainerProcess, WorkerProcess
from streams.topics import ensure_topics

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.faults]

V1_FIXTURE = Path(__file__).parent / "fixtures" / "formats" / "user_state_v1.json"


def as_v1(raw: bytes) -> bytes:
    """A user state in the previous release's format: no `seen` set, version 1."""
    d = orjson.loads(raw)
    del d["seen"]
    d["v"] = 1
    return orjson.dumps(d)


def test_as_v1_writes_the_previous_release_bytes():
    old = V1_FIXTURE.read_bytes()
    assert as_v1(UserState.from_bytes(old).to_bytes()) == old


def downgrade_changelog(s) -> int:
    """Append every user's newest changelog state again, in format v1; returns how many."""
    topic = f"{s.app_id}-user-state-changelog"
    newest = {m.key: m for m in read_all(s, topic) if not m.key.startswith(b"\x00")}
    producer = kafka_producer(s)
    try:
        for key, m in newest.items():
            producer.send(topic, key=key, value=as_v1(m.value), partition=m.partition)
        producer.flush(timeout=60)
    finally:
        producer.close()
    return len(newest)


def test_a_rolling_restart_from_v1_user_states_loses_nothing(kafka, tmp_path):
    s = make_settings(kafka, tmp_path, partitions=4, batch_size=200)
    ensure_topics(s)
    world, events = _replay(seed=97)
    half = len(events) // 2

    def worker(name: str) -> WorkerProcess:
        disk = {"data_dir": tmp_path / name.split("-")[0], "metrics_port": free_port()}
        return WorkerProcess(s.model_copy(update=disk), tmp_path / f"{name}.log").start()

    trainer = TrainerProcess(s, tmp_path / "trainer.log").start()
    procs = [trainer]
    try:
        publish_items(s, world.items, quiet=True)
        trainer.wait_ready()
        # phase 1: the first half is applied (standing in for the previous release)
        old = [worker("old_a"), worker("old_b")]
        procs += old
        publish_events(s, events[:half], quiet=True)
        wait_states(s, expected_states(events[:half], s.learner.history_len), timeout=300)
        for w in old:
            w.stop()
        downgraded = downgrade_changelog(s)
        # phase 2: new workers on fresh disks, each restarted while the second half flows
        a, b = worker("a-1"), worker("b-1")
        procs += [a, b]
        for w in (a, b):
            w.wait_ready()
        publish_events(s, events[half:], quiet=True)
        for name, at in (("a-2", half * 5 // 4), ("b-2", half * 3 // 2)):
            _wait_applied([a, b], at - half, timeout=300)
            target = a if name.startswith("a") else b
            target.stop()  # SIGTERM, as a rolling update does
            fresh = worker(name)  # same disk: the store it left, v1 and v2 records
            procs.append(fresh)
            fresh.wait_ready()
            a, b = (fresh, b) if target is a else (a, fresh)
        final = wait_states(s, expected_states(events, s.learner.history_len), timeout=300)
        committed, ends = _wait_committed(s, timeout=90)
    finally:
        for p in procs:
            p.stop()
    audit = _check_final(s, events, final, "rolling restart from v1")
    assert all((committed[p] or 0) >= ends[p] for p in ends), (committed, ends)
    untouched = {u for u in final} - {ev["user_id"] for ev in events[half:]}
    still_v1 = _still_v1(s, untouched)
    print(f"\n[faults-upgrade] {downgraded} users' states rewritten in v1 after {half} events; "
          f"two workers restored them and were each restarted under the other {half}: "
          f"applied {audit['applied']}, lost 0, duplicated 0; {still_v1} untouched users "
          f"still on v1 bytes, decoded exactly; committed = end {committed}")


def _still_v1(s, users: set[str]) -> int:
    """How many of `users` have a v1 record as their newest changelog state."""
    topic = f"{s.app_id}-user-state-changelog"
    newest = {m.key.decode(): m.value for m in read_all(s, topic) if not m.key.startswith(b"\x00")}
    return sum(1 for u in users if orjson.loads(newest[u]).get("v") == 1)
