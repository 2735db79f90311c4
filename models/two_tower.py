"""The two towers, scored by inner product so FAISS can serve them.

Item tower:  v_i = E[i] + W·t_i   (learned ID embedding + learned projection of the frozen
             text embedding t_i; a new item starts from its text alone, E[i] ≈ 0).
User tower:  u = f(last H events) (+ p_u, added by the learner), where f is a small causal
             sequence encoder over [item vector + event-type embedding + time-gap embedding +
             position] of each past event, read out at a final query token. (The query token
             carries no time: when a recommendation is served, the time of the next event is
             unknown, so training must not see it either.)

Their input is a user's recent events: one `History` per user (models/user_state.py),
padded into `Seqs`. The
per-scenario parameters (`ScenarioTable`) add to the user's own (models/personal.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.config import EVENT_TYPE_IDS

if TYPE_CHECKING:
    from models.user_state import History

N_GAP_BUCKETS = 24  # log2 buckets of seconds: 0 s ... ~97 days


def gap_buckets(gap_ms: np.ndarray) -> np.ndarray:
    """Time gaps (ms) -> bucket ids floor(log2(1 + seconds)), clipped."""
    sec = np.maximum(np.asarray(gap_ms, dtype=np.float64), 0.0) / 1000.0
    return np.minimum(N_GAP_BUCKETS - 1, np.floor(np.log2(1.0 + sec))).astype(np.int64)


def _flat(lists: Iterable[list[int]], total: int) -> np.ndarray:
    """The lists end to end, as int64 (`total` values in all)."""
    return np.fromiter(chain.from_iterable(lists), np.int64, total)


@dataclass
class Seqs:
    """A padded batch of histories: the user tower's input.

    A `History` holds item rows of this process (models/items.py; 0 = padding, a text-only
    event or an unknown item), event types, timestamps and the text vectors of text-only events
    by position. `Seqs` stacks histories left-padded to a common length L, so position L-1 is
    always the newest event.

    >>> from models.user_state import History
    >>> s = Seqs.pad([History([3, 4], [1, 1], [0, 2000], []), History([5], [2], [0], [])])
    >>> s.rows.tolist(), s.gaps.tolist()
    ([[3, 4], [0, 5]], [[0, 1], [0, 0]])
    """

    rows: np.ndarray  # (P, L) int64 item rows, 0 = pad or text-only event
    types: np.ndarray  # (P, L) int64
    gaps: np.ndarray  # (P, L) int64 gap buckets
    texts: list[tuple[int, int, np.ndarray]]  # (pair, position, text vector)
    seen: np.ndarray | None = None  # (P, S) rows of the seen set the example carried, 0 = pad

    @classmethod
    def pad(cls, hists: Sequence[History], seen: Sequence[np.ndarray] | None = None) -> Seqs:
        """Every history at once: one flat array per field, scattered into the padded
        matrices (`seen`: each pair's carried seen rows, `seen_matrix`). Numpy calls per
        history took 6.7 ms for 457 histories of up to 50 events, this 1.2 ms (the same
        arrays)."""
        lens = np.fromiter((len(h.rows) for h in hists), np.int64, len(hists))
        L, P, total = max(1, int(lens.max(initial=0))), len(hists), int(lens.sum())
        rows, types, gaps = (np.zeros((P, L), dtype=np.int64) for _ in range(3))
        first = np.cumsum(lens) - lens  # where each history starts in the flat arrays
        pair = np.repeat(np.arange(P), lens)
        at = np.arange(total) - np.repeat(first - (L - lens), lens)  # its padded position
        rows[pair, at] = _flat((h.rows for h in hists), total)
        types[pair, at] = _flat((h.types for h in hists), total)
        ts = _flat((h.ts for h in hists), total)
        gap = np.diff(ts, prepend=ts[:1])
        gap[first[lens > 0]] = 0  # a history's oldest event has no gap
        gaps[pair, at] = gap_buckets(gap)
        texts = [(p, L - len(h.rows) + k, vec) for p, h in enumerate(hists) for k, vec in h.texts]
        return cls(rows, types, gaps, texts, seen_matrix(seen))

    def __len__(self) -> int:
        return len(self.rows)

    def newest(self, n: int) -> Seqs:
        """The newest `n` positions of every sequence."""
        off = max(0, self.rows.shape[1] - n)
        if off == 0:
            return self
        texts = [(p, pos - off, v) for p, pos, v in self.texts if pos >= off]
        return Seqs(self.rows[:, off:], self.types[:, off:], self.gaps[:, off:], texts,
                    self.seen)

    def take(self, idx: np.ndarray) -> Seqs:
        pos = {int(p): k for k, p in enumerate(idx)}
        texts = [(pos[p], at, v) for p, at, v in self.texts if p in pos]
        return Seqs(self.rows[idx], self.types[idx], self.gaps[idx], texts,
                    None if self.seen is None else self.seen[idx])

    def concat(self, other: Seqs) -> Seqs:
        """Stack two padded batches, re-padding the shorter one on the left."""
        L = max(self.rows.shape[1], other.rows.shape[1])

        def lpad(x: np.ndarray) -> np.ndarray:
            return np.pad(x, ((0, 0), (L - x.shape[1], 0)))

        shift = L - self.rows.shape[1]
        texts = [(p, at + shift, v) for p, at, v in self.texts] + [
            (p + len(self), at + L - other.rows.shape[1], v) for p, at, v in other.texts]
        seen = seen_matrix([*self.seen_rows(), *other.seen_rows()])
        return Seqs(np.concatenate([lpad(self.rows), lpad(other.rows)]),
                    np.concatenate([lpad(self.types), lpad(other.types)]),
                    np.concatenate([lpad(self.gaps), lpad(other.gaps)]), texts, seen)

    def seen_rows(self) -> list[np.ndarray]:
        """Each pair's carried seen rows (none where not carried)."""
        if self.seen is None:
            return [np.zeros(0, np.int64)] * len(self)
        return [row[row > 0] for row in self.seen]

    def interacted(self) -> np.ndarray:
        """(P, L + S) the rows each pair's user interacted with before it: its history and,
        where the example carried it, its seen set (0 = padding)."""
        return self.rows if self.seen is None else np.concatenate([self.rows, self.seen], 1)


def seen_matrix(lists: Sequence[np.ndarray] | None) -> np.ndarray | None:
    """`Seqs.seen` of per-pair seen rows: None where no pair carries any (the mask then
    needs no extra columns)."""
    return padded_rows(lists) if lists is not None and any(len(r) for r in lists) else None


def padded_rows(lists: Sequence[np.ndarray]) -> np.ndarray:
    """Right-padded (len(lists), longest) int64 matrix of row lists, 0 = padding.

    >>> padded_rows([np.array([3, 1]), np.array([], np.int64)]).tolist()
    [[3, 1], [0, 0]]
    """
    out = np.zeros((len(lists), max(map(len, lists), default=0)), np.int64)
    for p, rows in enumerate(lists):
        out[p, : len(rows)] = rows
    return out


N_TYPES = 10  # 0 = padding, 1..8 = event types (models.config.EVENT_TYPE_IDS), 9 = query token
QUERY_TYPE = 9
#: Length of a new item's vector W·t for a unit text vector t. The untrained towers rank by
#: text similarity (u is the pool of the history's item vectors) at logits that already
#: separate, and the first Adam steps on the user tower's zero-initialised correction
#: (≈ lr per weight per step, whatever the gradient) refine that ranking instead of
#: swamping it. PyTorch's default init gave |W·t| ≈ 0.24, and the demo's first trained
#: snapshot then recommended at chance (tests/test_learner.py checks the first steps).
ITEM_NORM = 2.0


class ItemTower(nn.Module):
    """v_i = E[i] + W·t_i (mode `both`; `id`: E[i] alone, `text`: W·t_i alone). Row 0 is
    padding (its vector is always zero). Rows are grown by doubling. W starts with
    |W·t| ≈ ITEM_NORM for a unit t.

    >>> import torch
    >>> tower = ItemTower(capacity=4, text_dim=3, dim=2, mode="text")
    >>> tower.T[1] = torch.tensor([1.0, 0.0, 0.0])         # item 1's text embedding t_1
    >>> torch.equal(tower(torch.tensor([1]))[0], tower.proj.weight[:, 0])  # v_1 = W·t_1
    True
    >>> tower(torch.tensor([0])).abs().sum().item()        # padding
    0.0
    """

    def __init__(self, capacity: int, text_dim: int, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        self.dim = dim
        self.E = nn.Parameter(torch.randn(capacity, dim) * 0.01)
        with torch.no_grad():
            self.E[0].zero_()
        self.proj = nn.Linear(text_dim, dim, bias=False)
        bound = ITEM_NORM * (3 / dim) ** 0.5  # U(-b, b): E|W·t|² = dim·b²/3 for a unit t
        nn.init.uniform_(self.proj.weight, -bound, bound)
        self.register_buffer("T", torch.zeros(capacity, text_dim))

    @property
    def capacity(self) -> int:
        return self.E.shape[0]

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        # (F.embedding gathers T's rows in 0.6 ms where T[rows] took 1.0: 2,400 rows)
        if self.mode == "id":
            return self._ids(rows)
        text = self.proj(F.embedding(rows, self.T))
        return text if self.mode == "text" else self._ids(rows) + text

    def _ids(self, rows: torch.Tensor) -> torch.Tensor:
        """E's rows (a sparse gradient: a step touches few of them)."""
        return F.embedding(rows, self.E, padding_idx=0, sparse=True)

    def scores(self, u: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """u·v_j for every j in `rows` (the full softmax's logits over a catalog). For a few
        users as u·E[j] + (Wᵀu)·t_j, without forming the item vectors: forming them costs
        n·dim·text_dim (and as much again backward), this n·text_dim per user, so it is
        the cheaper way below dim·text_dim / (text_dim − dim) users (77 at 64 and 384; a
        trainer step has 32 to 64). For a catalog the text part runs over the rows up to
        the largest one, a view of T, and picks `rows` from the product: cheaper than
        gathering n rows of T. For a sample of rows (under half of those up to the largest:
        the sampled softmax's 2,048 negatives among 50,000 items) it gathers their rows of T.

        >>> tower = ItemTower(capacity=5, text_dim=3, dim=2, mode="both")
        >>> tower.T[1:] = torch.randn(4, 3)
        >>> for rows in (torch.tensor([1, 3, 4]), torch.tensor([4, 1])):  # catalog, sample
        ...     for u in (torch.randn(2, 2), torch.randn(9, 2)):          # factored, formed
        ...         print(torch.allclose(tower.scores(u, rows), u @ tower(rows).T, atol=1e-6))
        True
        True
        True
        True
        """
        t, d = self.T.shape[1], self.dim
        if self.mode != "id" and len(u) * (t - d) >= d * t:
            return u @ self(rows).T
        out = torch.zeros(len(u), len(rows), device=u.device) if self.mode == "text" \
            else u @ self._ids(rows).T
        if self.mode != "id" and len(rows):
            uw, upto = u @ self.proj.weight, int(rows.max()) + 1
            if 2 * len(rows) >= upto:  # most rows up to the largest: the catalog
                out = out + (uw @ self.T[:upto].T).index_select(1, rows)
            else:  # a sample (the sampled softmax's negatives): their rows of T alone
                out = out + uw @ F.embedding(rows, self.T).T
        return out

    def project_text(self, text_vecs: torch.Tensor) -> torch.Tensor:
        """Vector of a text-only event (a search query) in item space."""
        return self.proj(text_vecs)

    def grow(self, capacity: int) -> None:
        """Re-allocate E and T with more rows (new rows: small random E, zero text)."""
        old = self.capacity
        extra_e = (torch.randn(capacity - old, self.dim) * 0.01).to(self.E.device)  # (CPU RNG)
        self.E = nn.Parameter(torch.cat([self.E.detach(), extra_e]))
        extra_t = torch.zeros(capacity - old, self.T.shape[1], device=self.T.device)
        self.T = torch.cat([self.T, extra_t])


class UserTower(nn.Module):
    """u = pool + out(norm(enc(x)[query])): a causal sequence encoder over the history (left-
    padded to a common length L) read out at a query token, added to a recency-weighted
    mean of the history's item vectors, `pool` = s · Σ_t softmax(-λ·age_t) v_t. `out` starts
    at zero, so an untrained tower points u at what the user just touched:

    >>> import torch
    >>> tower = UserTower(dim=4, history_len=3, kind="transformer", n_layers=1, n_heads=1,
    ...                   dropout=0.0)
    >>> seq = torch.zeros(1, 3, 4); seq[0, 2] = torch.tensor([1.0, 0, 0, 0])  # one event
    >>> types = torch.tensor([[0, 0, 1]])                  # two padding slots, then a view
    >>> tower(seq, types, torch.zeros(1, 3, dtype=torch.long)).tolist()
    [[1.0, 0.0, 0.0, 0.0]]
    """

    def __init__(self, dim: int, history_len: int, kind: str, n_layers: int, n_heads: int,
                 dropout: float):
        super().__init__()
        self.kind = kind
        self.n_heads = n_heads
        self.type_emb = nn.Embedding(N_TYPES, dim)
        self.gap_emb = nn.Embedding(N_GAP_BUCKETS, dim)
        self.pos_emb = nn.Embedding(history_len + 1, dim)
        if kind == "transformer":
            layer = nn.TransformerEncoderLayer(
                dim, n_heads, 2 * dim, dropout, batch_first=True, norm_first=True
            )
            self.enc: nn.Module = nn.TransformerEncoder(
                layer, n_layers, enable_nested_tensor=False
            )
        elif kind == "gru":
            self.enc = nn.GRU(dim, dim, num_layers=n_layers, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)  # the encoder starts as a no-op correction of the pool
        nn.init.zeros_(self.out.bias)
        # recency-weighted mean of the history's item vectors, added to the encoder output:
        # from the first event on, u points at what the user just touched ("more like this"),
        # and the encoder learns the correction. decay and scale are learned.
        self.decay = nn.Parameter(torch.tensor(-2.0))  # softplus -> ~0.13 per step back
        self.pool_scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, seq: torch.Tensor, types: torch.Tensor, gaps: torch.Tensor
                ) -> torch.Tensor:
        """seq (B, L, d) item vectors, types/gaps (B, L) ids -> u (B, d)."""
        if self.kind == "none":  # no sequence information: u is the per-user residual alone
            return torch.zeros(seq.shape[0], seq.shape[2], device=seq.device)
        pooled = self._recency_pool(seq, types)
        B, L, _ = seq.shape
        x = seq + self.type_emb(types) + self.gap_emb(gaps)
        q = self.type_emb.weight[QUERY_TYPE].expand(B, 1, -1)
        x = torch.cat([x, q], dim=1)
        # positions count back from the query token, so "newest" always has the same index
        pos = torch.arange(self.pos_emb.num_embeddings - L - 1, self.pos_emb.num_embeddings,
                           device=seq.device)
        x = x + self.pos_emb(pos)[None]
        if self.kind == "gru":
            return self.out(self.norm(self._gru_last(x, types))) + pooled
        else:
            h = self.enc(x, mask=self._mask(types))
        return self.out(self.norm(h[:, -1])) + pooled

    def _gru_last(self, x: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        """GRU over the real events + query token only (left padding must not be read)."""
        n = x.shape[1]
        lengths = (types != 0).sum(1) + 1  # + the query token
        start = n - lengths
        idx = (start[:, None] + torch.arange(n, device=x.device)[None]).clamp(max=n - 1)
        right = x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[2]))  # right-aligned
        packed = nn.utils.rnn.pack_padded_sequence(right, lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, h_n = self.enc(packed)
        return h_n[-1]

    def _recency_pool(self, seq: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        """sum_t w_t v_t with w ∝ exp(-decay·age) over real (non-pad) positions."""
        L = seq.shape[1]
        age = torch.arange(L - 1, -1, -1, device=seq.device, dtype=seq.dtype)
        logw = (-F.softplus(self.decay) * age)[None].expand(seq.shape[0], L)
        # padding and dislikes are not "more like this"
        logw = logw.masked_fill((types == 0) | (types == EVENT_TYPE_IDS["dislike"]), float("-inf"))
        w = torch.nan_to_num(torch.softmax(logw, dim=1))  # all-pad rows -> zeros
        return self.pool_scale * torch.einsum("bl,bld->bd", w, seq)

    def _mask(self, types: torch.Tensor) -> torch.Tensor:
        """Causal + padding mask (B·heads, L+1, L+1). The diagonal is always open so no row is
        fully masked (a fully masked row turns into NaN in the next layer)."""
        B, L = types.shape
        n = L + 1
        pad = torch.cat([types == 0, torch.zeros(B, 1, dtype=torch.bool, device=types.device)], 1)
        future = torch.triu(torch.ones(n, n, dtype=torch.bool, device=types.device), 1)
        blocked = future[None] | pad[:, None, :]
        blocked = blocked & ~torch.eye(n, dtype=torch.bool, device=types.device)[None]
        mask = torch.zeros(B, n, n, device=types.device).masked_fill(blocked, float("-inf"))
        return mask.repeat_interleave(self.n_heads, dim=0)


class PriorHead(nn.Module):
    """The ranker: a learned blend of the two-tower score, co-visitation features and
    log-popularity, with a user's own correction θ_u of the weights (models/personal.py):

        score(u, i) = (w + θ_u) · [u·v_i, c_1(u, i) … c_K(u, i), log pop_i]

    It starts as "two-tower score + the classic sequence-aware item-kNN blend" (one
    co-visitation feature, 0.05 popularity, scaled to softmax logits); learned online.

    >>> import torch
    >>> head = PriorHead(n_covis=2, init_feature=0)        # w = [1, 5, 0, 0.25]
    >>> tower = torch.tensor([[1.0, 2.0]])                  # one user, two candidates
    >>> covis = torch.tensor([[[0.5, 0.0]], [[9.0, 9.0]]])  # feature 2 starts unweighted
    >>> head(tower, covis, torch.zeros(2)).tolist()
    [[3.5, 2.0]]
    """

    def __init__(self, n_covis: int, init_feature: int, scale: float = 5.0):
        super().__init__()
        w = torch.zeros(n_covis)
        w[init_feature] = scale
        self.tower_w = nn.Parameter(torch.tensor(1.0))
        self.covis_w = nn.Parameter(w)
        self.pop_w = nn.Parameter(torch.tensor(0.05 * scale))

    @property
    def n_params(self) -> int:
        return 2 + self.covis_w.numel()

    def forward(self, tower: torch.Tensor, covis: torch.Tensor, log_pop: torch.Tensor,
                theta: torch.Tensor | None = None) -> torch.Tensor:
        """tower (P, N) two-tower scores, covis (K, P, N), log_pop (N,) or (P, N) -> (P, N).
        `theta` (P, 2 + K): per-row corrections of [tower_w, covis_w..., pop_w]."""
        w = torch.cat([self.tower_w[None], self.covis_w, self.pop_w[None]])[None, :]
        if theta is not None:
            w = w + theta
        K = self.covis_w.numel()
        return (w[:, :1] * tower + torch.einsum("pk,kpn->pn", w[:, 1 : 1 + K], covis)
                + w[:, 1 + K :] * (log_pop if log_pop.dim() == 2 else log_pop[None, :]))


class ScenarioTable(nn.Module):
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
