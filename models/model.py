"""The shared model: what every serving worker holds and only the trainer moves.

    item tower   v_i = E[i] + W·t_i                       (models/two_tower.py ItemTower)
    user tower   u   = f(last H events) + p_u + q_s        (UserTower; p_u per user, q_s per
                                                            scenario, ScenarioTable)
    ranker       s_ui = w_us · [u·v_i, covis_k(u, i), log(1 + n_i)]
                                                 (PriorHead; w_us = w + θ_u + φ_s)
    loss         -log softmax_i(s_u)[target]   (over the catalog or sampled negatives,
                 models/losses.py; -log(1 - p) for a dislike)

Plus the catalog rows (models/items.py), the co-visitation counts (models/covisit.py) and
the popularity counts the sampled softmax draws negatives from. `version` is the trainer's
snapshot version this copy holds (0: fresh, nothing learned yet).

No optimizer here and no per-user state: the trainer (models/trainer.py) steps the
parameters, the per-user step (models/personal.py) moves p_u and θ_u with the parameters
frozen, and both compute their losses with `pair_losses`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models.config import LearnerConfig
from models.covisit import CoVisitation
from models.encoder import pick_device
from models.items import ItemRows, unique_ints
from models.losses import log_probs, log_q
from models.two_tower import ItemTower, PriorHead, ScenarioTable, Seqs, UserTower
from models.user_state import History, UserState


class SharedModel:
    """The towers, the ranker and the counts of the module doc, over one catalog. Fresh, it
    already ranks "more like what you just touched" first (the item tower starts from the
    text vectors; the transformer's output layer starts at zero):

    >>> model = SharedModel(LearnerConfig(device="cpu"), text_dim=4)
    >>> model.upsert_items(["a", "b", "c"], np.eye(3, 4, dtype=np.float32))
    >>> st = UserState(); st.append("a", etype=1, ts=1_000, text_vec=None, max_len=50)
    >>> hist = st.history(model.catalog)              # the user's events as catalog rows
    >>> s = model.scores([hist], [None], np.array(model.catalog.rows_of(["a", "b", "c"])))
    >>> s.shape, ["abc"[j] for j in np.argsort(-s[0])]   # s_ui for the one user
    ((1, 3), ['a', 'b', 'c'])
    """

    def __init__(self, config: LearnerConfig | None = None, text_dim: int = 384,
                 capacity: int = 1024):
        self.cfg = c = config or LearnerConfig()
        self.text_dim = text_dim
        self.device = pick_device(c.device)
        self.catalog = ItemRows(capacity)
        self.covis = CoVisitation(c.covisit_window, c.covisit_pair_decay, c.covisit_recencies,
                                  c.covisit_profile) if c.covisit else None
        with torch.random.fork_rng(devices=[]):  # same initial parameters in every process
            torch.manual_seed(c.seed)
            self.items = ItemTower(capacity, text_dim, c.dim, c.item_tower).to(self.device)
            self.users = UserTower(c.dim, c.history_len, c.user_tower, c.n_layers, c.n_heads,
                                   c.dropout).to(self.device)
            self.head = PriorHead(self.covis.n_features, len(c.covisit_recencies) // 2
                                  ).to(self.device) if self.covis else None
        self.counts = np.zeros(capacity, dtype=np.float64)  # positive targets per row
        self.softmax, self.sources = c.softmax, c.candidate_sources  # (frozen: shared)
        self.version = 0
        # per-user parameters: the residual p_u and, with the ranker, the user's own
        # correction θ_u of its blend weights; both move by the user's own learning rate
        self.n_head = 0 if self.head is None else self.head.n_params
        self.n_user = c.dim + self.n_head
        self.scenarios = ScenarioTable(c.max_scenarios, self.n_user).to(self.device)

    def fork(self) -> SharedModel:
        """An independent copy of the parameters and counts that shares this model's catalog
        rows (rows are per process; a server builds the next snapshot on a fork while it
        serves from this one). The trainer's model is never forked."""
        new = copy.copy(self)
        new.items, new.users = copy.deepcopy(self.items), copy.deepcopy(self.users)
        new.head, new.scenarios = copy.deepcopy(self.head), copy.deepcopy(self.scenarios)
        new.counts = self.counts.copy()
        if self.covis is not None:  # C and F are replaced, never changed in place, on add
            new.covis = copy.copy(self.covis)
            new.covis.n, new.covis._tops = self.covis.n.copy(), {}
        return new

    # ---------------------------------------------------------------- catalog
    def upsert_items(self, item_ids: Sequence[str], text_vectors: np.ndarray,
                     scenarios: Sequence[Sequence[str] | None] | None = None,
                     fingerprints: np.ndarray | None = None) -> None:
        """Add or update items (their frozen text vectors, and where each may be shown:
        None = everywhere); a re-added item keeps its E row. Text vectors are stored at unit
        length: the item tower's initial scale (ITEM_NORM) assumes it, whatever the encoder.
        `fingerprints`: of the texts the vectors were made from (None: unknown), for
        `known_text_vectors`."""
        rows = self.add_rows(item_ids)
        if len(rows):
            t = torch.as_tensor(np.asarray(text_vectors, dtype=np.float32), device=self.device)
            self.items.T[torch.as_tensor(rows, device=self.device)] = F.normalize(t, dim=1)
            self.catalog.fingerprints[rows] = 0 if fingerprints is None else fingerprints
            self.catalog.restrict(rows, scenarios or [None] * len(rows))
            self.catalog.set_live(rows, True)

    def known_text_vectors(self, item_ids: Sequence[str], fingerprints: np.ndarray
                           ) -> dict[int, np.ndarray]:
        """{position in `item_ids`: its stored text vector} for each item whose vector was
        made from the text of the same (non-zero) fingerprint: an item published again
        unchanged needs no encoder pass. A deleted item's vector counts too.

        >>> model = SharedModel(LearnerConfig(device="cpu"), text_dim=2)
        >>> model.upsert_items(["a", "b"], np.eye(2, dtype=np.float32), None, np.array([7, 8]))
        >>> {k: v.tolist() for k, v in model.known_text_vectors(
        ...     ["b", "a", "new"], np.array([8, 5, 9], np.uint64)).items()}  # "a" has changed
        {0: [0.0, 1.0]}
        """
        rows, same = self.catalog.same_text(item_ids, fingerprints)
        hit = np.flatnonzero(same)
        vecs = self.items.T[torch.as_tensor(rows[hit], device=self.device)].cpu().numpy()
        return dict(zip(hit.tolist(), vecs, strict=True))

    def add_rows(self, item_ids: Sequence[str]) -> np.ndarray:
        """Rows for `item_ids` (new ones not live yet), growing the tables with the catalog."""
        rows = self.catalog.add(item_ids)
        self.reserve(self.catalog.capacity)
        return rows

    def reserve(self, capacity: int) -> None:
        """Tables for at least `capacity` rows. New rows start alike in every process (trainer
        ranks must hold identical parameters, models/distributed.py; a run is repeatable):
        drawn from a generator seeded by the setting and the size, not torch's global one."""
        if capacity > self.items.capacity:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed + capacity)
                self.items.grow(capacity)
            self.counts = np.concatenate([self.counts, np.zeros(capacity - len(self.counts))])
        self.catalog.reserve(capacity)

    def delete_items(self, item_ids: Sequence[str]) -> None:
        """Deleted items leave the softmax and the index; their row is kept for a comeback."""
        rows = [self.catalog.rows[i] for i in item_ids if i in self.catalog.rows]
        self.catalog.set_live(np.asarray(rows, np.int64), False)

    def has_item(self, item_id: str) -> bool:
        return self.catalog.has(item_id)

    @property
    def n_items(self) -> int:
        return self.catalog.n_live

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        yield from (("items." + n, p) for n, p in self.items.named_parameters())
        yield from (("users." + n, p) for n, p in self.users.named_parameters())
        if self.head is not None:
            yield from (("head." + n, p) for n, p in self.head.named_parameters())
        yield "scenarios.P", self.scenarios.P

    # ---------------------------------------------------------------- sequences
    def item_table(self, rows: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Item vectors of the unique `rows` (computed once per step) and the sorted rows."""
        need = unique_ints(rows)
        return self.items(torch.as_tensor(need, device=self.device)), need

    def encode(self, s: Seqs, V: torch.Tensor, need: np.ndarray) -> torch.Tensor:
        """User-tower output for padded histories, gathering item vectors from (V, need).
        The encoder reads the newest `encoder_window` events (the co-visitation profile uses
        the whole history)."""
        dev = self.device
        s = s.newest(self.cfg.encoder_window)
        seq = V[torch.as_tensor(np.searchsorted(need, s.rows), device=dev)]
        if s.texts:
            idx_p = torch.tensor([t[0] for t in s.texts], device=dev)
            idx_l = torch.tensor([t[1] for t in s.texts], device=dev)
            tv = torch.as_tensor(np.stack([t[2] for t in s.texts]), device=dev)
            seq = seq.index_put((idx_p, idx_l), self.items.project_text(tv))
        return self.users(seq, torch.as_tensor(s.types, device=dev),
                          torch.as_tensor(s.gaps, device=dev))

    def features(self, hist_rows: Sequence[Sequence[int]] | np.ndarray, cols: np.ndarray
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Co-visitation features (K, P, len(cols)) and log-popularity (len(cols),)."""
        c = torch.as_tensor(self.covis.features(hist_rows, cols), device=self.device)
        return c, self.log_pop(cols)

    def scenario_histories(self, hist_rows: Sequence[Sequence[int]] | np.ndarray,
                           scenarios: Sequence[str] | None
                           ) -> Sequence[Sequence[int]] | np.ndarray:
        """Each history as its query's scenario reads it (`scenario_history`): the items
        the scenario allows, others blanked (0), or the whole history when it holds none of
        them. The co-visitation features of a query in scenario s then come from the user's
        sequence in s, with recency counted there, as a model of s alone would read it; a
        user new to s still brings what they did elsewhere. As given when nothing is
        restricted (one scenario, or items without `scenarios`).

        On Ciao's last 2,500 days this lifted NDCG@10 from 0.0822 to 0.0831 (seed 1: 0.0824
        to 0.0832); on the last 1,460 it cost 0.0882 -> 0.0868 (README, Quality). The user
        tower reads the whole history: restricted too, it measured lower."""
        if not self.cfg.scenario_history:
            return hist_rows
        return self._in_scenario(hist_rows, self.catalog.allowed_table(scenarios or []))

    def _in_scenario(self, hist_rows: Sequence[Sequence[int]] | np.ndarray,
                     allowed: tuple[np.ndarray, np.ndarray] | None
                     ) -> Sequence[Sequence[int]] | np.ndarray:
        """`scenario_histories` given the queries' `allowed_table`."""
        if allowed is None:
            return hist_rows
        table, which = allowed
        cap = table.shape[1]
        out = []
        for rows, w in zip(hist_rows, which, strict=True):
            rows = np.asarray(rows, np.int64)
            kept = np.where(table[w, np.minimum(rows, cap - 1)] & (rows < cap), rows, 0)
            out.append(kept if kept.any() else rows)
        return out

    def log_pop(self, rows: np.ndarray) -> torch.Tensor:
        """log(1 + n_i) of item rows, from the global interaction counts (replicated with
        the pairs; 0 for a row the counts do not reach yet)."""
        n = self.covis.n
        pop = np.where(rows < len(n), n[np.minimum(rows, len(n) - 1)], 0.0)
        return torch.as_tensor(np.log1p(pop), dtype=torch.float32, device=self.device)

    # ---------------------------------------------------------------- the loss
    def sample_negatives(self, rng: np.random.Generator, targets: np.ndarray,
                         scenarios: Sequence[str] | None = None) -> np.ndarray | None:
        """A step's negatives, as the loss's softmax strategy picks them among the
        `negative_pool` of its pairs (None: the full softmax over that pool)."""
        return self.softmax.negatives(self.counts, self.negative_pool(targets, scenarios), rng)

    def negative_pool(self, targets: np.ndarray, scenarios: Sequence[str] | None
                      ) -> np.ndarray:
        """Mask of the live rows that some pair's scenario allows, and the pairs' targets:
        the only items that can be a negative of a step's pairs (`scenarios`, one per pair).
        Every pair's softmax closes the items its scenario does not show, so an item no pair
        of the step may be shown adds nothing to a full softmax, and drawn as a sampled
        negative it is a wasted draw: over Ciao's 105k items in 28 categories, a draw over
        the whole catalog left a pair about 6% of its 2,048 negatives (the mean share of
        the catalog in an event's category, over the first 15,000 events).

        >>> m = SharedModel(LearnerConfig(covisit=False, device="cpu"), text_dim=2, capacity=6)
        >>> m.upsert_items([f"i{k}" for k in range(5)], np.ones((5, 2)),
        ...                scenarios=[["a"], ["a"], ["b"], ["c"], None])
        >>> m.negative_pool(np.array([3]), ["a", "a"]).astype(int).tolist()  # rows 1..5: i0..i4
        [0, 1, 1, 1, 0, 1]
        """
        return self._pool(targets, self.catalog.allowed_table(scenarios or []))

    def _pool(self, targets: np.ndarray, allowed: tuple[np.ndarray, np.ndarray] | None
              ) -> np.ndarray:
        """`negative_pool` from the pairs' `allowed_table`."""
        pool = self.catalog.live.copy()
        if allowed is not None:
            pool &= allowed[0].any(0)
            pool[targets] = self.catalog.live[targets]
        return pool

    def pair_losses(self, seqs: Seqs, targets: np.ndarray, weights: np.ndarray,
                    resid: torch.Tensor, fresh: np.ndarray, negatives: np.ndarray | None,
                    scenarios: Sequence[str] | None = None) -> torch.Tensor:
        """Per-pair loss of each (history -> target) pair, given each pair's per-user
        parameters `resid` (P, n_user: p_u then θ_u; zeros for replayed pairs). The softmax
        of a pair runs over the items allowed in its scenario ("": no filter) and, with
        `exclude_history_negatives`, not in its history nor in the seen set its example
        carried (`Seqs.interacted`), as serving ranks them: an item that can never be shown
        to that user there is no negative.

        The two-tower loss, plus with co-visitation the loss of the ranker that blends the
        (detached) two-tower score with the co-visitation features: the towers learn on
        their own, the ranker learns how much to trust each signal. The ranker learns from
        `fresh` pairs only: a replayed pair's target is already in the co-visitation counts,
        which would teach it to over-trust them. Its co-visitation features read each pair's
        history as serving reads it in the pair's scenario (`scenario_histories`)."""
        dev, d = self.device, self.cfg.dim
        cand = [] if negatives is None else [targets]
        V, need = self.item_table(np.concatenate(cand + [seqs.newest(
            self.cfg.encoder_window).rows.ravel()]))
        u = self.encode(seqs, V, need) + resid[:, :d]
        allowed = self.catalog.allowed_table(scenarios or [])  # (once for every use)
        if negatives is None:  # the whole pool, scored without its item vectors
            cols, logq = np.flatnonzero(self._pool(targets, allowed)), None
            pos = torch.as_tensor(np.searchsorted(cols, targets), device=dev)
            logits = self.items.scores(u, torch.as_tensor(cols, device=dev))
        else:  # column 0 is each pair's own target, then the shared negatives
            cols, (logq, pos, logits) = negatives, self._sampled_logits(u, targets, negatives,
                                                                        V, need)
        shut = self._closed(allowed, seqs.interacted(), cols, pos, targets,
                            negatives is not None)
        shown = logits if shut is None else logits.masked_fill(shut, float("-inf"))
        losses = self._nll(log_probs(shown, pos, logq, targets, negatives), weights)
        f = np.flatnonzero(fresh)
        if self.head is None or not len(f):
            return losses
        ft = torch.as_tensor(f, device=dev)
        blend = self.ranker_logits(seqs.rows[f], targets[f], cols, logits.detach()[ft],
                                   resid[ft, d:], logq is not None,
                                   None if allowed is None else (allowed[0], allowed[1][f]))
        if shut is not None:
            blend = blend.masked_fill(shut[ft], float("-inf"))
        head = self._nll(log_probs(blend, pos[ft], None if logq is None else logq[ft],
                                   targets[f], negatives), weights[f])
        return losses.index_add(0, ft, head)

    def ranker_logits(self, hist_rows: np.ndarray, targets: np.ndarray, cols: np.ndarray,
                      tower: torch.Tensor, theta: torch.Tensor, sampled: bool,
                      allowed: tuple[np.ndarray, np.ndarray] | None) -> torch.Tensor:
        """The ranker's training logits (P, columns) of pairs (histories `hist_rows`,
        `targets`): the columns `cols`, with each pair's own target in front when `sampled`;
        `tower` their u·v, `theta` the pairs' θ_u + φ_s, `allowed` their `allowed_table`.
        Every column is scored as serving scores that (user, item) (`blend_pairs`), with the
        pair's own blend weights. (The sampled target's popularity term once lacked θ_u + φ_s:
        its gradient came from the negatives alone, and the per-user and scenario steps
        lowered the popularity weight at every step; docs/quality.md.)"""
        if allowed is not None and self.cfg.scenario_history:
            hist_rows = self._in_scenario(hist_rows, allowed)
        feats, log_pop = self.features(hist_rows, cols)
        if sampled:  # each pair's target in front, as in the tower's logits
            tf = torch.as_tensor(self.covis.pair_features(
                hist_rows, np.arange(len(targets)), targets), device=self.device)
            feats = torch.cat([tf[:, :, None], feats], 2)
            log_pop = torch.cat([self.log_pop(targets)[:, None],
                                 log_pop.expand(len(targets), -1)], 1)
        return self.head(tower, feats, log_pop, theta)

    def _closed(self, allowed: tuple[np.ndarray, np.ndarray] | None, hist_rows: np.ndarray,
                cols: np.ndarray, pos: torch.Tensor, targets: np.ndarray, sampled: bool
                ) -> torch.Tensor | None:
        """(P, columns) mask of the columns a pair's user is never shown, so no negatives:
        items the pair's scenario does not allow (`allowed`: the pairs' `allowed_table`)
        and, with `exclude_history_negatives`, items the pair's user interacted with before
        (`hist_rows`: its history and carried seen set). Each pair's own target column stays
        open; None when nothing is closed.

        >>> m = SharedModel(LearnerConfig(covisit=False, device="cpu"), capacity=8)
        >>> hist = np.array([[0, 2, 5], [3, 3, 4]])   # rows; 0 = padding
        >>> m._closed(None, hist, np.arange(1, 7), torch.tensor([4, 3]), np.array([5, 4]),
        ...           sampled=False).int().tolist()   # columns: rows 1..6
        [[0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]]
        """
        parts = []
        if allowed is not None:
            table, which = allowed
            shut = ~table[:, cols][which]
            if sampled:  # column 0 holds each pair's own target
                shut = np.concatenate([np.zeros((len(shut), 1), bool), shut], 1)
            parts.append(shut)
        if self.cfg.exclude_history_negatives:
            parts.append(self._in_history(hist_rows, cols, targets, sampled))
        if not parts:
            return None
        mask = np.logical_or.reduce(parts)
        mask[np.arange(len(mask)), pos.cpu().numpy()] = False
        return torch.as_tensor(mask, device=self.device)

    def _in_history(self, hist_rows: np.ndarray, cols: np.ndarray, targets: np.ndarray,
                    sampled: bool) -> np.ndarray:
        """(P, columns) mask of the columns whose item is in the pair's history. Sampled:
        the columns are [own target, the shared negatives], bisected as their sorted
        distinct rows (np.isin over every pair's columns: 9.1 against 0.46 ms for 64 pairs
        of 60 rows and 2,048 negatives, a scratch benchmark)."""
        if not sampled:  # the live rows, sorted
            return _members(hist_rows, cols)
        own = ((hist_rows == targets[:, None]) & (hist_rows > 0)).any(1)
        distinct, where = np.unique(cols, return_inverse=True)
        return np.concatenate([own[:, None], _members(hist_rows, distinct)[:, where]], 1)

    def _nll(self, logp: torch.Tensor, weights: np.ndarray) -> torch.Tensor:
        neg = torch.as_tensor(weights < 0, device=self.device)
        p = logp.exp().clamp(max=1 - 1e-6)
        return torch.where(neg, -torch.log1p(-p), -logp)

    def _sampled_logits(self, u: torch.Tensor, targets: np.ndarray, neg: np.ndarray,
                        V: torch.Tensor, need: np.ndarray) -> tuple:
        """Logits over [own target, shared negatives] and their log Q (Q = S·q)."""
        dev = self.device
        logq = torch.as_tensor(log_q(self.counts, self.catalog.live, targets, neg),
                               dtype=torch.float32, device=dev)
        v_pos = V[torch.as_tensor(np.searchsorted(need, targets), device=dev)]
        logits = torch.cat([(u * v_pos).sum(-1, keepdim=True),
                            self.items.scores(u, torch.as_tensor(neg, device=dev))], 1)
        pos = torch.zeros(len(targets), dtype=torch.int64, device=dev)
        return logq, pos, logits

    def residuals(self, states: Sequence[UserState]) -> torch.Tensor:
        """(n, n_user) per-user parameters of `states` (zeros where a user has none yet)."""
        return torch.as_tensor(self.own_params([st.residual for st in states]),
                               device=self.device)

    def own_params(self, residuals: Sequence[np.ndarray | None] | None, n: int = 0
                   ) -> np.ndarray:
        """(n, n_user) users' own (p_u, θ_u), zeros where a user has none (or none used)."""
        out = np.zeros((len(residuals) if residuals else n, self.n_user), np.float32)
        if residuals and self.cfg.use_residual:
            for k, res in enumerate(residuals):
                if res is not None:
                    out[k, : min(len(res), self.n_user)] = res[: self.n_user]
        return out

    def scenario_params(self, scenarios: Sequence[str] | None, n: int) -> np.ndarray:
        """(n, n_user) scenarios' (q_s, φ_s); zeros without scenarios or with them off."""
        if not scenarios or not self.cfg.scenario_params:
            return np.zeros((n, self.n_user), np.float32)
        return self.scenarios.values(scenarios)

    def query_params(self, residuals: Sequence[np.ndarray | None] | None,
                     scenarios: Sequence[str] | None, n: int) -> np.ndarray:
        """(n, n_user) what each query adds to the shared model: (p_u + q_s, θ_u + φ_s)."""
        return self.own_params(residuals, n) + self.scenario_params(scenarios, n)

    # ---------------------------------------------------------------- serving
    def user_vectors(self, states: Sequence[UserState],
                     scenarios: Sequence[str] | None = None) -> np.ndarray:
        """(n, dim) user vectors u = encoder(history) + p_u + q_s, for querying the index."""
        return self.history_vectors([st.history(self.catalog) for st in states],
                                    [st.residual for st in states], scenarios)

    @torch.no_grad()
    def history_vectors(self, hists: Sequence[History],
                        residuals: Sequence[np.ndarray | None] | None,
                        scenarios: Sequence[str] | None = None) -> np.ndarray:
        """User vectors from history snapshots, the users' residuals and the scenarios."""
        if not hists:
            return np.zeros((0, self.cfg.dim), dtype=np.float32)
        seqs = Seqs.pad(hists)
        u = self.encode(seqs, *self.item_table(seqs.newest(self.cfg.encoder_window).rows)
                        ).cpu().numpy()
        u += self.query_params(residuals, scenarios, len(hists))[:, : self.cfg.dim]
        return u.astype(np.float32)

    def scores(self, hists: Sequence[History], residuals: Sequence[np.ndarray | None],
               rows: np.ndarray, scenarios: Sequence[str] | None = None) -> np.ndarray:
        """Final scores (P, len(rows)) of the items `rows` for history snapshots."""
        return self.blend(hists, self.history_vectors(hists, residuals, scenarios), rows,
                          residuals, scenarios)

    @torch.no_grad()
    def blend(self, hists: Sequence[History], U: np.ndarray, rows: np.ndarray,
              residuals: Sequence[np.ndarray | None] | None = None,
              scenarios: Sequence[str] | None = None) -> np.ndarray:
        """Final scores from user vectors U: u·v alone, or with co-visitation the ranker's
        learned blend of u·v, the co-visitation features and popularity (with each user's
        and each scenario's own correction of the blend weights)."""
        _, V = self.item_vectors(rows)
        out = U @ V.T
        if self.head is not None:
            feats, log_pop = self.features(
                self.scenario_histories([h.rows for h in hists], scenarios), rows)
            theta = self.query_params(residuals, scenarios, len(hists))[:, self.cfg.dim :]
            out = self.head(torch.as_tensor(out, device=self.device), feats, log_pop,
                            torch.as_tensor(theta, device=self.device))
            out = out.cpu().numpy()
        return out

    def pair_dots(self, U: np.ndarray, owner: np.ndarray, rows: np.ndarray,
                  V: np.ndarray | None = None) -> np.ndarray:
        """u·v of each pair (user owner[k], item rows[k]). `V` (len(rows), dim): the items'
        vectors if the caller has them (the index's), else the item tower's."""
        if V is None:
            cols = unique_ints(rows)
            V = self.item_vectors(cols)[1][np.searchsorted(cols, rows)]
        return np.einsum("pd,pd->p", U[owner], V)

    @torch.no_grad()
    def blend_pairs(self, hists: Sequence[History], U: np.ndarray, owner: np.ndarray,
                    rows: np.ndarray, residuals: Sequence[np.ndarray | None] | None = None,
                    scenarios: Sequence[str] | None = None,
                    tower: np.ndarray | None = None) -> np.ndarray:
        """`blend`'s scores of the pairs (user owner[k], item rows[k]) only, what serving
        ranks: O(pairs), where `blend` fills (users x every candidate of the batch), which a
        50k-item catalog makes the batch's largest cost. `tower`: the pairs' u·v if the
        caller has them (`pair_dots`, or the index search's own scores)."""
        if not len(rows):
            return np.zeros(0, np.float32)
        if tower is None:
            tower = self.pair_dots(U, owner, rows)
        if self.head is None:
            return tower
        dev = self.device
        feats = self.covis.pair_features(
            self.scenario_histories([h.rows for h in hists], scenarios), owner, rows)
        theta = self.query_params(residuals, scenarios, len(hists))[owner, self.cfg.dim :]
        out = self.head(torch.as_tensor(tower[:, None], device=dev),
                        torch.as_tensor(feats[:, :, None], device=dev),
                        self.log_pop(rows)[:, None], torch.as_tensor(theta, device=dev))
        return out[:, 0].cpu().numpy()

    @torch.no_grad()
    def item_vectors(self, rows: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
        """Current item-tower vectors of the live items (or of `rows`)."""
        if rows is None:
            rows = np.flatnonzero(self.catalog.live)
        vecs = self.items(torch.as_tensor(rows, dtype=torch.int64, device=self.device))
        return self.catalog.ids_of(rows), vecs.cpu().numpy().astype(np.float32)


def _members(hist_rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(P, len(cols)) mask of the sorted, distinct rows `cols` that each pair's history
    `hist_rows` (P, H; 0 = padding) holds. Rows are small dense integers, so each history
    row finds its column through a table indexed by row, with no sort (bisecting `cols`
    sorted the ~10^4 history rows of a step first).

    >>> _members(np.array([[0, 2, 5], [7, 5, 5]]), np.array([2, 3, 5])).astype(int).tolist()
    [[1, 0, 1], [0, 0, 1]]
    """
    mask = np.zeros((len(hist_rows), len(cols)), bool)
    if not len(cols):
        return mask
    where = np.full(max(int(cols[-1]), int(hist_rows.max(initial=0))) + 1, -1, np.int32)
    where[cols] = np.arange(len(cols), dtype=np.int32)
    at = where[hist_rows]
    hit = (at >= 0) & (hist_rows > 0)
    mask[np.nonzero(hit)[0], at[hit]] = True
    return mask
