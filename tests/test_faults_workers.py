"""Fault injection against real workers: at-least-once delivery, exactly-once effect on users.

Kafka delivers at least once; streamrec makes each event's effect on its user's state happen
exactly once (the state carries the last applied offset per partition, written in the same
changelog record as the effect; replays at or below it are skipped). These tests replay a
sizeable stream through workers that are SIGKILLed at random points (and restarted, some on
a fresh disk) or stopped and restarted beside a second worker (rebalances), and check every
user's final state against what a no-fault run stores: the last H item ids and the count.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict

import pytest
from helpers import (
    expected_states,
    latest_recommendations,
    make_settings,
    user_states,
    wait_states,
)

from models.synthetic import SyntheticStream, make_world
from streams.demo import free_port
from streams.publish import publish_events, publish_items
from streams.supervisor import WorkerProcess, total
from streams.topics import ensure_topics

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.faults]

N_EVENTS = 20_000
N_USERS = 600  # Zipf-skewed: every one of them gets events in 20k draws (asserted >= 500)
N_KILLS = 3
PARTITIONS = 4
APPLIED = {"outcome": "applied"}


# ---------------------------------------------------------------------------------- helpers
def _histories(events: list[dict]) -> dict[str, list]:
    hist: dict[str, list] = defaultdict(list)
    for ev in events:
        hist[ev["user_id"]].append(ev["item_id"])
    return hist


def _audit(states: dict, hist: dict[str, list], history_len: int) -> dict:
    """Compare durable states with the event list. A state that applied n of a user's events
    must hold exactly the first n of them (in order, last H kept): a count above the user's
    total is a double application, a history that is not that prefix is a skip or a repeat.
    `lost`/`duplicated`: events missing / applied too often, summed over users."""
    lost = duplicated = 0
    wrong: list[str] = []
    for user, items in hist.items():
        st = states.get(user)
        n = 0 if st is None else st.n_events
        lost += max(0, len(items) - n)
        duplicated += max(0, n - len(items))
        if st is not None and st.items != items[:n][-history_len:]:
            wrong.append(user)
    unknown = sorted(set(states) - set(hist))
    return {"applied": sum(st.n_events for st in states.values()), "lost": lost,
            "duplicated": duplicated, "wrong_history": wrong, "unknown_users": unknown}


def _explain(s, user: str, hist: dict[str, list]) -> str:
    """A user's records on the events topic and every changelog record of their state."""
    from helpers import read_all

    from models.user_state import UserState

    recs = [(m.partition, m.offset) for m in read_all(s, s.topic(s.events_topic))
            if m.key == user.encode()]
    log = [(m.partition, m.offset, st.n_events, st.offsets,
            sum(1 for a, b in zip(st.items, hist[user][:st.n_events][-len(st.items):],
                                  strict=False) if a != b))
           for m in read_all(s, f"{s.app_id}-user-state-changelog") if m.key == user.encode()
           for st in [UserState.from_bytes(m.value)]]
    from helpers import dead_letters

    from streams.dead_letters import H_DETAIL, H_OFFSET, H_PARTITION, H_REASON

    dlq = [tuple(h.get(k) for k in (H_REASON, H_PARTITION, H_OFFSET, H_DETAIL))
           for _, h in dead_letters(s, s.topic(s.events_dlq_topic))]
    progress = {m.key[1:].decode(): int(m.value)
                for m in read_all(s, f"{s.app_id}-user-state-changelog") if m.key[:1] == b"\x00"}
    committed, ends = _offsets(s)
    return (f"{user}: {len(hist[user])} events at (partition, offset) {recs}; changelog "
            f"(partition, offset, n_events, applied offsets, items off-prefix) {log}; "
            f"events DLQ ({len(dlq)} records) {dlq[:50]}; stored progress {progress}; "
            f"committed {committed}; end offsets {ends}")


def _applied(worker: WorkerProcess) -> float:
    """Events this worker process applied (0 if its page is not up yet)."""
    try:
        return total(worker.metrics(), "streamrec_events_total", **APPLIED)
    except OSError:
        return 0.0


def _wait_applied(workers: list[WorkerProcess], at_least: float, timeout: float) -> float:
    """Until the live workers' applied counters sum to `at_least`."""
    deadline = time.monotonic() + timeout
    value = 0.0
    while time.monotonic() < deadline:
        for w in workers:
            w._check_alive()
        value = sum(_applied(w) for w in workers)
        if value >= at_least:
            return value
        time.sleep(0.25)
    tails = "\n".join(w.log_tail() for w in workers)
    raise TimeoutError(f"applied {value} < {at_least} after {timeout}s\n{tails}")


def _offsets(s) -> tuple[dict[int, int | None], dict[int, int]]:
    """The consumer group's committed offsets on the events topic, and the topic's end offsets."""
    from kafka import TopicPartition

    from streams.clients import kafka_consumer

    consumer = kafka_consumer(s, group_id=s.app_id, enable_auto_commit=False)
    try:
        topic = s.topic(s.events_topic)
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        ends = consumer.end_offsets(tps)
        return ({tp.partition: consumer.committed(tp) for tp in tps},
                {tp.partition: ends[tp] for tp in tps})
    finally:
        consumer.close()


def _wait_committed(s, timeout: float) -> tuple[dict, dict]:
    """Committed offsets lag by up to a commit interval: poll until they reach the ends."""
    deadline = time.monotonic() + timeout
    while True:
        committed, ends = _offsets(s)
        if all((committed[p] or 0) >= ends[p] for p in ends) or time.monotonic() > deadline:
            return committed, ends
        time.sleep(1)


def _check_final(s, events: list[dict], states: dict, label: str) -> dict:
    """The per-user guarantees: exact count and history, last recommendation on last event."""
    H = s.learner.history_len
    hist = _histories(events)
    audit = _audit(states, hist, H)
    figures = (f"{label}: {len(events)} events, {len(hist)} users, applied {audit['applied']}, "
               f"lost {audit['lost']}, duplicated {audit['duplicated']}, "
               f"wrong histories {len(audit['wrong_history'])}")
    some = (audit["wrong_history"] or [u for u in hist if states.get(u) is None
                                       or states[u].n_events != len(hist[u])] or [None])[0]
    detail = "" if some is None else "\n" + _explain(s, some, hist)
    assert audit["lost"] == 0, figures + detail
    assert audit["duplicated"] == 0, figures + detail
    assert audit["applied"] == len(events), figures
    assert not audit["unknown_users"], f"{figures}; unknown users {audit['unknown_users']}"
    for user, items in hist.items():
        st = states[user]
        assert st.n_events == len(items), f"{figures}; {user}: {st.n_events} != {len(items)}"
        assert st.items == items[-H:], f"{figures}; {user}: history differs"
    recs = latest_recommendations(s)
    last_ts = {ev["user_id"]: ev["ts"] for ev in events}
    stale = [u for u, ts in last_ts.items() if u not in recs or recs[u]["source_event_ts"] != ts]
    assert not stale, f"{figures}; {len(stale)} users' last recommendation is not on their " \
        f"last event, e.g. {stale[:5]}"
    return audit


def _replay(seed: int) -> tuple[object, list[dict]]:
    world = make_world(400, n_topics=8, seed=seed)
    events = list(SyntheticStream(world, n_users=N_USERS, seed=seed + 1).events(N_EVENTS))
    assert len({ev["user_id"] for ev in events}) >= 500
    return world, events


# ---------------------------------------------------------------------------------- tests
def test_random_sigkills_lose_and_double_nothing(kafka, tmp_path):
    rng = random.Random(20_261_123)
    s = make_settings(kafka, tmp_path, partitions=PARTITIONS, batch_size=200,
                      checkpoint_interval_s=2.0)
    ensure_topics(s)
    world, events = _replay(seed=31)
    hist = _histories(events)
    H = s.learner.history_len
    # one kill point (in durable events) in each third of [10 %, 90 %] of the replay
    span = (N_EVENTS * 8 // 10) // N_KILLS
    kill_points = [N_EVENTS // 10 + k * span + rng.randrange(span // 4, span) for k in
                   range(N_KILLS)]
    # restarts: fresh disk (state only from the changelog), same disk, fresh disk
    fresh_disk = [True, False, True]

    started = time.monotonic()
    lives: list[str] = []
    worker = WorkerProcess(s, tmp_path / "life-0.log").start()
    try:
        publish_items(s, world.items, quiet=True)
        worker.wait_ready()
        worker.wait_for("streamrec_index_items", len(world.items), timeout=180)
        publish_events(s, events, quiet=True)
        durable = 0
        settings = s
        for k, point in enumerate(kill_points):
            need = max(1, point - durable)  # this lifetime applies about this many, then dies
            samples = worker.wait_for("streamrec_events_total", need, timeout=300, **APPLIED)
            # the batch that got there counts its events before they are durable; after a
            # restart it can hold ~1,000 refetched records and take seconds: wait for its
            # delivery, so each lifetime leaves durable progress to check
            commits = total(samples, "streamrec_stage_seconds_count", stage="commit")
            worker.wait_for("streamrec_stage_seconds_count", commits + 1, timeout=120,
                            stage="commit")
            time.sleep(rng.uniform(0.0, 0.4))  # anywhere in a batch: decode, emit, deliver
            worker.kill()
            states = user_states(s)
            audit = _audit(states, hist, H)
            lives.append(f"life {k}: killed at ~{point} durable target, "
                         f"durable after {audit['applied']}")
            assert audit["duplicated"] == 0 and not audit["wrong_history"], \
                f"after kill {k + 1}: {audit['duplicated']} duplicated effects, " \
                f"{len(audit['wrong_history'])} users with a history that is not a prefix " \
                f"of their events, e.g. {audit['wrong_history'][:5]}\n" + \
                (_explain(s, audit["wrong_history"][0], hist) if audit["wrong_history"] else "")
            assert audit["applied"] > durable, f"kill {k + 1}: no progress since the last one"
            durable = audit["applied"]
            if fresh_disk[k]:
                settings = s.model_copy(update={"data_dir": tmp_path / f"disk-{k + 1}"})
            worker = WorkerProcess(settings, tmp_path / f"life-{k + 1}.log").start()
            worker.wait_ready()
        final = wait_states(s, expected_states(events, H), timeout=300)
        time.sleep(2)
    finally:
        worker.stop()

    audit = _check_final(s, events, final, f"{N_KILLS} SIGKILLs ({'; '.join(lives)})")
    print(f"\n[faults] sigkills: {len(events)} events, {len(hist)} users, {N_KILLS} kills "
          f"({', '.join(lives)}), lost {audit['lost']}, duplicated {audit['duplicated']}, "
          f"{time.monotonic() - started:.0f}s")


def test_rebalance_two_workers_stop_and_rejoin(kafka, tmp_path):
    sa = make_settings(kafka, tmp_path, partitions=PARTITIONS, batch_size=200,
                       checkpoint_interval_s=2.0)
    sb = sa.model_copy(update={"metrics_port": free_port(), "data_dir": tmp_path / "disk-b"})
    assert sa.metrics_port != sb.metrics_port and sa.data_dir != sb.data_dir
    ensure_topics(sa)
    world, events = _replay(seed=41)
    H = sa.learner.history_len

    started = time.monotonic()
    a = WorkerProcess(sa, tmp_path / "a.log").start()
    b = WorkerProcess(sb, tmp_path / "b-0.log").start()
    b2 = None
    try:
        publish_items(sa, world.items, quiet=True)
        for w in (a, b):
            w.wait_ready()
            w.wait_for("streamrec_index_items", len(world.items), timeout=180)
        publish_events(sa, events, quiet=True)
        # both consume (split partitions) for a while, then B leaves cleanly
        _wait_applied([a, b], N_EVENTS * 0.3, timeout=300)
        b_first = _applied(b)
        rc = b.stop()
        assert rc == 0, f"B did not stop cleanly (rc {rc})\n{b.log_tail()}"
        a_at_stop = _applied(a)
        # A alone (all partitions, B's user state recovered from the changelog) ...
        _wait_applied([a], a_at_stop + N_EVENTS * 0.1, timeout=300)
        # ... then B rejoins on its old disk and takes partitions back
        b2 = WorkerProcess(sb, tmp_path / "b-1.log").start()
        b2.wait_ready()
        final = wait_states(sa, expected_states(events, H), timeout=300)
        committed, ends = _wait_committed(sa, timeout=90)
        a_total, b2_total = _applied(a), _applied(b2)
    finally:
        for w in (a, b, b2):
            if w is not None:
                w.stop()

    audit = _check_final(sa, events, final, "stop/rejoin")
    assert b_first > 0, "B never consumed: the partitions were not split"
    assert sum(ends.values()) == len(events)
    unconsumed = {p: (committed[p], ends[p]) for p in ends if (committed[p] or 0) < ends[p]}
    assert not unconsumed, f"partitions left unconsumed (committed, end): {unconsumed}"
    print(f"\n[faults] rebalance: {len(events)} events, {len(final)} users, applied by A "
          f"{a_total:.0f}, B {b_first:.0f} then {b2_total:.0f} after rejoining, lost "
          f"{audit['lost']}, duplicated {audit['duplicated']}, committed {committed} = end, "
          f"{time.monotonic() - started:.0f}s")
