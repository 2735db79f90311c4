"""A worker's local RocksDB store garbled between a SIGKILL and the restart on the same disk:
the worker finds the unreadable partition stores, drops them, restores those partitions
from the changelog and goes on with exact states, as one process (no crash loop)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from faults import _audit, _histories
from helpers import expected_states, index_catalog, make_settings, user_states, wait_states

from evaluation.synthetic import SyntheticStream, make_world
from streams.local_store import partition_stores
from streams.publish import publish_events
from streams.supervisor import WorkerProcess
from streams.topics import ensure_topics

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.faults]

N_EVENTS = 8000


def truncate(path: Path, rng: random.Random) -> None:
    for f in path.iterdir():
        if f.is_file() and f.stat().st_size:
            os.truncate(f, f.stat().st_size // 2)


def garble(path: Path, rng: random.Random) -> None:
    for f in path.iterdir():
        if f.suffix in (".sst", ".log") or f.name.startswith("MANIFEST"):
            size = f.stat().st_size
            if size > 64:
                with open(f, "r+b") as fh:
                    fh.seek(size // 2)
                    fh.write(rng.randbytes(min(4096, size - size // 2)))


def lose_manifest(path: Path, rng: random.Random) -> None:
    for f in path.iterdir():
        if f.name == "CURRENT" or f.name.startswith("MANIFEST"):
            f.unlink()


@pytest.mark.parametrize("damage", [truncate, garble, lose_manifest],
                         ids=lambda f: f.__name__)
def test_a_garbled_local_store_is_dropped_and_restored_from_the_changelog(
        kafka, tmp_path, damage):
    s = make_settings(kafka, tmp_path, batch_size=200, rocksdb_write_buffer_mb=1)
    ensure_topics(s)
    world = make_world(200, n_topics=4, seed=61)
    events = list(SyntheticStream(world, n_users=300, seed=62).events(N_EVENTS))
    first = WorkerProcess(s, tmp_path / "first.log").start()
    try:
        index_catalog(s, first, world.items)
        publish_events(s, events, quiet=True)
        first.wait_for("streamrec_events_total", N_EVENTS // 2, timeout=300,
                       outcome="applied")
    finally:
        first.kill()
    stores = partition_stores(s.data_dir)
    assert stores, "the worker wrote no local store"
    rng = random.Random(7)
    for path in stores:
        damage(path, rng)
    before = sum(st.n_events for st in user_states(s).values())

    second = WorkerProcess(s, tmp_path / "second.log").start()  # the same, damaged disk
    try:
        second.wait_ready(snapshot=False)
        pid = second.proc.pid
        final = wait_states(s, expected_states(events, s.learner.history_len), timeout=300)
        second.wait_idle()
        second._check_alive()
        assert second.proc.pid == pid
        log = (tmp_path / "second.log").read_text()
    finally:
        second.stop()
    audit = _audit(final, _histories(events), s.learner.history_len)
    assert (audit["lost"], audit["duplicated"], audit["wrong_history"]) == (0, 0, []), audit
    dropped = [p.name for p in stores if f"local store {p.name} is unreadable" in log]
    assert dropped, "no damaged store was noticed"
    print(f"\n[faults] disk ({damage.__name__}): {len(stores)} partition stores damaged, "
          f"{len(dropped)} dropped and restored, {before} events durable at the kill, "
          f"{audit['applied']} applied in the end, lost 0, duplicated 0")
