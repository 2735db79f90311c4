"""A secured broker: SASL_SSL (SCRAM-SHA-512 over TLS from a test CA), the StandardAuthorizer
denying whatever no ACL allows, and each role holding exactly its grants (streams/acls.py).

The pipeline works end to end as those principals (events in, recommendations out to a
downstream consumer, state recovered after a SIGKILL), with no access denied; and each
misconfiguration stops the worker at start-up in one line that names its cause, before it
consumes anything: a wrong password, a client without TLS, a certificate from another CA,
a principal without one of its ACLs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from faults import _audit, _histories
from helpers import committed, expected_states, index_catalog, make_settings, wait_states

from evaluation.synthetic import SyntheticStream, make_world
from streams import acls
from streams.clients import kafka_consumer
from streams.publish import publish_events
from streams.supervisor import TrainerProcess, WorkerProcess, settings_env
from streams.topics import ensure_topics

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.faults]

USERS = ("worker", "trainer", "publisher", "consumer", "worker-no-recs")


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A SASL_SSL broker; topics created and every role's ACLs granted by the admin."""
    import shutil

    if not (shutil.which("java") and shutil.which("mvn")):
        pytest.skip("the embedded Kafka broker needs a JDK and Maven")
    from streams.broker import EmbeddedKafka
    from streams.broker_security import BrokerSecurity

    tmp = tmp_path_factory.mktemp("secure")
    sec = BrokerSecurity.create(tmp / "tls", {u: f"{u}-secret" for u in USERS})
    with EmbeddedKafka(data_dir=tmp / "kafka", security=sec) as kafka:
        admin = make_settings(kafka, tmp, batch_size=100, **sec.client())
        ensure_topics(admin)
        for user in ("worker", "trainer", "publisher"):
            acls.apply(admin, f"User:{user}", acls.grants(admin, user))
        acls.apply(admin, "User:consumer", acls.grants(admin, "consumer", group="downstream"))
        short = [g for g in acls.grants(admin, "worker")
                 if g.name != admin.topic(admin.recommendations_topic)]
        acls.apply(admin, "User:worker-no-recs", short)
        yield kafka, sec, admin, tmp


def as_user(secured, user: str, **kw):
    _, sec, admin, _ = secured
    return admin.model_copy(update=sec.client(user) | kw)


def denied(kafka) -> list[str]:
    """Authorizer denials the broker logged (log4j kafka.authorizer.logger at INFO)."""
    return [ln for ln in kafka.log_path.read_text(errors="replace").splitlines()
            if "DENIED" in ln]


def test_the_pipeline_runs_as_least_privileged_principals(secured, tmp_path):
    kafka, sec, admin, _ = secured
    worker_s, trainer_s = as_user(secured, "worker"), as_user(secured, "trainer")
    publisher_s = as_user(secured, "publisher")
    world = make_world(120, n_topics=4, seed=71)
    events = list(SyntheticStream(world, n_users=60, seed=72).events(3000))
    trainer = TrainerProcess(trainer_s, tmp_path / "trainer.log").start()
    worker = WorkerProcess(worker_s, tmp_path / "worker-1.log").start()
    try:
        index_catalog(publisher_s, worker, world.items, trainer=trainer)
        publish_events(publisher_s, events[:2000], quiet=True)
        worker.wait_for("streamrec_events_total", 1000, timeout=180, outcome="applied")
        worker.kill()  # SIGKILL mid-stream; a new worker on a fresh disk takes over
        worker = WorkerProcess(worker_s.model_copy(update={"data_dir": tmp_path / "disk-2"}),
                               tmp_path / "worker-2.log").start()
        worker.wait_ready()
        publish_events(publisher_s, events[2000:], quiet=True)
        final = wait_states(admin, expected_states(events, admin.learner.history_len), 300)
    finally:
        worker.stop()
        trainer.stop()
    audit = _audit(final, _histories(events), admin.learner.history_len)
    assert (audit["lost"], audit["duplicated"], audit["wrong_history"]) == (0, 0, []), audit
    consumer = kafka_consumer(as_user(secured, "consumer"), admin.topic(
        admin.recommendations_topic), group_id="downstream", auto_offset_reset="earliest",
        consumer_timeout_ms=5000)
    try:
        recs = [orjson.loads(m.value) for m in consumer]
    finally:
        consumer.close()
    users = {ev["user_id"] for ev in events}
    assert len(recs) > 100 and {r["user_id"] for r in recs} <= users
    assert all(r["model"]["model_version"] >= 1 for r in recs)
    assert denied(kafka) == [], denied(kafka)[:5]
    print(f"\n[security] SASL_SSL, least privilege: {len(events)} events applied exactly "
          f"(SIGKILL at ~1,000), {len(recs)} recommendations read by the consumer role, 0 "
          f"denials")


def worker_cli(settings, tmp: Path, timeout: float = 120) -> tuple[subprocess.CompletedProcess,
                                                                   float]:
    env = {**os.environ, **settings_env(settings)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "streams.cli", "worker"], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


@pytest.mark.parametrize(("case", "needles"), [
    ("wrong password", ["authentication failed for user 'worker'", "STREAMREC_SASL_PASSWORD"]),
    ("no TLS", ["expects TLS", "STREAMREC_SECURITY_PROTOCOL is SASL_PLAINTEXT"]),
    ("another CA", ["certificate is not trusted", "STREAMREC_SSL_CAFILE"]),
    ("missing ACL", ["User:worker-no-recs lacks WRITE, DESCRIBE on topic",
                     "recommendations", "docs/operations.md#acls"]),
])
def test_a_misconfigured_worker_stops_at_once_naming_the_cause(secured, tmp_path, case, needles):
    from streams.broker_security import BrokerSecurity

    _, _, admin, _ = secured
    if case == "wrong password":
        s = as_user(secured, "worker", sasl_password="not-the-password")
    elif case == "no TLS":
        s = as_user(secured, "worker", security_protocol="SASL_PLAINTEXT")
    elif case == "another CA":
        s = as_user(secured, "worker",
                    ssl_cafile=BrokerSecurity.create(tmp_path / "other").ca_file)
    else:
        s = as_user(secured, "worker-no-recs")
    s = s.model_copy(update={"data_dir": tmp_path / "w", "app_id": f"{admin.app_id}-{len(case)}"})
    before = committed(admin.model_copy(update={"app_id": s.app_id}))
    proc, took = worker_cli(s, tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    last = proc.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, (needle, last)
    assert "Traceback" not in proc.stderr
    assert took < 60, took  # fails fast: no waiting out broker_wait_s on a permanent cause
    assert committed(admin.model_copy(update={"app_id": s.app_id})) == before  # nothing consumed
    print(f"\n[security] {case}: exit 2 after {took:.0f} s: {last}")
