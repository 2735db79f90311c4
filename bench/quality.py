"""Quality benchmark: streamrec, its ablations and the streaming peers on MovieLens 100K.

    .venv/bin/python -m bench.quality [ML_100K_DIR] [--batch-size 64] [--out bench/out]

Prints the table, writes quality-ml100k.json and quality-ml100k.png under --out, and the
wall time. The data is not shipped (licence): pass its directory (default: ../shared/data/
ml-100k next to the checkout).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from evaluation import comparison as cmp
from evaluation.datasets import movielens_events, movielens_items
from models.config import LearnerConfig
from streams.settings import Settings

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


def ml100k_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every ML-100K quality bench takes: the data, batch size, output
    folder and parallel jobs."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("ml_dir", nargs="?", default=str(DEFAULT_DIR))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--jobs", type=int, default=cmp.cpu_jobs())
    return ap


def ml100k(ml_dir: str, out: str, limit: int | None = None) -> tuple[cmp.Dataset, Path]:
    """ML-100K embedded with the agent's encoder (its first `limit` events in time order),
    and the output folder, created."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    events = movielens_events(ml_dir)[:limit]  # (already in time order)
    data = cmp.make_dataset("ml-100k", movielens_items(ml_dir), events,
                            Settings().text_encoder(device="cpu").encode)
    return data, folder


def main() -> None:
    args = ml100k_parser(__doc__).parse_args()
    start = time.perf_counter()
    data, out = ml100k(args.ml_dir, args.out)
    results = cmp.run_comparison(data, cmp.model_names(), args.batch_size, LearnerConfig(),
                                 jobs=args.jobs)
    doc = cmp.to_json(data, results, args.batch_size)
    cmp.print_table(doc)
    cmp.write_json(out / "quality-ml100k.json", doc)
    cmp.plot(results, out / "quality-ml100k.png",
             f"MovieLens 100K: NDCG@10 over the stream (batch {args.batch_size})")
    best_peer = max((n for n in doc["models"] if not n.startswith("streamrec")),
                    key=lambda n: doc["models"][n]["ndcg@10"])
    ratio = doc["models"]["streamrec"]["ndcg@10"] / doc["models"][best_peer]["ndcg@10"]
    print(f"streamrec NDCG@10 / best peer ({best_peer}): {ratio:.3f}")
    print(f"wall time: {time.perf_counter() - start:.0f} s; results in {out}/")


if __name__ == "__main__":
    main()
