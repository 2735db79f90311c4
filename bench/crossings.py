"""Module crossings: how many module boundaries one event crosses from record to recommendation.

    .venv/bin/python -m bench.crossings [--out bench/out]

Runs bench/compute.py's in-process worker path (the real EventProcessor, learner, encoder and
FAISS server) and traces, with `sys.setprofile`, one single-event batch through
`EventProcessor.decode` and `EventProcessor.process`: the part that ends when the event's
recommendation exists. A crossing is a call from one of the project's modules into another
(a call through a library, e.g. torch's `Module.__call__` into a `forward`, counts from the
nearest project frame). Prints the distinct (caller module → callee module) edges and the
files they touch, and writes crossings.json. The same script, copied into an older checkout,
measures that commit the same way; that is how the README's before/after figure was made.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections import Counter
from pathlib import Path
from types import FrameType

import orjson
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("streams", "models", "index", "evaluation")


def project_module(frame: FrameType | None) -> tuple[str | None, FrameType | None]:
    """The project module (e.g. `models/serving.py`) of the nearest project frame at or above
    `frame`, and that frame."""
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(ROOT) and path.relative_to(ROOT).parts[0] in PACKAGES:
            return str(path.relative_to(ROOT)), frame
        frame = frame.f_back
    return None, None


class Tracer:
    """Counts each call from one project module into another, while enabled."""

    def __init__(self) -> None:
        self.edges: Counter[tuple[str, str]] = Counter()

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if event != "call":
            return
        callee, _ = project_module(frame)
        if callee is None or project_module(frame)[1] is not frame:
            return  # a library's own frame
        caller, _ = project_module(frame.f_back)
        if caller is not None and caller != callee:
            self.edges[(caller, callee)] += 1

    def trace(self, fn, *args):
        sys.setprofile(self)
        try:
            return fn(*args)
        finally:
            sys.setprofile(None)


def one_event(warmup: int = 60) -> Tracer:
    """Trace one event of a user with history through decode and process (serving)."""
    from bench.compute import Harness

    h = Harness(300, 4, 1)
    for _ in range(warmup):
        h.run_batch(h.records())
    tracer = Tracer()
    recs = h.records()
    good, bad = tracer.trace(h.proc.decode, recs)
    from models.user_state import UserState

    def load(user: str, _record: object = None) -> UserState:
        return UserState.from_bytes(h.store.get(user))

    if "load_state" in inspect.signature(h.proc.process).parameters:  # before 2026-12-02
        tracer.trace(h.proc.process, good, bad, load)
    else:
        tracer.trace(h.proc.process, good, bad, {ev.user_id: load(ev.user_id) for _, ev in good})
    return tracer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    tracer = one_event()
    files = sorted({m for edge in tracer.edges for m in edge})
    table = Table(title=f"One event, record to recommendation: {len(tracer.edges)} module "
                        f"crossings in {len(files)} files")
    for col in ("caller", "callee", "calls"):
        table.add_column(col)
    for (a, b), n in sorted(tracer.edges.items()):
        table.add_row(a, b, str(n))
    Console().print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "crossings", "crossings": len(tracer.edges), "files": files,
           "edges": [[a, b, n] for (a, b), n in sorted(tracer.edges.items())]}
    (out / "crossings.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
