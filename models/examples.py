"""Training examples: what a serving worker hands the trainer for each event it applied,
and `observe`, which cuts them from a batch of events.

One example per event with a target item (a search is an input, never a target): the
user's history just before the event, exactly as the serving step encoded it (item ids,
event types, timestamps, search texts), the target, its weight, the user's per-user
parameters as they were before this batch's per-user step, and the event's source position
(partition, offset). The source position is the example's identity: the trainer skips one
it has already trained, which makes training exactly-once although examples are published
at least once (a replayed batch publishes its examples again).

Where serving never shows a user an item they interacted with (`exclude_seen: all`), the
example also carries the user's seen set as it was (its item keys, while the set is exact:
up to 1,024 items, models/user_state.py), so that the loss keeps every such item out of the
negatives, not only the ones in the history.

Ids, not rows: rows are local to each process (models/items.py).

>>> from models.user_state import UserState
>>> st = UserState(); st.append("a", 1, 1_000, None, 50)
>>> ex = TrainingExample.cut(st, "u1", "b", "view", 1.0, 2_000, "default", 0, 7)
>>> back = TrainingExample.from_bytes(ex.to_bytes())
>>> back.items, back.target, back.source
(['a'], 'b', (0, 7))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import orjson

from models.config import EVENT_TYPE_IDS, TEXT_ONLY_TYPES, LearnerConfig
from models.items import ItemRows
from models.user_state import ExcludeSeen, History, UserState, b64, from_b64, unb64

if TYPE_CHECKING:
    from models.model import SharedModel

#: 1: history, target, weight, scenario, residual, source. 2: + the seen keys ("k").
FORMAT_VERSION = 2
_F32 = np.dtype("<f4")
_I64 = np.dtype("<i8")


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
    seen: np.ndarray | None = None  # the user's seen item keys before the event, sorted

    @classmethod
    def cut(cls, st: UserState, user_id: str, target: str, event_type: str, weight: float,
            event_ts: int, scenario: str, partition: int, offset: int,
            carry_seen: bool = False) -> TrainingExample:
        """The example of an event, from its user's state just before it is applied;
        `carry_seen`: with the user's seen keys (unless the set is a Bloom filter)."""
        return cls(user_id, list(st.items), list(st.types), list(st.ts), list(st.texts),
                   target, event_type, weight, event_ts, scenario,
                   None if st.residual is None else st.residual.copy(), partition, offset,
                   st.seen.keys.copy() if carry_seen and st.seen.exact else None)

    @property
    def source(self) -> tuple[int, int]:
        return self.partition, self.offset

    def history(self, catalog: ItemRows) -> History:
        """The history as rows of `catalog` (unknown items read as padding)."""
        return History(catalog.rows_of(self.items), self.types, self.ts,
                       [(k, unb64(t)) for k, t in enumerate(self.texts) if t is not None])

    def seen_rows(self, catalog: ItemRows) -> np.ndarray:
        """Rows of `catalog` of the carried seen items it knows (none if not carried)."""
        if self.seen is None:
            return np.zeros(0, np.int64)
        rows = catalog.rows_of_keys(self.seen)
        return rows[rows > 0]

    def to_bytes(self) -> bytes:
        return orjson.dumps({
            "v": FORMAT_VERSION, "u": self.user_id, "i": self.items, "t": self.types,
            "ts": self.ts, "x": self.texts, "y": self.target, "e": self.event_type,
            "w": self.weight, "at": self.event_ts, "s": self.scenario,
            "r": None if self.residual is None else b64(self.residual, _F32),
            "p": self.partition, "o": self.offset,
            "k": None if self.seen is None else b64(self.seen, _I64)})

    @classmethod
    def from_bytes(cls, raw: bytes) -> TrainingExample:
        d = orjson.loads(raw)
        if d.get("v") not in (1, FORMAT_VERSION):
            raise ValueError(f"training example format {d.get('v')!r}, expected "
                             f"{FORMAT_VERSION}")
        return cls(d["u"], d["i"], d["t"], d["ts"], d["x"], d["y"], d["e"], d["w"], d["at"],
                   d["s"], from_b64(d["r"], _F32), d["p"], d["o"], from_b64(d.get("k"), _I64))


@dataclass(frozen=True)
class Interaction:
    """One validated event, as the learner sees it (the agent converts BehaviorEvent).
    (partition, offset) is its source position: the identity of its training example."""

    user_id: str
    item_id: str | None
    event_type: str
    ts: int
    value: float | None = None
    text_vec: np.ndarray | None = None
    scenario: str = "default"
    partition: int = 0
    offset: int = -1


@dataclass
class Pending:
    """A batch observed (histories appended, pairs cut) but not yet learned from."""

    states: Mapping[str, UserState]
    users: dict[str, int] = field(default_factory=dict)  # user -> owner index, first-seen order
    before: list[History] = field(default_factory=list)  # per event: the history just before it
    hists: list[History] = field(default_factory=list)  # per pair
    targets: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)
    scenarios: list[str] = field(default_factory=list)  # per pair
    examples: list[TrainingExample] = field(default_factory=list)  # per pair

    def seen_rows(self, catalog: ItemRows) -> list[np.ndarray]:
        """Per pair, the rows its user had seen (as its example carries them)."""
        return [ex.seen_rows(catalog) for ex in self.examples]

    @property
    def user_states(self) -> dict[str, UserState]:
        """The batch's users' states, in first-seen order (an owner index's position)."""
        return {u: self.states[u] for u in self.users}


def event_weight(cfg: LearnerConfig, event_type: str) -> float:
    """Loss weight of an event type (negative: a dislike pushes its item down)."""
    if event_type == "dislike":
        return -cfg.dislike_weight
    return cfg.event_weights.get(event_type, 1.0)


def observe(model: SharedModel, events: Sequence[Interaction],
            states: Mapping[str, UserState], exclude_seen: ExcludeSeen = "all") -> Pending:
    """Cut each event's (history -> item) pair and example, then append the event to its
    user's history. `states` must hold a UserState for every user of the batch. Where
    serving excludes every seen item (`exclude_seen`) and the loss leaves such items out
    (`exclude_history_negatives`), the examples carry the users' seen sets."""
    pend, cfg = Pending(states), model.cfg
    carry_seen = exclude_seen == "all" and cfg.exclude_history_negatives
    for ev in events:
        st = states[ev.user_id]
        owner = pend.users.setdefault(ev.user_id, len(pend.users))
        snap = st.history(model.catalog)
        pend.before.append(snap)
        if ev.event_type == "request":  # asks for a recommendation: no pair, no history
            continue
        target = None if ev.event_type in TEXT_ONLY_TYPES else model.catalog.live_row(ev.item_id)
        if target is not None:
            weight = event_weight(cfg, ev.event_type)
            pend.hists.append(snap)
            pend.targets.append(target)
            pend.weights.append(weight)
            pend.owners.append(owner)
            pend.scenarios.append(ev.scenario)
            pend.examples.append(TrainingExample.cut(
                st, ev.user_id, ev.item_id, ev.event_type, weight, ev.ts, ev.scenario,
                ev.partition, ev.offset, carry_seen))
        st.append(ev.item_id, EVENT_TYPE_IDS[ev.event_type], ev.ts, ev.text_vec,
                  cfg.history_len, model.catalog.key_of(ev.item_id))
    return pend
