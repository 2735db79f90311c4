"""The monitoring, end to end: a real trainer and a real worker on the embedded broker, a real
Prometheus (Debian's `prometheus`) scraping both every second with deploy/prometheus/alerts.yml
loaded (worker as job `streamrec`, trainer as job `streamrec-trainer`, the jobs the dashboard
and the alerts select), and every PromQL expression of the Grafana dashboard and of the alert
rules run through Prometheus' HTTP API. Each must return data, and the counters Prometheus
holds must match what was sent.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import orjson
import pytest
import yaml
from helpers import make_settings, read_all

from evaluation.synthetic import SyntheticStream, make_world
from streams.clients import kafka_producer
from streams.ports import free_port
from streams.publish import publish_events, publish_items
from streams.supervisor import TrainerProcess, WorkerProcess
from streams.topics import ensure_topics

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "streamrec.json"

N_ITEMS = 200
N_EVENTS = 600


def _event(**kw: object) -> dict:
    return {"user_id": "bad-user", "item_id": "item-000001", "event_type": "view",
            "ts": 1_700_000_000_000, **kw}


#: bad events and the DLQ reason each must get; 4 of 604 events (< 1%: DeadLetterRatio quiet)
BAD_EVENTS: list[tuple[bytes, str]] = [
    (b'{"user_id": "u1", "item_id": ', "invalid_json"),
    (orjson.dumps({"user_id": "bad-user", "item_id": "item-000001", "ts": 1}), "missing_field"),
    (orjson.dumps(_event(event_type="teleport")), "invalid_value"),
    (orjson.dumps(_event(item_id="no-such-item")), "unknown_item"),
]

#: alerts whose expression must return nothing on this healthy run. The latency alert is left
#: out: a cold worker's first batches on a shared CI machine may really take over 2 s.
QUIET_ALERTS = {"StreamrecConsumerLagGrowing", "StreamrecDeadLetterRatioHigh",
                "StreamrecNoRecommendations", "StreamrecWorkerDown", "StreamrecIndexEmpty",
                "StreamrecHitRateDropped", "StreamrecSnapshotStale", "StreamrecNoSnapshot",
                "StreamrecTrainerDown", "StreamrecTrainerLagGrowing"}

#: the job names the dashboard and the alert rules select (deploy/prometheus/prometheus.yml)
WORKER_JOB, TRAINER_JOB = "streamrec", "streamrec-trainer"


class Prometheus:
    """A Prometheus server on a free loopback port with its own temp dir."""

    def __init__(self, tmp: Path, targets: dict[str, str], scrape_s: int = 1):
        self.binary = shutil.which("prometheus")
        if not self.binary:
            pytest.skip("prometheus is not installed (Debian package `prometheus`; .ci/run "
                        "installs it)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = tmp
        shutil.copy(PROM / "alerts.yml", tmp / "alerts.yml")
        config = {
            "global": {"scrape_interval": f"{scrape_s}s", "evaluation_interval": f"{scrape_s}s",
                       "scrape_timeout": f"{scrape_s}s"},
            "rule_files": ["alerts.yml"],
            # the job names the dashboard and the alert rules select: job -> its one target
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                               for job, target in targets.items()],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = tmp / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Prometheus:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.tmp / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.tmp / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready\n{self.log.read_text()}")

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:  # 400 on a bad query: show Prometheus' reason
            body = json.loads(e.read())
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return data["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, expr: str, want: float, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            got = self.value(expr)
            if got == want:
                return
            time.sleep(0.5)
        raise AssertionError(f"{expr} = {got}, want {want} after {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


LAG = ('sum(streamrec_faust_topic_partition_end_offset{job="streamrec", '
       'topic=~".*behavior-events"} - streamrec_faust_topic_partition_offset_commited'
       '{job="streamrec", topic=~".*behavior-events"})')


@pytest.fixture(scope="module")
def run(kafka, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monitoring")
    s = make_settings(kafka, tmp, metrics_host="127.0.0.1")
    ensure_topics(s)
    world = make_world(N_ITEMS, n_topics=4, seed=11)
    events = list(SyntheticStream(world, n_users=40, seed=12, noise=0.05).events(N_EVENTS))
    prom = Prometheus(tmp, {WORKER_JOB: f"{s.metrics_host}:{s.metrics_port}",
                            TRAINER_JOB: f"{s.metrics_host}:{s.trainer_metrics_port}"}).start()
    # the trainer first: a worker is ready only once it serves a trainer snapshot
    trainer, worker = TrainerProcess(s, tmp / "trainer.log"), None
    try:
        trainer.start().wait_ready()
        worker = WorkerProcess(s, tmp / "worker.log").start()
        publish_items(s, world.items, quiet=True)
        worker.wait_ready()
        worker.wait_for("streamrec_index_items", len(world.items), timeout=120)
        prom.wait_value('sum(streamrec_index_items{job="streamrec"})', len(world.items))
        healthy_dlq = prom.query(_panel_expr("Dead letters/s by reason"))  # before any bad one
        producer = kafka_producer(s)
        for value, _ in BAD_EVENTS:  # keyed by their user id, as producers must
            producer.send(s.topic(s.events_topic), key=b"bad-user", value=value).get(timeout=30)
        producer.close()
        publish_events(s, events, quiet=True)
        sent = len(events) + len(BAD_EVENTS)
        worker.wait_for("streamrec_events_total", sent, timeout=120)
        # Prometheus has seen the last batch, and the group committed every event offset
        prom.wait_value('sum(streamrec_events_total{job="streamrec"})', sent)
        prom.wait_value(LAG, 0)
        # The lag series exists only once the first offsets are committed; rules that take its
        # deriv over a subquery need a few evaluation steps of it.
        prom.wait_value(f"count_over_time(({LAG})[1m:]) >= bool 3", 1)
        # the trainer has read every example the worker wrote, and Prometheus has seen it
        examples = len(read_all(s, s.topic(s.training_examples_topic)))
        trainer.wait_for("streamrec_trainer_examples_total", examples, timeout=120)
        prom.wait_value(f'sum(streamrec_trainer_examples_total{{job="{TRAINER_JOB}"}})',
                        examples)
        prom.wait_value(f'sum(streamrec_trainer_lag{{job="{TRAINER_JOB}"}})', 0)
        yield dict(settings=s, prom=prom, worker=worker, trainer=trainer, world=world,
                   events=events, sent=sent, examples=examples, healthy_dlq=healthy_dlq)
    finally:
        if worker is not None:
            worker.stop()
        trainer.stop()
        prom.stop()


def _dashboard_exprs() -> list[tuple[str, str]]:
    d = json.loads(DASHBOARD.read_text())
    out = [(f"{p['title']} / {t['refId']}", t["expr"])
           for p in d["panels"] if p["type"] != "row" for t in p["targets"]]
    out.append(("variable instance", 'up{job="streamrec"}'))  # label_values(up{...}, instance)
    return [(name, e.replace("$__rate_interval", "1m").replace("$instance", ".*"))
            for name, e in out]


def _panel_expr(title: str) -> str:
    return dict((name.split(" / ")[0], e) for name, e in _dashboard_exprs())[title]


def _alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


_SET_OPS = re.compile(r"\b(?:and|or|unless)\b")
_COMPARISONS = re.compile(r"(?:==|!=|>=|<=|>|<)(?:\s*bool\b)?")


def split_top_level(expr: str, ops: re.Pattern) -> list[str]:
    """Split a PromQL expression at the operators `ops` outside (), {}, [] and quotes."""
    parts, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(expr):
        c = expr[i]
        if quote:
            quote = "" if c == quote and expr[i - 1] != "\\" else quote
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and (m := ops.match(expr, i)):
            parts.append(expr[start:i])
            i = start = m.end()
            continue
        i += 1
    parts.append(expr[start:])
    return [p.strip() for p in parts if p.strip()]


def alert_operands(expr: str) -> list[str]:
    """The non-literal operands of an alert's set operations and comparisons: the series an
    alert compares, which must exist even while it does not fire."""
    out = []
    for side in split_top_level(expr, _SET_OPS):
        for operand in split_top_level(side, _COMPARISONS):
            if not re.fullmatch(r"[\d.eE+-]+", operand):
                out.append(operand)
    return out


def test_operand_splitter():
    ops = alert_operands('sum by (a) (x{t=~"a>b"}) > 1000 and deriv(y[5m:]) > 0')
    assert ops == ['sum by (a) (x{t=~"a>b"})', "deriv(y[5m:])"]
    assert alert_operands("a / b > 0.01") == ["a / b"]


def test_prometheus_scrapes_the_worker_and_the_trainer(run):
    targets = run["prom"].api("targets")["activeTargets"]
    assert [t["health"] for t in targets] == ["up", "up"], targets
    assert {t["labels"]["job"] for t in targets} == {WORKER_JOB, TRAINER_JOB}


def test_every_dashboard_query_returns_data(run):
    prom = run["prom"]
    empty = [name for name, expr in _dashboard_exprs() if not prom.query(expr)]
    assert not empty, f"dashboard queries without data: {empty}"


def test_dead_letter_panel_shows_zero_while_nothing_went_to_a_dlq(run):
    """Without the `or on() vector(0)` the panel was empty on a healthy run, which reads as
    "no data" (a broken scrape) rather than "no dead letters"."""
    assert [float(r["value"][1]) for r in run["healthy_dlq"]] == [0.0]


def test_every_alert_operand_returns_data_and_a_healthy_run_fires_nothing(run):
    prom = run["prom"]
    for rule in _alert_rules():
        operands = alert_operands(rule["expr"])
        assert operands, rule["alert"]
        for operand in operands:
            assert prom.query(operand), f"{rule['alert']}: no data for {operand}"
        if rule["alert"] in QUIET_ALERTS:
            assert prom.query(rule["expr"]) == [], f"{rule['alert']} fires on a healthy run"


def test_prometheus_loads_and_evaluates_every_alert_rule(run):
    rules = [r for g in run["prom"].api("rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == {r["alert"] for r in _alert_rules()}
    for r in rules:
        assert r["health"] == "ok", (r["name"], r.get("lastError"))
    firing = {r["name"] for r in rules if r["state"] != "inactive"}
    assert not firing & QUIET_ALERTS, firing


def test_counters_in_prometheus_match_what_was_sent(run):
    prom, sent = run["prom"], run["sent"]
    n_bad = len(BAD_EVENTS)
    j = 'job="streamrec"'
    assert prom.value(f"sum(streamrec_events_total{{{j}}})") == sent
    assert prom.value(f'sum(streamrec_events_total{{{j}, outcome="applied"}})') == sent - n_bad
    assert prom.value(f'sum(streamrec_events_total{{{j}, outcome="dlq"}})') == n_bad
    by_reason = {r["metric"]["reason"]: float(r["value"][1]) for r in prom.query(
        f'sum by (reason) (streamrec_dlq_total{{{j}, topic=~".*behavior-events"}})')}
    assert by_reason == {k: float(v) for k, v in Counter(r for _, r in BAD_EVENTS).items()}
    # Faust's own sensor counted the same records coming in
    assert prom.value("sum(streamrec_faust_messages_received_per_topic_total"
                      f'{{{j}, topic=~".*behavior-events"}})') == sent
    assert prom.value(f"sum(streamrec_index_items{{{j}}})") == N_ITEMS
    recs = prom.value(f"sum(streamrec_recommendations_total{{{j}}})")
    assert 0 < recs <= sent - n_bad
    # the online hit rate's counts: events of users served before, and hits among them
    scored = prom.value(f"sum(streamrec_next_events_total{{{j}}})")
    hits = prom.value(f"sum(streamrec_next_event_hits_total{{{j}}})")
    assert 0 <= hits <= scored <= sent - n_bad, (hits, scored)
    # ... and Prometheus holds what the worker itself reports
    own = sum(v for (n, _), v in run["worker"].metrics().items()
              if n == "streamrec_recommendations_total")
    prom.wait_value(f"sum(streamrec_recommendations_total{{{j}}})", own, timeout=10)


def test_trainer_counters_in_prometheus_match_the_training_examples(run):
    """Every training example the worker wrote was read by the trainer once and trained
    (unless a replayed batch wrote it twice: then the copy is a duplicate), and the worker
    serves the version the trainer published last."""
    prom, examples = run["prom"], run["examples"]
    t, w = f'job="{TRAINER_JOB}"', f'job="{WORKER_JOB}"'
    assert examples > 0
    by_outcome = {r["metric"]["outcome"]: float(r["value"][1]) for r in prom.query(
        f"sum by (outcome) (streamrec_trainer_examples_total{{{t}}})")}
    assert set(by_outcome) == {"trained", "duplicate", "dropped", "invalid"}
    assert by_outcome["trained"] + by_outcome["duplicate"] == examples, by_outcome
    assert by_outcome["trained"] > 0 and by_outcome["dropped"] == by_outcome["invalid"] == 0
    assert prom.value(f"sum(streamrec_trainer_trained{{{t}}})") == by_outcome["trained"]
    assert prom.value(f"sum(streamrec_trainer_steps_total{{{t}}})") > 0
    # the worker's page carries the trainer's names too, idle: why every query names its job
    assert prom.value(f"sum(streamrec_trainer_examples_total{{{w}}})") == 0
    # the worker catches up with the newest published version within a few seconds
    prom.wait_value(f"max(streamrec_model_version{{{w}}}) - max(streamrec_model_version{{{t}}})",
                    0, timeout=60)
    assert prom.value(f"max(streamrec_model_version{{{t}}})") >= 1
    assert prom.value(f'max(streamrec_snapshot_bytes{{{t}, kind="base"}})') > 0
    assert prom.value(f"max(streamrec_snapshot_age_seconds{{{w}}})") < 120
