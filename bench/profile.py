"""A py-spy profile of a running process, and its top frames.

`Profiler(pid, path)` samples the process (py-spy, collapsed-stack "raw" format, without
pausing it) until `stop()`; `top_frames(path)` reads the stacks back and ranks functions by
their own samples (where the time is spent) and by their inclusive samples (what it is
spent under). Install py-spy with the `profile` extra (`pip install -e '.[profile]'`).

>>> import tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "stacks.txt"
>>> _ = p.write_text("main (a.py:1);serve (b.py:9);search (c.py:3) 6\\n"
...                  "main (a.py:1);learn (d.py:2) 4\\n")
>>> [(f["frame"], f["self"], f["total"]) for f in top_frames(p, 2)["self"]]
[('search (c.py)', 0.6, 0.6), ('learn (d.py)', 0.4, 0.4)]
>>> top_frames(p, 1)["total"][0]["frame"], top_frames(p, 1)["samples"]
('main (a.py)', 10)
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(?P<stack>.*) (?P<n>\d+)$")
_LINENO = re.compile(r":\d+\)$")


def py_spy() -> str:
    """The py-spy executable: beside this interpreter (a venv not on PATH), else on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    exe = str(here) if here.exists() else shutil.which("py-spy")
    if exe is None:
        raise RuntimeError("--profile needs py-spy: pip install -e '.[profile]'")
    return exe


class Profiler:
    def __init__(self, pid: int, path: Path, rate: int = 50):
        exe = py_spy()
        self.path = path
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--format", "raw", "--output", str(path),
             "--rate", str(rate), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        """End the sampling; py-spy writes its file on SIGINT."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if not self.path.exists():
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise RuntimeError(f"py-spy wrote no profile: {err.strip()[-500:]}")


def top_frames(path: Path, n: int = 10) -> dict:
    """The `n` functions with the most own and the most inclusive samples, as shares of
    all samples (line numbers folded: one entry per function)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        m = _LINE.match(line.strip())
        if not m:
            continue
        count = int(m["n"])
        frames = [_LINENO.sub(")", f) for f in m["stack"].split(";")]
        samples += count
        own[frames[-1]] += count
        for f in set(frames):
            inclusive[f] += count

    def rank(counter: Counter[str]) -> list[dict]:
        return [{"frame": f, "self": round(own[f] / samples, 4),
                 "total": round(inclusive[f] / samples, 4)}
                for f, _ in counter.most_common(n)]

    return {"samples": samples, "self": rank(own) if samples else [],
            "total": rank(inclusive) if samples else []}
