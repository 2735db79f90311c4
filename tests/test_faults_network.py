"""The network between workers and the broker fails while both stay up: a worker cut off for
longer than the session timeout beside a second one, and a slow link that resets its
connections every few seconds. Each worker talks to the broker through a TCP proxy
(tests/netproxy.py) that the broker advertises as that worker's listener, so the worker's
every connection (metadata, fetch, produce, group) goes through it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults import _applied, _audit, _histories, _replay, _serving, _wait_applied, _wait_committed
from helpers import expected_states, index_catalog, make_settings, read_all, wait_states
from netproxy import Proxy

from streams.ports import free_port
from streams.publish import event_records, publish, publish_events
from streams.supervisor import TrainerProcess, WorkerProcess, total
from streams.topics import ensure_topics

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.faults]


@pytest.fixture
def relayed(tmp_path) -> Iterator:
    """A private broker with listeners VIA_A and VIA_B, each behind a proxy."""
    import shutil

    if not (shutil.which("java") and shutil.which("mvn")):
        pytest.skip("the embedded Kafka broker needs a JDK and Maven")
    from streams.broker import EmbeddedKafka

    ports = {"VIA_A": free_port(), "VIA_B": free_port()}
    kafka = EmbeddedKafka(data_dir=tmp_path / "kafka", relayed=ports).start()
    proxies = {name: Proxy(kafka.relay_ports[name], port).start()
               for name, port in ports.items()}
    try:
        yield kafka, proxies
    finally:
        for p in proxies.values():
            p.stop()
        kafka.stop()


def via(s, proxy: Proxy, tmp: Path, name: str):
    """Settings of a worker whose every connection goes through `proxy`."""
    return s.model_copy(update={"broker": f"kafka://127.0.0.1:{proxy.port}",
                                "metrics_port": free_port(), "data_dir": tmp / name})


def test_a_worker_cut_off_past_the_session_timeout_is_fenced_and_loses_nothing(
        relayed, tmp_path):
    kafka, proxies = relayed
    s = make_settings(kafka, tmp_path, partitions=4, batch_size=200, session_timeout_s=6.0)
    ensure_topics(s)
    world, events = _replay(seed=81)
    trainer = TrainerProcess(s, tmp_path / "trainer.log").start()
    a = WorkerProcess(via(s, proxies["VIA_A"], tmp_path, "a"), tmp_path / "a.log").start()
    b = WorkerProcess(via(s, proxies["VIA_B"], tmp_path, "b"), tmp_path / "b.log").start()
    workers = [a, b]
    try:
        _serving(s, trainer, [a, b], world.items)
        publish_events(s, events, quiet=True)
        _wait_applied([a, b], len(events) // 4, timeout=300)
        a_pid, b_pid, a_applied = a.proc.pid, b.proc.pid, _applied(a)
        proxies["VIA_A"].cut_link()
        t_cut = time.time()
        a_rc = _wait_exit(a, timeout=3 * s.session_timeout_s)  # its lease runs out mid-batch
        t_fenced = time.time()
        assert a_rc == 4, f"A, cut off mid-batch, exited with {a_rc}\n{a.log_tail()}"
        b_before = _applied(b)
        _wait_applied([b], b_before + 1000, timeout=120)  # B took A's partitions over
        proxies["VIA_A"].heal()
        a = WorkerProcess(via(s, proxies["VIA_A"], tmp_path, "a"), tmp_path / "a-2.log")
        workers.append(a.start())  # as a supervisor brings it back
        a.wait_ready()
        final = wait_states(s, expected_states(events, s.learner.history_len), timeout=300)
        committed, ends = _wait_committed(s, timeout=90)
    finally:
        for w in workers:
            w.stop()
        trainer.stop()
    audit = _audit(final, _histories(events), s.learner.history_len)
    assert (audit["lost"], audit["duplicated"], audit["wrong_history"]) == (0, 0, []), audit
    assert all((committed[p] or 0) >= ends[p] for p in ends), (committed, ends)
    for topic in (s.recommendations_topic, s.training_examples_topic):
        late, taken = _after_takeover(read_all(s, s.topic(topic)), a_pid, b_pid)
        assert taken, f"B never wrote {topic} for A's users"
        assert late == [], f"{len(late)} {topic} records of the fenced A after B took over"
    print(f"\n[faults-network] cut A at {a_applied:.0f} applied: A exited {a_rc} (fenced) "
          f"{t_fenced - t_cut:.1f} s later, B took its partitions over, A restarted; "
          f"lost 0, duplicated 0, committed = end {committed}")


def test_a_slow_link_that_resets_every_few_seconds_loses_nothing(relayed, tmp_path):
    kafka, proxies = relayed
    proxy = proxies["VIA_A"]
    s = make_settings(kafka, tmp_path, partitions=4, batch_size=200, session_timeout_s=20.0)
    ensure_topics(s)
    world, events = _replay(seed=91)
    events = events[:6000]
    trainer = TrainerProcess(s, tmp_path / "trainer.log").start()
    w = WorkerProcess(via(s, proxy, tmp_path, "w"), tmp_path / "w.log").start()
    try:
        index_catalog(s, w, world.items, trainer=trainer)
        pid = w.proc.pid
        proxy.latency_s = 0.2
        proxy.reset_every(3.0)
        t0 = time.monotonic()
        feeder = threading.Thread(target=publish, args=(s, s.topic(s.events_topic),
                                                        event_records(events)),
                                  kwargs={"rate": 100.0, "quiet": True}, daemon=True)
        feeder.start()
        feeder.join(timeout=120)  # a minute of traffic through the faulty link
        applied_in_fault = total(w.metrics(), "streamrec_events_total", outcome="applied")
        minute = time.monotonic() - t0
        resets = proxy.resets
        proxy.reset_every(None)
        proxy.latency_s = 0.0
        final = wait_states(s, expected_states(events, s.learner.history_len), timeout=300)
        w._check_alive()
        assert w.proc.pid == pid
        e2r = w.metrics()
    finally:
        w.stop()
        trainer.stop()
    audit = _audit(final, _histories(events), s.learner.history_len)
    assert (audit["lost"], audit["duplicated"], audit["wrong_history"]) == (0, 0, []), audit
    assert resets >= 10 and proxy.connections > resets
    p50 = _quantile(e2r, 0.5)
    print(f"\n[faults-network] 200 ms each way + resets every 3 s for {minute:.0f} s: "
          f"{resets} resets, {proxy.connections} connections, {applied_in_fault:.0f} of "
          f"{len(events)} applied meanwhile, all {audit['applied']} exact after healing, same "
          f"pid; event->recommendation p50 ~{p50:.2f} s")


def _quantile(samples, q: float) -> float:
    """A quantile of the event->recommendation histogram (upper bucket bound)."""
    buckets = sorted((float(dict(lab)["le"]), v) for (n, lab), v in samples.items()
                     if n == "streamrec_event_to_recommendation_seconds_bucket")
    count = buckets[-1][1] if buckets else 0
    return next((le for le, c in buckets if c >= q * count), float("nan"))


def _after_takeover(records: list, old_pid: int, new_pid: int) -> tuple[list, set[int]]:
    """Records of process `old_pid` that follow, in their partition, the first record of
    process `new_pid` for one of `old_pid`'s users: emitted for a partition it no longer
    owned (the workers serve disjoint users until one takes over the other's); and the
    partitions where `new_pid` took over."""
    def pid(m) -> int:
        return int(dict(m.headers or []).get("streamrec.worker", b":-1").rsplit(b":", 1)[1])

    old_users = {m.key for m in records if pid(m) == old_pid}
    first_new: dict[int, int] = {}
    for m in records:
        if pid(m) == new_pid and m.key in old_users:
            first_new[m.partition] = min(m.offset, first_new.get(m.partition, m.offset))
    late = [m for m in records if pid(m) == old_pid
            and m.offset > first_new.get(m.partition, float("inf"))]
    return late, set(first_new)


def _wait_exit(worker: WorkerProcess, timeout: float) -> int | None:
    """Until the worker's process exits; its exit status (None: still running at timeout)."""
    deadline = time.monotonic() + timeout
    while worker.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return worker.proc.poll()
