"""Logging set-up for the command line: streamrec's own lines, not the Kafka clients'.

kafka-python and aiokafka log every refused connection, reset and metadata retry at WARNING
or ERROR (a worker without its broker logged 217 such lines in 5 minutes). What they say is
for debugging; what a person needs (the broker is unreachable, at this address, check this
setting) streamrec says itself. So their records are demoted to DEBUG: shown with
`--verbose`, hidden otherwise.
"""

from __future__ import annotations

import logging

#: Loggers whose records are client chatter (prefixes of logger names).
CHATTY = ("kafka", "aiokafka")


class DemoteChatter(logging.Filter):
    """Rewrites records of the CHATTY loggers to DEBUG, and drops them below `level` (a
    handler's filters run after its level check, so the demoted record is judged here)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] in CHATTY and record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return record.levelno >= self.level


def configure_logging(verbose: bool = False) -> None:
    """INFO for streamrec and Faust, client chatter at DEBUG; everything with `verbose`."""
    level = logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(DemoteChatter(level))
    handler.setLevel(level)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in CHATTY:  # their DEBUG is very verbose; only worth producing when asked for
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
