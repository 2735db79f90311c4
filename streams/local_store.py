"""The worker's local table store, checked before Faust opens it.

User state lives in the changelog; the RocksDB directory under `data_dir` is a cache of it.
A crash mid-write, a full or failing disk, or a person's stray `truncate` can leave a
partition's database unreadable. Faust opens every partition's database when it is assigned
and, on a corrupt one, the open raises and the worker dies at start-up, again and again (a
crash loop: measured in tests/test_faults_disk.py). So each database is opened read-only
and read through once before Faust starts (RocksDB checks every block's checksum as it
reads); one that fails is removed, with a warning naming it, and Faust restores that
partition from the changelog as it would on a fresh disk.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

log = logging.getLogger("streamrec.local_store")


def partition_stores(data_dir: Path) -> list[Path]:
    """The RocksDB directories of Faust's tables under a worker's data directory."""
    return sorted(p for p in data_dir.glob("v*/tables/*.db") if p.is_dir())


def readable(path: Path) -> str | None:
    """None if every key and value of the database reads back, else why not."""
    from rocksdict import AccessType, Options, Rdict

    try:
        db = Rdict(str(path), options=Options(raw_mode=True),
                   access_type=AccessType.read_only())
    except Exception as exc:  # noqa: BLE001 - any failure to open is the answer
        return f"cannot open: {exc}"
    try:
        for _ in db.items():
            pass
    except Exception as exc:  # noqa: BLE001 - a corrupt block, a short file ...
        return f"cannot read: {exc}"
    finally:
        db.close()
    return None


def discard_unreadable(data_dir: Path) -> list[str]:
    """Remove every partition store that does not read back; returns their names."""
    removed = []
    t0 = time.monotonic()
    stores = partition_stores(data_dir)
    for path in stores:
        problem = readable(path)
        if problem is not None:
            log.warning("local store %s is unreadable (%s): removed; that partition is "
                        "restored from its changelog", path.name, problem[:300])
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    if stores:
        log.info("checked %d local stores in %.1f s", len(stores), time.monotonic() - t0)
    return removed
