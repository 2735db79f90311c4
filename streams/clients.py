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
from typing import Any, NamedTuple

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

    options = dict(acks="all", retries=10, linger_ms=5,
                   max_in_flight_requests_per_connection=1) | kw
    return KafkaProducer(bootstrap_servers=s.bootstrap, **s.kafka_security(), **options)


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


class Problem(NamedTuple):
    text: str
    permanent: bool = False  # waiting will not fix it (credentials, TLS trust): fail now


def _tcp_problem(host: str, port: int, timeout: float) -> str | None:
    """Why a TCP connection to host:port fails (None: it connects)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror:
        return f"host name {host!r} does not resolve"
    except ConnectionRefusedError:
        return "connection refused (nothing listens on that port)"
    except TimeoutError:
        return f"no answer within {timeout:.0f} s"
    except (OSError, ValueError) as exc:
        return str(exc) or type(exc).__name__


def _tls_problem(s: Settings, host: str, port: int, timeout: float) -> Problem | None:
    """A TLS handshake as the clients will make it: with the configured trust when the
    protocol is SSL/SASL_SSL (a certificate from another CA is named as such), and a probe
    when it is not (a broker that speaks TLS to a plaintext client just hangs up)."""
    wants_tls = "SSL" in s.security_protocol
    ctx = _ssl_context(s) if wants_tls else ssl._create_unverified_context()  # noqa: S323
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as exc:
        return Problem(f"the broker's TLS certificate is not trusted ({exc.verify_message}): "
                       f"is STREAMREC_SSL_CAFILE ({s.ssl_cafile}) the CA that signed it?", True)
    except (ssl.SSLError, OSError) as exc:
        if wants_tls:
            return Problem(f"TLS handshake failed ({exc}): does the broker listen with TLS on "
                           f"this port? (STREAMREC_SECURITY_PROTOCOL={s.security_protocol})",
                           True)
        return None  # not TLS: as the settings say
    if not wants_tls:
        return Problem("the broker expects TLS, but STREAMREC_SECURITY_PROTOCOL is "
                       f"{s.security_protocol}: set SSL or SASL_SSL, and STREAMREC_SSL_CAFILE",
                       True)
    return None


async def _sasl_problem(s: Settings, host: str, port: int, timeout: float) -> Problem | None:
    """One connection with this client's SASL credentials: the broker's answer names a wrong
    password or mechanism exactly (the clients' own retries only log it)."""
    from aiokafka.conn import create_conn
    from aiokafka.errors import (
        KafkaError,
        SaslAuthenticationFailed,
        UnsupportedSaslMechanismError,
    )

    try:
        conn = await create_conn(host, port, ssl_context=_ssl_context(s),
                                 security_protocol=s.security_protocol,
                                 sasl_mechanism=s.sasl_mechanism,
                                 sasl_plain_username=s.sasl_username,
                                 sasl_plain_password=s.sasl_password,
                                 request_timeout_ms=int(timeout * 1000))
    except SaslAuthenticationFailed:
        return Problem(f"authentication failed for user {s.sasl_username!r} "
                       f"({s.sasl_mechanism}): check STREAMREC_SASL_USERNAME and "
                       "STREAMREC_SASL_PASSWORD", True)
    except UnsupportedSaslMechanismError:
        return Problem(f"the broker does not accept SASL mechanism {s.sasl_mechanism}: check "
                       "STREAMREC_SASL_MECHANISM", True)
    except (TimeoutError, KafkaError, OSError) as exc:
        return Problem(f"a TCP connection opens but no Kafka broker answers ({exc!r})")
    conn.close()
    return None


def _kafka_problem(s: Settings, host: str, port: int, timeout: float) -> Problem | None:
    """A Kafka request as this client (after its credentials, if any): None if answered."""
    from kafka.errors import KafkaError

    from streams.topics import admin_client

    if "SASL" in s.security_protocol:
        problem = asyncio.run(_sasl_problem(s, host, port, timeout))
        if problem is not None:
            return problem
    try:
        admin_client(s.bootstrap, timeout, **s.kafka_security()).close()
    except KafkaError as exc:
        return Problem(f"a TCP connection opens but no Kafka broker answers ({exc})")
    return None


def broker_problem(s: Settings, timeout: float = 5.0) -> Problem | None:
    """Why the configured broker cannot be used right now (None: it answers a Kafka
    request). The common causes are named exactly, each by the cheapest probe that tells:
    TCP (nothing listening, a name that does not resolve), TLS (trust, protocol), then a
    Kafka request (credentials)."""
    reachable, problems = [], []
    for host_port in s.bootstrap:
        host, _, port = host_port.rpartition(":")
        address = (host.strip("[]"), int(port))
        problem = _tcp_problem(*address, timeout)
        if problem is None:
            reachable.append(address)
        else:
            problems.append(problem)
    if not reachable:
        return Problem(problems[0])
    return _tls_problem(s, *reachable[0], timeout) or _kafka_problem(s, *reachable[0], timeout)


def wait_for_broker(s: Settings, wait_s: float | None = None) -> None:
    """Return once the broker answers; raise BrokerUnreachable (naming the address and the
    setting to check) after `wait_s` (default `s.broker_wait_s`), or at once for a problem
    that waiting will not fix. One log line per retry."""
    wait_s = s.broker_wait_s if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    attempt, pause = 0, 1.0
    where = ",".join(s.bootstrap)
    while True:
        attempt += 1
        problem = broker_problem(s, timeout=min(5.0, max(1.0, wait_s)))
        if problem is None:
            return
        if problem.permanent:
            raise BrokerUnreachable(f"cannot use the Kafka broker at {where}: {problem.text}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise BrokerUnreachable(
                f"cannot reach the Kafka broker at {where}: {problem.text} "
                f"({attempt} attempts over {wait_s:.0f} s). Check --broker or STREAMREC_BROKER "
                f"(now {s.broker}); `streamrec broker` prints the address of the embedded one")
        pause = min(pause * 2, 5.0, left)
        log.warning("Kafka broker at %s not reachable: %s; retrying in %.0f s", where,
                    problem.text, pause)
        time.sleep(pause)
