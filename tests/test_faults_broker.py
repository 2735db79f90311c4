"""Broker trouble: a worker must ride out a broker that is late, hung or crashed, losing nothing.

Each test runs its *own* embedded broker (it is frozen or killed, so the session broker cannot
be used). "Nothing lost" means: for every user the changelog state holds exactly the last H
item ids and the applied count that the published event list implies, and the worker's
`applied` counter equals the number of events (no double count). "No crash loop" means: the
same worker process (same pid) is alive from start to end; nobody restarts it.

Events are published before the fault (so the fault hits consumption and state writes) and a
second slice after recovery (so the worker is shown to still consume new input).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import expected_states, make_settings, wait_states

from evaluation.synthetic import SyntheticStream, make_world
from streams.publish import publish_events, publish_items
from streams.supervisor import WorkerProcess, total
from streams.topics import ensure_topics

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.faults]

N_FIRST = 6000  # published before the fault
N_SECOND = 600  # published after recovery
BATCH = 50  # small batches: more commits/changelog flushes, so the fault lands mid-stream


@pytest.fixture
def broker(tmp_path) -> Iterator:
    """A private broker, not started (tests start it when they want); stopped afterwards."""
    if not (shutil.which("java") and shutil.which("mvn")):
        pytest.skip("the embedded Kafka broker needs a JDK and Maven")
    from streams.broker import EmbeddedKafka
    from streams.ports import free_port

    kafka = EmbeddedKafka(data_dir=tmp_path / "kafka", port=free_port())
    try:
        yield kafka
    finally:
        kafka.stop(grace=10)






def _scenario(tmp_path: Path, kafka, seed: int):
    # a worker rides out a broker outage shorter than its session timeout (longer, and it
    # exits so nothing lands late: tests/test_faults_network.py)
    s = make_settings(kafka, tmp_path, batch_size=BATCH, checkpoint_interval_s=2.0,
                      session_timeout_s=30.0)
    world = make_world(300, n_topics=6, seed=seed)
    stream = SyntheticStream(world, n_users=150, seed=seed + 1)
    first = list(stream.events(N_FIRST))
    second = list(stream.events(N_SECOND))
    return s, world, first, second


def _applied(worker: WorkerProcess) -> float:
    """The worker's applied counter (retried: its event loop may be busy for a moment)."""
    for attempt in range(10):
        try:
            return total(worker.metrics(), "streamrec_events_total", outcome="applied")
        except OSError:
            if attempt == 9:
                raise
            time.sleep(1)
    raise AssertionError("unreachable")


def _check_exact(s, worker: WorkerProcess, pid: int, events: list[dict]) -> None:
    """Every user's state is exact, the applied counter equals the events, same process."""
    expected = expected_states(events, s.learner.history_len)
    states = wait_states(s, expected, timeout=180)
    bad = [(u, states[u].n_events if u in states else None, n)
           for u, (_, n) in expected.items() if u not in states or states[u].n_events != n]
    assert not bad, f"{len(bad)} users with wrong applied counts (user, got, want): {bad[:5]}"
    for user, (items, _) in expected.items():
        assert states[user].items == items, user
    assert _applied(worker) == len(events), "events applied twice or lost"
    assert worker.proc.poll() is None and worker.proc.pid == pid, \
        f"the worker process died or was replaced\n{worker.log_tail()}"


def _log_lines(path: Path, *words: str, limit: int = 8) -> list[str]:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return [ln[:200] for ln in text if any(w in ln for w in words)][:limit]


def test_worker_started_before_the_broker_waits_and_proceeds(broker, tmp_path):
    t0 = time.monotonic()
    s, world, first, second = _scenario(tmp_path, broker, seed=21)
    log = tmp_path / "worker.log"
    worker = WorkerProcess(s, log).start()
    try:
        # wait until the worker is actually trying to reach the (absent) broker, or 12 s
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline and not _log_lines(
                log, "Bootstrap", "bootstrap", "Connection refused", "Connect attempt",
                "NoBrokersAvailable", "error 111"):
            assert worker.proc.poll() is None, worker.log_tail()
            time.sleep(0.5)
        time.sleep(3)
        assert worker.proc.poll() is None, f"worker gave up before the broker came\n" \
                                           f"{worker.log_tail()}"
        waited = time.monotonic() - t0
        tried = _log_lines(log, "Bootstrap", "bootstrap", "Connection refused", limit=2)
        broker.start(timeout=120)
        print(f"\n[faults-broker] broker started {waited:.0f}s after the worker (ready "
              f"{time.monotonic() - t0:.0f}s); worker had logged: {tried}")
        pid = worker.proc.pid
        ensure_topics(s)  # idempotent: the worker may have created them already
        publish_items(s, world.items, quiet=True)
        worker.wait_ready(timeout=240, snapshot=False)
        worker.wait_for("streamrec_index_items", len(world.items), timeout=180)
        publish_events(s, first, quiet=True)
        worker.wait_for("streamrec_events_total", N_FIRST, timeout=300, outcome="applied")
        publish_events(s, second, quiet=True)
        worker.wait_for("streamrec_events_total", N_FIRST + N_SECOND, timeout=300,
                        outcome="applied")
        _check_exact(s, worker, pid, first + second)
        print(f"[faults-broker] late broker: {N_FIRST + N_SECOND} events applied exactly, "
              f"worker pid {pid} alive; test {time.monotonic() - t0:.0f}s")
    finally:
        worker.stop()


def _start_mid_stream(broker, tmp_path: Path, seed: int):
    """Broker + worker up, catalog loaded, the first slice published and partly applied."""
    broker.start(timeout=120)
    s, world, first, second = _scenario(tmp_path, broker, seed)
    ensure_topics(s)
    worker = WorkerProcess(s, tmp_path / "worker.log").start()
    try:
        publish_items(s, world.items, quiet=True)
        worker.wait_ready(timeout=240, snapshot=False)
        worker.wait_for("streamrec_index_items", len(world.items), timeout=180)
        publish_events(s, first, quiet=True)
        worker.wait_for("streamrec_events_total", N_FIRST // 10, timeout=300,
                        outcome="applied")
    except BaseException:
        worker.stop()
        raise
    return s, worker, first, second


def test_broker_frozen_for_10s_mid_stream(broker, tmp_path):
    t0 = time.monotonic()
    s, worker, first, second = _start_mid_stream(broker, tmp_path, seed=31)
    try:
        pid = worker.proc.pid
        broker.freeze()
        try:
            at_fault = _applied(worker)  # the worker's own web server still answers
            time.sleep(10)
            during = _applied(worker)
        finally:
            broker.thaw()
        print(f"\n[faults-broker] frozen 10s: applied {at_fault:.0f} at freeze, {during:.0f} "
              f"after 10s frozen (of {N_FIRST})")
        assert at_fault < N_FIRST, "the fault did not hit mid-stream (worker too fast)"
        recovered, dup = _finish(s, worker, pid, first, second, since=time.monotonic())
        print(f"[faults-broker] frozen 10s: first slice done {recovered:.0f}s after thaw, "
              f"{dup:.0f} replays skipped, same pid {pid}; test {time.monotonic() - t0:.0f}s")
        print(f"[faults-broker] worker log, notable: "
              f"{_log_lines(tmp_path / 'worker.log', 'ERROR', 'rebalance', 'Rebalanc')}")
    finally:
        worker.stop()


def _finish(s, worker: WorkerProcess, pid: int, first: list, second: list,
            since: float) -> tuple[float, float]:
    """After the fault: the first slice is applied, a second slice published and applied,
    every state exact. Returns (seconds from `since` to the first slice done, replays
    skipped)."""
    worker.wait_for("streamrec_events_total", N_FIRST, timeout=300, outcome="applied")
    recovered = time.monotonic() - since
    publish_events(s, second, quiet=True)
    worker.wait_for("streamrec_events_total", N_FIRST + N_SECOND, timeout=300,
                    outcome="applied")
    _check_exact(s, worker, pid, first + second)
    return recovered, total(worker.metrics(), "streamrec_events_total", outcome="duplicate")


def test_broker_killed_and_restarted_on_the_same_log_dir(broker, tmp_path):
    t0 = time.monotonic()
    s, worker, first, second = _start_mid_stream(broker, tmp_path, seed=41)
    try:
        pid = worker.proc.pid
        port = broker.port
        broker.kill()
        at_fault = _applied(worker)
        time.sleep(5)  # the broker stays away a while
        assert worker.proc.poll() is None, \
            f"worker exited when the broker was killed\n{worker.log_tail(60)}"
        t_restart = time.monotonic()
        broker.start(timeout=120)  # same data dir, same ports
        assert broker.port == port
        print(f"\n[faults-broker] killed: applied {at_fault:.0f} of {N_FIRST} at the kill; "
              f"broker back after {time.monotonic() - t_restart:.0f}s")
        assert at_fault < N_FIRST, "the fault did not hit mid-stream (worker too fast)"
        recovered, dup = _finish(s, worker, pid, first, second, since=t_restart)
        print(f"[faults-broker] killed: first slice done {recovered:.0f}s after restart, "
              f"{dup:.0f} replays skipped, same pid {pid}; test {time.monotonic() - t0:.0f}s")
        print(f"[faults-broker] worker log, notable: "
              f"{_log_lines(tmp_path / 'worker.log', 'ERROR', 'Rebalanc', 'crash')}")
    finally:
        worker.stop()
