"""Index benchmark: streamrec's FaissIndex layer against bare faiss, same index and parameters.

    .venv/bin/python -m bench.index [--sizes 10000,100000,1000000] [--quick] [--dim 64]
                                     [--queries 1000] [--batch 256] [--k 10] [--out bench/out]

For each catalog size and each index kind the layer supports (exact ``flat`` and ``hnsw``;
index/faiss_index.py has no IVF), builds the index with ``FaissIndex.build`` and measures
build time, memory (VmRSS delta of the build and the faiss index's serialized size), search
throughput through the layer (``qps``) and through bare faiss (``qps_bare``), and recall@k
against an exact inner-product search. The catalog is "embedding-like": rank-``--rank``
Gaussian factors through a fixed random basis plus isotropic noise, L2-normalised, float32,
from a seeded numpy RNG; queries are drawn from the same distribution.

Bare faiss searches *the same faiss object the layer built* (``FaissIndex._backend.index``),
with the same search parameters (efSearch, k, the layer's process-wide BLAS threshold): the
layer has no public way to wrap an existing index, and one graph searched through both paths
isolates the layer's own search overhead, free of HNSW build randomness, while the 1M HNSW
graph (minutes) is built once. A separately built bare index (its build time, memory and
recall) is added for sizes up to --bare-build-max. Layer and bare searches alternate batch by
batch and each batch's best round counts, so background load hits both alike (qps_median
keeps the per-batch medians). Each HNSW graph is also searched at other efSearch values
(--ef-sweep), to show what a recall target would cost. Flat rows also report bare faiss at
faiss's own BLAS threshold, i.e. what the layer's process-wide override changes.

Writes index.json and index.png to --out; prints the table, the wall time and a pass/fail
line per target: layer within 1.2x of bare faiss (qps_bare/qps), and recall@10 >= 0.95 for
the default index of the largest catalog.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import orjson
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from bench._common import save_figure
from index.faiss_index import FaissIndex, IndexConfig, use_blas_from
from models.config import LearnerConfig

#: faiss's own BLAS threshold, read before `main` sets the layer's process-wide.
FAISS_DEFAULT_BLAS_THRESHOLD = int(faiss.cvar.distance_compute_blas_threshold)
KINDS = ("flat", "hnsw")  # every kind IndexConfig accepts besides 'auto'
MAX_RATIO = 1.2  # target: qps_bare / qps
MIN_RECALL = 0.95  # target: recall@10 of the default index at the largest catalog
# piped output would otherwise be cut to 80 columns, which truncates the table
console = Console(width=None if sys.stdout.isatty() else 160)


# --------------------------------------------------------------------------- data


def rss_mb() -> float:
    """This process's resident set size in MB (VmRSS of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def settle() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc malloc_trim).

    Without the trim, an index built after another was freed reuses the freed heap and its
    RSS delta reads ~0 MB.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: deltas are only rougher
        pass


def make_basis(dim: int, rank: int, seed: int) -> np.ndarray:
    """The fixed (rank, dim) mixing matrix shared by catalog and queries."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rank, dim), dtype=np.float32) / np.sqrt(rank)).astype(np.float32)


def make_vectors(n: int, basis: np.ndarray, noise: float, seed: int,
                 chunk: int = 100_000) -> np.ndarray:
    """n L2-normalised rows of factors @ basis + noise; chunked so 1M rows stay at 256 MB."""
    rng = np.random.default_rng(seed)
    rank, dim = basis.shape
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = rng.standard_normal((m, rank), dtype=np.float32) @ basis
        x += noise * rng.standard_normal((m, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + m] = x
    return out


def make_excludes(nq: int, n: int, per_query: int, seed: int) -> list[set[int]] | None:
    """Random 'already seen' ids per query, like serving's exclude=seen (None when 0)."""
    if per_query <= 0:
        return None
    rng = np.random.default_rng(seed)
    return [set(rng.choice(n, size=min(per_query, n), replace=False).tolist())
            for _ in range(nq)]


def exact_topk(x: np.ndarray, q: np.ndarray, k: int, exclude: list[set[int]] | None,
               batch: int) -> np.ndarray:
    """Ground truth: bare IndexFlatIP top-k ids per query, minus that query's excluded ids."""
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    extra = max((len(e) for e in exclude), default=0) if exclude else 0
    kk = min(k + extra, len(x))
    ids = np.concatenate([flat.search(q[s : s + batch], kk)[1] for s in range(0, len(q), batch)])
    if not exclude:
        return ids[:, :k]
    return np.array([[i for i in row if i not in ex][:k] for row, ex in
                     zip(ids.tolist(), exclude, strict=True)], dtype=np.int64)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found ∩ truth| / k over queries (padding ids -1 never match)."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k].tolist()) & set(t.tolist())) / k
                          for f, t in zip(found, truth, strict=True)]))


# --------------------------------------------------------------------------- search paths


Search = Callable[[int], np.ndarray]  # batch number -> ids (batch, k)


def batches(nq: int, batch: int) -> list[slice]:
    """Serving-sized query batches (the last one may be short)."""
    return [slice(s, min(s + batch, nq)) for s in range(0, nq, batch)]


def layer_search(index: FaissIndex, q: np.ndarray, k: int, parts: list[slice],
                 exclude: list[set[int]] | None) -> Search:
    """One batch through FaissIndex.search, as serving calls it."""
    def run(b: int) -> np.ndarray:
        return index.search(q[parts[b]], k, exclude=exclude[parts[b]] if exclude else None)[1]
    return run


def fetch_k(index: FaissIndex, k: int, exclude: list[set[int]] | None,
            parts: list[slice]) -> list[int]:
    """Per batch, the candidate count the layer asks faiss for (k + most excluded, capped)."""
    most = [max((len(e) for e in exclude[p]), default=0) if exclude else 0 for p in parts]
    return [min(k + m, len(index)) for m in most]


def bare_search(fidx: faiss.Index, kind: str, cfg: IndexConfig, q: np.ndarray, k: int,
                parts: list[slice], kks: list[int]) -> Search:
    """One batch straight through faiss: same index, same fetch size, same efSearch.

    With excludes, the same over-fetch (``kks``) is searched but nothing is filtered, so the
    ratio then also prices the layer's exclusion step.
    """
    def run(b: int) -> np.ndarray:
        if kind == "hnsw":
            fidx.hnsw.efSearch = max(cfg.ef_search, kks[b])
        return fidx.search(q[parts[b]], kks[b])[1][:, :k]
    return run


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call (perf_counter: monotonic, sub-microsecond)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def race(layer: Search, bare: Search, n_batches: int, repeats: int, min_s: float,
         max_s: float, max_repeats: int = 500
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Time every batch through both paths, alternating batch by batch (and which path goes
    first), so the other processes on this shared machine slow both paths alike.

    After one untimed round (warm-up, and the ids for recall), runs at least ``repeats``
    rounds and until each path has ``min_s`` seconds, but stops after two rounds once a path
    has ``max_s`` seconds (slow cases: 1M flat under load). Returns the (rounds, batches)
    time arrays of layer and bare and their ids.
    """
    ids_l = np.concatenate([layer(b) for b in range(n_batches)])
    ids_b = np.concatenate([bare(b) for b in range(n_batches)])
    t_l: list[list[float]] = []
    t_b: list[list[float]] = []

    def more() -> bool:
        spent = min(np.sum(t_l), np.sum(t_b)) if t_l else 0.0
        if len(t_l) >= max_repeats or (len(t_l) >= 2 and spent >= max_s):
            return False
        return len(t_l) < repeats or spent < min_s

    while more():
        row_l, row_b = [], []
        for b in range(n_batches):
            if (len(t_l) + b) % 2:
                row_b.append(timed(lambda b=b: bare(b)))
                row_l.append(timed(lambda b=b: layer(b)))
            else:
                row_l.append(timed(lambda b=b: layer(b)))
                row_b.append(timed(lambda b=b: bare(b)))
        t_l.append(row_l)
        t_b.append(row_b)
    return np.array(t_l), np.array(t_b), ids_l, ids_b


def pass_s(times: np.ndarray, stat: Callable[..., np.ndarray] = np.min) -> float:
    """Seconds for all queries: per batch the best (or median) round, summed over batches.

    The best round is the one least disturbed by other processes; OpenMP's two threads on
    two shared cores make single passes vary up to 10x when a core is taken.
    """
    return float(stat(times, axis=0).sum())


# --------------------------------------------------------------------------- one case


def faiss_of(index: FaissIndex) -> faiss.Index:
    """The faiss index inside the layer (private attribute: the layer exposes none)."""
    return index._backend.index  # noqa: SLF001


def serialized_mb(fidx: faiss.Index) -> float | None:
    """Size of the faiss index as written by write_index (None for GPU indexes)."""
    try:
        return faiss.serialize_index(fidx).nbytes / 2**20
    except RuntimeError:
        return None


def build_layer(kind: str, ids: np.ndarray, x: np.ndarray,
                q1: np.ndarray) -> tuple[FaissIndex, float, float, float]:
    """FaissIndex.build with only the kind forced, then one search of one query.

    A GPU flat backend copies the catalog into faiss lazily, on the first search, so memory
    is read after that search (the index is then ready to serve); a CPU one searches its
    own copy (index/topk.py) and fills faiss only for a selector's search. Returns (index, build
    seconds, first-search seconds, RSS delta MB).
    """
    settle()
    rss0, t0 = rss_mb(), time.perf_counter()
    index = FaissIndex.build(ids, x, IndexConfig(kind=kind))
    t1 = time.perf_counter()
    index.search(q1, 1)
    t2 = time.perf_counter()
    return index, t1 - t0, t2 - t1, rss_mb() - rss0


def build_bare(kind: str, cfg: IndexConfig, x: np.ndarray) -> tuple[faiss.Index, float, float]:
    """The bare-faiss equivalent of the layer's build; returns (index, seconds, RSS delta MB)."""
    settle()
    rss0, t0 = rss_mb(), time.perf_counter()
    if kind == "hnsw":
        fidx = faiss.IndexHNSWFlat(x.shape[1], cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        fidx.hnsw.efConstruction = cfg.ef_construction
    else:
        fidx = faiss.IndexFlatIP(x.shape[1])
    fidx.add(x)
    return fidx, time.perf_counter() - t0, rss_mb() - rss0


def ef_sweep(fidx: faiss.Index, cfg: IndexConfig, q: np.ndarray, k: int, parts: list[slice],
             truth: np.ndarray, efs: list[int]) -> list[dict]:
    """Recall and bare q/s of one HNSW graph at other efSearch values: how far the default
    ef_search is from a recall target, without building another graph."""
    out = []
    for ef in efs:
        search = bare_search(fidx, "hnsw", cfg.model_copy(update={"ef_search": ef}), q, k,
                             parts, [k] * len(parts))
        found = np.concatenate([search(b) for b in range(len(parts))])
        times = [[timed(lambda b=b, f=search: f(b)) for b in range(len(parts))]
                 for _ in range(3)]
        out.append({"ef_search": ef, "recall@10": recall_at_k(found, truth),
                    "qps_bare": len(q) / pass_s(np.array(times))})
    return out


def default_blas_qps(bare: Search, n_batches: int, nq: int, layer_threshold: int) -> float:
    """Bare flat q/s with faiss's own BLAS threshold: what the layer's override buys."""
    faiss.cvar.distance_compute_blas_threshold = FAISS_DEFAULT_BLAS_THRESHOLD
    try:
        times = [[timed(lambda b=b: bare(b)) for b in range(n_batches)] for _ in range(2)]
        return nq / pass_s(np.array(times))
    finally:
        faiss.cvar.distance_compute_blas_threshold = layer_threshold


def bench_case(n: int, kind: str, x: np.ndarray, q: np.ndarray, truth: np.ndarray,
               exclude: list[set[int]] | None, default_kind: str,
               args: argparse.Namespace, say: Callable[[str], None]) -> dict:
    """Build one (n, kind) index through the layer, race layer vs bare search, score recall."""
    ids = np.arange(n, dtype=np.int64)  # ids == insertion order, so bare labels are ids
    say(f"n={n:,} {kind}: layer build")
    index, build_s, first_s, mem_mb = build_layer(kind, ids, x, q[:1])
    cfg, fidx = index.config, faiss_of(index)
    if fidx.ntotal < n:  # CPU flat: the layer searches its own copy (index/topk.py)
        fidx.add(x)
    parts = batches(len(q), args.batch)
    kks = fetch_k(index, args.k, exclude, parts)
    say(f"n={n:,} {kind}: search layer vs bare")
    t_l, t_b, ids_l, ids_b = race(layer_search(index, q, args.k, parts, exclude),
                                  bare_search(fidx, kind, cfg, q, args.k, parts, kks),
                                  len(parts), args.repeats, args.min_s, args.max_s)
    nq = len(q)
    row = {
        "n": n, "index": index.kind, "default": index.kind == default_kind,
        "qps": nq / pass_s(t_l), "qps_bare": nq / pass_s(t_b),
        "recall@10": recall_at_k(ids_l, truth), "ratio": pass_s(t_l) / pass_s(t_b),
        # each layer batch is timed right next to the same bare batch: the median of those
        # pairs' ratios is the estimate least moved by load that comes and goes
        "ratio_paired": float(np.median(t_l / t_b)),
        "qps_median": nq / pass_s(t_l, np.median),
        "qps_bare_median": nq / pass_s(t_b, np.median),
        "rounds": len(t_l),
        "same_results": None if exclude else float(np.mean(ids_l == ids_b)),
        "build_s": build_s, "first_search_s": first_s, "mem_mb": mem_mb,
        "index_mb": serialized_mb(fidx),
    }
    if kind == "flat" and args.default_blas and not exclude:
        say(f"n={n:,} {kind}: bare with faiss's default BLAS threshold")
        row["qps_bare_faiss_blas_default"] = default_blas_qps(
            bare_search(fidx, kind, cfg, q, args.k, parts, kks), len(parts), nq,
            cfg.blas_threshold)
    if kind == "hnsw" and args.ef_sweep and not exclude:
        say(f"n={n:,} {kind}: efSearch sweep")
        row["ef_sweep"] = ef_sweep(fidx, cfg, q, args.k, parts, truth, args.ef_sweep)
    del index, fidx
    if n <= args.bare_build_max:
        say(f"n={n:,} {kind}: separate bare build")
        own, row["build_s_bare"], row["mem_mb_bare"] = build_bare(kind, cfg, x)
        search = bare_search(own, kind, cfg, q, args.k, parts, kks)
        found = np.concatenate([search(b) for b in range(len(parts))])
        row["recall@10_bare"] = recall_at_k(found, truth) if not exclude else None
        del own
    settle()
    return row


# --------------------------------------------------------------------------- report


def machine() -> dict:
    """Enough context to compare runs over time (load matters: the machine is shared)."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in
                Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
               platform.processor())
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpu": cpu, "cpus": os.cpu_count(), "faiss": faiss.__version__,
            "faiss_compile": faiss.get_compile_options(), "numpy": np.__version__,
            "omp_threads": faiss.omp_get_max_threads(), "gpus": faiss.get_num_gpus()
            if hasattr(faiss, "get_num_gpus") else 0, "loadavg_start": os.getloadavg()}


def print_table(rows: list[dict], k: int) -> None:
    table = Table(title=f"FaissIndex layer vs bare faiss (k={k}; q/s from each batch's best "
                        "round; paired = median layer/bare time of back-to-back batches)")
    for col in ("n", "index", "default", "build s", "build s bare", "mem MB", "mem MB bare",
                "index MB", "qps", "qps bare", "bare/layer", "paired", f"recall@{k}",
                f"recall@{k} bare"):
        table.add_column(col, justify="right")

    def f(v: object, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in rows:
        table.add_row(f"{r['n']:,}", r["index"], "yes" if r["default"] else "",
                      f(r["build_s"], ".2f"), f(r.get("build_s_bare"), ".2f"),
                      f(r["mem_mb"], ".0f"), f(r.get("mem_mb_bare"), ".0f"),
                      f(r["index_mb"], ".0f"), f(r["qps"], ",.0f"), f(r["qps_bare"], ",.0f"),
                      f(r["ratio"], ".3f"), f(r["ratio_paired"], ".3f"),
                      f(r["recall@10"], ".4f"),
                      f(r.get("recall@10_bare"), ".4f"))
    console.print(table)


def check_targets(rows: list[dict], sizes: list[int]) -> dict:
    """The two targets, from the measured rows."""
    worst = max(rows, key=lambda r: r["ratio"])
    big = max(sizes)
    default_big = next((r for r in rows if r["n"] == big and r["default"]), None)
    out = {
        "max_ratio": MAX_RATIO, "worst_ratio": worst["ratio"],
        "worst_case": f"n={worst['n']} {worst['index']}",
        "ratio_pass": worst["ratio"] <= MAX_RATIO,
        "worst_ratio_paired": max(r["ratio_paired"] for r in rows),
        "min_recall": MIN_RECALL, "recall_n": big,
        "recall_index": default_big and default_big["index"],
        "recall": default_big and default_big["recall@10"],
        "recall_pass": bool(default_big and default_big["recall@10"] >= MIN_RECALL),
        "ef_search_for_target": min((p["ef_search"] for p in
                                     (default_big or {}).get("ef_sweep") or []
                                     if p["recall@10"] >= MIN_RECALL), default=None),
    }
    mark = {True: "[green]PASS[/]", False: "[red]FAIL[/]"}
    console.print(f"target layer within {MAX_RATIO}x of bare faiss (qps_bare/qps <= {MAX_RATIO}):"
                  f" {mark[out['ratio_pass']]}, worst {out['worst_ratio']:.3f} "
                  f"({out['worst_case']}); worst paired median "
                  f"{out['worst_ratio_paired']:.3f}")
    note = "" if big == 1_000_000 else f" [yellow](largest size run is {big:,}, not 1M)[/]"
    console.print(f"target default index at n={big:,} ({out['recall_index']}) recall@10 >= "
                  f"{MIN_RECALL}: {mark[out['recall_pass']]}, measured "
                  f"{out['recall'] or float('nan'):.4f}{note}")
    if not out["recall_pass"] and default_big and default_big.get("ef_sweep"):
        ef = out["ef_search_for_target"]
        console.print(f"  smallest swept efSearch reaching {MIN_RECALL}: "
                      + (str(ef) if ef else "none of " + ",".join(
                          str(p["ef_search"]) for p in default_big["ef_sweep"])))
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Left: q/s vs catalog size per kind, layer and bare. Right: recall vs q/s per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for color, kind in zip(("tab:blue", "tab:orange"), sorted({r["index"] for r in rows}),
                           strict=False):
        rs = sorted((r for r in rows if r["index"] == kind), key=lambda r: r["n"])
        ns = [r["n"] for r in rs]
        left.plot(ns, [r["qps"] for r in rs], marker="o", color=color, label=f"{kind} layer")
        left.plot(ns, [r["qps_bare"] for r in rs], marker="x", linestyle="--", color=color,
                  label=f"{kind} bare faiss")
        right.scatter([r["qps"] for r in rs], [r["recall@10"] for r in rs], color=color,
                      label=kind)
        for r in rs:
            sweep = r.get("ef_sweep") or []
            right.plot([p["qps_bare"] for p in sweep], [p["recall@10"] for p in sweep],
                       linestyle=":", marker=".", color=color, alpha=0.6)
            for p in sweep:
                right.annotate(f"ef{p['ef_search']}", (p["qps_bare"], p["recall@10"]),
                               fontsize=6, alpha=0.6)
            right.annotate(f"{r['n']:,}" + (" (default)" if r["default"] else ""),
                           (r["qps"], r["recall@10"]), textcoords="offset points",
                           xytext=(4, 4), fontsize=8)
    left.set(xscale="log", yscale="log", xlabel="catalog size", ylabel="queries/s",
             title="search throughput")
    right.set(xscale="log", xlabel="queries/s (layer)", ylabel="recall@10 vs exact",
              title="recall vs throughput (dotted: HNSW efSearch sweep)")
    right.axhline(MIN_RECALL, color="grey", linestyle=":", label=f"target {MIN_RECALL}")
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="catalog sizes, comma list")
    ap.add_argument("--quick", action="store_true", help="only 10k and 100k")
    ap.add_argument("--dim", type=int, default=LearnerConfig().dim, help="vector dimension")
    ap.add_argument("--rank", type=int, default=None, help="latent factors (default dim/2)")
    ap.add_argument("--noise", type=float, default=0.3, help="noise std per coordinate")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=256, help="queries per search call")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--exclude", type=int, default=0,
                    help="random excluded ids per query (serving passes seen items)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="min timed rounds (all batches, both paths)")
    ap.add_argument("--min-s", type=float, default=3.0,
                    help="min timed seconds per path (more rounds: the best is steadier)")
    ap.add_argument("--max-s", type=float, default=20.0,
                    help="after 2 rounds, stop once a path has this many timed seconds")
    ap.add_argument("--ef-sweep", default="32,64,128,256",
                    help="efSearch values to also try on each HNSW graph (bare; '' for none)")
    ap.add_argument("--bare-build-max", type=int, default=100_000,
                    help="also build a separate bare index up to this size")
    ap.add_argument("--no-default-blas", dest="default_blas", action="store_false",
                    help="skip the flat pass with faiss's own BLAS threshold")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    args.sizes = [10_000, 100_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    args.rank = args.rank or max(1, args.dim // 2)
    args.ef_sweep = [int(e) for e in args.ef_sweep.split(",") if e.strip()]
    return args


def main() -> None:
    args = parse_args()
    t_begin = time.perf_counter()
    use_blas_from(IndexConfig().blas_threshold)  # as the worker's entry point sets it
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    basis = make_basis(args.dim, args.rank, args.seed)
    q = make_vectors(args.queries, basis, args.noise, args.seed + 1)
    rows: list[dict] = []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total} cases"), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("index", total=len(args.sizes) * len(KINDS))

        def say(msg: str) -> None:
            bar.update(task, description=msg)

        for n in args.sizes:
            say(f"n={n:,}: catalog + exact ground truth")
            x = make_vectors(n, basis, args.noise, args.seed + 2 + n)
            # the default kind for this size
            default_kind = FaissIndex(args.dim, IndexConfig(), expected_size=n).kind
            exclude = make_excludes(len(q), n, args.exclude, args.seed + 3)
            truth = exact_topk(x, q, args.k, exclude, args.batch)
            for kind in KINDS:
                row = bench_case(n, kind, x, q, truth, exclude, default_kind, args, say)
                rows.append(row)
                bar.console.print(f"n={n:,} {row['index']}: qps {row['qps']:,.0f}, bare "
                                  f"{row['qps_bare']:,.0f} (x{row['ratio']:.3f}), recall "
                                  f"{row['recall@10']:.4f}, build {row['build_s']:.1f}s"
                                  + (f"; bare at faiss's default BLAS threshold "
                                     f"{row['qps_bare_faiss_blas_default']:,.0f} q/s"
                                     if "qps_bare_faiss_blas_default" in row else ""))
                if row.get("ef_sweep"):
                    bar.console.print("  efSearch sweep (same graph, bare): " + ", ".join(
                        f"{p['ef_search']}: recall {p['recall@10']:.4f} at {p['qps_bare']:,.0f}"
                        " q/s" for p in row["ef_sweep"]))
                bar.advance(task)
            del x, truth
            settle()
    print_table(rows, args.k)
    targets = check_targets(rows, args.sizes)
    info["loadavg_end"] = os.getloadavg()
    doc = {
        "benchmark": "index", "rows": rows, "targets": targets, "machine": info,
        "config": {k: v for k, v in vars(args).items()},
        "index_config": IndexConfig().model_dump(),
        "blas_threshold": {"faiss_default": FAISS_DEFAULT_BLAS_THRESHOLD,
                           "used": int(faiss.cvar.distance_compute_blas_threshold)},
        "wall_s": round(time.perf_counter() - t_begin, 1),
    }
    (out / "index.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    plot(rows, out / "index.png",
         f"FaissIndex vs bare faiss: dim {args.dim}, {args.queries} queries in batches of "
         f"{args.batch}, k={args.k}")
    print(f"wall time {doc['wall_s']:.0f}s; results in {out}/index.json, {out}/index.png")


if __name__ == "__main__":
    main()
