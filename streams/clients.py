"""Kafka client construction in one place, so security settings reach every client.

kafka-python (CLI tools: publish, catalog load, tail) takes file paths; aiokafka (the
worker's catalog replica and checkpoint reader) takes an SSLContext; Faust takes credentials.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from typing import Any

from streams.errors import BrokerUnreachable
from streams.settings import Settings

log = logging.getLogger("streamrec.clients")


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


def _tcp_problem(host_port: str, timeout: float) -> str | None:
    """Why a TCP connection to host:port fails (None: it connects)."""
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except socket.gaierror:
        return f"host name {host!r} does not resolve"
    except ConnectionRefusedError:
        return "connection refused (nothing listens on that port)"
    except TimeoutError:
        return f"no answer within {timeout:.0f} s"
    except (OSError, ValueError) as exc:
        return str(exc) or type(exc).__name__


def broker_problem(s: Settings, timeout: float = 5.0) -> str | None:
    """Why the configured broker cannot be used right now (None: it answers a Kafka
    request). A TCP probe first, so the common causes (nothing listening, a host name that
    does not resolve) are named exactly instead of as a client timeout."""
    problems = [p for p in (_tcp_problem(h, timeout) for h in s.bootstrap) if p is not None]
    if len(problems) == len(s.bootstrap):
        return problems[0]
    from kafka.errors import KafkaError

    from streams.topics import admin_client

    try:
        admin_client(s.bootstrap, timeout, **s.kafka_security()).close()
    except KafkaError as exc:
        return f"a TCP connection opens but no Kafka broker answers ({exc})"
    return None


def wait_for_broker(s: Settings, wait_s: float | None = None) -> None:
    """Return once the broker answers; raise BrokerUnreachable (naming the address and the
    setting to check) after `wait_s` (default `s.broker_wait_s`). One log line per retry."""
    wait_s = s.broker_wait_s if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    attempt, pause = 0, 1.0
    while True:
        attempt += 1
        problem = broker_problem(s, timeout=min(5.0, max(1.0, wait_s)))
        if problem is None:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise BrokerUnreachable(
                f"cannot reach the Kafka broker at {','.join(s.bootstrap)}: {problem} "
                f"({attempt} attempts over {wait_s:.0f} s). Check --broker or STREAMREC_BROKER "
                f"(now {s.broker}); `streamrec broker` prints the address of the embedded one")
        pause = min(pause * 2, 5.0, left)
        log.warning("Kafka broker at %s not reachable: %s; retrying in %.0f s",
                    ",".join(s.bootstrap), problem, pause)
        time.sleep(pause)
