"""Shared parts of the worker fault tests: the replayed stream, and the audit of every user's
state against the event list (lost, applied twice, history not the events' prefix)."""

from __future__ import annotations

import time
from collections import defaultdict

from helpers import latest_recommendations

from evaluation.synthetic import SyntheticStream, make_world
from streams.supervisor import WorkerProcess, total

N_EVENTS = 20_000
N_USERS = 600  # Zipf-skewed: every one of them gets events in 20k draws (asserted >= 500)
N_KILLS = 3
PARTITIONS = 4
APPLIED = {"outcome": "applied"}


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


def _serving(s, trainer, workers: list[WorkerProcess], items: list[dict]) -> None:
    """Publish the catalog, then wait until the trainer is ready and every worker serves all
    of it (ready, its index holding every item)."""
    from streams.publish import publish_items

    publish_items(s, items, quiet=True)
    trainer.wait_ready()
    for w in workers:
        w.wait_ready()
        w.wait_for("streamrec_index_items", len(items), timeout=180)
