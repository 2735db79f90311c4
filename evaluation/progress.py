"""Progress bars that also show progress in a log file.

rich's `Progress` redraws in place on a terminal, but on anything else (a job piped to a
file, `nohup`, CI) its live display prints nothing until it stops, so an hour-long benchmark
looks dead until it ends. This `Progress` is rich's, plus: off a terminal it prints one plain
line per unfinished task every `every` seconds. It lives here, beside the evaluator, because
this is the lowest package the CLI, the evaluator and the benchmarks all import (`models/`
stays free of display code).

>>> import io, rich.console
>>> out = io.StringIO()
>>> with Progress(console=rich.console.Console(file=out, width=80), every=60) as bar:
...     task = bar.add_task("replay", total=4, info="200/s")
...     bar.advance(task, 1)
...     bar.log_tasks()
>>> out.getvalue().splitlines()[0]
'replay: 1/4 (25%) 200/s'
"""

from __future__ import annotations

import threading
from typing import Any

from rich import progress as rich_progress


class Progress(rich_progress.Progress):
    def __init__(self, *columns: Any, every: float = 30.0, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self.every = every
        self._done = threading.Event()
        self._ticker: threading.Thread | None = None

    def start(self) -> None:
        super().start()
        if not self.disable and not self.console.is_terminal:
            self._done.clear()
            self._ticker = threading.Thread(target=self._tick, name="progress-log", daemon=True)
            self._ticker.start()

    def stop(self) -> None:
        self._done.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        super().stop()

    def _tick(self) -> None:
        while not self._done.wait(self.every):
            self.log_tasks()

    def log_tasks(self) -> None:
        """One line per unfinished task: description, count and share (if it has a total),
        its text fields."""
        for task in self.tasks:
            if task.finished:
                continue
            count = (f"{task.completed:g}/{task.total:g} ({task.percentage:.0f}%)"
                     if task.total else "")
            words = [count, *(str(v) for v in task.fields.values())]
            self.console.print(f"{task.description}: " + " ".join(w for w in words if w),
                               highlight=False, markup=False, soft_wrap=True)
