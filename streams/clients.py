"""Kafka client construction in one place, so security settings reach every client.

kafka-python (CLI tools: publish, catalog load, tail) takes file paths; aiokafka (the
worker's catalog replica and checkpoint reader) takes an SSLContext; Faust takes credentials.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from streams.settings import Settings


def _ssl_context(s: Settings) -> ssl.SSLContext | None:
    if "SSL" not in s.security_protocol:
        return None
    from aiokafka.helpers import create_ssl_context

    return create_ssl_context(
        cafile=str(s.ssl_cafile) if s.ssl_cafile else None,
        certfile=str(s.ssl_certfile) if s.ssl_certfile else None,
        keyfile=str(s.ssl_keyfile) if s.ssl_keyfile else None,
    )


def aio_options(s: Settings) -> dict[str, Any]:
    opts: dict[str, Any] = {"bootstrap_servers": s.bootstrap,
                            "security_protocol": s.security_protocol}
    ctx = _ssl_context(s)
    if ctx is not None:
        opts["ssl_context"] = ctx
    if "SASL" in s.security_protocol:
        opts.update(sasl_mechanism=s.sasl_mechanism, sasl_plain_username=s.sasl_username,
                    sasl_plain_password=s.sasl_password)
    return opts


def faust_credentials(s: Settings) -> Any:
    """`broker_credentials` for faust.App (None for PLAINTEXT)."""
    import faust

    if s.security_protocol == "PLAINTEXT":
        return None
    ctx = _ssl_context(s)
    if "SASL" in s.security_protocol:
        return faust.SASLCredentials(username=s.sasl_username, password=s.sasl_password,
                                     ssl_context=ctx, mechanism=s.sasl_mechanism)
    return faust.SSLCredentials(ctx)


def kafka_producer(s: Settings, **kw: Any) -> Any:
    """kafka-python producer for the CLI tools: acks=all, retries, ordered per partition."""
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=s.bootstrap, acks="all", retries=10,
                         linger_ms=5, max_in_flight_requests_per_connection=1,
                         **s.kafka_security(), **kw)


def kafka_consumer(s: Settings, *topics: str, **kw: Any) -> Any:
    from kafka import KafkaConsumer

    return KafkaConsumer(*topics, bootstrap_servers=s.bootstrap, **s.kafka_security(), **kw)


async def wait_assignment(consumer: Any, timeout: float = 30.0) -> set[Any]:
    """Partitions of a started group-less, subscribed aiokafka consumer (it takes them all)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not consumer.assignment():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"no partitions assigned after {timeout}s (topic missing?)")
        await asyncio.sleep(0.05)
    return set(consumer.assignment())


async def reached(consumer: Any, target: dict[Any, int]) -> bool:
    """True once the consumer's position is at or past `target` (end offsets) everywhere."""
    for tp, end in target.items():
        if await consumer.position(tp) < end:
            return False
    return True
