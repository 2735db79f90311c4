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

import pytest
from faults import (
    APPLIED,
    N_EVENTS,
    N_KILLS,
    PARTITIONS,
    _applied,
    _audit,
    _check_final,
    _explain,
    _histories,
    _replay,
    _wait_applied,
    _wait_committed,
)
from helpers import expected_states, index_catalog, make_settings, user_states, wait_states

from streams.ports import free_port
from streams.publish import publish_events, publish_items
from streams.supervisor import WorkerProcess, total
from streams.topics import ensure_topics

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.faults]


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
        index_catalog(s, worker, world.items)
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
            worker.wait_ready(snapshot=False)
        final = wait_states(s, expected_states(events, H), timeout=300)
        worker.wait_idle()
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
            w.wait_ready(snapshot=False)
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
        b2.wait_ready(snapshot=False)
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
