"""Training examples: what a serving worker hands the trainer for each event it applied.

One example per event with a target item (a search is an input, never a target): the
user's history just before the event, exactly as the serving step encoded it (item ids,
event types, timestamps, search texts), the target, its weight, the user's per-user
parameters as they were before this batch's per-user step, and the event's source position
(partition, offset). The source position is the example's identity: the trainer skips one
it has already trained, which makes training exactly-once although examples are published
at least once (a replayed batch publishes its examples again).

Ids, not rows: rows are local to each process (models/items.py).

>>> from models.user_state import UserState
>>> st = UserState(); st.append("a", 1, 1_000, None, 50)
>>> ex = TrainingExample.cut(st, "u1", "b", "view", 1.0, 2_000, "default", 0, 7)
>>> back = TrainingExample.from_bytes(ex.to_bytes())
>>> back.items, back.target, back.source
(['a'], 'b', (0, 7))
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import orjson

from models.items import ItemRows
from models.sequences import History
from models.user_state import UserState, unb64

FORMAT_VERSION = 1
_F32 = np.dtype("<f4")


@dataclass(frozen=True)
class TrainingExample:
    user_id: str
    items: list[str | None]  # the history before the event, oldest first
    types: list[int]
    ts: list[int]
    texts: list[str | None]  # float16 text vectors of search events (UserState's encoding)
    target: str
    event_type: str
    weight: float  # > 0 a positive, < 0 a dislike
    event_ts: int
    scenario: str
    residual: np.ndarray | None  # p_u then θ_u, before this batch's per-user step
    partition: int  # source partition and offset: the example's identity
    offset: int

    @classmethod
    def cut(cls, st: UserState, user_id: str, target: str, event_type: str, weight: float,
            event_ts: int, scenario: str, partition: int, offset: int) -> TrainingExample:
        """The example of an event, from its user's state just before it is applied."""
        return cls(user_id, list(st.items), list(st.types), list(st.ts), list(st.texts),
                   target, event_type, weight, event_ts, scenario,
                   None if st.residual is None else st.residual.copy(), partition, offset)

    @property
    def source(self) -> tuple[int, int]:
        return self.partition, self.offset

    def history(self, catalog: ItemRows) -> History:
        """The history as rows of `catalog` (unknown items read as padding)."""
        return History(catalog.rows_of(self.items), self.types, self.ts,
                       [(k, unb64(t)) for k, t in enumerate(self.texts) if t is not None])

    def to_bytes(self) -> bytes:
        res = None if self.residual is None else base64.b64encode(
            np.ascontiguousarray(self.residual, _F32).tobytes()).decode("ascii")
        return orjson.dumps({
            "v": FORMAT_VERSION, "u": self.user_id, "i": self.items, "t": self.types,
            "ts": self.ts, "x": self.texts, "y": self.target, "e": self.event_type,
            "w": self.weight, "at": self.event_ts, "s": self.scenario, "r": res,
            "p": self.partition, "o": self.offset})

    @classmethod
    def from_bytes(cls, raw: bytes) -> TrainingExample:
        d = orjson.loads(raw)
        if d.get("v") != FORMAT_VERSION:
            raise ValueError(f"training example format {d.get('v')!r}, expected "
                             f"{FORMAT_VERSION}")
        res = None if d["r"] is None else np.frombuffer(base64.b64decode(d["r"]), _F32).copy()
        return cls(d["u"], d["i"], d["t"], d["ts"], d["x"], d["y"], d["e"], d["w"], d["at"],
                   d["s"], res, d["p"], d["o"])
