"""Drift benchmark: how fast each per-user LR rule recovers when a shared account changes hands.

    .venv/bin/python -m bench.drift ML_100K_DIR [--pairs 200] [--events N] [--out bench/out]

MovieLens 100K with 200 spliced ids (evaluation/drift.py: user A's first 40 events, then
user B's first 50 under the same id), and the control (the same ids, A's own first 90
events), each run through the prequential evaluator (batch 64) once per rule, one run at a
time. Prints the table and writes drift.json and drift.png under --out. The data is not
shipped (licence): pass its directory.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench._common import save_figure
from evaluation import comparison as cmp
from evaluation import drift
from evaluation.datasets import movielens_events, movielens_items
from evaluation.evaluate import Result, StreamrecModel, prequential
from models.config import LearnerConfig
from streams.settings import Settings

RULES = ("fixed", "adagrad", "rmsprop", "adaptive")


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ml_dir")
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--cut", type=int, default=40, help="A's events before the switch")
    ap.add_argument("--after", type=int, default=50, help="B's events after the switch")
    ap.add_argument("--pre", type=int, default=20, help="pre-switch window (A's last events)")
    ap.add_argument("--window", type=int, default=10, help="moving mean for recovery")
    ap.add_argument("--events", type=int, default=None, help="use a prefix of the stream")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out")
    return ap.parse_args()


def _runs(data: cmp.Dataset, streams: dict[str, drift.Marked], rules: list[str],
          batch_size: int, done: Callable[[dict], None]) -> dict[tuple[str, str], Result]:
    """Every (rule, stream) run, one after another (all spliced runs first), with a rich
    progress bar each; `done(results so far)` after each, so a cut-short run leaves its
    figures."""
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

    from evaluation.progress import Progress

    cmp.one_core()  # one core: the machine is shared
    results = {}
    cols = (TextColumn("{task.description:<18}"), BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn())
    with Progress(*cols) as bar:
        tasks = {(r, s): bar.add_task(f"{r} {s}", total=len(streams[s].events))
                 for s in streams for r in rules}
        for (rule, kind), task in tasks.items():
            cfg = LearnerConfig(lr_rule=rule)
            model = StreamrecModel(data.item_ids, data.text_vectors, cfg, name=rule)
            results[rule, kind] = prequential(
                model, streams[kind].events, batch_size,
                on_batch=lambda n, t=task: bar.advance(t, n), item_ids=data.item_ids,
                history_len=cfg.history_len)
            done(results)
    return results


def _doc(args: argparse.Namespace, data: cmp.Dataset, streams: dict[str, drift.Marked],
         results: dict, seconds: float) -> dict:
    rules = sorted({r for r, _ in results}, key=list(RULES).index)
    doc = {"dataset": "ml-100k", "events": len(data.events), "pairs": args.pairs,
           "cut": args.cut, "after": args.after, "pre": args.pre, "window": args.window,
           "batch_size": args.batch_size, "seed": args.seed,
           "stream_events": {k: len(m.events) for k, m in streams.items()},
           "recovery": f"first k whose mean NDCG@10 over post-switch events k-{args.window - 1}"
                       f"..k (per-k mean over the ids) reaches the pre-switch level",
           "seconds": round(seconds), "rules": {}}
    for rule in rules:
        doc["rules"][rule] = {kind: drift.drift_report(results[rule, kind], streams[kind],
                                                       args.window)
                                for kind in streams if (rule, kind) in results}
        doc["rules"][rule]["overall_ndcg@10"] = round(
            results[rule, "splice"].metrics["ndcg@10"], 5)
    return doc


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ML-100K, {doc['pairs']} spliced ids ({doc['cut']} events of A, "
                        f"then {doc['after']} of B), NDCG@10, batch {doc['batch_size']}")
    for col in ("rule", "pre (last 20)", "post k=1..10", "post k=1..50", "recover k",
                "control pre", "control post", "control recover k", "stream NDCG@10"):
        table.add_column(col, justify="left" if col == "rule" else "right")
    for rule, m in doc["rules"].items():
        s, c = m["splice"], m.get("control")
        ctrl = ("-", "-", "-") if c is None else (
            f"{c['pre_level']:.4f}", f"{c['post_mean']:.4f}", _k(c["recovery_k"], doc["after"]))
        table.add_row(rule, f"{s['pre_level']:.4f}", f"{s['post_first10']:.4f}",
                      f"{s['post_mean']:.4f}", _k(s["recovery_k"], doc["after"]), *ctrl,
                      f"{m['overall_ndcg@10']:.4f}")
    Console(width=140).print(table)


def _k(k: int | None, after: int) -> str:
    return f">{after}" if k is None else str(k)


def plot(doc: dict, path: Path) -> None:
    """NDCG@10 against events after the switch (moving mean), one line per rule; the
    control dotted, each rule's pre-switch level as a thin horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    w = doc["window"]
    for n, (rule, m) in enumerate(doc["rules"].items()):
        color = f"C{n}"
        for kind, style in (("splice", "-"), ("control", ":")):
            if kind not in m:
                continue
            curve = np.array(m[kind]["curve"])
            y = np.convolve(curve, np.ones(w) / w, mode="valid")
            ax.plot(np.arange(w, len(curve) + 1), y, style, color=color,
                    label=f"{rule} {kind}", linewidth=2.0 if rule == "rmsprop" else 1.2)
        ax.axhline(m["splice"]["pre_level"], color=color, linewidth=0.6, alpha=0.6)
    ax.set_xlabel(f"events after the switch (k; moving mean of {w} ending at k)")
    ax.set_ylabel(f"NDCG@10 (mean over {doc['pairs']} ids)")
    ax.set_title("Shared account changes hands (ML-100K): recovery per LR rule; "
                 "thin lines: pre-switch level")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    save_figure(fig, path)


def main() -> None:
    args = _args()
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    events = movielens_events(args.ml_dir)[:args.events]
    data = cmp.make_dataset("ml-100k", movielens_items(args.ml_dir), events,
                            Settings().text_encoder(device="cpu").encode)
    pairs = drift.choose_pairs(data.events, args.pairs, args.cut, args.after, seed=args.seed)
    streams = {kind: drift.splice(data.events, pairs, args.cut, args.after, args.pre,
                                  control=kind == "control") for kind in ("splice", "control")}

    def save(results: dict) -> dict:
        doc = _doc(args, data, streams, results, time.perf_counter() - start)
        doc["pairs_used"] = [[p.user, p.a, p.b] for p in pairs]
        cmp.write_json(out / "drift.json", doc)
        plot(doc, out / "drift.png")
        return doc

    print_table(save(_runs(data, streams, args.rules.split(","), args.batch_size, save)))
    print(f"wall time: {time.perf_counter() - start:.0f} s; results in {out}/")


if __name__ == "__main__":
    main()
