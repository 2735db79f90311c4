"""Per-scenario parameters: one shared model, adapted online to each scenario (page, domain).

A scenario s has its own (q_s, φ_s), the same shape as a user's own (p_u, θ_u)
(models/personal.py), and they add up:

    u    = f(history) + p_u + q_s                         (the index query)
    w_us = w + θ_u + φ_s                                  (the ranker's blend weights)

Both start at zero, so a scenario seen for the first time is served by the shared model at
once and moves away from it only as far as its own events pull it. The trainer owns them
(a scenario spans every serving worker) and steps each by the scenario's own learning-rate
rule (models/lr_rules.py), as the per-user step does for users; snapshots carry them to the
workers with the names (`names`, row order = the trainer's).

Rows are named in the order the trainer first trains a scenario's example, up to
`capacity`; row 0 is "no scenario parameters" (unknown here, or beyond the bound), always
zero.

>>> table = ScenarioTable(capacity=2, width=3)
>>> table.register(["books", "games", "music"])         # the third is beyond the bound
['books', 'games']
>>> table.rows_of(["games", "unknown"]).tolist()
[2, 0]
>>> table.values(["games"]).tolist()                    # a new scenario starts at zero
[[0.0, 0.0, 0.0]]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


class ScenarioTable(nn.Module):
    def __init__(self, capacity: int, width: int):
        super().__init__()
        self.capacity = capacity
        self.P = nn.Parameter(torch.zeros(capacity + 1, width))  # row s: (q_s, φ_s)
        self.names: list[str] = [""]
        self.rows: dict[str, int] = {}

    @property
    def full(self) -> bool:
        return len(self.names) > self.capacity

    def register(self, names: Sequence[str]) -> list[str]:
        """Give new `names` the next rows while there is room; returns those registered."""
        added = []
        for name in names:
            if name not in self.rows and not self.full:
                self.rows[name] = len(self.names)
                self.names.append(name)
                added.append(name)
        return added

    @torch.no_grad()
    def load(self, values: torch.Tensor | None, names: Sequence[str]) -> None:
        """Take another process's rows and values (a snapshot's or a checkpoint's; None: a
        file from before scenarios). Rows beyond this table's bound are dropped."""
        self.names = [""] + (list(names)[: self.capacity] if values is not None else [])
        self.rows = {n: r for r, n in enumerate(self.names) if r}
        self.P.zero_()
        if values is not None:
            n = min(len(values), len(self.names))
            self.P[:n] = values[:n].to(self.P.device)

    def rows_of(self, names: Sequence[str]) -> np.ndarray:
        return np.fromiter((self.rows.get(n, 0) for n in names), np.int64, len(names))

    def params(self, names: Sequence[str]) -> torch.Tensor:
        """(n, width) parameters of each name's scenario (differentiable, for training)."""
        return self.P[torch.as_tensor(self.rows_of(names), device=self.P.device)]

    @torch.no_grad()
    def values(self, names: Sequence[str]) -> np.ndarray:
        return self.params(names).cpu().numpy()
