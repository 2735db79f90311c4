"""Helpers shared by bench/throughput.py and bench/latency.py (not a benchmark itself).

Process accounting from /proc (CPU seconds, RSS), the benchmark event stream (synthetic
events with user ids remapped onto a large user population), worker start-up, and
"drain": watching a worker's counters while it consumes a backlog.
"""

from __future__ import annotations

import os
import platform
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from evaluation.synthetic import SyntheticStream, SyntheticWorld
from streams.metrics import STAGES
from streams.settings import Settings
from streams.supervisor import Samples, TrainerProcess, WorkerProcess, scrape, total

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads) in seconds, from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _status_kb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1])
    return float("nan")


def rss_mb(pid: int) -> float:
    """Resident set size now (VmRSS), MB."""
    return _status_kb(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size (VmHWM), MB."""
    return _status_kb(pid, "VmHWM") / 1024


class CpuWindow:
    """CPU use of some processes over a wall-clock window: `start()`, ..., `stop()`."""

    def __init__(self, pids: dict[str, int | None]):
        self.pids = {k: p for k, p in pids.items() if p}
        self._c0: dict[str, float] = {}
        self._t0 = self._t1 = 0.0
        self._c1: dict[str, float] = {}

    def start(self) -> CpuWindow:
        self._t0 = time.monotonic()
        self._c0 = {k: _safe(cpu_seconds, p) for k, p in self.pids.items()}
        return self

    def stop(self) -> CpuWindow:
        self._t1 = time.monotonic()
        self._c1 = {k: _safe(cpu_seconds, p) for k, p in self.pids.items()}
        return self

    def percent(self) -> dict[str, float]:
        """Per process: CPU seconds / wall seconds × 100 (200 = both cores of this machine)."""
        wall = max(self._t1 - self._t0, 1e-9)
        return {k: round((self._c1[k] - self._c0[k]) / wall * 100, 1) for k in self.pids}


def _safe(fn: Callable[[int], float], pid: int) -> float:
    try:
        return fn(pid)
    except (OSError, ValueError, IndexError):
        return float("nan")


def machine() -> dict:
    """What ran the benchmark, including the load other jobs put on it at the time."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "cpu_model": model,
            "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}


# --------------------------------------------------------------------------- events


class BenchEvents:
    """Synthetic events (evaluation/synthetic.py) with user ids remapped onto `n_users` users.

    SyntheticStream draws its users from a Zipf law, so 200k events of 100k synthetic users
    hold far fewer than 100k distinct ones. Here the i-th event's user id is replaced by
    position i of a round-robin over a fixed random permutation of `n_users` ids: exactly
    min(events, n_users) distinct users, each seen every `n_users` events, so with more users
    than a micro-batch holds, every event of a batch is a different user (one state read, one
    state write and one recommendation per event: the heavy case). Items, event types, search
    texts and timestamps are the synthetic stream's. Deterministic given the seed; the stream
    continues across calls of `take`.
    """

    def __init__(self, world: SyntheticWorld, n_users: int, seed: int = 2):
        if n_users < 1:
            raise ValueError(f"n_users must be >= 1, got {n_users}")
        self.stream = SyntheticStream(world, n_users=min(n_users, 5000), seed=seed)
        width = max(5, len(str(n_users - 1)))
        ids = [f"user-{u:0{width}d}" for u in range(n_users)]
        random.Random(seed).shuffle(ids)
        self.user_ids = ids
        self.n = 0

    def take(self, count: int, now_ms: Callable[[], float] | None = None) -> Iterator[dict]:
        for ev in self.stream.events(count, now_ms=now_ms):
            ev["user_id"] = self.user_ids[self.n % len(self.user_ids)]
            self.n += 1
            yield ev


# --------------------------------------------------------------------------- the worker


def worker_env(pairs: list[str] | None) -> dict[str, str]:
    """--worker-env KEY=VALUE options -> the extra environment of the worker process (e.g.
    OMP_NUM_THREADS=1, or STREAMREC_BATCH_SIZE=1000: any setting, as `streamrec` reads it)."""
    env = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--worker-env wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env



def first_snapshot(settings: Settings, log_path: Path | str, timeout: float = 600) -> None:
    """Run the trainer until it has published its first snapshot, then stop it: a worker
    needs one to be ready, and the benchmarks of a serving worker measure it alone (on two
    cores a running trainer would take the worker's CPU; bench/scaleout.py measures both)."""
    trainer = TrainerProcess(settings, log_path).start()
    try:
        trainer.wait_ready(timeout=timeout)
    finally:
        trainer.stop()


def start_worker(worker: WorkerProcess, n_items: int, timeout: float = 600) -> None:
    """Wait until the (started) worker serves an index holding `n_items` items."""
    worker.wait_ready(timeout=timeout)
    worker.wait_for("streamrec_index_items", n_items, timeout=timeout)


@dataclass
class Sample:
    """What the benchmarks read off a worker's /metrics at one moment."""

    t: float
    events: float
    applied: float
    dlq: float
    duplicate: float
    recs: float
    batches: float
    batch_events: float
    stage_sum: dict[str, float]
    stage_count: dict[str, float]
    e2r_buckets: list[tuple[float, float]]  # event->recommendation histogram (le, cumulative)
    stall_buckets: list[tuple[float, float]] = field(default_factory=list)  # event-loop stalls
    index_version: float = 0.0  # goes up by one per index rebuild (Server.refresh)
    cpu: dict[str, float] = field(default_factory=dict)
    scrape_s: float = 0.0


def take_sample(worker: WorkerProcess, pids: dict[str, int | None] | None = None,
                timeout: float = 60.0) -> Sample:
    """Scrape the worker's /metrics. The page is served by the worker's event loop, which a
    micro-batch's CPU work blocks: answers can take seconds, hence the long timeout (and
    `scrape_s`, how long this one took)."""
    t0 = time.monotonic()
    samples = scrape(worker.metrics_url, timeout=timeout)
    sample = _sample(samples, pids)
    sample.scrape_s = sample.t - t0
    return sample


def _sample(samples: Samples, pids: dict[str, int | None] | None) -> Sample:
    def buckets(name: str) -> list[tuple[float, float]]:
        return sorted((float(dict(lab)["le"]), v) for (n, lab), v in samples.items()
                      if n == f"{name}_bucket")

    return Sample(
        t=time.monotonic(),
        events=total(samples, "streamrec_events_total"),
        applied=total(samples, "streamrec_events_total", outcome="applied"),
        dlq=total(samples, "streamrec_events_total", outcome="dlq"),
        duplicate=total(samples, "streamrec_events_total", outcome="duplicate"),
        recs=total(samples, "streamrec_recommendations_total"),
        batches=total(samples, "streamrec_batch_size_count"),
        batch_events=total(samples, "streamrec_batch_size_sum"),
        stage_sum={s: total(samples, "streamrec_stage_seconds_sum", stage=s) for s in STAGES},
        stage_count={s: total(samples, "streamrec_stage_seconds_count", stage=s)
                     for s in STAGES},
        e2r_buckets=buckets("streamrec_event_to_recommendation_seconds"),
        stall_buckets=buckets("streamrec_event_loop_stall_seconds"),
        index_version=total(samples, "streamrec_index_version"),
        cpu={k: _safe(cpu_seconds, p) for k, p in (pids or {}).items() if p},
    )


def hist_max(b0: list[tuple[float, float]], b1: list[tuple[float, float]]) -> float:
    """Upper bound of the largest observation between two cumulative-bucket snapshots of
    one histogram: the `le` of the lowest bucket that holds them all (inf: beyond the
    largest bound; 0: none)."""
    cum = _between(b0, b1)
    if not cum or cum[-1][1] <= 0:
        return 0.0
    return next(le for le, c in cum if c >= cum[-1][1])


def _between(b0: list[tuple[float, float]], b1: list[tuple[float, float]]
             ) -> list[tuple[float, float]]:
    """Cumulative bucket counts of the observations made between two snapshots."""
    before = dict(b0)
    return [(le, v - before.get(le, 0.0)) for le, v in b1]


def hist_quantile(b0: list[tuple[float, float]], b1: list[tuple[float, float]],
                  q: float) -> float:
    """Quantile `q` of the observations between two cumulative-bucket snapshots of one
    Prometheus histogram (linear within a bucket, like PromQL's histogram_quantile); nan if
    none."""
    cum = _between(b0, b1)
    if not cum or cum[-1][1] <= 0:
        return float("nan")
    rank = q * cum[-1][1]
    lo_le, lo_c = 0.0, 0.0
    for le, c in cum:
        if c >= rank:
            if le == float("inf"):
                return lo_le
            return lo_le + (le - lo_le) * ((rank - lo_c) / max(c - lo_c, 1e-12))
        lo_le, lo_c = le, c
    return lo_le


@dataclass
class Drain:
    """A worker consuming a backlog: the samples bounding the measured window."""

    first: Sample
    last: Sample
    target: float
    complete: bool
    final: Sample  # the sample that saw the target (or the time limit): totals at the end
    max_scrape_s: float = 0.0  # slowest /metrics answer while draining (event loop blocked)

    @property
    def seconds(self) -> float:
        return self.last.t - self.first.t

    @property
    def events(self) -> float:
        return self.last.events - self.first.events

    @property
    def eps(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("nan")

    def cpu_percent(self) -> dict[str, float]:
        return {k: round((self.last.cpu[k] - self.first.cpu[k]) / max(self.seconds, 1e-9)
                         * 100, 1) for k in self.first.cpu}

    def stages(self) -> dict[str, dict[str, float]]:
        """Per stage: seconds per batch (a stage timed twice in a batch, like `commit`:
        delivery, then the offset commit, counts both) and its share of the window's wall
        time; `other` is the unstaged rest (Faust's take and acks, state reads, idle)."""
        f, la = self.first, self.last
        batches = max(la.batches - f.batches, 1.0)
        out: dict[str, dict[str, float]] = {}
        staged = 0.0
        for s in STAGES:
            secs = la.stage_sum[s] - f.stage_sum[s]
            runs = la.stage_count[s] - f.stage_count[s]
            staged += secs
            out[s] = {"seconds_per_batch": round(secs / batches, 5),
                      "share": round(secs / max(self.seconds, 1e-9), 4),
                      "seconds": round(secs, 3), "batches": int(runs)}
        other = max(self.seconds - staged, 0.0)
        out["other"] = {"seconds_per_batch": round(other / batches, 5),
                        "share": round(other / max(self.seconds, 1e-9), 4),
                        "seconds": round(other, 3), "batches": int(batches)}
        return out

    @property
    def batch_size_mean(self) -> float:
        n = self.last.batches - self.first.batches
        return (self.last.batch_events - self.first.batch_events) / n if n else float("nan")


def drain(worker: WorkerProcess, target: float, max_seconds: float,
          pids: dict[str, int | None], on_sample: Callable[[Sample], None] | None = None,
          interval: float = 0.5, idle_timeout: float = 120.0) -> Drain:
    """Sample the worker every `interval` s until `streamrec_events_total` >= `target`.

    The window starts at the first sample that shows progress (events counted before it are
    left out with the time they took, so group join and the first fetch are excluded, as the
    raw and Faust measurements exclude their start-up) and ends at the last sample before the
    one that reached `target` (the worker was busy until then; `final` is the one that reached
    it), or `max_seconds` after it started (complete=False).
    Raises if the worker dies, or nothing is consumed for `idle_timeout` s.
    """
    start = take_sample(worker, pids)
    if on_sample:
        on_sample(start)
    first: Sample | None = None
    changed = prev = start  # changed: the last sample at which the counter had moved
    slowest = start.scrape_s

    def done(first: Sample, last: Sample, complete: bool, final: Sample) -> Drain:
        return Drain(first, last, target, complete, final, round(slowest, 3))

    while True:
        time.sleep(interval)
        if worker.proc is not None and worker.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.proc.returncode}\n"
                               f"{worker.log_tail()}")
        s = take_sample(worker, pids)
        slowest = max(slowest, s.scrape_s)
        if on_sample:
            on_sample(s)
        if s.events != changed.events:
            changed = s
        if first is None:
            if s.events >= target:  # all of it went by within one interval
                return done(start, s, True, s)
            if s.events > start.events:
                first = s
        else:
            if s.events >= target:
                # The worker finished somewhere in the last interval: end the window at the
                # previous sample (busy throughout) unless that leaves too short a window.
                busy = prev.t - first.t >= 4 * interval
                return done(first, prev if busy else s, True, s)
            if s.t - first.t >= max_seconds:
                return done(first, s, False, s)
        if s.t - changed.t > idle_timeout:
            raise TimeoutError(f"worker consumed nothing for {idle_timeout:.0f}s (at "
                               f"{s.events:.0f} of {target:.0f} events)\n{worker.log_tail()}")
        prev = s


def save_figure(fig, path: Path | str) -> None:
    """Every benchmark's plot ends the same way: laid out, written as a 120-dpi PNG, closed
    (a long run draws no more figures, but pyplot would keep them all alive otherwise)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
