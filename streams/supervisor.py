"""Run a worker as a child process and watch it through its /metrics page.

The demo, the tests and the benchmarks all need "start a worker with these settings, wait
until it is ready, read its counters, stop or kill it": this is that, once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson
from prometheus_client.parser import text_string_to_metric_families

from streams.settings import Settings

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def settings_env(s: Settings) -> dict[str, str]:
    """The STREAMREC_* environment that reproduces `s` in a child process."""
    env = {}
    for name, value in s.model_dump(mode="json").items():
        if value is None:
            continue
        text = orjson.dumps(value).decode() if isinstance(value, dict | list) else str(value)
        env[f"STREAMREC_{name.upper()}"] = text
    return env


def scrape(url: str, timeout: float = 5.0) -> Samples:
    """Parse a Prometheus text page into {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - our own page
        text = resp.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            out[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


class WorkerProcess:
    command = "worker"

    def __init__(self, settings: Settings, log_path: str | Path, extra_env: dict | None = None,
                 cwd: str | Path | None = None, args: list[str] | None = None,
                 program: list[str] | None = None):
        self.settings = settings
        self.args = args or []
        self.program = program or ["-m", "streams.cli"]  # (tests run a wrapped CLI)
        self.log_path = Path(log_path)
        self.extra_env = extra_env or {}
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        return self.settings.metrics_port

    @property
    def metrics_url(self) -> str:
        return f"http://{self.settings.metrics_host}:{self.port}/metrics"

    def start(self) -> WorkerProcess:
        env = {**os.environ, **settings_env(self.settings), **self.extra_env,
               "PYTHONUNBUFFERED": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([sys.executable, *self.program, self.command,
                                      *self.args], env=env,
                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd,
                                     start_new_session=True)
        log.close()
        return self

    def metrics(self) -> Samples:
        return scrape(self.metrics_url)

    def wait_ready(self, timeout: float = 180.0, snapshot: bool = True) -> Samples:
        """Until the worker's /ready says so (state restored, catalog loaded, a snapshot
        served, index built; `snapshot=False`: without a trainer, once the index is built);
        raises with the log tail."""
        if not snapshot:
            return self.wait_for("streamrec_index_version", 1, timeout=timeout)
        url = self.metrics_url.rsplit("/", 1)[0] + "/ready"

        def ready() -> bool:  # urlopen raises on a 503
            with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - ours
                return resp.status == 200

        self.wait_until(ready, lambda: f"{self.command} not ready", timeout, every=0.5)
        return self.metrics()

    def wait_for(self, name: str, at_least: float, timeout: float = 120.0, **labels: str
                 ) -> Samples:
        """Until `sum(name{labels}) >= at_least` on the worker's /metrics."""
        return self._wait(lambda v: v >= at_least, f">= {at_least}", timeout, name, **labels)

    def wait_idle(self, timeout: float = 120.0) -> Samples:
        """Until no batch is in flight: every event counted so far has its recommendation
        emitted, its state durable and its offset committed."""
        return self._wait(lambda v: v == 0, "== 0", timeout, "streamrec_batches_in_flight")

    def wait_log(self, text: str, timeout: float = 120.0) -> None:
        """Until the process's log holds `text`."""
        self.wait_until(lambda: text in self.log_path.read_text(errors="replace"),
                        lambda: f"no {text!r} in the log", timeout)

    def wait_until(self, ok: Callable[[], bool], what: Callable[[], str], timeout: float,
                   every: float = 0.25) -> None:
        """Poll `ok` until it holds; raise at once if the process exits, and after
        `timeout` with `what()` and the log tail. An OSError from `ok` (the page is not up
        yet) counts as not yet."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if ok():
                    return
            except OSError:
                pass
            time.sleep(every)
        raise TimeoutError(f"{what()} after {timeout}s\n{self.log_tail()}")

    def _wait(self, ok: Callable[[float], bool], want: str, timeout: float, name: str,
              **labels: str) -> Samples:
        seen: dict = {"value": None}

        def check() -> bool:
            seen["samples"] = self.metrics()
            seen["value"] = total(seen["samples"], name, **labels)
            return ok(seen["value"])

        self.wait_until(check, lambda: f"{name}{labels} = {seen['value']}, not {want}", timeout)
        return seen["samples"]

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no worker log)"

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM (Faust stops cleanly: final checkpoint, commit), SIGKILL after `grace`."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class TrainerProcess(WorkerProcess):
    """`streamrec trainer` as a child process (rank 0's /metrics on trainer_metrics_port)."""

    command = "trainer"

    @property
    def port(self) -> int:
        return self.settings.trainer_metrics_port

    def wait_ready(self, timeout: float = 180.0, snapshot: bool = True) -> Samples:
        """Until it has published a version (a fresh trainer publishes one at once)."""
        return self.wait_for("streamrec_model_version", 1, timeout=timeout)
