"""Prequential (test-then-train) evaluation with full ranking over the catalog.

Protocol: events in timestamp order (stable for ties), in micro-batches. For an event (u, i)
whose user has an earlier event and whose item the serving rule would not exclude
(models/seen.py `exclusions`, `exclude_seen`: by default every item u interacted with),
every catalog item is scored for u; the excluded items are dropped; rank = #(remaining items
scoring strictly above i) + floor(#(other remaining items scoring exactly as i) / 2), so ties
do not flatter a model.
Then the model learns the batch. Within a batch, the score of an event uses the user's own
history up to (not including) that event, and shared state (parameters, co-occurrence
counts) as of the start of the batch: in the agent a user's next event arrives after the
recommendation that followed their previous one, while shared learning lags by a batch. With
batch size 1 this is plain test-then-train.
Reported: HR@10, NDCG@10, MRR, Recall@50 (one target: hit within 50), over all evaluated
events and over the last half of the stream, plus events/s of learn + score.

Every model, the streamrec learner included, implements `StreamModel`; the streamrec adapter
runs exactly the agent's learner (models/learner.py) and scorer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import xxhash

from models.config import LearnerConfig
from models.examples import TrainingExample
from models.learner import Interaction, OnlineLearner, Pending, observe, personal_step
from models.model import SharedModel
from models.seen import ExcludeSeen, Exclusion, exclusions, item_keys
from models.sequences import History
from models.serving import rank_candidates, tower_candidates
from models.trainer import Trainer
from models.user_state import UserState

Event = tuple[str, int, int]  # (user, item index in catalog order, ts ms)


class StreamModel(Protocol):
    name: str

    def step(self, batch: Sequence[Event], which: Sequence[int],
             excluded: Sequence[Exclusion] | None = None) -> np.ndarray:
        """Scores (len(which), n_items) for the events `batch[j]`, j in `which`, each with
        its user's history strictly before it and shared state from before the batch; then
        learn the batch. `excluded[k]`: what event which[k] may not be recommended (a
        serving path uses it to pick candidates; full-catalog scorers may ignore it)."""
        ...


@dataclass
class Result:
    name: str
    batch_size: int
    ranks: np.ndarray  # rank of each evaluated event (0 = top)
    positions: np.ndarray  # stream position of each evaluated event
    n_events: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    last_half: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        return {**self.metrics, "evaluated": int(len(self.ranks)),
                "events_per_s": round(self.n_events / max(self.seconds, 1e-9), 1)}


def metrics_of(ranks: np.ndarray) -> dict[str, float]:
    """HR@10, NDCG@10, MRR, Recall@50 of single-target ranks (0-based)."""
    if len(ranks) == 0:
        return {"hr@10": 0.0, "ndcg@10": 0.0, "mrr": 0.0, "recall@50": 0.0}
    r = ranks.astype(np.float64)
    return {
        "hr@10": float(np.mean(r < 10)),
        "ndcg@10": float(np.mean(np.where(r < 10, 1.0 / np.log2(r + 2), 0.0))),
        "mrr": float(np.mean(1.0 / (r + 1))),
        "recall@50": float(np.mean(r < 50)),
    }


def rank_of(scores: np.ndarray, target: int, excluded: np.ndarray | Sequence[int]) -> int:
    """Rank of `target` among the items not `excluded` (a boolean mask over the catalog, or
    item indexes), ties split in half (rounded down). Scores may be -inf (not retrieved by a
    serving path); those tie with each other."""
    keep = np.ones(len(scores), dtype=bool)
    excluded = np.asarray(excluded)
    keep[excluded if excluded.dtype == bool else excluded.astype(np.int64)] = False
    s, t = scores[keep], scores[target]
    above = int(np.count_nonzero(s > t))
    ties = int(np.count_nonzero(s == t)) - 1  # the target itself is not "other"
    return above + ties // 2


def prequential(model: StreamModel, events: Sequence[Event], batch_size: int = 64,
                on_batch: Callable[[int], None] | None = None,
                item_ids: Sequence[str] | None = None, exclude_seen: ExcludeSeen = "all",
                history_len: int = 50) -> Result:
    """Test-then-train over `events` (already in time order). What a user may not be
    recommended comes from the serving rule (models/seen.py) on a UserState kept per user,
    the same state and rule the agent uses; `item_ids` names the catalog's items (default:
    their indexes as strings)."""
    states: dict[str, UserState] = {}
    ids = list(item_ids) if item_ids is not None else None
    catalog_keys: np.ndarray | None = None
    ranks, positions = [], []
    start = time.perf_counter()
    for b in range(0, len(events), batch_size):
        batch = events[b : b + batch_size]
        which, todo, excl = [], [], []  # todo: (position, item)
        for j, (user, item, ts) in enumerate(batch):
            st = states.setdefault(user, UserState())
            item_id = ids[item] if ids is not None else str(item)
            ex = exclusions(st, exclude_seen)
            if st.n_events and not ex.contains(item_keys([item_id]))[0]:
                which.append(j)
                todo.append((b + j, item))
                excl.append(ex)
            st.append(item_id, 0, ts, None, history_len)
        scores = model.step(batch, which, excl)
        if catalog_keys is None and len(scores):
            catalog_keys = item_keys(ids if ids is not None else
                                     [str(i) for i in range(scores.shape[1])])
        for row, (pos, item), ex in zip(scores, todo, excl, strict=True):
            ranks.append(rank_of(row, item, ex.contains(catalog_keys)))
            positions.append(pos)
        if on_batch:
            on_batch(len(batch))
    res = Result(model.name, batch_size, np.array(ranks, dtype=np.int64),
                 np.array(positions, dtype=np.int64), len(events), time.perf_counter() - start)
    res.metrics = metrics_of(res.ranks)
    res.last_half = metrics_of(res.ranks[res.positions >= len(events) // 2])
    return res


def moving_ndcg(res: Result, window: int = 5000) -> tuple[np.ndarray, np.ndarray]:
    """NDCG@10 over a moving window of evaluated events, against stream position."""
    gains = np.where(res.ranks < 10, 1.0 / np.log2(res.ranks + 2.0), 0.0)
    if len(gains) < window:
        window = max(1, len(gains))
    kernel = np.ones(window) / window
    return res.positions[window - 1:], np.convolve(gains, kernel, mode="valid")


class StreamrecModel:
    """streamrec as a StreamModel: serving workers and the trainer, as deployed.

    Scores come from the serving path (models/serving.rank_candidates): the top
    `candidates` items by u·v (what the FAISS index returns; exact here) plus co-visitation
    candidates, reranked; items the path does not retrieve rank below all it does (ties
    among them split as the protocol says). `candidates=None` scores the whole catalog.

    `workers` serving shards (users hashed to shards, as Kafka partitions them) serve from a
    snapshot of the trainer's model that is refreshed every `snapshot_every` events (None:
    after every batch, the single in-process learner); each shard takes the per-user step
    for its users, and the trainer trains every example (with `trainer_ranks` > 1: that many
    ranks in lockstep, each training its share of the source partitions, as
    models/distributed.py does across processes). `independent=True` is the old deployment
    instead: each shard its own model, trained on its own users' events only."""

    def __init__(self, item_ids: Sequence[str], text_vectors: np.ndarray,
                 config: LearnerConfig | None = None, name: str = "streamrec",
                 event_type: str = "rate", candidates: int | None = 200, workers: int = 1,
                 snapshot_every: int | None = None, independent: bool = False,
                 trainer_ranks: int = 1):
        self.name = name
        self.event_type = event_type
        cfg = config or LearnerConfig()
        n = workers if independent else 1
        self.learners = [OnlineLearner(cfg, text_dim=text_vectors.shape[1]) for _ in range(n)]
        for learner in self.learners:
            learner.upsert_items(list(item_ids), text_vectors)
        self.workers, self.independent = workers, independent
        self.ranks = _ranks(trainer_ranks, cfg, item_ids, text_vectors) if trainer_ranks > 1 \
            else [learner.trainer for learner in self.learners[:1]]
        self.snapshot_every, self._since = snapshot_every, 0
        self.serving = self.ranks[0].model  # what the shards serve from
        self.personal = [personal_step(cfg) for _ in range(workers)]
        self.rows = self.serving.catalog.add(list(item_ids))
        self.col_of = np.full(int(self.rows.max(initial=0)) + 1, -1, dtype=np.int64)
        self.col_of[self.rows] = np.arange(len(self.rows))  # model row -> output column
        self.item_ids = list(item_ids)
        self.candidates = candidates
        self.states: dict[str, UserState] = {}
        self._offset = 0

    def _shard(self, user: str, n: int | None = None) -> int:
        return xxhash.xxh64_intdigest(user.encode()) % (n or self.workers)

    def step(self, batch: Sequence[Event], which: Sequence[int],
             excluded: Sequence[Exclusion] | None = None) -> np.ndarray:
        shards = [self._shard(u) for u, _, _ in batch]
        inters = []
        for u, i, ts in batch:
            self.states.setdefault(u, UserState())
            self._offset += 1
            inters.append(Interaction(u, self.item_ids[i], self.event_type, ts,
                                      partition=self._shard(u, PARTITIONS),
                                      offset=self._offset))
        pend = observe(self.serving, inters, self.states)  # residuals untouched until learned
        hists = [pend.before[j] for j in which]
        if excluded is None:  # no rule given: the user's history before the event
            excluded = [Exclusion(recent=self.serving.catalog.keys[np.asarray(h.rows, np.int64)])
                        for h in hists]
        scores = np.zeros((len(which), len(self.rows)))
        for k in range(len(self.learners)):
            mine = [p for p, j in enumerate(which) if not self.independent or shards[j] == k]
            if mine:
                model = self.learners[k].model if self.independent else self.serving
                scores[mine] = self._serve(model, [hists[p] for p in mine],
                                           [self.states[batch[which[p]][0]].residual
                                            for p in mine], [excluded[p] for p in mine])
        self._learn(pend, shards)
        return scores

    def _learn(self, pend: Pending, shards: list[int]) -> None:
        """Each shard's per-user step on its pairs, then the trainer(s) on the examples."""
        owner_shard = {pend.users[ex.user_id]: self._shard(ex.user_id) for ex in pend.examples}
        states = [pend.states[u] for u in pend.users]
        for k, personal in enumerate(self.personal):
            mine = [p for p, o in enumerate(pend.owners) if owner_shard[o] == k]
            if mine:
                model = self.learners[k].model if self.independent else self.serving
                personal.step(model, [pend.hists[p] for p in mine],
                              [pend.targets[p] for p in mine], [pend.weights[p] for p in mine],
                              [pend.owners[p] for p in mine], states)
        if self.independent:
            for k, learner in enumerate(self.learners):
                learner.trainer.train([ex for ex in pend.examples
                                       if self._shard(ex.user_id) == k])
            return  # each shard serves its own live model
        _train_ranks(self.ranks, pend.examples)
        self._since += len(shards)
        if self.snapshot_every is not None and self._since >= self.snapshot_every:
            self.serving, self._since = self.ranks[0].model.fork(), 0

    def _serve(self, model: SharedModel, hists: list[History], residuals: list,
               excluded: Sequence[Exclusion]) -> np.ndarray:
        U = model.history_vectors(hists, residuals)
        if self.candidates is None or model.head is None and \
                self.candidates >= len(self.rows):
            return model.blend(hists, U, self.rows, residuals)
        _, V = model.item_vectors(self.rows)
        top = np.argsort(-(U @ V.T), axis=1, kind="stable")  # the exact index's order
        ok = tower_candidates(model.catalog.keys[self.rows[top]], excluded, self.candidates)
        tower_rows = [self.rows[t[m]] for t, m in zip(top, ok, strict=True)]
        ranked = rank_candidates(model, hists, U, tower_rows, excluded, residuals)
        out = np.full((len(hists), len(self.rows)), -np.inf)
        for p, (rows, scores) in enumerate(ranked):
            out[p, self.col_of[rows]] = scores
        return out


PARTITIONS = 8  # source partitions the evaluator numbers examples by (users hashed)


def _ranks(k: int, cfg: LearnerConfig, item_ids: Sequence[str], vectors: np.ndarray
           ) -> list[Trainer]:
    """K trainer ranks over identical model copies, synchronised as threads."""
    from models.distributed import ThreadGroup

    group = ThreadGroup(k)
    ranks = []
    for r in range(k):
        model = SharedModel(cfg, vectors.shape[1])
        trainer = Trainer(model, group.sync(r))
        trainer.upsert_items(list(item_ids), vectors)
        ranks.append(trainer)
    return ranks


def _train_ranks(ranks: list[Trainer], examples: Sequence[TrainingExample]) -> None:
    """Each rank its share of the examples (by source partition), all in lockstep."""
    k = len(ranks)
    if k == 1:
        ranks[0].train(examples)
        return
    threads = [threading.Thread(target=t.train, args=(
        [ex for ex in examples if ex.partition % k == r],)) for r, t in enumerate(ranks)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
