"""A worker killed (SIGKILL) mid-stream and replaced by a new one on a fresh disk loses nothing.

User state comes back from the changelog (the new worker has no local RocksDB), replayed
events are skipped (offsets in the state), the shared model comes from the trainer's newest
snapshot, processing continues, and every user's last recommendation follows their last
event.
"""

from __future__ import annotations

import time

import orjson
import pytest
from helpers import (
    committed,
    expected_states,
    index_catalog,
    latest_recommendations,
    make_settings,
    user_states,
    wait_states,
)

from evaluation.synthetic import SyntheticStream, make_world
from models.user_state import UserState
from streams.publish import publish_events
from streams.supervisor import TrainerProcess, WorkerProcess, total
from streams.topics import ensure_topics

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

N_EVENTS = 6000


def test_kill_mid_stream_and_recover_on_a_new_worker(kafka, tmp_path):
    s = make_settings(kafka, tmp_path, batch_size=200, checkpoint_interval_s=1.0)
    ensure_topics(s)
    world = make_world(300, n_topics=6, seed=7)
    events = list(SyntheticStream(world, n_users=150, seed=8).events(N_EVENTS))
    expected = expected_states(events, s.learner.history_len)

    trainer = TrainerProcess(s, tmp_path / "trainer.log").start()
    first = WorkerProcess(s, tmp_path / "first.log").start()
    try:
        index_catalog(s, first, world.items, trainer=trainer)
        publish_events(s, events, quiet=True)
        first.wait_for("streamrec_model_version", 2, timeout=120)  # the trainer learns
        first.wait_for("streamrec_events_total", N_EVENTS // 3, timeout=300)
    except BaseException:
        trainer.stop()
        raise
    finally:
        first.kill()  # SIGKILL mid-stream: no clean shutdown, no final commit
    killed_at = int(time.time() * 1000)
    offsets = committed(s)
    before = user_states(s)
    assert 0 < sum(st.n_events for st in before.values()) < N_EVENTS, "not killed mid-stream"

    second_settings = s.model_copy(update={"data_dir": tmp_path / "fresh-disk"})
    second = WorkerProcess(second_settings, tmp_path / "second.log").start()
    try:
        second.wait_ready()
        # the shared model is the trainer's: the new worker starts on its newest snapshot
        served = total(second.metrics(), "streamrec_model_version")
        published = total(trainer.metrics(), "streamrec_model_version")
        assert served >= 2 and served <= published
        after = wait_states(s, expected, timeout=300)
        second.wait_idle()
        samples = second.metrics()
    finally:
        second.stop()
        trainer.stop()

    # recovered + continued: every user's history and applied-event count is exact
    for user, (items, n) in expected.items():
        st = after[user]
        assert st.n_events == n, _explain(s, user, st, n) + \
            f" killed at {killed_at}, committed then {offsets}"  # no loss, no double count
        assert st.items == items, user
    # what the new worker applied is exactly what the dead one had not
    applied_first = sum(st.n_events for st in before.values())
    assert total(samples, "streamrec_events_total", outcome="applied") == N_EVENTS - applied_first
    # every user's final recommendation follows their last event
    recs = latest_recommendations(s)
    last_ts = {ev["user_id"]: ev["ts"] for ev in events}
    for user, ts in last_ts.items():
        assert recs[user]["source_event_ts"] == ts, user


def _explain(s, user: str, st, n: int) -> str:
    """What the events topic holds for `user`, to tell a pipeline fault from a publish fault."""
    from helpers import read_all

    recs = [(m.partition, m.offset, orjson.loads(m.value)["ts"])
            for m in read_all(s, s.topic(s.events_topic)) if m.key == user.encode()]
    dup_ts = len(recs) - len({ts for *_, ts in recs})
    changelog = [(m.offset, m.timestamp, UserState.from_bytes(m.value))
                 for m in read_all(s, f"{s.app_id}-user-state-changelog")
                 if m.key == user.encode()]
    history = [(off, ts, st.n_events, st.offsets) for off, ts, st in changelog]
    return (f"{user}: applied {st.n_events}, published {n}, topic has {len(recs)} records "
            f"({dup_ts} duplicated), state offsets {st.offsets}, records {recs}, "
            f"changelog (offset, n_events, offsets) {history}")
