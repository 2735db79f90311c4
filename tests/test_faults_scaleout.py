"""Two serving workers and a trainer on the real broker, each SIGKILLed once at a random point:
one model across the workers, trained exactly once, reaching every worker exactly once.

After the replay: every user's state is exact (the audit of tests/faults.py); the trainer
has trained exactly one example per event with a target; each worker's co-visitation counts
(its /covisit page) equal those a single process computes from the same events; every
recommendation names the model version it was served from, never a lower one than its
worker served before; and the checkpoint topic holds only the trainer's records.
"""

from __future__ import annotations

import json
import random
import time
import urllib.request
from collections import defaultdict

import numpy as np
import orjson
import pytest
from faults import APPLIED, N_EVENTS, PARTITIONS, _check_final, _replay, _serving, _wait_applied
from helpers import expected_states, make_settings, read_all, wait_states

from models.config import LearnerConfig
from models.covisit import CoVisitation
from streams.ports import free_port
from streams.publish import publish_events
from streams.supervisor import TrainerProcess, WorkerProcess, total
from streams.topics import ensure_topics

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.faults]


def reference_counts(events: list[dict], cfg: LearnerConfig) -> tuple[dict, dict]:
    """The co-visitation counts of a single process that sees every event once, by item id:
    each positive event pairs with its user's last `history_len` events before it."""
    ids: dict[str, int] = {}
    hist: dict[str, list[int]] = defaultdict(list)
    pairs = []
    for ev in events:
        row = ids.setdefault(ev["item_id"], len(ids) + 1) if ev["item_id"] else 0
        h = hist[ev["user_id"]]
        if ev["event_type"] not in ("search", "dislike") and row:
            pairs.append((list(h[-cfg.history_len:]), row))
        h.append(row)
    cv = CoVisitation(cfg.covisit_window, cfg.covisit_pair_decay, cfg.covisit_recencies,
                      cfg.covisit_profile)
    cv.learn(pairs)
    name = {r: i for i, r in ids.items()}
    F = cv.F.tocoo()
    return ({name[r]: float(v) for r, v in enumerate(cv.n) if v},
            {(name[j], name[i]): float(w) for j, i, w in zip(F.row, F.col, F.data, strict=True)})


def served_counts(worker: WorkerProcess) -> tuple[int, dict, dict]:
    url = worker.metrics_url.rsplit("/", 1)[0] + "/covisit"
    with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 - our own page
        doc = json.loads(resp.read())
    return doc["version"], doc["n"], {(a, b): w for a, b, w in doc["f"]}


def wait_model(trainer: TrainerProcess, workers: list[WorkerProcess], trained: int,
               timeout: float) -> int:
    """Until the trainer has trained `trained` examples and published its last version, and
    every worker serves that version; returns it."""
    deadline = time.monotonic() + timeout
    version, served = -1, []
    while time.monotonic() < deadline:
        samples = trainer.metrics()
        version = total(samples, "streamrec_model_version")
        done = total(samples, "streamrec_trainer_trained")
        served = [total(w.metrics(), "streamrec_model_version") for w in workers]
        if done >= trained and all(v == version for v in served):
            time.sleep(3)  # one more publish interval: nothing left to publish
            if total(trainer.metrics(), "streamrec_model_version") == version:
                return int(version)
        time.sleep(0.5)
    raise TimeoutError(f"trainer trained {done} of {trained}, version {version}, workers "
                       f"serve {served}\n{trainer.log_tail()}")


def _versions_by_worker(s) -> int:  # noqa: ANN001
    """Every recommendation names its model version, and no worker ever went backwards;
    returns how many workers wrote recommendations."""
    by_worker: dict[bytes, list[tuple[int, int, int]]] = defaultdict(list)
    for msg in read_all(s, s.topic(s.recommendations_topic)):
        rec = orjson.loads(msg.value)
        assert rec["model"]["model_version"] >= 1, rec["model"]
        by_worker[dict(msg.headers)["streamrec.worker"]].append(
            (rec["generated_at"], msg.offset, rec["model"]["model_version"]))
    for worker, recs in by_worker.items():
        versions = [v for _, _, v in sorted(recs)]
        assert versions == sorted(versions), f"{worker!r}: model_version went down"
    return len(by_worker)


def test_two_workers_and_a_trainer_each_killed_once(kafka, tmp_path):
    rng = random.Random(20_261_202)
    sa = make_settings(kafka, tmp_path, partitions=PARTITIONS, batch_size=200,
                       checkpoint_interval_s=2.0, snapshot_interval_s=1.0)
    sb = sa.model_copy(update={"metrics_port": free_port(), "data_dir": tmp_path / "disk-b"})
    ensure_topics(sa)
    world, events = _replay(seed=53)
    with_target = sum(1 for ev in events if ev["item_id"] and ev["event_type"] != "search")
    started = time.monotonic()
    trainer = TrainerProcess(sa, tmp_path / "trainer-0.log").start()
    a = WorkerProcess(sa, tmp_path / "a.log").start()
    b = WorkerProcess(sb, tmp_path / "b-0.log").start()
    procs = [trainer, a, b]
    try:
        _serving(sa, trainer, [a, b], world.items)
        publish_events(sa, events, quiet=True)
        # the trainer dies once it has trained a random share, and comes back
        point = rng.randrange(with_target // 5, with_target // 2)
        trainer.wait_for("streamrec_trainer_trained", point, timeout=300)
        time.sleep(rng.uniform(0.0, 1.0))
        trainer.kill()
        trainer = TrainerProcess(sa, tmp_path / "trainer-1.log").start()
        procs.append(trainer)
        # worker B dies once the workers have applied a random share, and comes back
        _wait_applied([a, b], rng.randrange(N_EVENTS // 2, N_EVENTS * 3 // 4), timeout=300)
        time.sleep(rng.uniform(0.0, 0.4))
        b.kill()
        b = WorkerProcess(sb.model_copy(update={"data_dir": tmp_path / "disk-b2"}),
                          tmp_path / "b-1.log").start()
        procs.append(b)
        b.wait_ready()
        final = wait_states(sa, expected_states(events, sa.learner.history_len), timeout=300)
        version = wait_model(trainer, [a, b], with_target, timeout=300)
        trained = total(trainer.metrics(), "streamrec_trainer_trained")
        counts = [served_counts(w) for w in (a, b)]
        applied = total(a.metrics(), "streamrec_events_total", **APPLIED)
        successor = total(b.metrics(), "streamrec_events_total", **APPLIED)
    finally:
        for p in procs:
            p.stop()

    audit = _check_final(sa, events, final, "2 workers + trainer, each killed once")
    assert trained == with_target, f"trained {trained} examples for {with_target} events"
    ref_n, ref_f = reference_counts(events, sa.learner)
    for (v, n, f), name in zip(counts, "AB", strict=True):
        assert v == version, f"worker {name} serves v{v}, the trainer published v{version}"
        assert n == ref_n, f"worker {name}: interaction counts differ from one process's"
        assert f.keys() == ref_f.keys(), f"worker {name}: other item pairs than one process's"
        np.testing.assert_allclose([f[k] for k in ref_f], [ref_f[k] for k in ref_f],
                                   rtol=1e-5, err_msg=f"worker {name}: pair counts")
    # A, B and B's successor when it applied any event (A may have drained the backlog
    # before the rebalance gave the successor its partitions back: then it has none to serve)
    assert _versions_by_worker(sa) >= 2 + (successor > 0)
    keys = {m.key for m in read_all(sa, sa.topic(sa.checkpoints_topic))}
    assert keys and all(k.startswith(f"{sa.app_id}/trainer/".encode()) for k in keys), keys
    print(f"\n[faults] scale-out: {len(events)} events, {with_target} examples trained once "
          f"(trainer killed at ~{point}), worker B killed and replaced, lost {audit['lost']}, "
          f"duplicated {audit['duplicated']}, counts equal on both workers at v{version}, "
          f"A applied {applied:.0f}, {time.monotonic() - started:.0f}s")
