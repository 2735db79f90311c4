"""An embedded, real Apache Kafka broker (KRaft mode, single node) for tests, the demo and the CLI.

Why a real broker and not a fake: the recommender's guarantees (consumer-group rebalances,
offsets surviving a crash, producers blocking on a stalled broker) only mean something against
the real protocol implementation. Running ``kafka.Kafka`` from jars that Maven resolves into
``~/.m2`` gives us that without Docker or a downloaded Kafka distribution; the only
prerequisites are a JDK (11+) and Maven.

Typical use::

    with EmbeddedKafka() as kafka:
        create_topics([kafka.bootstrap], {"events": {"partitions": 4}})  # streams.topics
        ...  # point producers/consumers/Faust at kafka.bootstrap / kafka.url

The broker runs as a child ``java`` process in its own session (so a Ctrl-C aimed at the
parent's terminal cannot kill it half-way through our own orderly shutdown) and is stopped by an
``atexit`` hook, and on Linux also by the kernel if the parent dies, so it never outlives Python.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import ctypes.util
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

from streams.broker_security import BrokerSecurity
from streams.ports import free_port, port_free
from streams.topics import admin_client

__all__ = ["BrokerError", "EmbeddedKafka", "kafka_classpath"]

log = logging.getLogger("streamrec.broker")

DEFAULT_VERSION = "3.9.1"
POM = Path(__file__).parent / "kafka" / "pom.xml"

# Loggers kept at INFO so broker.log shows when the server started/stopped; everything else WARN.
_LOG4J = """\
log4j.rootLogger=WARN, stderr
log4j.appender.stderr=org.apache.log4j.ConsoleAppender
log4j.appender.stderr.Target=System.err
log4j.appender.stderr.layout=org.apache.log4j.PatternLayout
log4j.appender.stderr.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.server.KafkaRaftServer=INFO
log4j.logger.kafka.server.BrokerServer=INFO
"""


class BrokerError(RuntimeError):
    """The broker could not be resolved, formatted or started (message says why)."""


# --------------------------------------------------------------------------- classpath


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streamrec"


def _java() -> str:
    """The java binary: $JAVA_HOME/bin/java if set (what the user chose), else PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise BrokerError(
            "java not found (neither $JAVA_HOME/bin/java nor on PATH): the embedded Kafka "
            "broker needs a JDK 11+, e.g. `apt-get install openjdk-17-jre-headless`"
        )
    return java


def _read_cached_classpath(path: Path) -> str | None:
    """The cached classpath, or None when absent or any jar in it vanished (e.g. ~/.m2 wiped)."""
    try:
        cp = path.read_text().strip()
    except OSError:
        return None
    if not cp or not all(Path(jar).is_file() for jar in cp.split(os.pathsep)):
        return None
    return cp


def kafka_classpath(version: str = DEFAULT_VERSION) -> str:
    """Resolve (and cache under ~/.m2) the broker jars with Maven; returns the java classpath.

    The resolved classpath is cached in ``~/.cache/streamrec/`` keyed by Kafka version and by a
    hash of the pom (so editing the pom's dependencies re-resolves), and re-resolved when a jar
    in it is missing. Maven runs offline first so that, once ~/.m2 is populated, starting a
    broker needs no network; only if that fails does it go online.
    """
    pom_hash = hashlib.sha256(POM.read_bytes()).hexdigest()[:12]
    cache = _cache_dir() / f"kafka-{version}-{pom_hash}.classpath"
    cp = _read_cached_classpath(cache)
    if cp is not None:
        return cp

    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(
            "mvn not found on PATH: the embedded Kafka broker resolves its jars with Maven "
            "(e.g. `apt-get install maven`)"
        )
    _java()  # fail early with the clearer message if java is missing too
    cache.parent.mkdir(parents=True, exist_ok=True)
    # A private output file per call, then an atomic rename: parallel test workers may race here.
    fd, tmp = tempfile.mkstemp(prefix=cache.name, suffix=".tmp", dir=cache.parent)
    os.close(fd)
    try:
        base = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(POM),
            "dependency:build-classpath",
            f"-Dmdep.outputFile={tmp}",
            f"-Dkafka.version={version}",
        ]
        result = None
        for mode in (["-o"], []):
            log.info("resolving Kafka %s jars with Maven%s", version, " (offline)" if mode else "")
            result = subprocess.run(
                base[:1] + mode + base[1:],
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=900,
            )
            if result.returncode == 0 and Path(tmp).stat().st_size > 0:
                break
        else:
            assert result is not None
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-30:])
            raise BrokerError(
                f"mvn could not resolve org.apache.kafka:kafka_2.13:{version}:\n{tail}"
            )
        cp = Path(tmp).read_text().strip()
        os.replace(tmp, cache)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return cp


# --------------------------------------------------------------------------- helpers


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _random_cluster_id() -> str:
    """A Kafka ``Uuid`` string (base64url of 16 bytes, unpadded), as ``random-uuid`` would print.

    Generated here to save a JVM start. Like Kafka, avoid ids starting with '-' (they would be
    parsed as a command-line flag) and the reserved all-zero/``1`` ids.
    """
    while True:
        raw = uuid.uuid4().bytes
        cid = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        if not cid.startswith("-") and int.from_bytes(raw, "big") > 1:
            return cid


_PR_SET_PDEATHSIG = 1


def _wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Until every thread of `pid` is stopped (Linux; elsewhere a no-op). SIGSTOP returns
    once queued, and a loaded machine runs the JVM's threads on for a while before the group
    stop reaches them all: a CI run saw a record acknowledged after `freeze()` returned."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for stat in tasks.glob("*/stat"):
            try:  # the state follows the command name's closing parenthesis
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):
                continue  # a thread that just exited
        if states and all(st in ("T", "t") for st in states):
            return
        time.sleep(0.01)
    raise BrokerError(f"the broker (pid {pid}) did not stop within {timeout:.0f} s of SIGSTOP")


def _pdeathsig_preexec() -> Any:
    """On Linux, a preexec_fn asking the kernel to SIGKILL the child when its parent dies.

    atexit does not run when Python is SIGKILLed (a CI timeout, an OOM kill); without this an
    orphaned JVM would keep holding the ports and the data dir. The death signal fires when the
    *thread* that forked exits, so it is only armed when started from the main thread. libc is
    looked up here, in the parent, so the child only makes one async-signal-safe syscall.
    """
    if (
        not sys.platform.startswith("linux")
        or threading.current_thread() is not threading.main_thread()
    ):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # parent already died before prctl took effect
            os._exit(1)

    return arm


# --------------------------------------------------------------------------- the broker

_START_MARKER = "=== streamrec: starting"
_RUNNING: set[EmbeddedKafka] = set()
_TEMP_DIRS: set[Path] = set()  # temp data dirs we created and nobody has cleaned up yet
_RUNNING_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    """Stop brokers the program forgot to stop, so no JVM outlives the Python process."""
    with _RUNNING_LOCK:
        brokers = list(_RUNNING)
    for broker in brokers:
        try:
            broker.stop(grace=5, cleanup=broker._owns_dir)
        except Exception:  # best effort at interpreter exit
            log.exception("failed to stop embedded Kafka (pid %s) at exit", broker.pid)
    # A temp dir is worthless once its broker is gone: also remove those of brokers that never
    # started or whose start failed.
    for path in list(_TEMP_DIRS):
        shutil.rmtree(path, ignore_errors=True)


class EmbeddedKafka:
    """A single-node KRaft Kafka broker (combined broker+controller) running as a java child.

    ``data_dir`` holds everything: ``server.properties``, ``log4j.properties``, the broker's
    stdout/stderr in ``broker.log`` and the partition/metadata logs under ``logs/``. Pass the same
    ``data_dir`` again (or call :meth:`restart`) and the broker comes back with its topics and
    messages; storage is only formatted the first time. With ``data_dir=None`` a temporary
    directory is used, which ``stop(cleanup=True)`` (and leaving the ``with`` block) removes; a
    directory you passed in is never deleted.

    Ports default to free loopback ports picked at the first :meth:`start` and kept for the
    lifetime of the object, so clients keep working across :meth:`restart`.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        port: int | None = None,
        heap: str = "512m",
        version: str = DEFAULT_VERSION,
        partitions: int = 4,
        security: BrokerSecurity | None = None,
        relayed: dict[str, int] | None = None,
    ) -> None:
        """`security`: a SASL_SSL listener instead of PLAINTEXT (streams/broker_security.py).
        `relayed`: extra PLAINTEXT listeners, name -> the port they are advertised at (a
        proxy in front of them: clients of that listener talk to the broker through it; the
        listener's own port is in `relay_ports`)."""
        self._owns_dir = data_dir is None
        self.data_dir = Path(
            tempfile.mkdtemp(prefix="streamrec-kafka-") if data_dir is None else data_dir
        ).resolve()
        self.port: int | None = port
        self.controller_port: int | None = None
        self.heap = heap
        self.version = version
        self.partitions = partitions
        self.security = security
        self.relayed = dict(relayed or {})
        self.relay_ports: dict[str, int] = {}
        if self._owns_dir:
            _TEMP_DIRS.add(self.data_dir)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._frozen = False
        self._lock = threading.RLock()

    # -- addresses -----------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """``host:port`` for kafka-python / aiokafka ``bootstrap_servers``."""
        if self.port is None:
            raise BrokerError("the broker's port is only known once start() has been called")
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``kafka://host:port``, the broker URL form Faust takes."""
        return f"kafka://{self.bootstrap}"

    @property
    def log_path(self) -> Path:
        """The broker's stdout/stderr (appended across restarts): look here when it misbehaves."""
        return self.data_dir / "broker.log"

    @property
    def pid(self) -> int | None:
        """The java process id while it runs (frozen counts as running), else None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<EmbeddedKafka {self.port and self.bootstrap} {state} dir={self.data_dir}>"

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 60) -> EmbeddedKafka:
        """Format storage if new, start the JVM and wait until it answers a metadata request.

        Readiness is a real Kafka request (a metadata/DescribeCluster answer listing a
        registered broker), not an open port: an open port does not prove it is *our* broker,
        nor that it has registered with its controller and been unfenced, and clients that
        connect before that see ``LEADER_NOT_AVAILABLE``/timeouts. Raises :class:`BrokerError`
        with the first error and the tail of ``broker.log`` if the JVM dies or ``timeout`` runs
        out (the JVM is then stopped; the data dir is kept for inspection).
        """
        with self._lock:
            if self.running:
                log.debug("%r already running", self)
                return self
            cp = kafka_classpath(self.version)
            java = _java()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._pick_ports()
            props = self._write_config()
            if not (self.data_dir / "logs" / "meta.properties").exists():
                self._format(java, cp, props)
            self._launch(java, cp, props)
            try:
                self._wait_ready(timeout)
            except BaseException:
                self.stop(grace=2)
                raise
            return self

    def _pick_ports(self) -> None:
        if self.port is None:
            self.port = free_port()
        elif not port_free(self.port):  # fail in ms with a clear message, not after a JVM
            raise BrokerError(f"cannot start Kafka: port {self.port} is already in use")
        if self.controller_port is None:
            self.controller_port = free_port()

    def _launch(self, java: str, cp: str, props: Path) -> None:
        """The broker's JVM, logging to broker.log, registered for clean-up at exit."""
        cmd = [
            java,
            f"-Xmx{self.heap}",
            "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration={(self.data_dir / 'log4j.properties').as_uri()}",
            "-cp",
            cp,
            "kafka.Kafka",
            str(props),
        ]
        self._log_file = open(self.log_path, "ab")  # lives as long as the JVM
        self._log_file.write(f"\n{_START_MARKER} {' '.join(cmd[:-4])} ...\n".encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            cmd,
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_pdeathsig_preexec(),
        )
        self._frozen = False
        with _RUNNING_LOCK:
            _RUNNING.add(self)
        log.info(
            "starting Kafka %s (pid %d) at %s, data in %s",
            self.version,
            self._proc.pid,
            self.bootstrap,
            self.data_dir,
        )

    def stop(self, grace: float = 10, cleanup: bool = False) -> None:
        """Stop the broker: SIGTERM (Kafka's orderly shutdown), after ``grace`` s SIGKILL.

        Idempotent. ``cleanup=True`` also deletes the data dir if this object created it.
        """
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                log.info("stopping Kafka (pid %d) at %s", proc.pid, self.bootstrap)
                proc.send_signal(signal.SIGTERM)
                if self._frozen:  # a stopped process only acts on SIGTERM once continued
                    proc.send_signal(signal.SIGCONT)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    log.warning(
                        "Kafka (pid %d) ignored SIGTERM for %.0fs; killing", proc.pid, grace
                    )
                    proc.kill()
                    proc.wait()
            self._reap()
            if cleanup and self._owns_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)
                _TEMP_DIRS.discard(self.data_dir)

    def kill(self) -> None:
        """SIGKILL the broker, no orderly shutdown: simulates a crash for fault tests."""
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                log.info("killing Kafka (pid %d)", proc.pid)
                proc.kill()
                proc.wait()
            self._reap()

    def freeze(self) -> None:
        """SIGSTOP the broker: connections stay open but nothing is answered (a hung broker)."""
        with self._lock:
            if not self.running or self._proc is None:
                raise BrokerError("cannot freeze: the broker is not running")
            self._proc.send_signal(signal.SIGSTOP)
            self._frozen = True
            _wait_stopped(self._proc.pid)

    def thaw(self) -> None:
        """SIGCONT a frozen broker; requests sent meanwhile are then answered."""
        with self._lock:
            if self.running and self._proc is not None:
                self._proc.send_signal(signal.SIGCONT)
            self._frozen = False

    def restart(self, timeout: float = 60) -> None:
        """Stop (if running) and start again on the same data dir and the same ports."""
        self.stop()
        self.start(timeout)

    def __enter__(self) -> EmbeddedKafka:
        try:
            return self.start()
        except BaseException:
            # __exit__ will not run, so nobody else could remove a temp dir we created.
            self.stop(cleanup=self._owns_dir)
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop(cleanup=self._owns_dir)

    # -- internals -----------------------------------------------------------------------

    def _reap(self) -> None:
        """Forget a dead process: close its log file and drop it from the atexit registry."""
        self._frozen = False
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        with _RUNNING_LOCK:
            _RUNNING.discard(self)

    def _write_config(self) -> Path:
        """(Re)write server.properties: ports may have been picked only now."""
        logs = self.data_dir / "logs"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},"
            f"CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            **(self.security.server_properties(self.port, self.controller_port)
               if self.security else {}),
            "log.dirs": str(logs),
            "num.partitions": str(self.partitions),
            # Single node: every internal topic must make do with one replica. Fewer
            # __consumer_offsets partitions make the group coordinator come up faster.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            # No 3 s wait for more members before the first rebalance: tests/demo have few.
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            # After a crash (kill -9) the restarted controller still believes the old broker
            # incarnation alive and refuses the new registration until that session expires:
            # 9 s by default, which made every kill/restart cycle take ~14 s. A short session
            # keeps crash recovery at a few seconds; heartbeats are loopback-cheap.
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "500",
        }
        self._relay(props)
        path = self.data_dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.data_dir / "log4j.properties").write_text(
            _LOG4J + ("log4j.logger.kafka.authorizer.logger=INFO\n" if self.security else ""))
        return path

    def _relay(self, props: dict[str, str]) -> None:
        """Add the relayed listeners: each on a port of its own, advertised at its proxy."""
        for name, advertised in self.relayed.items():
            port = self.relay_ports.setdefault(name, free_port())
            props["listeners"] += f",{name}://127.0.0.1:{port}"
            props["advertised.listeners"] += f",{name}://127.0.0.1:{advertised}"
            props["listener.security.protocol.map"] += f",{name}:PLAINTEXT"

    def _format(self, java: str, cp: str, props: Path) -> None:
        """Write meta.properties + the bootstrap metadata checkpoint (`kafka-storage format`)."""
        cluster_id = _random_cluster_id()
        log.info(
            "formatting Kafka storage in %s (cluster id %s)", self.data_dir / "logs", cluster_id
        )
        result = subprocess.run(
            [
                java,
                "-Xmx256m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                f"-Dlog4j.configuration={(self.data_dir / 'log4j.properties').as_uri()}",
                "-cp",
                cp,
                "kafka.tools.StorageTool",
                "format",
                "--ignore-formatted",
                "-t",
                cluster_id,
                "-c",
                str(props),
                *(self.security.format_args() if self.security else []),
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
        )
        if result.returncode != 0:
            raise BrokerError(
                f"kafka-storage format failed (exit {result.returncode}):\n"
                f"{result.stdout}{result.stderr}".rstrip()
            )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self._proc is not None and self.port is not None
        last_error: Exception | None = None
        while True:
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"Kafka exited with code {self._proc.returncode} during startup; "
                    f"{self._startup_report()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"Kafka at {self.bootstrap} not ready after {timeout:.0f}s "
                    f"(last client error: {last_error!r}); {self._startup_report()}"
                )
            # Cheap TCP probe first: a Kafka client against a closed port logs connection errors.
            if _port_open(self.port):
                try:
                    admin = admin_client([self.bootstrap], timeout=min(5.0, max(remaining, 1.0)),
                                         **(self.security.kafka_python()
                                            if self.security else {}))
                    try:
                        cluster = admin.describe_cluster()
                    finally:
                        admin.close()
                    if cluster.get("brokers"):
                        log.info("Kafka ready at %s (pid %d)", self.bootstrap, self._proc.pid)
                        return
                    last_error = BrokerError("no broker registered yet")
                except Exception as e:  # any client error means "not yet"
                    last_error = e
            time.sleep(0.2)

    def _startup_report(self, lines: int = 40) -> str:
        """The first error of this start attempt plus the log tail, for exception messages.

        The JVM usually dies with a long stack trace whose last lines are frames, not the cause
        ("Address already in use", a bad config key), so the first ERROR line is quoted too.
        """
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(no broker log: {e})"
        run = text.rsplit(_START_MARKER, 1)[-1].splitlines()
        first = next((ln for ln in run if " ERROR " in ln or " FATAL " in ln), None)
        report = f"first error: {first}\n" if first else ""
        return report + f"tail of {self.log_path}:\n" + "\n".join(run[-lines:])
