"""Serving and training in one process: what one micro-batch does to the model, end to end.

    observe   each event with a target becomes a (history -> item) pair whose history holds
              only that user's *earlier* events (no leakage), and a training example; then
              the event is appended to the user's history
    train     the per-user step moves each user's own parameters (models/personal.py), then
              the trainer steps the shared model on the examples (models/trainer.py)

A deployment splits this: serving workers observe and take the per-user step, and publish
the examples; one trainer process trains and publishes snapshots of the shared model. Here
the trainer's model *is* the serving model (a snapshot after every batch), which makes this
the reference the split deployment is measured against (`streamrec eval --workers N`), and
the learner the evaluator, the benchmarks and the tests run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from models.config import EVENT_TYPE_IDS, TEXT_ONLY_TYPES, LearnerConfig
from models.examples import TrainingExample
from models.model import SharedModel
from models.personal import PersonalStep
from models.sequences import History
from models.trainer import Trainer
from models.user_state import UserState


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


@dataclass
class BatchResult:
    loss: float  # weighted mean pair loss of the trainer's last step (nan: nothing learned)
    n_pairs: int
    users: list[str] = field(default_factory=list)  # users touched, first-seen order
    alphas: dict[str, float] = field(default_factory=dict)  # α per user after the step


def event_weight(cfg: LearnerConfig, event_type: str) -> float:
    """Loss weight of an event type (negative: a dislike pushes its item down)."""
    if event_type == "dislike":
        return -cfg.dislike_weight
    return cfg.event_weights.get(event_type, 1.0)


def observe(model: SharedModel, events: Sequence[Interaction],
            states: Mapping[str, UserState]) -> Pending:
    """Cut each event's (history -> item) pair and example, then append the event to its
    user's history. `states` must hold a UserState for every user of the batch."""
    pend, cfg = Pending(states), model.cfg
    for ev in events:
        st = states[ev.user_id]
        owner = pend.users.setdefault(ev.user_id, len(pend.users))
        snap = model.history(st)
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
                ev.partition, ev.offset))
        st.append(ev.item_id, EVENT_TYPE_IDS[ev.event_type], ev.ts, ev.text_vec,
                  cfg.history_len)
    return pend


def personal_step(cfg: LearnerConfig) -> PersonalStep:
    """The per-user step the settings configure."""
    budget = cfg.max_pairs_per_step * cfg.max_steps_per_batch
    return PersonalStep(cfg.lr_rule, budget, cfg.seed)


def alphas(cfg: LearnerConfig, pend: Pending) -> dict[str, float]:
    return {u: pend.states[u].rule.step_size(cfg.lr_rule.alpha0) for u in pend.users}


class OnlineLearner:
    """A serving step and the trainer over one shared model, in one process."""

    def __init__(self, config: LearnerConfig | None = None, text_dim: int = 384,
                 capacity: int = 1024):
        self.cfg = config or LearnerConfig()
        self.model = SharedModel(self.cfg, text_dim, capacity)
        self.trainer = Trainer(self.model)
        self.personal = personal_step(self.cfg)
        self._offset = 0  # source positions of this process's examples (no Kafka here)

    def upsert_items(self, item_ids: Sequence[str], text_vectors: np.ndarray,
                     scenarios: Sequence[Sequence[str] | None] | None = None) -> None:
        self.trainer.upsert_items(item_ids, text_vectors, scenarios)

    def delete_items(self, item_ids: Sequence[str]) -> None:
        self.model.delete_items(item_ids)

    def observe(self, events: Sequence[Interaction], states: Mapping[str, UserState]
                ) -> Pending:
        numbered = []
        self._offset = max(self._offset, self.trainer.progress.get(0, -1))  # (restored)
        for ev in events:  # each example its own source position, as Kafka would give
            self._offset += 1
            numbered.append(ev if ev.offset >= 0 else _at(ev, self._offset))
        return observe(self.model, numbered, states)

    def train(self, pend: Pending) -> BatchResult:
        """The per-user step (with the model as it is), then the trainer's steps."""
        states = [pend.states[u] for u in pend.users]
        self.personal.step(self.model, pend.hists, pend.targets, pend.weights, pend.owners,
                           states, pend.scenarios)
        loss = self.trainer.train(pend.examples).loss
        return BatchResult(loss, len(pend.targets), list(pend.users), alphas(self.cfg, pend))

    def learn_batch(self, events: Sequence[Interaction],
                    states: Mapping[str, UserState]) -> BatchResult:
        """Learn from one micro-batch (events in stream order); mutates `states`."""
        return self.train(self.observe(events, states))


def _at(ev: Interaction, offset: int) -> Interaction:
    return Interaction(ev.user_id, ev.item_id, ev.event_type, ev.ts, ev.value, ev.text_vec,
                       ev.scenario, ev.partition, offset)
