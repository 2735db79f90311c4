"""The full quality comparison: streamrec, its ablations and the streaming peers, side by side.

Each model runs the same prequential protocol (evaluation/evaluate.py) in its own process (two
at a time on two cores, one torch thread each); item texts are embedded once with the
agent's encoder and recipe. Results come back as a table, a JSON document and a plot.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from evaluation.baselines import BASELINES, make_baseline
from evaluation.evaluate import (
    SMALL_SCENARIOS,
    Event,
    PerScenario,
    Result,
    StreamrecModel,
    moving_ndcg,
    prequential,
)
from models.config import LearnerConfig
from models.user_state import ExcludeSeen

#: Ablations of the default learner: name suffix -> overrides of LearnerConfig.
ABLATIONS: dict[str, dict[str, Any]] = {
    "adaptive": {"lr_rule": "adaptive"},
    "rmsprop": {"lr_rule": "rmsprop"},
    "fixed": {"lr_rule": "fixed"},
    "adagrad": {"lr_rule": "adagrad"},
    "text": {"item_tower": "text"},
    "id": {"item_tower": "id"},
    "noseq": {"user_tower": "none"},
    "noreplay": {"replay_ratio": 0.0},
    "nocovisit": {"covisit": False},
    "onlytower": {"candidate_sources": ("tower",)},
    "onlycovisit": {"candidate_sources": ("covisit",)},
    "nopersonal": {"use_residual": False},
}
#: Run only when named (`--models`): keeps bench/quality.py within its 15-minute budget.
ON_REQUEST = {"nocovisit", "onlytower", "onlycovisit", "nopersonal"}
#: Scenario variants (a stream whose events carry scenarios): `streamrec-shared` is one
#: model without per-scenario parameters (the scenario only filters the items),
#: `streamrec-separate` one independent model per scenario (no transfer at all).
SCENARIO_VARIANTS = ("streamrec-shared", "streamrec-separate")
#: What `streamrec eval --ciao` runs unless --models says otherwise.
SCENARIO_MODELS = ("streamrec", *SCENARIO_VARIANTS, "pop", "itemknn_seq")


@dataclass(frozen=True)
class Dataset:
    name: str
    item_ids: list[str]
    text_vectors: np.ndarray
    events: list[Event]  # (user, item index, ts ms, scenario)
    item_scenarios: list[list[str] | None] | None = None  # None: every item everywhere
    by_day: bool = False  # a batch is one day (timestamps only say the day)


def make_dataset(name: str, items: Sequence[dict], events: Sequence[dict],
                 encode: Any, by_day: bool = False) -> Dataset:
    """Items embedded with `encode` (the agent's recipe); events in time order (stable),
    each with its scenario ("default" when it names none); items' `scenarios` kept."""
    from models.encoder import item_text

    item_ids = [str(it["item_id"]) for it in items]
    index = {i: n for n, i in enumerate(item_ids)}
    if len(index) != len(item_ids):
        twice = next(i for n, i in enumerate(item_ids) if index[i] != n)
        raise ValueError(f"{name}: the catalog lists item {twice!r} more than once")
    ordered = sorted(events, key=lambda e: e["ts"])  # sorted() is stable: ties keep file order
    evs = [(str(e["user_id"]), index[str(e["item_id"])], int(e["ts"]),
            str(e.get("scenario") or "default")) for e in ordered
           if e.get("item_id") is not None and str(e["item_id"]) in index]
    where = [None if it.get("scenarios") is None else [str(s) for s in it["scenarios"]]
             for it in items]
    texts = [item_text(it) for it in items]
    unique = list(dict.fromkeys(texts))  # Ciao: 105k items, a few dozen distinct texts
    at = {t: k for k, t in enumerate(unique)}
    vectors = np.asarray(encode(unique), dtype=np.float32)[[at[t] for t in texts]]
    return Dataset(name, item_ids, np.asarray(vectors, dtype=np.float32), evs,
                   where if any(w is not None for w in where) else None, by_day)


def overridden(base: LearnerConfig, overrides: dict[str, Any]) -> LearnerConfig:
    """`base` with `overrides` validated as settings are (a rule's name builds the rule)."""
    return LearnerConfig.model_validate(base.model_dump() | overrides)


def model_names(peers: bool = True, ablations: bool = True) -> list[str]:
    names = ["streamrec"]
    if ablations:
        default = LearnerConfig()
        names += [f"streamrec-{a}" for a, o in ABLATIONS.items() if a not in ON_REQUEST
                  and overridden(default, o) != default]
    if peers:
        names += list(BASELINES)
    return names


#: streamrec deployed as N serving workers + a trainer: `streamrec@w4` (4 workers, a snapshot
#: after every batch), `streamrec@w4e1024` (a snapshot every 1,024 events), `streamrec@w4i`
#: (4 independent learners: each worker its own model, the deployment before the trainer),
#: `streamrec@w1r2` (a trainer of 2 ranks).
_SHARDED = re.compile(r"^streamrec@w(?P<workers>\d+)(?:e(?P<every>\d+))?(?:r(?P<ranks>\d+))?"
                      r"(?P<independent>i)?$")


def sharded_name(workers: int, snapshot_every: int | None = None, independent: bool = False,
                 ranks: int = 1) -> str:
    if workers == 1 and snapshot_every is None and not independent and ranks == 1:
        return "streamrec"
    return f"streamrec@w{workers}{'' if snapshot_every is None else f'e{snapshot_every}'}" \
        f"{'' if ranks == 1 else f'r{ranks}'}{'i' if independent else ''}"


def _kind(name: str) -> str | None:
    """Which kind of model `name` names (None: none): the one reading of a name, for both
    :func:`is_known` and :func:`build_model`."""
    if name in ("streamrec", "streamrec-separate", "streamrec-shared"):
        return name
    if _SHARDED.match(name):
        return "sharded"
    if name.startswith("streamrec-") and name.split("-", 1)[1] in ABLATIONS:
        return "ablation"
    return "baseline" if name in BASELINES else None


def is_known(name: str) -> bool:
    """Whether :func:`build_model` builds `name` (checked before any model runs)."""
    return _kind(name) is not None


def build_model(name: str, data: Dataset, base: LearnerConfig,
                exclude_seen: ExcludeSeen = "all") -> Any:
    """The model `name` over `data`'s catalog: a peer, or streamrec with `base` as its
    configuration, sharded, shared or ablated as the name says."""
    kind = _kind(name)
    if kind in ("baseline", None):  # an unknown name gets make_baseline's error
        return make_baseline(name, len(data.item_ids))
    if kind == "streamrec-separate":
        return PerScenario(data.item_ids, data.text_vectors, data.item_scenarios, base,
                           name=name)
    if kind == "sharded":
        m = _SHARDED.match(name)
        every = m["every"]
        extra = dict(workers=int(m["workers"]), independent=bool(m["independent"]),
                     snapshot_every=None if every is None else int(every),
                     trainer_ranks=int(m["ranks"] or 1))
    else:
        extra = {}
    if kind == "streamrec-shared":
        base = base.model_copy(update={"scenario_params": False, "scenario_history": False})
    elif kind == "ablation":
        base = overridden(base, ABLATIONS[name.split("-", 1)[1]])
    return StreamrecModel(data.item_ids, data.text_vectors, base, name=name,
                          item_scenarios=data.item_scenarios, exclude_seen=exclude_seen,
                          **extra)


def one_core() -> None:
    """An evaluation process's set-up (a spawned job is its own entry point): torch and
    FAISS on one thread (the jobs share the machine), FAISS's BLAS switch as the worker
    sets it (streams/process.py configure_process). The models run in the job's main
    thread, which the per-thread caps then cover."""
    from index.faiss_index import IndexConfig, use_blas_from
    from models.compute_threads import limit_threads

    limit_threads(1)
    use_blas_from(IndexConfig().blas_threshold)


def _run_one(name: str, data: Dataset, base: LearnerConfig, batch_size: int,
             progress: Any, exclude_seen: ExcludeSeen = "all") -> Result:
    one_core()
    model = build_model(name, data, base, exclude_seen)
    report = (lambda n: progress.put((name, n))) if progress is not None else None
    return prequential(model, data.events, batch_size, on_batch=report,
                       item_ids=data.item_ids, exclude_seen=exclude_seen,
                       history_len=base.history_len, item_scenarios=data.item_scenarios,
                       by_day=data.by_day)


def run_comparison(data: Dataset, names: Sequence[str], batch_size: int = 64,
                   base: LearnerConfig | None = None, jobs: int = 2,
                   show_progress: bool = True, exclude_seen: ExcludeSeen = "all",
                   failures: dict[str, str] | None = None) -> dict[str, Result]:
    """Every model over the same stream; returns {name: Result} in `names` order.
    `exclude_seen` is the serving rule of what a user is not recommended (models/user_state.py).
    With `failures`, a model that raises (or whose process dies) is left out of the result
    and its error recorded there, so one model's failure does not lose the others' figures;
    without, the first error propagates."""
    base = base or LearnerConfig()
    ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch/faiss thread state
    with ctx.Manager() as manager:
        queue = manager.Queue() if show_progress else None
        with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            futures = {n: pool.submit(_run_one, n, data, base, batch_size, queue, exclude_seen)
                       for n in names}
            if show_progress:
                progress_bars(futures, queue, len(data.events))
            if failures is None:
                return {n: f.result() for n, f in futures.items()}
            failures.update({n: f"{type(e).__name__}: {e}" for n, f in futures.items()
                             if (e := f.exception()) is not None})
            return {n: f.result() for n, f in futures.items() if n not in failures}


def progress_bars(futures: dict, queue: Any, total: int) -> None:
    """One rich bar per model, advanced by (name, events) messages on `queue`."""
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

    from evaluation.progress import Progress

    cols = (TextColumn("{task.description:<22}"), BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn())
    with Progress(*cols) as bar:
        tasks = {n: bar.add_task(n, total=total) for n in futures}
        while not all(f.done() for f in futures.values()):
            try:
                name, n = queue.get(timeout=0.5)
                bar.advance(tasks[name], n)
            except Exception:  # noqa: BLE001 - queue.Empty from a manager proxy
                continue


def to_json(data: Dataset, results: dict[str, Result], batch_size: int,
            failures: dict[str, str] | None = None) -> dict:
    """Figures per model; with scenarios also per scenario ({ndcg@10, hr@10, n}) and the
    mean NDCG@10 of the SMALL_SCENARIOS smallest (`small10_ndcg@10`); the models that
    failed under `failed` ({name: error})."""
    models = {}
    for name, res in results.items():
        models[name] = {k: round(v, 5) if isinstance(v, float) else v
                        for k, v in res.summary().items()}
        models[name]["last_half"] = {k: round(v, 5) for k, v in res.last_half.items()}
        if res.by_scenario:
            models[name]["per_scenario"] = {
                s: {k: round(v, 5) if isinstance(v, float) else v for k, v in m.items()}
                for s, m in res.by_scenario.items()}
    doc = {"dataset": data.name, "batch_size": "day" if data.by_day else batch_size,
           "events": len(data.events), "items": len(data.item_ids), "models": models}
    if any(res.by_scenario for res in results.values()):
        doc["scenario_items"] = scenario_sizes(data)
    if failures:
        doc["failed"] = failures
    return doc


def scenario_sizes(data: Dataset) -> dict[str, int]:
    """Items each scenario of the stream may show: how hard its ranking is (a scenario of
    ten items has HR@10 = 1 for any model)."""
    names = sorted({e[3] for e in data.events})
    where = data.item_scenarios or [None] * len(data.item_ids)
    return {s: sum(1 for w in where if w is None or s in w) for s in names}


def write_json(path: str | Path, doc: dict) -> None:
    Path(path).write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    small = f"small{SMALL_SCENARIOS}_ndcg@10"
    scen = any(small in m for m in doc["models"].values())
    table = Table(title=f"{doc['dataset']}: prequential, full ranking, batch "
                        f"{doc['batch_size']} ({doc['events']:,} events, {doc['items']:,} items)")
    for col in ("model", "HR@10", "NDCG@10", "MRR", "Recall@50", "retrieved (n)",
                "evaluated", "events/s", "NDCG@10 last half",
                *([f"NDCG@10 {SMALL_SCENARIOS} smallest"] if scen else [])):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, m in sorted(doc["models"].items(), key=lambda kv: -kv[1]["ndcg@10"]):
        table.add_row(name, f"{m['hr@10']:.4f}", f"{m['ndcg@10']:.4f}", f"{m['mrr']:.4f}",
                      f"{m['recall@50']:.4f}", _retrieved(m), f"{m['evaluated']:,}",
                      f"{m['events_per_s']:,.0f}", f"{m['last_half']['ndcg@10']:.4f}",
                      *([f"{m.get(small, float('nan')):.4f}"] if scen else []))
    console = Console(width=max(Console().width, 150))  # full names when piped
    console.print(table)
    if scen:
        console.print(scenario_table(doc))
    for name, error in doc.get("failed", {}).items():
        console.print(f"[red]{name} failed[/red]: {error}", markup=True, highlight=False)


def _retrieved(m: dict) -> str:
    """Share of targets among the items a model scored, and how many it scored (mean)."""
    if "candidate_recall" not in m:
        return "-"
    return f"{m['candidate_recall']:.4f} ({m['candidates']:,.0f})"


def scenario_table(doc: dict) -> Any:
    """NDCG@10 / HR@10 per scenario (rows, largest first) and model (columns)."""
    from rich.table import Table

    names = [n for n in doc["models"] if "per_scenario" in doc["models"][n]]
    first = doc["models"][names[0]]["per_scenario"]
    table = Table(title="per scenario: NDCG@10 / HR@10 (items: the scenario's catalog, "
                        "n: evaluated events)")
    sizes = doc.get("scenario_items", {})
    table.add_column("scenario")
    table.add_column("items", justify="right")
    table.add_column("n", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for s in sorted(first, key=lambda s: (-first[s]["n"], s)):
        cells = [doc["models"][n]["per_scenario"].get(s) for n in names]
        table.add_row(s, f"{sizes.get(s, 0):,}", f"{first[s]['n']:,}", *(
            "-" if c is None else f"{c['ndcg@10']:.4f} / {c['hr@10']:.3f}" for c in cells))
    return table


def plot(results: dict[str, Result], path: str | Path, title: str, window: int = 5000) -> None:
    """NDCG@10 over the stream (moving window of evaluated events), one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    window = min(window, max(1, min((len(r.ranks) for r in results.values()), default=0) // 5))
    for name, res in sorted(results.items(), key=lambda kv: -kv[1].metrics["ndcg@10"]):
        x, y = moving_ndcg(res, window)
        style = "-" if name == "streamrec" else (":" if name.startswith("streamrec-") else "--")
        ax.plot(x, y, style, linewidth=2.2 if name == "streamrec" else 1.2, label=name)
    ax.set_xlabel("stream position (events)")
    ax.set_ylabel(f"NDCG@10 (moving window of {window:,} evaluated events)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))
