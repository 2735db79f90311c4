"""Scale-out quality: one model across N serving workers, against the single learner.

    .venv/bin/python -m bench.scaleout_quality [ML_100K_DIR] [--out bench/out]

On MovieLens 100K (prequential, batch 64), streamrec as:
- the single in-process learner (the reference);
- N = 2, 4, 8 serving workers (users hashed to them) and one trainer, its snapshot reaching
  the workers after every batch: must land within 0.002 NDCG@10 of the reference;
- 4 workers with the snapshot every E events (E = 256 ... 16,384): the cost of snapshot lag;
- N = 4 and 8 independent learners (each worker its own model, trained on its own users'
  events: the deployment before the trainer tier);
- a trainer of 2 ranks in lockstep (each training half the source partitions).
Prints the table, writes scaleout-quality.json and a plot of NDCG@10 against E.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench._common import save_figure
from bench.quality import ml100k, ml100k_parser
from evaluation import comparison as cmp
from models.config import LearnerConfig

LAGS = (256, 1024, 4096, 16384)


def configs() -> list[str]:
    return (["streamrec"] + [cmp.sharded_name(n) for n in (2, 4, 8)]
            + [cmp.sharded_name(4, e) for e in LAGS]
            + [cmp.sharded_name(n, independent=True) for n in (4, 8)]
            + [cmp.sharded_name(1, ranks=2)])


def main() -> None:
    ap = ml100k_parser(__doc__)
    ap.add_argument("--limit", type=int, default=None, help="first N events (smoke runs)")
    args = ap.parse_args()
    start = time.perf_counter()
    data, out = ml100k(args.ml_dir, args.out, args.limit)
    results = cmp.run_comparison(data, configs(), args.batch_size, LearnerConfig(),
                                 jobs=args.jobs)
    doc = cmp.to_json(data, results, args.batch_size)
    ref = doc["models"]["streamrec"]["ndcg@10"]
    for m in doc["models"].values():
        m["delta_vs_single"] = round(m["ndcg@10"] - ref, 5)
    cmp.print_table(doc)
    print(f"{'model':<22} {'NDCG@10':>8} {'vs single':>10}")
    for name in configs():
        m = doc["models"][name]
        print(f"{name:<22} {m['ndcg@10']:>8.4f} {m['delta_vs_single']:>+10.4f}")
    cmp.write_json(out / "scaleout-quality.json", doc)
    plot(doc, out / "scaleout-quality.png")
    print(f"wall time: {time.perf_counter() - start:.0f} s; results in {out}/")


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = doc["models"]
    xs = [64, *LAGS]
    ys = [models[cmp.sharded_name(4)]["ndcg@10"]] + \
        [models[cmp.sharded_name(4, e)]["ndcg@10"] for e in LAGS]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, ys, "o-", label="4 workers + trainer")
    ax.axhline(models["streamrec"]["ndcg@10"], color="k", linestyle=":",
               label="single learner")
    for n, style in ((4, "--"), (8, "-.")):
        ax.axhline(models[cmp.sharded_name(n, independent=True)]["ndcg@10"], color="C3",
                   linestyle=style, label=f"{n} independent learners")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("events between snapshots (E)")
    ax.set_ylabel("NDCG@10 (MovieLens 100K, prequential)")
    ax.set_title("The cost of snapshot lag")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
