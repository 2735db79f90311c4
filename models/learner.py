"""Serving and training in one process: what one micro-batch does to the model, end to end.

    observe   each event with a target becomes a (history -> item) pair whose history holds
              only that user's *earlier* events (no leakage), and a training example; then
              the event is appended to the user's history (models/examples.py)
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

from models.config import LearnerConfig
from models.examples import Interaction, Pending, observe
from models.model import SharedModel
from models.personal import PersonalStep
from models.trainer import Trainer
from models.user_state import ExcludeSeen, UserState


@dataclass
class BatchResult:
    loss: float  # weighted mean pair loss of the trainer's last step (nan: nothing learned)
    n_pairs: int
    users: list[str] = field(default_factory=list)  # users touched, first-seen order
    alphas: dict[str, float] = field(default_factory=dict)  # α per user after the step


class OnlineLearner:
    """A serving step and the trainer over one shared model, in one process."""

    def __init__(self, config: LearnerConfig | None = None, text_dim: int = 384,
                 capacity: int = 1024, exclude_seen: ExcludeSeen = "all"):
        self.cfg = config or LearnerConfig()
        self.exclude_seen = exclude_seen  # the serving rule the examples follow
        self.model = SharedModel(self.cfg, text_dim, capacity)
        self.trainer = Trainer(self.model)
        self.personal = PersonalStep.from_config(self.cfg)
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
        return observe(self.model, numbered, states, self.exclude_seen)

    def train(self, pend: Pending) -> BatchResult:
        """The per-user step (with the model as it is), then the trainer's steps."""
        states = list(pend.user_states.values())
        self.personal.step(self.model, pend.hists, pend.targets, pend.weights, pend.owners,
                           states, pend.scenarios, pend.seen_rows(self.model.catalog))
        loss = self.trainer.train(pend.examples).loss
        return BatchResult(loss, len(pend.targets), list(pend.users),
                           self.personal.step_sizes(pend.user_states))

    def learn_batch(self, events: Sequence[Interaction],
                    states: Mapping[str, UserState]) -> BatchResult:
        """Learn from one micro-batch (events in stream order); mutates `states`."""
        return self.train(self.observe(events, states))


def _at(ev: Interaction, offset: int) -> Interaction:
    return Interaction(ev.user_id, ev.item_id, ev.event_type, ev.ts, ev.value, ev.text_vec,
                       ev.scenario, ev.partition, offset)
