"""One micro-batch of behavior events: decode -> dedupe -> encode -> search -> (emit) -> learn.

Kafka-agnostic on purpose (records and user states in, records to write out), so the agent
stays a thin loop, this runs off the event loop, and it is testable without a broker.
Emitting (table writes, sends) is the agent's job. "Learn" here is the per-user step only:
the shared model learns in the trainer, from the batch's training examples.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from models.config import EVENT_TYPE_IDS
from models.encoder import QueryVectors, TextEncoder
from models.examples import Interaction, Pending, TrainingExample, observe
from models.personal import PersonalStep
from models.serving import Server
from models.user_state import UserState
from streams import metrics as m
from streams.records import RawRecord, isolate_failures
from streams.schemas import (
    BehaviorEvent,
    InvalidRecord,
    ModelInfo,
    Reason,
    parse_event,
    recommendation_bytes,
    scores_a_list,
)
from streams.settings import Settings

log = logging.getLogger("streamrec.processor")

Decoded = tuple[RawRecord, BehaviorEvent]
Rejected = tuple[RawRecord, InvalidRecord]


@dataclass
class UserUpdate:
    """What the agent writes for one user after a batch."""

    state: UserState
    record: RawRecord  # the user's newest record: routes the table write to its partition
    recommendations: list[bytes] = field(default_factory=list)  # one per scenario served
    newest_kafka_ts: int = 0


@dataclass
class BatchOutput:
    rejected: list[Rejected] = field(default_factory=list)
    users: dict[str, UserUpdate] = field(default_factory=dict)
    # Users whose every event in the batch was a replay: their state is written again as it
    # is. A worker killed between its local store write and the changelog's ack restarts on
    # its disk with state the changelog lacks; the batch was not committed, so it comes back
    # as replays, and this write puts that state in the changelog before the offsets move on
    # (otherwise a later restart from the changelog alone loses the event).
    replayed: dict[str, UserUpdate] = field(default_factory=dict)
    applied: int = 0
    duplicates: int = 0
    loss: float = float("nan")
    pending: Pending | None = None

    @property
    def examples(self) -> list[TrainingExample]:
        return [] if self.pending is None else self.pending.examples


class EventProcessor:
    def __init__(self, settings: Settings, server: Server, personal: PersonalStep,
                 encoder: TextEncoder):
        self.s = settings
        self.server = server  # server.model: the snapshot of the shared model being served
        self.personal = personal
        self.encoder = encoder
        self.queries = QueryVectors(encoder.encode, settings.query_cache_size)
        self.last_seen: dict[str, float] = {}  # user -> monotonic time (users_active gauge)
        # (user, scenario) -> the items of the list this worker served last: the online hit
        # rate's reference. In memory only, for active users: a metric, not state (about 230
        # bytes per active user with 10 items, the ids shared with the catalog).
        self.served: dict[tuple[str, str], tuple[str, ...]] = {}
        self.admitted: set[str] = set()  # scenarios this worker let in beyond the snapshot's
        self._loss_ema: float | None = None

    # ------------------------------------------------------------------ decode
    def decode(self, records: Sequence[RawRecord]) -> tuple[list[Decoded], list[Rejected]]:
        good, bad = [], []
        with m.STAGE_SECONDS.labels(stage="decode").time():
            for rec in records:
                try:
                    ev = parse_event(rec.value, self.s.max_event_bytes)
                except InvalidRecord as exc:
                    bad.append((rec, exc))
                    continue
                # The user-state table is co-partitioned with this topic by *record* partition:
                # an event keyed by anything but its user id sits on a foreign partition, where
                # its user's state would be read as empty and written as a second copy.
                if rec.key != ev.user_id.encode():
                    bad.append((rec, InvalidRecord(
                        Reason.MISROUTED, f"record key {rec.key[:60]!r} is not the user_id "
                        f"{ev.user_id[:60]!r} (events must be keyed by user_id)"
                        if rec.key is not None else "record has no key (must be the user_id)",
                        ev.event_type)))
                    continue
                good.append((rec, ev))
        return good, bad

    def unknown_items(self, events: Sequence[Decoded]) -> bool:
        return any(e.item_id is not None and not self.server.has_item(e.item_id)
                   for _, e in events)

    # ------------------------------------------------------------------ the batch
    def process(self, events: Sequence[Decoded], rejected: list[Rejected],
                states: Mapping[str, UserState]) -> BatchOutput:
        """The batch against the users' states (loaded by the caller: `states` holds every
        user of `events`; they are changed in place)."""
        out = BatchOutput(rejected=list(rejected))
        m.BATCH_SIZE.observe(len(events) + len(rejected))
        counts = Counter((exc.event_type or "invalid", "dlq") for _, exc in rejected)
        todo = self._dedupe(events, states, out, counts)
        todo, inters = self._encode(todo, out, counts)
        counts.update((ev.event_type, "applied") for _, ev in todo)
        for (event_type, outcome), n in counts.items():  # one update per label set
            if n:
                m.EVENTS.labels(event_type=event_type, outcome=outcome).inc(n)
        if todo:
            batch_states = {u: upd.state for u, upd in out.users.items()}
            out.pending = observe(self.server.model, inters, batch_states, self.s.exclude_seen)
            self._mark(todo, out)
            self._count_hits(todo)
            self._recommend(todo, inters, out)
        return out

    def learn(self, out: BatchOutput) -> None:
        """The batch's per-user step, after its recommendations are out (serve, then learn)."""
        pend = out.pending
        if pend is None:
            return
        with m.STAGE_SECONDS.labels(stage="learn").time():
            model = self.server.model
            out.loss = self.personal.step(model, pend.hists, pend.targets, pend.weights,
                                          pend.owners, list(pend.user_states.values()),
                                          pend.scenarios, pend.seen_rows(model.catalog))
        for alpha in self.personal.step_sizes(pend.user_states).values():
            m.LEARNING_RATE.observe(alpha)
        if out.loss == out.loss:  # not NaN
            self._loss_ema = out.loss if self._loss_ema is None else \
                0.95 * self._loss_ema + 0.05 * out.loss
            m.ONLINE_LOSS.set(self._loss_ema)

    def _dedupe(self, events: Sequence[Decoded], states: Mapping[str, UserState],
                out: BatchOutput, counts: Counter) -> list[Decoded]:
        """Drop replays (offset at or below the user's last applied one) and unknown items.

        An accepted event marks its offset at once: after a rebalance the consumer may hand the
        same record to one batch twice (seen in tests/test_restart.py as a double count).
        """
        todo, replays = [], set()
        for rec, ev in events:
            upd = out.users.get(ev.user_id)
            if upd is None:
                upd = out.users[ev.user_id] = UserUpdate(states[ev.user_id], rec)
            if upd.state.already_applied(rec.partition, rec.offset):
                out.duplicates += 1
                replays.add(ev.user_id)
                outcome = "duplicate"
            elif ev.item_id is not None and not self.server.has_item(ev.item_id):
                out.rejected.append((rec, InvalidRecord(
                    Reason.UNKNOWN_ITEM, f"item_id {ev.item_id[:100]!r} is not in the catalog")))
                outcome = "dlq"
            elif not self._admit(ev.scenario):
                out.rejected.append((rec, InvalidRecord(
                    Reason.SCENARIO_LIMIT, f"scenario {ev.scenario!r} is new and "
                    f"{self.server.model.cfg.max_scenarios} scenarios are known "
                    "(learner.max_scenarios)")))
                outcome = "dlq"
            else:
                todo.append((rec, ev))
                upd.state.mark_applied(rec.partition, rec.offset)
                continue  # counted as applied once its text (if any) is encoded
            counts[(ev.event_type, outcome)] += 1
        touched = {ev.user_id for _, ev in todo}
        out.replayed = {u: out.users[u] for u in replays - touched}
        out.users = {u: upd for u, upd in out.users.items() if u in touched}
        return todo

    def _encode(self, todo: list[Decoded], out: BatchOutput, counts: Counter
                ) -> tuple[list[Decoded], list[Interaction]]:
        """Text-only events (a search query) get their text embedded in one encoder call. If
        that call fails, the texts are bisected until the poison ones are alone: those go to
        the DLQ (`processing_error`; their offsets count as handled), the rest is applied."""
        with m.STAGE_SECONDS.labels(stage="encode").time():
            texts = [d for d in todo if d[1].item_id is None and d[1].text]
            hits = self.queries.hits
            ok, failed = isolate_failures(
                lambda batch: list(self.queries([ev.text for _, ev in batch])), texts
            ) if texts else ([], [])
            m.QUERY_CACHE_HITS.inc(self.queries.hits - hits)
            m.QUERIES.inc(len(texts))
        vecs = {id(ev): vec for (_, ev), vec in ok}
        for (rec, ev), exc in failed:
            log.error("text encoder failed on %s:%s: %r", rec.partition, rec.offset, exc)
            out.rejected.append((rec, InvalidRecord(
                Reason.PROCESSING_ERROR, f"the text encoder failed on this event: {exc!r}"[:500])))
            counts[(ev.event_type, "dlq")] += 1
        poison = {id(ev) for (_, ev), _ in failed}
        todo = [d for d in todo if id(d[1]) not in poison]
        if poison:  # a user left with no event this batch gets no state write, no recommendation
            users = {ev.user_id for _, ev in todo}
            out.users = {u: upd for u, upd in out.users.items() if u in users}
        inters = [Interaction(ev.user_id, ev.item_id, ev.event_type, ev.ts, ev.value,
                              vecs.get(id(ev)), ev.scenario, rec.partition, rec.offset)
                  for rec, ev in todo]
        return todo, inters

    def _admit(self, scenario: str) -> bool:
        """Whether events of `scenario` may be applied: a known scenario (in the served
        snapshot, or admitted here before), or a new one while fewer than
        `max_scenarios` are known. (Workers admit independently between snapshots; the
        trainer's bound is the final word: beyond it a scenario is served by the shared
        model alone.)"""
        known = self.server.model.scenarios.rows
        if scenario in known or scenario in self.admitted:
            return True
        if len(known.keys() | self.admitted) >= self.server.model.cfg.max_scenarios:
            return False
        self.admitted.add(scenario)
        return True

    def _mark(self, todo: list[Decoded], out: BatchOutput) -> None:
        """Note each user's newest record: its changelog write carries the applied offsets."""
        now = time.monotonic()
        for rec, ev in todo:
            upd = out.users[ev.user_id]
            upd.record = rec
            upd.newest_kafka_ts = max(upd.newest_kafka_ts, rec.timestamp_ms)
            self.last_seen[ev.user_id] = now
        out.applied = len(todo)

    def _count_hits(self, todo: list[Decoded]) -> None:
        """The online hit rate, what a deployment is for: of the applied events of users this
        worker served in the event's scenario, those whose item was in the list served last
        (before this batch's), among the events that say something about it
        (`scores_a_list`)."""
        scored = hits = 0
        for _, ev in todo:
            served = self.served.get((ev.user_id, ev.scenario))
            if served is None or not scores_a_list(ev.event_type, ev.item_id):
                continue
            scored += 1
            hits += ev.item_id in served
        m.NEXT_EVENTS.inc(scored)
        m.NEXT_EVENT_HITS.inc(hits)

    def _queries(self, todo: list[Decoded], inters: list[Interaction], out: BatchOutput
                 ) -> dict[tuple[str, str], tuple[UserState, int]]:
        """One recommendation per (user, scenario) of the batch, from the user's state after
        the batch, with the ts of the newest event that asked for it. A request's context
        text joins its own query's history (a copy), not the user's."""
        queries: dict[tuple[str, str], tuple[UserState, int]] = {}
        for (_, ev), inter in zip(todo, inters, strict=True):
            st = out.users[ev.user_id].state
            if ev.event_type == "request" and inter.text_vec is not None:
                st = copy.deepcopy(st)
                st.append(None, EVENT_TYPE_IDS["search"], ev.ts, inter.text_vec,
                          self.server.model.cfg.history_len)
            queries.pop((ev.user_id, ev.scenario), None)  # newest last: in ts order
            queries[(ev.user_id, ev.scenario)] = st, ev.ts
        return queries

    def _recommend(self, todo: list[Decoded], inters: list[Interaction], out: BatchOutput
                   ) -> None:
        with m.STAGE_SECONDS.labels(stage="search").time():
            model = self.server.model
            queries = self._queries(todo, inters, out)
            states, scenarios = [st for st, _ in queries.values()], [s for _, s in queries]
            lists, version = self.server.recommend(states, self.s.top_k,
                                                   self.s.reason_window, scenarios)
            now_ms = int(time.time() * 1000)
            info = ModelInfo(encoder=self.encoder.name, index_version=version,
                             model_version=model.version)
            alpha0 = model.cfg.lr_rule.alpha0
            for ((user, scenario), (st, ts)), recs in zip(queries.items(), lists, strict=True):
                self.served[(user, scenario)] = tuple(r.item_id for r in recs)
                out.users[user].recommendations.append(recommendation_bytes(
                    user, scenario, [(r.item_id, r.score, r.reason_item_id) for r in recs],
                    now_ms, ts, info, st.rule.step_size(alpha0)))
        m.INDEX_ITEMS.set(self.server.n_items)
        m.INDEX_VERSION.set(self.server.version)

    def prune_active(self, window_s: float = 300.0) -> int:
        """Forget users idle for `window_s` (and the lists served to them); returns how many
        are active (the gauge)."""
        cutoff = time.monotonic() - window_s
        for user in [u for u, t in self.last_seen.items() if t < cutoff]:
            del self.last_seen[user]
        for key in [k for k in self.served if k[0] not in self.last_seen]:
            del self.served[key]
        m.USERS_ACTIVE.set(len(self.last_seen))
        return len(self.last_seen)

