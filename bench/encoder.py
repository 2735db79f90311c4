"""Encoder benchmark: catalog items embedded per second by the text encoder, by batch size.

    .venv/bin/python -m bench.encoder [--batch-sizes 1,8,32,128,256] [--items 2000]
                                       [--items-b1 200] [--seconds 10] [--threads 1,2]
                                       [--device auto] [--dtypes float32,bfloat16]
                                       [--out bench/out]

Loads models.encoder.TextEncoder (the bundled all-MiniLM-L6-v2; nothing is downloaded) on the
device it picks by itself (--device auto: CUDA when torch sees one, else CPU) and times it on
a synthetic catalog (evaluation.synthetic.make_world items through models.encoder.item_text, the
catalog agent's text recipe). The batch size is the texts per forward pass, the worker's
Settings.encoder_batch_size (32 by default): it is set on the encoder so one encode() call is
one forward pass. Each size encodes up to --items items (--items-b1 at batch size 1) in full
batches after one warm-up batch, stopping early once --seconds have passed. --threads sweeps
torch's intra-op thread count (default: torch's own choice, as the worker runs); on a shared
2-core host one thread can beat two, because two OpenMP threads wait on each other whenever
another process holds a core. --dtypes sweeps the encoder's weight type (Settings.encoder_dtype)
in the same run, and prints how close each type's vectors are to float32's (cosine over the
texts). Prints the table, writes encoder.json and encoder.png (items/s vs batch size) to
--out, and the wall time.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import torch
from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench._common import save_figure
from evaluation.progress import Progress
from evaluation.synthetic import make_world
from models.encoder import DTYPES, TextEncoder, item_text

# piped output would otherwise be cut to 80 columns
console = Console(width=None if sys.stdout.isatty() else 120)


def catalog_texts(n: int, seed: int) -> list[str]:
    """The encoder input for n synthetic catalog items, as the catalog agent builds it."""
    return [item_text(item) for item in make_world(n, seed=seed).items]


def load_encoder(device: str, dtype: str = "auto") -> tuple[TextEncoder, float]:
    """The encoder and its load time (tokenizer + weights + move to device)."""
    start = time.perf_counter()
    enc = TextEncoder(device=device, dtype=dtype)
    return enc, time.perf_counter() - start


def first_call_s(enc: TextEncoder, text: str) -> float:
    """Latency of the very first encode (lazy initialisation), kept out of the sweep."""
    start = time.perf_counter()
    enc.encode([text])
    return time.perf_counter() - start


def token_lengths(enc: TextEncoder, texts: list[str]) -> list[int]:
    """Tokens per text after truncation: what each item costs the model."""
    tok = enc.tokenizer(texts, truncation=True, max_length=enc.max_length)
    return [len(ids) for ids in tok["input_ids"]]


def pad_fraction(lengths: list[int], batch: int, n_batches: int) -> float:
    """Share of the timed forward passes spent on padding: each batch is padded to its
    longest text, so bigger batches of uneven texts waste more."""
    real = sum(lengths[: batch * n_batches])
    padded = sum(max(lengths[s : s + batch]) * batch for s in range(0, batch * n_batches, batch))
    return 1 - real / padded


def time_batches(enc: TextEncoder, texts: list[str], batch: int, seconds: float,
                 on_batch: Callable[[int], None]) -> list[float]:
    """Seconds per full batch, one warm-up batch first; stops early after ``seconds``
    (but not before 3 timed batches) so slow sizes still finish in a few seconds."""
    enc.batch_size = batch  # one encode() call == one forward pass of `batch` texts
    enc.encode(texts[:batch])
    times: list[float] = []
    start = time.perf_counter()
    for s in range(0, len(texts) - batch + 1, batch):
        t0 = time.perf_counter()
        enc.encode(texts[s : s + batch])
        times.append(time.perf_counter() - t0)
        on_batch(batch)
        if time.perf_counter() - start >= seconds and len(times) >= 3:
            break
    return times


def bench_size(enc: TextEncoder, texts: list[str], lengths: list[int], batch: int,
               seconds: float, on_batch: Callable[[int], None]) -> dict:
    """One row of the table: throughput and per-batch latency for one batch size."""
    times = time_batches(enc, texts, batch, seconds, on_batch)
    total, n = sum(times), len(times) * batch
    return {
        "batch_size": batch,
        "items_per_s": n / total,
        "ms_per_batch": 1000 * total / len(times),
        "ms_per_batch_median": 1000 * float(np.median(times)),
        "ms_per_batch_p90": 1000 * float(np.percentile(times, 90)),
        "ms_per_item": 1000 * total / n,
        "items": n,
        "batches": len(times),
        "seconds": total,
        "pad_frac": pad_fraction(lengths, batch, len(times)),
    }


def cosine_to_float32(encs: dict[str, TextEncoder], texts: list[str]) -> dict:
    """Per weight type other than float32 (when float32 was swept too): the cosine between
    its vectors and float32's over `texts`, min and mean (both are L2-normalised)."""
    if "float32" not in encs:
        return {}
    ref = encs["float32"].encode(texts)
    out = {}
    for dt, enc in encs.items():
        if dt != "float32":
            cos = (enc.encode(texts) * ref).sum(1)
            out[dt] = {"texts": len(texts), "min": float(cos.min()), "mean": float(cos.mean())}
    return out


def machine(enc: TextEncoder) -> dict:
    """Enough context to compare runs over time (load matters: the machine is shared)."""
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in
                Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
               platform.processor())
    gpu = torch.cuda.get_device_name(enc.device) if enc.device.type == "cuda" else None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cpus": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_interop_threads": torch.get_num_interop_threads(),
            "loadavg": os.getloadavg()}


def print_table(doc: dict) -> None:
    table = Table(title=f"TextEncoder {doc['model']} on {doc['device']} (load "
                        f"{doc['load_s']:.2f}s, torch default {doc['torch_default_threads']} "
                        "threads)")
    for col in ("dtype", "threads", "batch size", "items", "batches", "items/s", "ms/batch",
                "ms/batch p50", "ms/batch p90", "ms/item", "padding"):
        table.add_column(col, justify="right")
    for r in doc["rows"]:
        table.add_row(r["dtype"], str(r["threads"]), str(r["batch_size"]), str(r["items"]),
                      str(r["batches"]),
                      f"{r['items_per_s']:,.1f}", f"{r['ms_per_batch']:,.1f}",
                      f"{r['ms_per_batch_median']:,.1f}", f"{r['ms_per_batch_p90']:,.1f}",
                      f"{r['ms_per_item']:.2f}", f"{r['pad_frac']:.0%}")
    console.print(table)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Items/s against batch size (log2 axis), with ms per batch on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["batch_size"] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    twin = ax.twinx()
    for dt, th in sorted({(r["dtype"], r["threads"]) for r in rows}):
        rs = [r for r in rows if (r["dtype"], r["threads"]) == (dt, th)]
        bs = [r["batch_size"] for r in rs]
        ax.plot(bs, [r["items_per_s"] for r in rs], marker="o",
                label=f"items/s, {dt}, {th} threads")
        twin.plot(bs, [r["ms_per_batch"] for r in rs], marker="x", linestyle="--", alpha=0.6,
                  label=f"ms/batch, {dt}, {th} threads")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("batch size (texts per forward pass)")
    ax.set_ylabel("items/s")
    ax.grid(alpha=0.3, which="both")
    twin.set_yscale("log")
    twin.set_ylabel("ms per batch")
    fig.legend(loc="upper left", bbox_to_anchor=(0.1, 0.9))
    ax.set_title(title)
    save_figure(fig, path)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,8,32,128,256", help="comma list")
    ap.add_argument("--items", type=int, default=2000, help="catalog items per batch size")
    ap.add_argument("--items-b1", type=int, default=200, help="items at batch size 1")
    ap.add_argument("--seconds", type=float, default=10.0,
                    help="stop a batch size after this long (at least 3 batches)")
    ap.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda")
    ap.add_argument("--threads", default="",
                    help="torch intra-op thread counts to sweep, comma list (default: torch's "
                    "own choice, as the worker runs)")
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="encoder weight types to sweep, comma list (auto, float32, bfloat16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.dtypes = args.dtypes.split(",")
    if bad := set(args.dtypes) - {"auto", *DTYPES}:
        ap.error(f"--dtypes: {', '.join(sorted(bad))}: use auto, float32 or bfloat16")
    args.threads = [int(t) for t in args.threads.split(",") if t.strip()] or [
        torch.get_num_threads()]
    return args


def main() -> None:
    args = parse_args()
    t_begin = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    default_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads[0])
    texts = catalog_texts(max(args.items, args.items_b1, max(args.batch_sizes)), args.seed)
    encs = {dt: load_encoder(args.device, dt) for dt in args.dtypes}
    enc, load_s = encs[args.dtypes[0]]
    first_s = first_call_s(enc, texts[0])
    lengths = token_lengths(enc, texts)
    console.print(f"{enc.name} on {enc.device}: loaded in {load_s:.2f}s, first call "
                  f"{first_s * 1000:.0f} ms, dim {enc.dim}, "
                  f"{torch.get_num_threads()} torch threads, weight types "
                  + ", ".join(f"{dt} = {e.dtype}" for dt, (e, _) in encs.items()))
    plan = [(dt, th, b, texts[: args.items_b1 if b == 1 else args.items])
            for dt in args.dtypes for th in args.threads for b in args.batch_sizes]
    rows = []
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total} items"), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("encoder", total=sum(len(t) // b * b for _, _, b, t in plan))
        for dt, th, b, chunk in plan:
            torch.set_num_threads(th)
            bar.update(task, description=f"{dt}, {th} threads, batch size {b}")
            row = bench_size(encs[dt][0], chunk, lengths, b, args.seconds,
                             lambda m: bar.advance(task, m))
            rows.append({**row, "threads": th, "dtype": dt})
        bar.update(task, completed=bar.tasks[0].total)
    agreement = cosine_to_float32({dt: e for dt, (e, _) in encs.items()}, texts[:512])
    doc = {
        "benchmark": "encoder", "device": str(enc.device), "model": enc.name,
        "model_path": enc.model_path, "dim": enc.dim, "max_length": enc.max_length,
        "load_s": load_s, "first_call_s": first_s,
        "torch_threads": args.threads if len(args.threads) > 1 else args.threads[0],
        "torch_default_threads": default_threads,
        "mean_tokens": float(np.mean(lengths[: args.items])), "example_text": texts[0],
        "rows": rows, "cosine_to_float32": agreement, "machine": machine(enc),
        "config": vars(args),
        "wall_s": round(time.perf_counter() - t_begin, 1),
    }
    print_table(doc)
    (out / "encoder.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    plot(rows, out / "encoder.png",
         f"{enc.name} on {enc.device}: catalog items embedded per second")
    for dt, cos in agreement.items():
        print(f"{dt} vectors against float32's, cosine over {cos['texts']} texts: min "
              f"{cos['min']:.4f}, mean {cos['mean']:.4f}")
    best = max(rows, key=lambda r: r["items_per_s"])
    print(f"best: batch size {best['batch_size']} ({best['dtype']}, {best['threads']} "
          f"threads) at "
          f"{best['items_per_s']:,.1f} items/s; "
          f"mean {doc['mean_tokens']:.1f} tokens/item")
    print(f"wall time {doc['wall_s']:.0f}s; results in {out}/encoder.json, {out}/encoder.png")


if __name__ == "__main__":
    main()
