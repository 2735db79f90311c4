"""Test helpers (imported by tests as `helpers`): isolated settings, reading topics back."""

from __future__ import annotations

import itertools
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson
from kafka import KafkaConsumer, TopicPartition

from models.examples import Interaction
from models.learner import OnlineLearner
from models.user_state import UserState
from streams.clients import kafka_consumer
from streams.dead_letters import read_headers
from streams.publish import publish_items
from streams.settings import Settings
from streams.supervisor import TrainerProcess, WorkerProcess

_ids = itertools.count()


def make_settings(kafka, tmp: Path, **overrides: object) -> Settings:
    """Settings with topics and consumer group of their own, so tests do not see each other."""
    from streams.ports import free_port

    n = next(_ids)
    base = dict(
        broker=kafka.url,
        app_id=f"t{os.getpid()}-{n}",
        topic_prefix=f"t{os.getpid()}-{n}.",
        data_dir=tmp / f"worker-{n}",
        metrics_port=free_port(),
        trainer_metrics_port=free_port(),
        session_timeout_s=6.0,
        checkpoint_interval_s=2.0,
        snapshot_interval_s=1.0,
        snapshot_wait_s=2.0,
    )
    base.update(overrides)
    return Settings(**base)


def read_all(settings: Settings, topic: str, idle_ms: int = 3000) -> list:
    """Every record of `topic` (all partitions, from the beginning) until `idle_ms` of silence."""
    consumer = KafkaConsumer(topic, bootstrap_servers=settings.bootstrap,
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             consumer_timeout_ms=idle_ms, **settings.kafka_security())
    try:
        return list(consumer)
    finally:
        consumer.close()


def latest_recommendations(settings: Settings) -> dict[str, dict]:
    """The newest recommendation per user (by source_event_ts, then arrival)."""
    latest: dict[str, dict] = {}
    for msg in read_all(settings, settings.topic(settings.recommendations_topic)):
        rec = orjson.loads(msg.value)
        prev = latest.get(rec["user_id"])
        if prev is None or rec["source_event_ts"] >= prev["source_event_ts"]:
            latest[rec["user_id"]] = rec
    return latest


def user_states(settings: Settings, idle_ms: int = 3000) -> dict[str, UserState]:
    """User states as the changelog holds them (what a recovering worker would load)."""
    topic = f"{settings.app_id}-user-state-changelog"
    out = {}
    for msg in read_all(settings, topic, idle_ms):
        if not msg.key.startswith(b"\x00"):  # streams/gaps.py: partition progress records
            out[msg.key.decode()] = UserState.from_bytes(msg.value)
    return out


def expected_states(events: list[dict], history_len: int) -> dict[str, tuple[list, int]]:
    """What a no-fault run stores per user: the last H item ids (None for text) and the count."""
    hist: dict[str, list] = defaultdict(list)
    for ev in events:
        hist[ev["user_id"]].append(ev["item_id"])
    return {u: (h[-history_len:], len(h)) for u, h in hist.items()}


def wait_states(settings: Settings, expected: dict, timeout: float,
                stall_s: float = 60.0) -> dict[str, UserState]:
    """Poll the changelog until every user's applied count reaches the expected one; give up
    after `timeout`, or once nothing changed for `stall_s` (stuck: no point waiting on)."""
    deadline = time.monotonic() + timeout
    last, stalled_since = -1, time.monotonic()
    while True:
        states = user_states(settings, idle_ms=1500)
        if all(u in states and states[u].n_events >= n for u, (_, n) in expected.items()):
            return states
        applied = sum(st.n_events for st in states.values())
        if applied != last:
            last, stalled_since = applied, time.monotonic()
        if time.monotonic() > deadline or time.monotonic() - stalled_since > stall_s:
            return states
        time.sleep(1)


def dead_letters(settings: Settings, topic: str) -> list[tuple[bytes | None, dict[str, str]]]:
    """(original value, headers) of every DLQ record."""
    return [(m.value, read_headers(m.headers)) for m in read_all(settings, topic)]


class FixedScores:
    """An evaluator model that scores every item the same way, always, and records each call's
    batch, scored events and keyword arguments (what the evaluator asked)."""

    name = "fixed"

    def __init__(self, scores: list[float]):
        self.scores = np.array(scores, dtype=float)
        self.calls: list[tuple[list, list[int], dict]] = []

    def step(self, batch, which, excluded=None, **kw):
        self.calls.append((list(batch), list(which), kw))
        return np.tile(self.scores, (len(which), 1))


def index_catalog(settings: Settings, worker: WorkerProcess, items: list[dict],
                  timeout: float = 180, trainer: TrainerProcess | None = None) -> None:
    """Publish the catalog and wait until `trainer` (if any) is ready and `worker` has
    indexed all of it: an event published before its item waits for the catalog agent,
    which would change what a test measures."""
    publish_items(settings, items, quiet=True)
    if trainer is not None:
        trainer.wait_ready()
    worker.wait_ready(snapshot=trainer is not None)
    worker.wait_for("streamrec_index_items", len(items), timeout=timeout)


def walk_cycle(learner: OnlineLearner, ids: list[str], n_users: int, rounds: int,
               ts: int = 1_700_000_000_000
               ) -> tuple[dict[str, UserState], dict[str, int], list[float]]:
    """Users u0, u1, ... walk the catalog i -> i+1 (mod len(ids)), user k from item 5k, one
    view each per batch for `rounds` batches. Returns their states, the position each goes
    to next and the batches' losses."""
    states = {f"u{k}": UserState() for k in range(n_users)}
    pos = {u: k * 5 for k, u in enumerate(states)}
    losses = []
    for _ in range(rounds):
        evs = []
        for u in states:
            ts += 1000
            evs.append(Interaction(u, ids[pos[u] % len(ids)], "view", ts))
            pos[u] += 1
        losses.append(learner.learn_batch(evs, states).loss)
    return states, pos, losses


def committed(settings: Settings) -> dict[int, int | None]:
    """The worker group's committed offsets per partition of the events topic (None:
    nothing committed), as `settings`' principal sees them."""
    c = kafka_consumer(settings, group_id=settings.app_id, enable_auto_commit=False)
    try:
        topic = settings.topic(settings.events_topic)
        return {p: c.committed(TopicPartition(topic, p))
                for p in sorted(c.partitions_for_topic(topic) or ())}
    finally:
        c.close()
