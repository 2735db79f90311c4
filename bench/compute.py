"""Compute benchmark: the worker's micro-batch path in-process, with no Kafka at all.

    .venv/bin/python -m bench.compute [--items 2000] [--users 100000] [--batch 500]
                                      [--batches 40] [--profile] [--out bench/out]

The same objects the worker runs (streams/processor.EventProcessor over the real encoder,
learner and FAISS server), fed with bench/throughput.py's event stream (every event of a
batch a different user) and an in-memory dict as the user-state store. Item vectors are
random instead of embedded (the catalog is not what is measured); the heap is frozen after
set-up, as the worker's is (streams/process.py freeze_heap). What this rate is, the
pipeline cannot exceed on the same core: the gap between the two is the streaming layer's
share. Prints events/s and milliseconds per batch by step; --profile adds cProfile's top
functions. Writes compute.json to --out.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

from bench._common import BenchEvents, machine
from evaluation.synthetic import make_world
from models.learner import OnlineLearner
from models.serving import Server
from models.user_state import UserState
from streams.process import configure_process, freeze_heap
from streams.processor import EventProcessor
from streams.records import RawRecord
from streams.settings import Settings

#: serving worker: decode, process (serve), learn (per-user step), state; the trainer: train
STEPS = ("decode", "process", "learn", "state", "train")


class Harness:
    """One worker's compute parts, a dict as the state store, a synthetic stream."""

    def __init__(self, n_items: int, n_users: int, batch: int):
        s = Settings()
        configure_process(s.compute_threads, s.index.blas_threshold, s.index.search_threads)
        self.encoder = s.text_encoder()
        self.learner = OnlineLearner(s.learner, text_dim=self.encoder.dim)
        self.server = Server(self.learner.model, s.index,
                             exclude_seen=s.exclude_seen)
        self.proc = EventProcessor(s, self.server, self.learner.personal, self.encoder)
        world = make_world(n_items, n_topics=16, seed=1)
        ids = [it["item_id"] for it in world.items]
        vecs = np.random.default_rng(0).standard_normal((len(ids), self.encoder.dim))
        self.learner.upsert_items(ids, vecs.astype(np.float32))
        self.server.add_items(ids)
        self.server.refresh()
        self.events = BenchEvents(world, n_users, seed=2)
        self.batch = batch
        self.store: dict[str, bytes] = {}
        self.offset = 0
        self.ms = dict.fromkeys(STEPS, 0.0)

    def records(self) -> list[RawRecord]:
        now = int(time.time() * 1000)
        out = []
        for ev in self.events.take(self.batch):
            out.append(RawRecord(ev["user_id"].encode(), orjson.dumps(ev), 0, self.offset, now))
            self.offset += 1
        return out

    def run_batch(self, recs: list[RawRecord]) -> None:
        t = [time.perf_counter()]
        good, bad = self.proc.decode(recs)
        states = {ev.user_id: UserState.from_bytes(self.store.get(ev.user_id)) for _, ev in good}
        t.append(time.perf_counter())
        out = self.proc.process(good, bad, states)
        t.append(time.perf_counter())
        self.proc.learn(out)
        t.append(time.perf_counter())
        for user, upd in out.users.items():
            self.store[user] = upd.state.to_bytes()
        t.append(time.perf_counter())
        self.learner.trainer.train(out.examples)
        t.append(time.perf_counter())
        for name, a, b in zip(STEPS, t, t[1:], strict=False):
            self.ms[name] += (b - a) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=500, help="events per micro-batch")
    ap.add_argument("--batches", type=int, default=40, help="timed batches (after 5 warm-up)")
    ap.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    h = Harness(args.items, args.users, args.batch)
    freeze_heap()  # as the worker's entry point does once started: without it, collections
    # of the encoder's and catalog's objects took ~50 of 265 ms per 50k-item batch here
    for _ in range(5):
        h.run_batch(h.records())
    h.ms = dict.fromkeys(STEPS, 0.0)
    batches = [h.records() for _ in range(args.batches)]
    prof = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    for recs in batches:
        h.run_batch(recs)
    if prof:
        prof.disable()
    seconds = time.perf_counter() - t0
    eps = args.batches * args.batch / seconds
    per_batch = {k: round(v / args.batches, 1) for k, v in h.ms.items()}
    table = Table(title=f"In-process batch path: {args.batch} events/batch, {args.items:,} "
                        f"items, {args.users:,} users: {eps:,.0f} events/s")
    table.add_column("step")
    table.add_column("ms per batch", justify="right")
    for k, v in per_batch.items():
        table.add_row(k, f"{v:.1f}")
    Console().print(table)
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "compute", "eps": round(eps, 1), "batch": args.batch,
           "items": args.items, "users": args.users, "batches": args.batches,
           "ms_per_batch": per_batch, "machine": machine()}
    (out / "compute.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
