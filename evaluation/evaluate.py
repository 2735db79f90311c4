"""Prequential (test-then-train) evaluation with full ranking over the catalog.

Protocol: events in timestamp order (stable for ties), in micro-batches. For an event (u, i)
whose user has an earlier event and whose item the serving rule would not exclude
(models/user_state.py `exclusions`, `exclude_seen`: by default every item u interacted with),
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

Scenarios: an event may carry a scenario (the page or domain it happened in: a 4th field),
and an item may list the scenarios where it may be shown (`item_scenarios`; none: all).
An event is then ranked within its scenario: items it does not allow are dropped from the
ranking as excluded items are, and an event whose own item is not allowed there is not
evaluated (no model could serve it). With more than one scenario, the result also has
NDCG@10 / HR@10 / n per scenario and the mean NDCG@10 of the 10 smallest scenarios (by
evaluated events), where transfer between scenarios should show most.

By day (`by_day=True`, for data whose timestamps only say the day, like Ciao): a batch is
one day, and every event of it is scored against the state before that day, its user's
history and exclusions included (the order within a day is unknown, so it must not help);
a (user, item) pair is evaluated at most once a day. Then the model learns the day.

Every model, the streamrec learner included, implements `StreamModel`; the streamrec adapter
runs exactly the agent's learner (models/learner.py) and scorer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import xxhash

from evaluation.baselines import Event, NamedItems, StreamModel
from models.candidates import TowerCandidates, tower_of
from models.config import LearnerConfig
from models.examples import Interaction, Pending, TrainingExample, observe
from models.items import KeyIndex
from models.learner import OnlineLearner
from models.model import SharedModel
from models.personal import PersonalStep
from models.serving import rank_candidates
from models.trainer import Trainer
from models.user_state import ExcludeSeen, Exclusion, History, UserState, exclusions, item_keys

DAY_MS = 86_400_000
SMALL_SCENARIOS = 10  # the report's "small scenarios": this many, fewest evaluated events


def scenario_of(event: Event) -> str:
    """An event's scenario: its 4th field, "default" for a plain (user, item, ts) triple."""
    return event[3] if len(event) > 3 else "default"


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
    scenarios: np.ndarray = field(default_factory=lambda: np.zeros(0, object))  # per evaluated
    by_scenario: dict[str, dict[str, float]] = field(default_factory=dict)  # >1 scenario only
    small_ndcg: float | None = None  # mean NDCG@10 of the SMALL_SCENARIOS smallest scenarios
    # per evaluated event: the target had a finite score (was among what the model retrieved),
    # and how many rankable items did
    retrieved: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    scored: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def summary(self) -> dict[str, float]:
        out = {**self.metrics, "evaluated": int(len(self.ranks)),
               "events_per_s": round(self.n_events / max(self.seconds, 1e-9), 1)}
        if len(self.retrieved):  # a candidate set's recall, and its mean size
            out["candidate_recall"] = float(np.mean(self.retrieved))
            out["candidates"] = float(np.mean(self.scored))
        if self.small_ndcg is not None:
            out[f"small{SMALL_SCENARIOS}_ndcg@10"] = self.small_ndcg
        return out


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


def scenario_report(ranks: np.ndarray, scenarios: np.ndarray, small: int = SMALL_SCENARIOS
                    ) -> tuple[dict[str, dict[str, float]], float | None]:
    """Per scenario {ndcg@10, hr@10, n} of the evaluated events, and the mean NDCG@10 over
    the `small` scenarios with the fewest evaluated events (ties by name; only scenarios with
    at least one). The set is the same for every model: which events are evaluated does not
    depend on the model. Empty and None when the stream has a single scenario."""
    names = sorted(set(scenarios.tolist()))
    if len(names) < 2:
        return {}, None
    out = {}
    for name in names:
        m = metrics_of(ranks[scenarios == name])
        out[name] = {"ndcg@10": m["ndcg@10"], "hr@10": m["hr@10"],
                     "n": int(np.count_nonzero(scenarios == name))}
    smallest = sorted(names, key=lambda n: (out[n]["n"], n))[:small]
    return out, float(np.mean([out[n]["ndcg@10"] for n in smallest]))


def rank_of(scores: np.ndarray, target: int, excluded: np.ndarray | Sequence[int]) -> int:
    """Rank of `target` among the items not `excluded` (a boolean mask over the catalog, or
    item indexes), ties split in half (rounded down). Scores may be -inf (not retrieved by a
    serving path); those tie with each other. NaN counts as -inf: compared as it is, a NaN
    target would be above nothing and rank first, flattering a broken model."""
    return ranked(scores, target, excluded)[0]


def ranked(scores: np.ndarray, target: int, excluded: np.ndarray | Sequence[int]
           ) -> tuple[int, int]:
    """`rank_of`, and how many rankable items (the target among them) score above -inf:
    the size of what a serving path retrieved, the whole rankable catalog for a full
    scorer."""
    keep = np.ones(len(scores), dtype=bool)
    excluded = np.asarray(excluded)
    keep[excluded if excluded.dtype == bool else excluded.astype(np.int64)] = False
    scores = np.where(np.isnan(scores), -np.inf, scores)
    s, t = scores[keep], scores[target]
    above = int(np.count_nonzero(s > t))
    ties = int(np.count_nonzero(s == t)) - 1  # the target itself is not "other"
    return above + ties // 2, int(np.count_nonzero(s > -np.inf))


class Allowed:
    """Which catalog items each scenario may show: an item's `scenarios` list, or every
    scenario when it has none (the catalog's rule, models/items.py). Masks are cached."""

    def __init__(self, item_scenarios: Sequence[Sequence[str] | None] | None):
        self.where = [None if s is None else frozenset(s) for s in item_scenarios or []]
        self.restricted = any(w is not None for w in self.where)
        self._masks: dict[str, np.ndarray] = {}

    def __call__(self, scenario: str) -> np.ndarray | None:
        """Bool mask over items (None: every item is allowed everywhere)."""
        if not self.restricted:
            return None
        mask = self._masks.get(scenario)
        if mask is None:
            mask = np.array([w is None or scenario in w for w in self.where], dtype=bool)
            self._masks[scenario] = mask
        return mask


def best_first(scores: np.ndarray, m: int) -> list[np.ndarray]:
    """Per row, the columns of its `m` largest scores, best first, ties in column order,
    and any further columns tied with the m-th: a prefix of the row's stable descending
    argsort (so the same candidates), found by partition in O(columns), not a sort.

    >>> [c.tolist() for c in best_first(np.array([[1.0, 3, 2, 3], [0, 0, 5, 0]]), 2)]
    [[1, 3], [2, 0, 1, 3]]
    """
    neg = -scores
    if m >= scores.shape[1]:
        return list(np.argsort(neg, axis=1, kind="stable"))
    kth = np.partition(neg, m - 1, axis=1)[:, m - 1 : m]
    out = []
    for row, bound in zip(neg, kth[:, 0], strict=True):
        cols = np.flatnonzero(row <= bound)
        out.append(cols[np.argsort(row[cols], kind="stable")])
    return out


def batches(events: Sequence[Event], batch_size: int, by_day: bool) -> list[tuple[int, int]]:
    """[start, end) of each batch: `batch_size` events, or (by_day) all events of one
    UTC day (ts // 86,400,000 ms) however many, so none of a day is learned before all of
    that day is scored."""
    if not by_day:
        return [(b, min(b + batch_size, len(events))) for b in range(0, len(events), batch_size)]
    days = np.array([e[2] // DAY_MS for e in events], dtype=np.int64)
    cuts = [0, *(np.flatnonzero(np.diff(days)) + 1).tolist(), len(events)]
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


@dataclass
class _Protocol:
    """What the evaluator keeps between batches: each user's serving state (for the seen
    rule) and what is needed to rank."""

    ids: list[str] | None
    exclude_seen: ExcludeSeen
    history_len: int
    allowed: Allowed
    by_day: bool
    states: dict[str, UserState] = field(default_factory=dict)

    def item_id(self, item: int) -> str:
        return self.ids[item] if self.ids is not None else str(item)

    def select(self, batch: Sequence[Event]) -> tuple[list[int], list[Exclusion]]:
        """Which events of the batch are evaluated, and what each may not be recommended:
        a returning user, an item the serving rule does not exclude and the scenario allows.
        By day: everything as of the day's start, and a (user, item) once per day."""
        which, excl, done = [], [], set()
        pending: list[tuple[UserState, str, int]] = []
        for j, event in enumerate(batch):
            user, item, ts = event[0], event[1], event[2]
            st = self.states.setdefault(user, UserState())
            item_id = self.item_id(item)
            ex = exclusions(st, self.exclude_seen)
            mask = self.allowed(scenario_of(event))
            if st.n_events and not ex.contains(item_keys([item_id]))[0] and \
                    (mask is None or mask[item]) and (user, item) not in done:
                which.append(j)
                excl.append(ex)
                if self.by_day:
                    done.add((user, item))
            pending.append((st, item_id, ts))
            if not self.by_day:
                self._append(pending.pop())
        for p in pending:
            self._append(p)
        return which, excl

    def _append(self, p: tuple[UserState, str, int]) -> None:
        st, item_id, ts = p
        st.append(item_id, 0, ts, None, self.history_len)


def prequential(model: StreamModel, events: Sequence[Event], batch_size: int = 64,
                on_batch: Callable[[int], None] | None = None,
                item_ids: Sequence[str] | None = None, exclude_seen: ExcludeSeen = "all",
                history_len: int = 50,
                item_scenarios: Sequence[Sequence[str] | None] | None = None,
                by_day: bool = False) -> Result:
    """Test-then-train over `events` (already in time order). What a user may not be
    recommended comes from the serving rule (models/user_state.py) on a UserState kept per user,
    the same state and rule the agent uses; `item_ids` names the catalog's items (default:
    the model's own names if it is `NamedItems`, as StreamrecModel is, else their indexes as
    strings: a model's exclusions only match the protocol's under the same names).
    `item_scenarios[i]`: where item i may be shown (None: every scenario); an event is
    ranked among the items its scenario allows. `by_day`: a batch is one day (see
    `batches`) and its events are all scored against the state before it."""
    if item_ids is None and isinstance(model, NamedItems):
        item_ids = model.item_ids
    proto = _Protocol(list(item_ids) if item_ids is not None else None, exclude_seen,
                      history_len, Allowed(item_scenarios), by_day)
    catalog: KeyIndex | None = None
    ranks, positions, scens, scored = [], [], [], []
    kw = {"own_history": False} if by_day else {}
    start = time.perf_counter()
    for b, e in batches(events, batch_size, by_day):
        batch = events[b:e]
        which, excl = proto.select(batch)
        scores = model.step(batch, which, excl, **kw)
        if catalog is None and len(scores):
            catalog = KeyIndex(item_keys([proto.item_id(i) for i in range(scores.shape[1])]))
        for row, j, ex in zip(scores, which, excl, strict=True):
            drop = ex.mask(catalog)
            mask = proto.allowed(scenario_of(batch[j]))
            rank, n = ranked(row, batch[j][1], drop if mask is None else drop | ~mask)
            ranks.append(rank)
            scored.append((n, np.isfinite(row[batch[j][1]])))
            positions.append(b + j)
            scens.append(scenario_of(batch[j]))
        if on_batch:
            on_batch(len(batch))
    return _result(model.name, batch_size, ranks, positions, scens, scored, len(events),
                   time.perf_counter() - start)


def _result(name: str, batch_size: int, ranks: list[int], positions: list[int],
            scens: list[str], scored: list[tuple[int, bool]], n_events: int,
            seconds: float) -> Result:
    res = Result(name, batch_size, np.array(ranks, dtype=np.int64),
                 np.array(positions, dtype=np.int64), n_events, seconds,
                 scenarios=np.array(scens, dtype=object),
                 retrieved=np.array([r for _, r in scored], dtype=bool),
                 scored=np.array([n for n, _ in scored], dtype=np.int64))
    res.metrics = metrics_of(res.ranks)
    res.last_half = metrics_of(res.ranks[res.positions >= n_events // 2])
    res.by_scenario, res.small_ndcg = scenario_report(res.ranks, res.scenarios)
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

    Scores come from the serving path (models/serving.rank_candidates): the candidate
    sources of the config (models/candidates.py: the `tower` source's items by u·v, what the
    FAISS index returns, exact here, plus co-visitation candidates), reranked; items the
    path does not retrieve rank below all it does (ties among them split as the protocol
    says).
    Each event is served in its scenario (the 4th field of an event; `item_scenarios` says
    where each item may be shown): the scenario's parameters join the user's, and the tower
    candidates, like the index's, are the allowed items only.

    `workers` serving shards (users hashed to shards, as Kafka partitions them) serve from a
    snapshot of the trainer's model that is refreshed every `snapshot_every` events (None:
    after every batch, the single in-process learner); each shard takes the per-user step
    for its users, and the trainer trains every example (with `trainer_ranks` > 1: that many
    ranks in lockstep, each training its share of the source partitions, as
    models/distributed.py does across processes). `independent=True` is the old deployment
    instead: each shard its own model, trained on its own users' events only."""

    def __init__(self, item_ids: Sequence[str], text_vectors: np.ndarray,
                 config: LearnerConfig | None = None, name: str = "streamrec",
                 event_type: str = "rate", workers: int = 1,
                 snapshot_every: int | None = None, independent: bool = False,
                 trainer_ranks: int = 1,
                 item_scenarios: Sequence[Sequence[str] | None] | None = None,
                 exclude_seen: ExcludeSeen = "all"):
        self.name = name
        self.exclude_seen = exclude_seen  # the serving rule: what the examples carry
        self.event_type = event_type
        cfg = config or LearnerConfig()
        n = workers if independent else 1
        self.learners = [OnlineLearner(cfg, text_dim=text_vectors.shape[1]) for _ in range(n)]
        for learner in self.learners:
            learner.upsert_items(list(item_ids), text_vectors, item_scenarios)
        self.workers, self.independent = workers, independent
        self.ranks = _ranks(trainer_ranks, cfg, item_ids, text_vectors, item_scenarios) \
            if trainer_ranks > 1 else [learner.trainer for learner in self.learners[:1]]
        self.snapshot_every, self._since = snapshot_every, 0
        self.serving = self.ranks[0].model  # what the shards serve from
        self.personal = [PersonalStep.from_config(cfg) for _ in range(workers)]
        self.rows = self.serving.catalog.add(list(item_ids))
        self.col_of = np.full(int(self.rows.max(initial=0)) + 1, -1, dtype=np.int64)
        self.col_of[self.rows] = np.arange(len(self.rows))  # model row -> output column
        self.item_ids = list(item_ids)
        self.states: dict[str, UserState] = {}
        self._offset = 0
        self.train_seconds = 0.0  # in the trainer(s): the training budget's cost

    def _shard(self, user: str, n: int | None = None) -> int:
        return xxhash.xxh64_intdigest(user.encode()) % (n or self.workers)

    def step(self, batch: Sequence[Event], which: Sequence[int],
             excluded: Sequence[Exclusion] | None = None, own_history: bool = True
             ) -> np.ndarray:
        shards = [self._shard(e[0]) for e in batch]
        inters = []
        for e in batch:
            self.states.setdefault(e[0], UserState())
            self._offset += 1
            inters.append(Interaction(e[0], self.item_ids[e[1]], self.event_type, e[2],
                                      scenario=scenario_of(e),
                                      partition=self._shard(e[0], PARTITIONS),
                                      offset=self._offset))
        start = {} if own_history else {e[0]: self.states[e[0]].history(self.serving.catalog)
                                        for e in batch}
        pend = observe(self.serving, inters, self.states,  # residuals untouched until learned
                       self.exclude_seen)
        hists = [pend.before[j] if own_history else start[batch[j][0]] for j in which]
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
                                            for p in mine], [excluded[p] for p in mine],
                                           [scenario_of(batch[which[p]]) for p in mine])
        self._learn(pend, shards)
        return scores

    def _learn(self, pend: Pending, shards: list[int]) -> None:
        """Each shard's per-user step on its pairs, then the trainer(s) on the examples."""
        owner_shard = {pend.users[ex.user_id]: self._shard(ex.user_id) for ex in pend.examples}
        states = list(pend.user_states.values())
        shared_seen = None if self.independent else pend.seen_rows(self.serving.catalog)
        for k, personal in enumerate(self.personal):
            mine = [p for p, o in enumerate(pend.owners) if owner_shard[o] == k]
            if mine:
                model = self.learners[k].model if self.independent else self.serving
                seen = pend.seen_rows(model.catalog) if shared_seen is None else shared_seen
                personal.step(model, [pend.hists[p] for p in mine],
                              [pend.targets[p] for p in mine], [pend.weights[p] for p in mine],
                              [pend.owners[p] for p in mine], states,
                              [pend.scenarios[p] for p in mine], [seen[p] for p in mine])
        if self.independent:
            for k, learner in enumerate(self.learners):
                learner.trainer.train([ex for ex in pend.examples
                                       if self._shard(ex.user_id) == k])
            return  # each shard serves its own live model
        start = time.perf_counter()
        _train_ranks(self.ranks, pend.examples)
        self.train_seconds += time.perf_counter() - start
        self._since += len(shards)
        if self.snapshot_every is not None and self._since >= self.snapshot_every:
            self.serving, self._since = self.ranks[0].model.fork(), 0

    def _serve(self, model: SharedModel, hists: list[History], residuals: list,
               excluded: Sequence[Exclusion], scenarios: list[str]) -> np.ndarray:
        U = model.history_vectors(hists, residuals, scenarios)
        tower = tower_of(model.sources)
        if model.head is None and tower is not None and tower.count >= len(self.rows):
            return model.blend(hists, U, self.rows, residuals, scenarios)  # the same ranking
        tower_rows, tower_scores = ([np.zeros(0, np.int64)] * len(hists), None) \
            if tower is None else self._tower_rows(model, tower, U, excluded, scenarios)
        ranked = rank_candidates(model, hists, U, tower_rows, excluded, residuals, scenarios,
                                 tower_scores=tower_scores)
        out = np.full((len(hists), len(self.rows)), -np.inf)
        for p, (rows, scores) in enumerate(ranked):
            out[p, self.col_of[rows]] = scores
        return out

    def _tower_rows(self, model: SharedModel, tower: TowerCandidates, U: np.ndarray,
                    excluded: Sequence[Exclusion], scenarios: list[str]
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The `tower` source's rows per query, from an exact search (the index's order: by
        u·v, ties by catalog order), of the allowed items only; and their u·v."""
        _, V = model.item_vectors(self.rows)
        S = U @ V.T
        allowed = self._allowed(model, scenarios)
        if allowed is not None:  # the index searches the scenario's items only
            S[~allowed] = -np.inf
        tops = best_first(S, tower.count + max(map(len, excluded), default=0))
        keys = np.full((len(S), max(map(len, tops), default=0)), -1, np.int64)
        for p, top in enumerate(tops):
            keys[p, : len(top)] = model.catalog.keys[self.rows[top]]
            if allowed is not None:  # (fewer allowed items than wanted: the rest tie at -inf)
                keys[p, : len(top)][~allowed[p, top]] = -1
        ok = tower.select(keys, excluded)
        chosen = [top[m[: len(top)]] for top, m in zip(tops, ok, strict=True)]
        return [self.rows[c] for c in chosen], [s[c] for s, c in zip(S, chosen, strict=True)]

    def _allowed(self, model: SharedModel, scenarios: list[str]) -> np.ndarray | None:
        """(n, n_items) which output columns each query's scenario allows; None: all."""
        allowed = model.catalog.allowed_table(scenarios)
        if allowed is None:
            return None
        table, which = allowed
        return table[:, self.rows][which]


class PerScenario:
    """streamrec with no transfer between scenarios: one independent StreamrecModel per
    scenario, over that scenario's items only, trained on that scenario's events only (a
    user's history in it is their events there). The baseline that per-scenario
    parameters on one shared model must beat on small scenarios. Models are made on a
    scenario's first event; items outside a scenario score -inf there."""

    def __init__(self, item_ids: Sequence[str], text_vectors: np.ndarray,
                 item_scenarios: Sequence[Sequence[str] | None] | None,
                 config: LearnerConfig | None = None, name: str = "streamrec-separate"):
        self.name, self.cfg = name, config or LearnerConfig()
        self.item_ids, self.vectors = list(item_ids), text_vectors
        self.allowed = Allowed(item_scenarios)
        self.models: dict[str, tuple[StreamrecModel, np.ndarray, np.ndarray]] = {}

    def _model(self, scenario: str) -> tuple[StreamrecModel, np.ndarray, np.ndarray]:
        """The scenario's model, its items (global indexes) and global -> local index."""
        if scenario not in self.models:
            mask = self.allowed(scenario)
            cols = np.arange(len(self.item_ids)) if mask is None else np.flatnonzero(mask)
            local = np.full(len(self.item_ids), -1, np.int64)
            local[cols] = np.arange(len(cols))
            model = StreamrecModel([self.item_ids[c] for c in cols], self.vectors[cols],
                                   self.cfg, name=f"{self.name}:{scenario}")
            self.models[scenario] = (model, cols, local)
        return self.models[scenario]

    def step(self, batch: Sequence[Event], which: Sequence[int],
             excluded: Sequence[Exclusion] | None = None, own_history: bool = True
             ) -> np.ndarray:
        out = np.full((len(which), len(self.item_ids)), -np.inf)
        row_of = {j: k for k, j in enumerate(which)}
        groups: dict[str, list[int]] = {}
        for j, e in enumerate(batch):
            groups.setdefault(scenario_of(e), []).append(j)
        for scenario, js in groups.items():
            model, cols, local = self._model(scenario)
            js = [j for j in js if local[batch[j][1]] >= 0]  # (an item not shown here)
            sub = [(batch[j][0], int(local[batch[j][1]]), batch[j][2], scenario) for j in js]
            mine = [p for p, j in enumerate(js) if j in row_of]
            ex = None if excluded is None else [excluded[row_of[js[p]]] for p in mine]
            scores = model.step(sub, mine, ex, own_history=own_history)
            for p, row in zip(mine, scores, strict=True):
                out[row_of[js[p]], cols] = row
        return out


PARTITIONS = 8  # source partitions the evaluator numbers examples by (users hashed)


def _ranks(k: int, cfg: LearnerConfig, item_ids: Sequence[str], vectors: np.ndarray,
           item_scenarios: Sequence[Sequence[str] | None] | None = None) -> list[Trainer]:
    """K trainer ranks over identical model copies, synchronised as threads."""
    from models.distributed import ThreadGroup

    group = ThreadGroup(k)
    ranks = []
    for r in range(k):
        model = SharedModel(cfg, vectors.shape[1])
        trainer = Trainer(model, group.sync(r))
        trainer.upsert_items(list(item_ids), vectors, item_scenarios)
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
