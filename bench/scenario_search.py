"""Scenario-filtered search: one index with an ID selector against per-scenario sub-indexes.

    .venv/bin/python -m bench.scenario_search [--items 50000] [--shares 0.01,0.05,0.2,0.5]
                                               [--kinds flat,hnsw] [--batch 256] [--k 200]

A scenario allows a share of the catalog. Serving can search the one catalog-wide index
restricted to those items (`FaissIndex.search(allowed=...)`: an IDSelectorBitmap over the
labels, rebuilt from the allowed keys each call, which is what models/serving.py does), or
keep one sub-index per scenario and search only it. Per share and index kind this measures
the search time of a batch of `--batch` queries for `--k` candidates both ways (best of
`--repeats`, the two alternating, so background load hits both alike), the sub-index's build
time (paid again at every index refresh, per scenario), and recall@k of each against the
exact restricted top-k. Writes scenario_search.json and .png to --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import orjson
from rich.console import Console
from rich.progress import track
from rich.table import Table

from bench._common import save_figure
from bench.index import make_basis, make_vectors
from index.faiss_index import FaissIndex, IndexConfig


def best_time(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / len(t) for f, t in zip(found, truth,
                                                                                 strict=True)]))


def case(kind: str, share: float, x: np.ndarray, keys: np.ndarray, q: np.ndarray, k: int,
         whole: FaissIndex, repeats: int, rng: np.random.Generator) -> dict:
    allowed = np.sort(rng.choice(keys, size=max(k, int(share * len(keys))), replace=False))
    sub_x = x[np.searchsorted(keys, allowed)]
    t0 = time.perf_counter()
    sub = FaissIndex.build(allowed, sub_x, IndexConfig(kind=kind))
    build_s = time.perf_counter() - t0
    truth = allowed[np.argsort(-(q @ sub_x.T), axis=1)[:, :k]]
    t_sel = t_sub = float("inf")
    for _ in range(repeats):  # alternate: the same background load for both
        t_sel = min(t_sel, best_time(lambda: whole.search(q, k, allowed=allowed), 1))
        t_sub = min(t_sub, best_time(lambda: sub.search(q, k), 1))
    return {"kind": kind, "share": share, "allowed": len(allowed), "selector_ms": 1e3 * t_sel,
            "subindex_ms": 1e3 * t_sub, "subindex_build_s": build_s,
            "selector_over_subindex": t_sel / t_sub,
            "recall_selector": recall(whole.search(q, k, allowed=allowed)[1], truth),
            "recall_subindex": recall(sub.search(q, k)[1], truth)}


def print_table(rows: list[dict]) -> None:
    table = Table(title="scenario-filtered search (one batch)")
    for col in ("kind", "share", "allowed", "selector ms", "sub-index ms", "sel/sub",
                "sub build s", "recall sel", "recall sub"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["kind"], f"{r['share']:.2f}", str(r["allowed"]),
                      f"{r['selector_ms']:.1f}", f"{r['subindex_ms']:.1f}",
                      f"{r['selector_over_subindex']:.2f}", f"{r['subindex_build_s']:.2f}",
                      f"{r['recall_selector']:.3f}", f"{r['recall_subindex']:.3f}")
    Console().print(table)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in sorted({r["kind"] for r in rows}):
        rs = [r for r in rows if r["kind"] == kind]
        ax.plot([r["share"] for r in rs], [r["selector_ms"] for r in rs], "o-",
                label=f"{kind}: one index + selector")
        ax.plot([r["share"] for r in rs], [r["subindex_ms"] for r in rs], "s--",
                label=f"{kind}: per-scenario sub-index")
    ax.set(xscale="log", yscale="log", xlabel="share of the catalog allowed",
           ylabel="ms per batch", title="scenario-filtered search")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--shares", default="0.01,0.05,0.2,0.5")
    ap.add_argument("--kinds", default="flat,hnsw")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/out")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    basis = make_basis(a.dim, a.dim // 2, 0)
    x = make_vectors(a.items, basis, 0.1, 1)
    q = make_vectors(a.batch, basis, 0.1, 2)
    keys = np.arange(1, a.items + 1, dtype=np.int64)
    rows = []
    for kind in a.kinds.split(","):
        whole = FaissIndex.build(keys, x, IndexConfig(kind=kind))
        for share in track([float(s) for s in a.shares.split(",")], description=kind):
            rows.append(case(kind, share, x, keys, q, a.k, whole, a.repeats, rng))
    print_table(rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scenario_search.json").write_bytes(orjson.dumps(
        {"args": vars(a), "rows": rows}, option=orjson.OPT_INDENT_2))
    plot(rows, out / "scenario_search.png")


if __name__ == "__main__":
    main()
