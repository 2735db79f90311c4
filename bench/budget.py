"""Quality against training budget: streamrec on MovieLens 100K with more or less training.

    .venv/bin/python -m bench.budget [ML_100K_DIR] [--out bench/out] [--jobs 2] [--limit N]

Each variant changes one lever of the trainer's budget (replayed pairs per new pair,
passes over a batch, pairs per step, model width) and runs the prequential protocol
(evaluation/evaluate.py) with everything else at the defaults. The budget is counted as
the trainer's pair-gradients per event (fresh and replayed pairs summed over its steps)
and its seconds per 1,000 events. Prints a table, writes budget-ml100k.json and a plot
(NDCG@10 against the trainer's seconds) under --out.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.quality import ml100k, ml100k_parser
from evaluation import comparison as cmp
from evaluation.evaluate import StreamrecModel, prequential
from models.config import LearnerConfig

#: name -> LearnerConfig overrides; one lever each, the default first.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "replay 0": {"replay_ratio": 0.0},
    "replay 2": {"replay_ratio": 2.0},
    "replay 4": {"replay_ratio": 4.0},
    "2 passes": {"steps_per_batch": 2},
    "3 passes": {"steps_per_batch": 3},
    "64 pairs/step": {"max_pairs_per_step": 64, "max_steps_per_batch": 2},
    "dim 128": {"dim": 128},
}


def run_variant(name: str, data: cmp.Dataset, batch_size: int, queue: Any) -> dict:
    """One variant's figures: quality, candidate recall and the budget it spent."""
    cmp.one_core()
    cfg = LearnerConfig().model_copy(update=VARIANTS[name])
    model = StreamrecModel(data.item_ids, data.text_vectors, cfg, name=name)
    res = prequential(model, data.events, batch_size, item_ids=data.item_ids,
                      history_len=cfg.history_len,
                      on_batch=lambda n: queue.put((name, n)))
    trainer, n = model.ranks[0], len(data.events)
    return {**res.summary(), "overrides": VARIANTS[name], "seconds": round(res.seconds, 1),
            "train_steps_per_event": trainer.steps / n,
            "pair_grads_per_event": trainer.pair_steps / n,
            "train_s_per_1k_events": 1000 * model.train_seconds / n}


def run_all(data: cmp.Dataset, names: list[str], batch_size: int, jobs: int
            ) -> dict[str, dict]:
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        queue = manager.Queue()
        with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            futures = {n: pool.submit(run_variant, n, data, batch_size, queue) for n in names}
            cmp.progress_bars(futures, queue, len(data.events))
            return {n: f.result() for n, f in futures.items()}


def print_table(rows: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Quality against training budget (ML-100K, batch 64)")
    for col in ("variant", "NDCG@10", "HR@10", "Recall@50", "target retrieved",
                "pair-grads / event", "steps / event", "train s / 1k events"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, r in rows.items():
        table.add_row(name, f"{r['ndcg@10']:.4f}", f"{r['hr@10']:.4f}", f"{r['recall@50']:.4f}",
                      f"{r['candidate_recall']:.4f}", f"{r['pair_grads_per_event']:.2f}",
                      f"{r['train_steps_per_event']:.3f}", f"{r['train_s_per_1k_events']:.2f}")
    Console(width=max(Console().width, 120)).print(table)


def plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench._common import save_figure

    fig, ax = plt.subplots(figsize=(8, 4.5))
    by_x = sorted(rows.items(), key=lambda kv: kv[1]["train_s_per_1k_events"])
    for k, (name, r) in enumerate(by_x):  # labels alternate above and below: x's crowd
        x, y = r["train_s_per_1k_events"], r["ndcg@10"]
        ax.scatter([x], [y], color="tab:red" if name == "default" else "tab:blue")
        ax.annotate(name, (x, y), textcoords="offset points", fontsize=8,
                    xytext=(4, 6 if k % 2 == 0 else -12))
    ax.set_xlabel("trainer seconds per 1,000 events (one core)")
    ax.set_ylabel("NDCG@10")
    ax.set_title("streamrec on MovieLens 100K: quality against training budget")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main() -> None:
    ap = ml100k_parser(__doc__)
    ap.add_argument("--limit", type=int, help="only the first N events (smoke runs)")
    ap.add_argument("--variants", help="comma-separated names (default: all)")
    args = ap.parse_args()
    start = time.perf_counter()
    data, out = ml100k(args.ml_dir, args.out, args.limit)
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    rows = run_all(data, names, args.batch_size, args.jobs)
    print_table(rows)
    cmp.write_json(out / "budget-ml100k.json", {"events": len(data.events), "variants": rows})
    plot(rows, out / "budget-ml100k.png")
    print(f"wall time: {time.perf_counter() - start:.0f} s; results in {out}/")


if __name__ == "__main__":
    main()
