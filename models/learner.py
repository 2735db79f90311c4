"""The online learner: micro-batch gradient steps on next-item prediction.

One `learn_batch` call = one micro-batch of the stream, in event order:
1. every event with an item becomes a (history -> next item) pair whose history is only that
   user's *earlier* events (the state is appended to after the pair is cut: no leakage);
2. one gradient step per `max_pairs_per_step` pairs (at most `max_steps_per_batch`), each
   with a replay sample of recent pairs: full softmax over the catalog when it is
   small, sampled softmax with logQ correction when it is large; `dislike` pushes its item
   down;
3. shared parameters (item tower, sequence encoder) move by Adam / SparseAdam; each user's
   residual p_u moves by that user's own adaptive learning rate (models/lr_rules.py).
No Kafka here: the Faust agent, the offline evaluator and the benchmarks all call this.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from index.ids import item_hash
from models.config import EVENT_TYPE_IDS, TEXT_ONLY_TYPES, LearnerConfig
from models.covisit import CoVisitation
from models.encoder import pick_device
from models.lr_rules import RuleState, make_rule
from models.two_tower import ItemTower, PriorHead, UserTower, gap_buckets
from models.user_state import UserState

log = logging.getLogger("streamrec.learner")

CHECKPOINT_FORMAT = "streamrec-learner-1"
#: Config fields that change parameter shapes: a checkpoint only loads into the same ones.
_STRUCTURAL = ("dim", "history_len", "item_tower", "user_tower", "n_layers", "n_heads",
               "covisit", "covisit_recencies")


@dataclass(frozen=True)
class Interaction:
    """One validated event, as the learner sees it (the agent converts BehaviorEvent)."""

    user_id: str
    item_id: str | None
    event_type: str
    ts: int
    value: float | None = None
    text_vec: np.ndarray | None = None


@dataclass
class BatchResult:
    loss: float  # weighted mean pair loss of the last step (nan if there was nothing to learn)
    n_pairs: int
    users: list[str] = field(default_factory=list)  # users touched, first-seen order
    alphas: dict[str, float] = field(default_factory=dict)  # α per user after the step


@dataclass
class Pending:
    """A batch observed (histories appended, pairs cut) but not yet trained on."""

    states: Mapping[str, UserState]
    users: dict[str, int] = field(default_factory=dict)  # user -> owner index, first-seen order
    before: list[tuple] = field(default_factory=list)  # per event: the history just before it
    hists: list[tuple] = field(default_factory=list)  # per pair
    targets: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)


@dataclass
class _Seqs:
    """A padded batch of histories (left-padded to a common length)."""

    rows: np.ndarray  # (P, L) int64 item rows, 0 = pad or text-only event
    types: np.ndarray  # (P, L) int64
    gaps: np.ndarray  # (P, L) int64 gap buckets
    texts: list[tuple[int, int, np.ndarray]]  # (pair, position, text vector)


class OnlineLearner:
    """Two-tower model learned online from a stream of interactions."""

    def __init__(self, config: LearnerConfig | None = None, text_dim: int = 384,
                 capacity: int = 1024):
        self.cfg = config or LearnerConfig()
        self.text_dim = text_dim
        self.device = pick_device(self.cfg.device)
        torch.manual_seed(self.cfg.seed)
        self._rng = np.random.default_rng(self.cfg.seed)
        c = self.cfg
        self.items = ItemTower(capacity, text_dim, c.dim, c.item_tower).to(self.device)
        self.users = UserTower(c.dim, c.history_len, c.user_tower, c.n_layers, c.n_heads,
                               c.dropout).to(self.device)
        self.covis = CoVisitation(c.covisit_window, c.covisit_pair_decay, c.covisit_recencies,
                                  c.covisit_profile) if c.covisit else None
        self.head = PriorHead(self.covis.n_features, len(c.covisit_recencies) // 2
                              ).to(self.device) if self.covis else None
        self.rule = make_rule(c.lr_rule, **c.rule_params())
        # per-user parameters: the residual p_u and, with the ranker, the user's own
        # correction of its blend weights (how much *this* user follows co-visitation, the
        # towers or popularity); both move by the user's adaptive learning rate
        self.n_head = 0 if self.head is None else self.head.n_params
        self.n_user = c.dim + self.n_head
        self.ids: list[str] = [""]  # row -> item id; row 0 is padding
        self.rows: dict[str, int] = {}
        self.live = np.zeros(capacity, dtype=bool)
        self.keys = np.zeros(capacity, dtype=np.int64)  # row -> stable item key (index/ids.py)
        self.counts = np.zeros(capacity, dtype=np.float64)
        self._make_optimizers()
        self._replay = _Replay(c.replay_capacity, c.history_len)
        self.steps = 0

    # ---------------------------------------------------------------- catalog
    def upsert_items(self, item_ids: Sequence[str], text_vectors: np.ndarray) -> None:
        """Add or update items (their frozen text vectors); a re-added item keeps its E row."""
        new = [i for i in dict.fromkeys(item_ids) if i not in self.rows]
        self._ensure_capacity(len(self.ids) + len(new))
        for item_id in new:
            self.rows[item_id] = len(self.ids)
            self.keys[len(self.ids)] = item_hash(item_id)
            self.ids.append(item_id)
        rows = np.fromiter((self.rows[i] for i in item_ids), dtype=np.int64, count=len(item_ids))
        if len(rows):
            self.items.T[torch.as_tensor(rows, device=self.device)] = torch.as_tensor(
                np.asarray(text_vectors, dtype=np.float32), device=self.device
            )
            self.live[rows] = True

    def delete_items(self, item_ids: Sequence[str]) -> None:
        """Deleted items leave the softmax and the index; their row is kept for a comeback."""
        for item_id in item_ids:
            row = self.rows.get(item_id)
            if row is not None:
                self.live[row] = False

    def has_item(self, item_id: str) -> bool:
        row = self.rows.get(item_id)
        return row is not None and bool(self.live[row])

    @property
    def n_items(self) -> int:
        return int(self.live.sum())

    def _ensure_capacity(self, n: int) -> None:
        cap = self.items.capacity
        if n <= cap:
            return
        while cap < n:
            cap *= 2
        old_state = self.sparse_opt.state.get(self.items.E)
        self.items.grow(cap)
        self.live = np.concatenate([self.live, np.zeros(cap - len(self.live), dtype=bool)])
        self.keys = np.concatenate([self.keys, np.zeros(cap - len(self.keys), dtype=np.int64)])
        self.counts = np.concatenate([self.counts, np.zeros(cap - len(self.counts))])
        self._make_optimizers(keep_dense=True)
        if old_state:  # carry SparseAdam moments of the existing rows over
            pad = cap - old_state["exp_avg"].shape[0]
            self.sparse_opt.state[self.items.E] = {
                "step": old_state["step"],
                "exp_avg": F.pad(old_state["exp_avg"], (0, 0, 0, pad)),
                "exp_avg_sq": F.pad(old_state["exp_avg_sq"], (0, 0, 0, pad)),
            }

    def _make_optimizers(self, keep_dense: bool = False) -> None:
        if not keep_dense:
            named = [(n, p) for n, p in self.named_parameters() if n != "items.E"]
            groups = [{"params": [p for n, p in named if not n.startswith("head.")]},
                      {"params": [p for n, p in named if n.startswith("head.")],
                       "lr": self.cfg.head_lr, "weight_decay": 0.0}]
            self.dense_opt = torch.optim.Adam([g for g in groups if g["params"]],
                                              lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.sparse_opt = torch.optim.SparseAdam([self.items.E], lr=self.cfg.lr)

    def named_parameters(self):
        yield from (("items." + n, p) for n, p in self.items.named_parameters())
        yield from (("users." + n, p) for n, p in self.users.named_parameters())
        if self.head is not None:
            yield from (("head." + n, p) for n, p in self.head.named_parameters())

    # ---------------------------------------------------------------- learning
    def learn_batch(self, events: Sequence[Interaction],
                    states: Mapping[str, UserState]) -> BatchResult:
        """Learn from one micro-batch (events in stream order); mutates `states`.

        `states` must hold a UserState for every user of the batch. Same as `observe`,
        `train` and `apply_covisits(covisit_pairs(...))`; the agent splits them to serve
        before it trains and to share co-visitation counts between workers.
        """
        pend = self.observe(events, states)
        result = self.train(pend)
        self.apply_covisits(self.covisit_pairs(pend))
        return result

    def covisit_pairs(self, pend: Pending) -> list[tuple[list[str], str]]:
        """The batch's positive events as (earlier item ids of the user, item id): what every
        replica needs to update its co-visitation counts (ids, not rows: rows are local)."""
        if self.covis is None:
            return []
        window = self.cfg.covisit_window
        return [([self.ids[r] for r in hist[0][-window:] if r], self.ids[t])
                for hist, t, w in zip(pend.hists, pend.targets, pend.weights, strict=True)
                if w > 0]

    def apply_covisits(self, pairs: Sequence[tuple[Sequence[str], str]]) -> None:
        """Add co-visitation pairs (from this or any other worker); unknown ids are skipped."""
        if self.covis is None or not pairs:
            return
        rows = self.rows
        self.covis.learn([([rows.get(i, 0) for i in hist], rows[t]) for hist, t in pairs
                          if t in rows])

    def observe(self, events: Sequence[Interaction], states: Mapping[str, UserState]) -> Pending:
        """Cut each event's (history -> item) pair, then append the event to the history."""
        pend = Pending(states)
        for ev in events:
            st = states[ev.user_id]
            owner = pend.users.setdefault(ev.user_id, len(pend.users))
            snap = self.history(st)
            pend.before.append(snap)
            target = self._target_row(ev)
            if target is not None:
                pend.hists.append(snap)
                pend.targets.append(target)
                pend.weights.append(self._weight(ev))
                pend.owners.append(owner)
            st.append(ev.item_id, EVENT_TYPE_IDS[ev.event_type], ev.ts, ev.text_vec,
                      self.cfg.history_len)
        return pend

    def train(self, pend: Pending) -> BatchResult:
        """Gradient step(s) on the observed pairs; updates shared params and residuals."""
        result = BatchResult(loss=float("nan"), n_pairs=len(pend.targets), users=list(pend.users))
        if pend.targets:
            targets, weights = np.array(pend.targets), np.array(pend.weights)
            result.loss = self._train(pend.hists, targets, weights, np.array(pend.owners),
                                      [pend.states[u] for u in pend.users])
            np.add.at(self.counts, targets[weights > 0], 1.0)
        for u in pend.users:
            alpha = pend.states[u].alpha
            result.alphas[u] = self.cfg.alpha0 if alpha is None else alpha
        return result

    def _target_row(self, ev: Interaction) -> int | None:
        if ev.event_type in TEXT_ONLY_TYPES or ev.item_id is None:
            return None
        row = self.rows.get(ev.item_id)
        return row if row is not None and self.live[row] else None

    def _weight(self, ev: Interaction) -> float:
        if ev.event_type == "dislike":
            return -self.cfg.dislike_weight
        return self.cfg.event_weights.get(ev.event_type, 1.0)

    def history(self, st: UserState) -> tuple:
        """Snapshot of the user's last H events: (rows, types, ts, text vectors)."""
        rows = [self.rows.get(i, 0) if i is not None else 0 for i in st.items]
        texts = [(k, st.text_vector(k)) for k, t in enumerate(st.texts) if t is not None]
        return rows, list(st.types), list(st.ts), texts

    def _pad(self, hists: Sequence[tuple]) -> _Seqs:
        L = max(1, max(len(h[0]) for h in hists))
        P = len(hists)
        rows = np.zeros((P, L), dtype=np.int64)
        types = np.zeros((P, L), dtype=np.int64)
        gaps = np.zeros((P, L), dtype=np.int64)
        texts = []
        for p, (r, t, ts, tx) in enumerate(hists):
            n = len(r)
            if n == 0:
                continue
            rows[p, L - n:] = r
            types[p, L - n:] = t
            ts_arr = np.asarray(ts, dtype=np.int64)
            gaps[p, L - n:] = gap_buckets(np.diff(ts_arr, prepend=ts_arr[0]))
            texts.extend((p, L - n + k, vec) for k, vec in tx)
        return _Seqs(rows, types, gaps, texts)

    def _item_table(self, rows: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Item vectors of the unique `rows` (computed once per step) and the sorted rows."""
        need = unique_ints(rows)
        return self.items(torch.as_tensor(need, device=self.device)), need

    def _window(self, s: _Seqs) -> _Seqs:
        """The newest `encoder_window` positions: what the sequence encoder reads (the full
        history still feeds the co-visitation profile)."""
        off = max(0, s.rows.shape[1] - self.cfg.encoder_window)
        if off == 0:
            return s
        texts = [(p, pos - off, v) for p, pos, v in s.texts if pos >= off]
        return _Seqs(s.rows[:, off:], s.types[:, off:], s.gaps[:, off:], texts)

    def _encode(self, s: _Seqs, V: torch.Tensor, need: np.ndarray) -> torch.Tensor:
        """User-tower output for padded histories, gathering item vectors from (V, need)."""
        dev = self.device
        s = self._window(s)
        seq = V[torch.as_tensor(np.searchsorted(need, s.rows), device=dev)]
        if s.texts:
            idx_p = torch.tensor([t[0] for t in s.texts], device=dev)
            idx_l = torch.tensor([t[1] for t in s.texts], device=dev)
            tv = torch.as_tensor(np.stack([t[2] for t in s.texts]), device=dev)
            seq = seq.index_put((idx_p, idx_l), self.items.project_text(tv))
        return self.users(seq, torch.as_tensor(s.types, device=dev),
                          torch.as_tensor(s.gaps, device=dev))

    def _train(self, hists: list[tuple], targets: np.ndarray, weights: np.ndarray,
               owners: np.ndarray, user_states: list[UserState]) -> float:
        seqs = self._pad(hists)
        loss_val = float("nan")
        for _ in range(self.cfg.steps_per_batch):
            for chunk in self._budgeted_chunks(len(targets)):
                k = int(round(self.cfg.replay_ratio * len(chunk)))
                replay = self._replay.sample(k, self._rng)
                loss_val = self._step(_take(seqs, chunk), targets[chunk], weights[chunk],
                                      owners[chunk], user_states, replay)
        self._replay.add(seqs, targets, weights)
        return loss_val

    def _budgeted_chunks(self, n: int) -> list[np.ndarray]:
        """Chunks of `max_pairs_per_step` pairs, at most `max_steps_per_batch` of them: under
        overload (big batches) a random subset trains now, the rest only enters the replay.
        A step's cost grows with its pairs (the softmax over the catalog dominates), so only
        a cap on pairs, not fewer larger steps, bounds the compute of a batch."""
        budget = self.cfg.max_pairs_per_step * self.cfg.max_steps_per_batch
        idx = np.arange(n) if n <= budget else \
            np.sort(self._rng.choice(n, size=budget, replace=False))
        size = self.cfg.max_pairs_per_step
        return [idx[i : i + size] for i in range(0, len(idx), size)]

    def _step(self, seqs: _Seqs, targets: np.ndarray, weights: np.ndarray, owners: np.ndarray,
              user_states: list[UserState], replay: tuple | None) -> float:
        dev, d = self.device, self.cfg.dim
        n_users = len(user_states)
        resid = torch.zeros(n_users + 1, self.n_user, device=dev)  # last row: replay pairs
        if self.cfg.use_residual:
            for k, st in enumerate(user_states):
                if st.residual is not None:
                    resid[k, : len(st.residual)] = torch.as_tensor(st.residual, device=dev)
        resid.requires_grad_(True)
        if replay is not None:
            r_seqs, r_targets, r_weights = replay
            seqs = _concat(seqs, r_seqs)
            targets = np.concatenate([targets, r_targets])
            weights = np.concatenate([weights, r_weights])
            owners = np.concatenate([owners, np.full(len(r_targets), n_users)])
        # a target deleted since its pair was cut (replay, or a delete applied mid-batch)
        # is no longer a class of the softmax: drop the pair
        keep = self.live[targets] & (weights != 0)
        if not keep.all():
            seqs, targets, weights, owners = _take(seqs, np.flatnonzero(keep)), targets[keep], \
                weights[keep], owners[keep]
        if len(targets) == 0:
            return float("nan")
        live = np.flatnonzero(self.live)
        cand = live if len(live) <= self.cfg.full_softmax_max_items else \
            np.concatenate([targets, self._sample_negatives(live)])
        V, need = self._item_table(np.concatenate([cand, self._window(seqs).rows.ravel()]))
        own = resid[torch.as_tensor(owners, device=dev)]
        u = self._encode(seqs, V, need) + own[:, :d]
        pair_loss = self._pair_losses(u, targets, weights, live, V, need, seqs.rows,
                                      fresh=owners < n_users, theta=own[:, d:])
        w = torch.as_tensor(np.abs(weights), dtype=torch.float32, device=dev)
        loss = (pair_loss * w).sum() / w.sum()
        self.dense_opt.zero_grad(set_to_none=True)
        self.sparse_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.dense_opt.step()
        if self.items.E.grad is not None:
            self.sparse_opt.step()
        self.steps += 1
        self._update_residuals(resid, pair_loss.detach(), w, owners, user_states)
        return float(loss.detach())

    def _features(self, hist_rows: np.ndarray, cols: np.ndarray
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Co-visitation features (K, P, len(cols)) and log-popularity (len(cols),)."""
        c = torch.as_tensor(self.covis.features(hist_rows, cols), device=self.device)
        n = self.covis.n  # global interaction counts (replicated with the pairs)
        pop = np.where(cols < len(n), n[np.minimum(cols, len(n) - 1)], 0.0)
        log_pop = torch.as_tensor(np.log1p(pop), dtype=torch.float32, device=self.device)
        return c, log_pop

    def _pair_losses(self, u: torch.Tensor, targets: np.ndarray, weights: np.ndarray,
                     live: np.ndarray, V: torch.Tensor, need: np.ndarray,
                     hist_rows: np.ndarray, fresh: np.ndarray,
                     theta: torch.Tensor | None = None) -> torch.Tensor:
        """Per-pair loss of the two-tower scores, plus, with co-visitation, the loss of the
        ranker that blends the (detached) two-tower score with the co-visitation features:
        the towers learn on their own, the ranker learns how much to trust each signal. The
        ranker learns from fresh pairs only: a replayed pair's target is already in the
        co-visitation counts, which would teach it to over-trust them (and its features are
        not even computed for replayed pairs).
        -log p(target) for positives, -log(1 - p(target)) for dislikes."""
        dev = self.device
        if len(live) <= self.cfg.full_softmax_max_items:
            cols, logq = live, None
            pos = torch.as_tensor(np.searchsorted(live, targets), device=dev)
            logits = u @ V[torch.as_tensor(np.searchsorted(need, live), device=dev)].T
        else:  # sampled softmax: column 0 is each pair's own target, then shared negatives
            cols, logq, pos, logits = self._sampled_logits(u, targets, live, V, need)
        losses = self._nll(self._logp(logits, pos, logq, targets), weights)
        f = np.flatnonzero(fresh)
        if self.head is not None and len(f):
            ft = torch.as_tensor(f, device=dev)
            feats, log_pop = self._features(hist_rows[f], cols if logq is None else self._neg)
            if logq is not None:  # put each pair's target in front, as in `logits`
                tf, tp = self._features(hist_rows[f], targets[f])
                diag = torch.arange(len(f), device=dev)
                feats = torch.cat([tf[:, diag, diag][:, :, None], feats], 2)
                log_pop = torch.cat([tp[:1] * 0, log_pop])  # per-pair target pop added below
            blend = self.head(logits.detach()[ft], feats, log_pop,
                              None if theta is None else theta[ft])
            if logq is not None:
                blend[:, 0] = blend[:, 0] + self.head.pop_w * tp
            head = self._nll(self._logp(blend, pos[ft], None if logq is None else logq[ft],
                                        targets[f]), weights[f])
            losses = losses.index_add(0, ft, head)
        return losses

    def _logp(self, logits: torch.Tensor, pos: torch.Tensor, logq: torch.Tensor | None,
              targets: np.ndarray) -> torch.Tensor:
        if logq is not None:  # logQ correction; an accidental hit of the target is no negative
            logits = logits - logq
            hit = torch.as_tensor(self._neg[None, :] == targets[:, None], device=self.device)
            logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(hit, float("-inf"))], 1)
        return logits.log_softmax(-1)[torch.arange(len(targets)), pos]

    def _nll(self, logp: torch.Tensor, weights: np.ndarray) -> torch.Tensor:
        neg = torch.as_tensor(weights < 0, device=self.device)
        p = logp.exp().clamp(max=1 - 1e-6)
        return torch.where(neg, -torch.log1p(-p), -logp)

    def _sample_negatives(self, live: np.ndarray) -> np.ndarray:
        """Popularity-proportional negatives (counts + 1), shared by the pairs of a step."""
        q = self.counts[live] + 1.0
        self._neg = live[self._rng.choice(len(live), size=self.cfg.n_negatives, p=q / q.sum())]
        return self._neg

    def _sampled_logits(self, u: torch.Tensor, targets: np.ndarray, live: np.ndarray,
                        V: torch.Tensor, need: np.ndarray) -> tuple:
        """Logits over [own target, shared negatives] and their log Q (Q = S·q)."""
        dev, neg, S = self.device, self._neg, self.cfg.n_negatives
        q_all = self.counts[live].sum() + len(live)
        logq_pos = np.log(S * (self.counts[targets] + 1) / q_all)
        logq_neg = np.log(S * (self.counts[neg] + 1) / q_all)
        logq = torch.as_tensor(np.concatenate([logq_pos[:, None],
                                               np.broadcast_to(logq_neg, (len(targets), S))], 1),
                               dtype=torch.float32, device=dev)
        v_pos = V[torch.as_tensor(np.searchsorted(need, targets), device=dev)]
        v_neg = V[torch.as_tensor(np.searchsorted(need, neg), device=dev)]
        logits = torch.cat([(u * v_pos).sum(-1, keepdim=True), u @ v_neg.T], 1)
        pos = torch.zeros(len(targets), dtype=torch.int64, device=dev)
        return None, logq, pos, logits

    def _update_residuals(self, resid: torch.Tensor, pair_loss: torch.Tensor, w: torch.Tensor,
                          owners: np.ndarray, user_states: list[UserState]) -> None:
        """Per-user step on p_u with the per-user rule, from each user's mean-loss gradient."""
        if not self.cfg.use_residual or resid.grad is None:
            return
        n = len(user_states)
        own = torch.as_tensor(owners, device=self.device)
        w_user = torch.zeros(n + 1, device=self.device).index_add_(0, own, w)[:n]
        l_user = torch.zeros(n + 1, device=self.device).index_add_(0, own, pair_loss * w)[:n]
        has = (w_user > 0).cpu().numpy()
        grad = (resid.grad[:n] * (w.sum() / w_user.clamp(min=1e-12))[:, None]).cpu().numpy()
        loss = (l_user / w_user.clamp(min=1e-12)).cpu().numpy()
        idx = np.flatnonzero(has)
        if len(idx) == 0:
            return
        rs = _rule_state([user_states[i] for i in idx], self.cfg.alpha0)
        delta = self.rule.step(rs, grad[idx].astype(np.float64), loss[idx].astype(np.float64))
        for j, i in enumerate(idx):
            st = user_states[i]
            base = np.zeros(self.n_user, np.float32)
            if st.residual is not None:
                base[: len(st.residual)] = st.residual
            st.residual = (base + delta[j]).astype(np.float32)
            st.alpha, st.accum = float(rs.alpha[j]), float(rs.accum[j])
            st.loss_ema, st.loss_var = float(rs.loss_ema[j]), float(rs.loss_var[j])
            st.steps = int(rs.steps[j])

    # ---------------------------------------------------------------- serving
    def user_vectors(self, states: Sequence[UserState]) -> np.ndarray:
        """(n, dim) user vectors u = encoder(history) + p_u, for querying the index."""
        return self.history_vectors([self.history(st) for st in states],
                                    [st.residual for st in states])

    @torch.no_grad()
    def history_vectors(self, hists: Sequence[tuple],
                        residuals: Sequence[np.ndarray | None]) -> np.ndarray:
        """User vectors from history snapshots (e.g. `Pending.hists`: what the user's vector
        was just before each event of a batch) and the users' residuals."""
        if not hists:
            return np.zeros((0, self.cfg.dim), dtype=np.float32)
        seqs = self._pad(hists)
        u = self._encode(seqs, *self._item_table(self._window(seqs).rows.ravel())).cpu().numpy()
        if self.cfg.use_residual:
            for k, res in enumerate(residuals):
                if res is not None:
                    u[k] += res[: self.cfg.dim]
        return u.astype(np.float32)

    def scores(self, hists: Sequence[tuple], residuals: Sequence[np.ndarray | None],
               rows: np.ndarray) -> np.ndarray:
        """Final scores (P, len(rows)) of the items `rows` for history snapshots."""
        return self.blend(hists, self.history_vectors(hists, residuals), rows, residuals)

    @torch.no_grad()
    def blend(self, hists: Sequence[tuple], U: np.ndarray, rows: np.ndarray,
              residuals: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
        """Final scores from user vectors U: u·v alone, or with co-visitation the ranker's
        learned blend of u·v, the co-visitation features and popularity (with each user's
        own correction of the blend weights, from their residuals)."""
        _, V = self.item_vectors(rows)
        out = U @ V.T
        if self.head is not None:
            feats, log_pop = self._features([h[0] for h in hists], rows)
            theta = self._thetas(residuals, len(hists))
            out = self.head(torch.as_tensor(out, device=self.device), feats, log_pop, theta)
            out = out.cpu().numpy()
        return out

    def _thetas(self, residuals: Sequence[np.ndarray | None] | None, n: int
                ) -> torch.Tensor | None:
        if not residuals or not self.cfg.use_residual:
            return None
        theta = np.zeros((n, self.n_head), np.float32)
        for k, res in enumerate(residuals):
            if res is not None and len(res) > self.cfg.dim:
                theta[k] = res[self.cfg.dim : self.n_user]
        return torch.as_tensor(theta, device=self.device)

    def covisit_candidates(self, hist: tuple, recent: int = 10, per_item: int = 50
                           ) -> np.ndarray:
        """Live item rows co-visited most with the user's `recent` newest distinct items (an
        item may appear more than once)."""
        if self.covis is None:
            return np.zeros(0, dtype=np.int64)
        newest = list(dict.fromkeys(r for r in reversed(hist[0]) if r))[:recent]
        rows = self.covis.neighbours(np.asarray(newest, dtype=np.int64), per_item)
        return rows[self.live[np.minimum(rows, len(self.live) - 1)] & (rows < len(self.live))]

    @torch.no_grad()
    def item_vectors(self, rows: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
        """Current item-tower vectors of the live items (or of `rows`)."""
        if rows is None:
            rows = np.flatnonzero(self.live)
        vecs = self.items(torch.as_tensor(rows, dtype=torch.int64, device=self.device))
        return [self.ids[r] for r in rows], vecs.cpu().numpy().astype(np.float32)

    # ---------------------------------------------------------------- checkpoints
    def checkpoint(self, extra: dict[str, str] | None = None) -> bytes:
        """Shared parameters, optimizer moments, item rows and co-visitation counts, as
        safetensors bytes (no pickle); `extra` rides along in the metadata."""
        tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in self.named_parameters()}
        tensors["counts"] = torch.as_tensor(self.counts[: len(self.ids)].copy())
        if self.covis is not None:
            for k, v in self.covis.arrays().items():
                tensors[f"covis.{k}"] = torch.as_tensor(v)
        for n, p in self.named_parameters():
            opt = self.sparse_opt if n == "items.E" else self.dense_opt
            for k, v in opt.state.get(p, {}).items():
                tensors[f"opt.{n}.{k}"] = torch.as_tensor(v).detach().cpu().reshape(-1).clone() \
                    if k == "step" else v.detach().cpu().contiguous()
        meta = {
            "format": CHECKPOINT_FORMAT,
            "config": json.dumps({k: getattr(self.cfg, k) for k in _STRUCTURAL}),
            "text_dim": str(self.text_dim),
            "ids": json.dumps(self.ids),
            "steps": str(self.steps),
            **(extra or {}),
        }
        return st_save(tensors, metadata=meta)

    def restore(self, data: bytes) -> dict[str, str]:
        """Load a checkpoint into this (fresh) learner; rows follow the checkpoint's order.

        Items come back not-live: the catalog replica re-upserts their text vectors.
        Returns the checkpoint's metadata (incl. what was passed as `extra`).
        """
        meta = _read_meta(data)
        want = json.loads(json.dumps({k: getattr(self.cfg, k) for k in _STRUCTURAL}))
        if json.loads(meta["config"]) != want or int(meta["text_dim"]) != self.text_dim:
            raise ValueError(f"checkpoint shape config {meta['config']} != this learner's {want}")
        if len(self.ids) > 1:
            raise RuntimeError("restore() needs a fresh learner (restore before the catalog)")
        tensors = st_load(data)
        ids = json.loads(meta["ids"])
        self.ids = ids
        self.rows = {i: r for r, i in enumerate(ids) if r > 0}
        cap = tensors["param.items.E"].shape[0]
        if cap != self.items.capacity:
            self.items = ItemTower(cap, self.text_dim, self.cfg.dim, self.cfg.item_tower
                                   ).to(self.device)
        params = dict(self.named_parameters())
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[f"param.{n}"].to(self.device))
        self.live = np.zeros(cap, dtype=bool)
        self.keys = np.zeros(cap, dtype=np.int64)
        self.keys[1 : len(ids)] = [item_hash(i) for i in ids[1:]]
        self.counts = np.zeros(cap)
        self.counts[: len(ids)] = tensors["counts"].numpy()
        self._make_optimizers()
        self._load_opt_state(tensors, params)
        self.steps = int(meta["steps"])
        if self.covis is not None and "covis.n" in tensors:
            self.covis.load_arrays({k[6:]: v.numpy() for k, v in tensors.items()
                                    if k.startswith("covis.")})
        return meta

    def _load_opt_state(self, tensors: dict, params: dict) -> None:
        for n, p in params.items():
            keys = {k.rsplit(".", 1)[1]: v for k, v in tensors.items()
                    if k.startswith(f"opt.{n}.") and k.count(".") == n.count(".") + 2}
            if not keys:
                continue
            opt = self.sparse_opt if n == "items.E" else self.dense_opt
            state = {k: v.to(self.device) for k, v in keys.items() if k != "step"}
            step = keys["step"]
            state["step"] = step.reshape(()) if isinstance(opt, torch.optim.Adam) else \
                int(step.reshape(-1)[0])
            opt.state[p] = state


class _Replay:
    """Ring buffer of recent (history -> target) pairs, replayed to curb forgetting.

    Text vectors of search events are not kept (they would dominate its memory): replayed
    search positions keep their event type but no text.
    """

    def __init__(self, capacity: int, history_len: int):
        self.cap, self.H = capacity, history_len
        self.rows = np.zeros((capacity, history_len), dtype=np.int64)
        self.types = np.zeros((capacity, history_len), dtype=np.int64)
        self.gaps = np.zeros((capacity, history_len), dtype=np.int64)
        self.target = np.zeros(capacity, dtype=np.int64)
        self.weight = np.zeros(capacity, dtype=np.float64)
        self.n = 0
        self.pos = 0

    def add(self, s: _Seqs, targets: np.ndarray, weights: np.ndarray) -> None:
        if self.cap == 0:
            return
        L = s.rows.shape[1]
        for p in range(len(targets)):
            i = self.pos
            for arr, src in ((self.rows, s.rows), (self.types, s.types), (self.gaps, s.gaps)):
                arr[i] = 0
                arr[i, self.H - L:] = src[p]
            self.target[i], self.weight[i] = targets[p], weights[p]
            self.pos = (self.pos + 1) % self.cap
            self.n = min(self.n + 1, self.cap)

    def sample(self, k: int, rng: np.random.Generator) -> tuple | None:
        if k == 0 or self.n == 0:
            return None
        idx = rng.choice(self.n, size=min(k, self.n), replace=False)
        seqs = _Seqs(self.rows[idx], self.types[idx], self.gaps[idx], [])
        return seqs, self.target[idx], self.weight[idx]


def _rule_state(states: list[UserState], alpha0: float) -> RuleState:
    return RuleState(
        alpha=np.array([alpha0 if s.alpha is None else s.alpha for s in states]),
        accum=np.array([s.accum for s in states]),
        loss_ema=np.array([np.nan if s.loss_ema is None else s.loss_ema for s in states]),
        loss_var=np.array([s.loss_var for s in states]),
        steps=np.array([s.steps for s in states], dtype=np.int64),
    )


def unique_ints(x: np.ndarray) -> np.ndarray:
    """Sorted unique values of an integer array: np.unique by sort + mask, which numpy 2.4's
    hash-based np.unique is ~6x slower than on the 10^5-long arrays of a batch."""
    s = np.sort(np.asarray(x).ravel())
    return s[np.concatenate([[True], s[1:] != s[:-1]])] if len(s) else s


def _take(s: _Seqs, idx: np.ndarray) -> _Seqs:
    pos = {int(p): k for k, p in enumerate(idx)}
    texts = [(pos[p], at, v) for p, at, v in s.texts if p in pos]
    return _Seqs(s.rows[idx], s.types[idx], s.gaps[idx], texts)


def _concat(a: _Seqs, b: _Seqs) -> _Seqs:
    """Stack two padded batches, re-padding the shorter one on the left."""
    L = max(a.rows.shape[1], b.rows.shape[1])

    def lpad(x: np.ndarray) -> np.ndarray:
        return np.pad(x, ((0, 0), (L - x.shape[1], 0)))

    shift = L - a.rows.shape[1]
    texts = [(p, pos + shift, v) for p, pos, v in a.texts]
    return _Seqs(
        np.concatenate([lpad(a.rows), lpad(b.rows)]),
        np.concatenate([lpad(a.types), lpad(b.types)]),
        np.concatenate([lpad(a.gaps), lpad(b.gaps)]),
        texts,
    )


def _read_meta(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(io.BytesIO(data[8 : 8 + header_len]).read())
    meta = header.get("__metadata__", {})
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a {CHECKPOINT_FORMAT} checkpoint")
    return meta
