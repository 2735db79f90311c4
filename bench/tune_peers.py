"""Small hyper-parameter grids for the sr_decay and markov_backoff peers, on the FIRST
50,000 events of MovieLens 100K only (the second half stays unseen by the choice).

    .venv/bin/python -m bench.tune_peers [ML_100K_DIR] [--events 50000] [--only markov_backoff]

Same protocol as `streamrec eval` (evaluation/evaluate.prequential: batch 64, full ranking,
the serving rule's seen items excluded); one configuration at a time, one process. Prints
NDCG@10 and HR@10 per configuration, best first per model.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import Any

from evaluation.baselines import make_baseline
from evaluation.datasets import movielens_events, movielens_items
from evaluation.evaluate import prequential
from models.config import LearnerConfig
from streams.settings import Settings

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"
GRIDS: dict[str, list[dict[str, Any]]] = {
    "sr_decay": [dict(window=w, profile_size=lp, decay=d)
                 for w, lp, d in itertools.product((10, 50), (10, 50), (0.8, 0.9))],
    # 1, 10 and 100 rank identically (q sums to 1 over the catalog, so α·q_j < 1 = one
    # observed transition): the grid goes on until the prior can outweigh a count
    "markov_backoff": [dict(alpha=a) for a in (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)],
    "itemknn_seq": [{}],  # the reference: what markov_backoff backs off to
}


def load(ml_dir: str, n_events: int) -> tuple[list[str], list[tuple]]:
    """Item ids and the first `n_events` events as (user, item index, ts) in time order,
    as evaluation.comparison.make_dataset orders them (stable sort on ts)."""
    item_ids = [str(it["item_id"]) for it in movielens_items(ml_dir)]
    index = {i: n for n, i in enumerate(item_ids)}
    events = sorted(movielens_events(ml_dir), key=lambda e: e["ts"])
    evs = [(str(e["user_id"]), index[str(e["item_id"])], int(e["ts"])) for e in events]
    return item_ids, evs[:n_events]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ml_dir", nargs="?", default=str(DEFAULT_DIR))
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--only", choices=sorted(GRIDS), default=None)
    args = ap.parse_args()
    item_ids, events = load(args.ml_dir, args.events)
    s, history = Settings(), LearnerConfig().history_len
    for name, grid in GRIDS.items():
        if args.only and name != args.only:
            continue
        rows = []
        for params in grid:
            start = time.perf_counter()
            res = prequential(make_baseline(name, len(item_ids), **params), events,
                              args.batch_size, item_ids=item_ids, exclude_seen=s.exclude_seen,
                              history_len=history)
            m = res.metrics
            rows.append((m["ndcg@10"], m["hr@10"], params, time.perf_counter() - start))
            print(f"{name} {params}: NDCG@10 {m['ndcg@10']:.4f}  HR@10 {m['hr@10']:.4f}  "
                  f"({rows[-1][3]:.0f} s)", flush=True)
        for ndcg, hr, params, _ in sorted(rows, key=lambda r: -r[0]):
            print(f"  {name:<15} {params!s:<50} NDCG@10 {ndcg:.4f}  HR@10 {hr:.4f}")


if __name__ == "__main__":
    main()
