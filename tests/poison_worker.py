"""`python tests/poison_worker.py worker`: the streamrec CLI, with batch processing made to
raise whenever a batch holds an event of user `$POISON_USER_ID`.

tests/test_pipeline.py runs it to prove that a record whose processing raises costs itself
(it goes to the DLQ as `processing_error`) and not the rest of its batch. The hook lives here,
not in the product's settings or its hot path.
"""

from __future__ import annotations

import os

from streams.cli import main
from streams.processor import EventProcessor

POISON = os.environ["POISON_USER_ID"]
_process = EventProcessor.process


def _poisoned(self, events, rejected, states):  # noqa: ANN001, ANN202 - EventProcessor's
    if any(ev.user_id == POISON for _, ev in events):
        raise RuntimeError(f"injected fault: an event of user {POISON!r}")
    return _process(self, events, rejected, states)


EventProcessor.process = _poisoned  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
