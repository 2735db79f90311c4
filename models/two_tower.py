"""The two towers, scored by inner product so FAISS can serve them.

Item tower:  v_i = E[i] + W·t_i   (learned ID embedding + learned projection of the frozen
             text embedding t_i; a new item starts from its text alone, E[i] ≈ 0).
User tower:  u = f(last H events) (+ p_u, added by the learner), where f is a small causal
             sequence encoder over [item vector + event-type embedding + time-gap embedding +
             position] of each past event, read out at a final query token. (The query token
             carries no time: when a recommendation is served, the time of the next event is
             unknown, so training must not see it either.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import EVENT_TYPE_IDS
from models.sequences import N_GAP_BUCKETS

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
