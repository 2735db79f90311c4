"""Loopback ports for the processes streamrec starts itself (broker, metrics, trainer ranks).

Why not let the OS pick (bind port 0, read it, close)? That port comes from the ephemeral
range (Linux: /proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default), which is
also where every *outgoing* connection gets its local port. Between closing the probe and
the real server binding it, a Kafka client's connection can take that port, and the server
fails with EADDRINUSE (seen once in CI on a trainer's metrics port). So `free_port` picks
below the ephemeral range, where the kernel never hands out ports on its own, and never
returns the same port twice in one process.

>>> p = free_port()
>>> port_free(p) and p < ephemeral_range()[0]
True
>>> len({free_port() for _ in range(50)} | {p})  # never the same port twice
51
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_LOWEST = 20000  # below this lie many registered service ports
_handed_out: set[int] = set()
_rng = random.SystemRandom()  # not the global generator: seeded runs must not share ports


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default elsewhere)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def port_free(port: int) -> bool:
    """Whether a server could bind ``port`` on loopback (with SO_REUSEADDR, as Kafka and the
    metrics server set it, so a TIME_WAIT socket is no obstacle)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A free loopback port outside the ephemeral range, not handed out before by this
    process. Falls back to an OS-picked port if the range below is too narrow or full."""
    top = ephemeral_range()[0]
    candidates = [p for p in _rng.sample(range(_LOWEST, top), min(64, max(0, top - _LOWEST)))
                  if p not in _handed_out]
    port = next((p for p in candidates if port_free(p)), None) or _os_picked()
    _handed_out.add(port)
    return port


def _os_picked() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
