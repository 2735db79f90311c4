"""Streaming peer recommenders for the prequential (test-then-train) evaluator.

Every peer follows the evaluator's protocol (evaluation/evaluate.py, :class:`StreamModel`):
``step(batch, which, excluded)`` returns one row of scores over the whole catalog (items
``0..n_items-1``) for each event ``batch[j]``, j in ``which`` — user-side state (the profile
of recent items) as it was just before that event, shared state (counts, factors) as of the
start of the micro-batch — and then learns the batch's events ``(user, item, ts_ms[,
scenario])`` in stream order. With ``own_history=False`` (a batch that is one day, whose
order is unknown) every event sees its user's profile as of the batch's start. Every event
is an implicit positive interaction. Unknown users always get a valid row (zeros, or the
popularity term where the model has one). Peers score every item, so they ignore
``excluded`` and the scenario's item restriction: the evaluator drops those items from the
ranking itself.

Peers (``BASELINES`` maps each ``name`` to its class; ``make_baseline`` builds one by name):

==================  ======================================================================
``pop``             cumulative interaction counts within the event's scenario
``pop_decay``       exponentially decayed counts, half-life in events
``itemknn``         incremental item-item cosine over user co-occurrence counts
``isgd``            incremental SGD matrix factorisation for positive-only feedback
``itemknn_seq``     sequence-aware item-kNN (distance-decayed co-occurrence, recency profile)
``sr_decay``        sequential rules a -> b weighted 1/distance, the last items' rules decayed
``markov_backoff``  first-order transitions P(j | last item), backing off to ``itemknn_seq``
==================  ======================================================================

>>> m = ItemKNNSeq(n_items=3)
>>> m.step([("u", 0, 0), ("u", 1, 1), ("v", 2, 2)], which=[1, 2]).shape
(2, 3)
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

Event = tuple  # (user, item index in catalog order, ts ms[, scenario name]; a triple: "default")


@runtime_checkable
class StreamModel(Protocol):
    """What the prequential evaluator (evaluation/evaluate.py) relies on. A model that
    names its items is a `NamedItems` too."""

    name: str

    def step(self, batch: Sequence[Event], which: Sequence[int],
             excluded: Sequence[Any] | None = None, own_history: bool = True
             ) -> np.ndarray:
        """Scores (len(which), n_items) for the events `batch[j]`, j in `which`, each with
        its user's history strictly before it and shared state from before the batch; then
        learn the batch. `excluded[k]`: what event which[k] may not be recommended (a
        serving path uses it to pick candidates; full-catalog scorers may ignore it).
        A batch of one day (`prequential(by_day=True)`) is called with `own_history=False`:
        then every event sees its user's history as of the batch's start, since the order
        of a day's events is unknown."""
        ...


@runtime_checkable
class NamedItems(StreamModel, Protocol):
    """A model that names its items in catalog order (the streamrec adapter): the
    evaluator's exclusions then match the model's own by those names."""

    item_ids: list[str]


class _RecentDistinct:
    """The last ``size`` distinct items of one user, oldest first (a re-seen item moves last)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[int, None] = OrderedDict()

    def add(self, item: int) -> None:
        self._items[item] = None
        self._items.move_to_end(item)
        if len(self._items) > self.size:
            self._items.popitem(last=False)

    def items(self) -> np.ndarray:
        """Item ids, oldest first."""
        return np.fromiter(self._items, dtype=np.intp, count=len(self._items))


class _StateAtBatchStart:
    """Peers whose only user-side state is learnt: score everybody, then learn the batch."""

    def step(self, batch: Sequence[Event], which: Sequence[int],
             excluded: Sequence[Any] | None = None, own_history: bool = True
             ) -> np.ndarray:
        out = self.score([batch[j][0] for j in which])  # type: ignore[attr-defined]
        self.learn(batch)  # type: ignore[attr-defined]
        return out


class _ProfileBeforeEvent:
    """kNN peers: each scored event sees the user's profile up to that very event."""

    profile_size: int
    _profile: dict[str, _RecentDistinct]

    def score(self, users: Sequence[str]) -> np.ndarray:
        """Scores from the current state (between batches)."""
        empty = np.empty(0, dtype=np.intp)
        return self._score_profiles([self._profile[u].items() if u in self._profile else empty
                                     for u in users])

    def step(self, batch: Sequence[Event], which: Sequence[int],
             excluded: Sequence[Any] | None = None, own_history: bool = True
             ) -> np.ndarray:
        out = self._score_profiles(self._profiles_before(batch, which)) if own_history \
            else self.score([batch[j][0] for j in which])
        self.learn(batch)  # type: ignore[attr-defined]
        return out

    def _score_profiles(self, profiles: list[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def _profiles_before(self, batch: Sequence[Event], which: Sequence[int]) -> list[np.ndarray]:
        """Last `profile_size` distinct items (oldest first) of each `which` event's user."""
        wanted = set(which)
        extra: dict[str, list[int]] = {}
        out = []
        for j, (user, item, *_) in enumerate(batch):
            if j in wanted:
                prof = self._profile.get(user)
                base = list(prof.items()) if prof is not None else []
                out.append(_last_distinct(base + extra.get(user, []), self.profile_size))
            extra.setdefault(user, []).append(item)
        return out


def _last_distinct(items: list[int], size: int) -> np.ndarray:
    """The last `size` distinct items, oldest first (a repeat counts at its last position)."""
    last = dict.fromkeys(reversed(items))  # newest first, first occurrence kept
    return np.fromiter(reversed(list(last)[:size]), dtype=np.intp)


def _inv_sqrt(counts: np.ndarray) -> np.ndarray:
    """1/sqrt(c), and 0 where c == 0 (an item nobody has touched has no neighbours)."""
    out = np.zeros_like(counts, dtype=np.float64)
    np.divide(1.0, np.sqrt(counts), out=out, where=counts > 0)
    return out


def _cosine_scores(
    cooc: _DenseRows | _GrowingRows, inv_sqrt: np.ndarray,
    profiles: Sequence[tuple[np.ndarray, np.ndarray]],
) -> np.ndarray:
    """Rows ``Σ_p w_p · c_pi / sqrt(c_p c_i)`` for each profile ``(items p, weights w_p)``.

    Computed as one matrix product ``(W · diag(1/sqrt c)) @ C[cols] · diag(1/sqrt c)`` with W
    the (users x profile items) weight matrix, restricted to the union ``cols`` of the
    profiles' items so the product costs |users| x |cols| x n_items, not n_items³.
    """
    out = np.zeros((len(profiles), cooc.n))
    rows = [r for r, (items, _) in enumerate(profiles) if items.size]
    if not rows:
        return out
    items = np.concatenate([profiles[r][0] for r in rows])
    weights = np.concatenate([profiles[r][1] for r in rows])
    owner = np.repeat(np.arange(len(rows)), [profiles[r][0].size for r in rows])
    cols, col_of = np.unique(items, return_inverse=True)
    w = np.zeros((len(rows), cols.size))
    np.add.at(w, (owner, col_of), weights)
    w *= inv_sqrt[cols]
    out[rows] = cooc.product(w, cols) * inv_sqrt
    return out


class Pop(_StateAtBatchStart):
    """Popularity: ``score_i = n_si``, the cumulative number of interactions with item i in
    the scored event's scenario s (``counts``: over all scenarios; ``score`` ranks by it).

    The non-personalised baseline of every top-N study (e.g. Cremonesi, Koren & Turrin,
    RecSys 2010, "Performance of recommender algorithms on top-N recommendation tasks").
    Counted per scenario because "popular here" is the natural peer of a model adapted to
    the scenario: a page of games should not lead with the books everybody rates. With
    one scenario (plain triples) both are the same.
    """

    name = "pop"

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items
        self.counts = np.zeros(n_items)
        self.by_scenario: dict[str, np.ndarray] = {}

    def score(self, users: Sequence[str]) -> np.ndarray:
        return np.tile(self.counts, (len(users), 1))

    def step(self, batch: Sequence[Event], which: Sequence[int],
             excluded: Sequence[Any] | None = None, own_history: bool = True
             ) -> np.ndarray:
        out = np.zeros((len(which), self.n_items))
        for k, j in enumerate(which):
            counts = self.by_scenario.get(_scenario(batch[j]))
            if counts is not None:
                out[k] = counts
        self.learn(batch)
        return out

    def learn(self, batch: Sequence[Event]) -> None:
        for event in batch:
            item = event[1]
            self.counts[item] += 1.0
            scen = self.by_scenario.setdefault(_scenario(event), np.zeros(self.n_items))
            scen[item] += 1.0


def _scenario(event: Event) -> str:
    return event[3] if len(event) > 3 else "default"


class PopDecay(_StateAtBatchStart):
    """Exponentially decayed popularity, half-life measured in events.

    Each event first multiplies every count by ``d = 2^(-1/half_life)``, then adds 1 to its
    item: ``n_i(t) = Σ_{events e of i up to t} d^(t - t_e)``, so an event's weight halves after
    ``half_life`` further events (default 2,000 ≈ 2% of ML-100K). Decay is per *event*, not per
    wall-clock millisecond: the decay then tracks the stream's own pace and is unaffected by
    bursts or idle gaps in the timestamps (``ts_ms`` is ignored).

    Lazy form: ``raw = n · g`` with a global scale ``g = d^-t``; an event does ``g /= d`` and
    ``raw_i += g`` (O(1) instead of O(n_items)); when ``g`` exceeds ``renorm_at`` the raw
    counts are divided by ``g`` and ``g`` is reset to 1. ``score`` returns ``raw / g``.
    """

    name = "pop_decay"

    def __init__(self, n_items: int, half_life: float = 2000.0, renorm_at: float = 1e100) -> None:
        if half_life <= 0:
            raise ValueError("half_life must be positive")
        self.n_items = n_items
        self.half_life = float(half_life)
        self.decay = 0.5 ** (1.0 / self.half_life)
        self.renorm_at = renorm_at
        self._raw = np.zeros(n_items)
        self._scale = 1.0

    @property
    def counts(self) -> np.ndarray:
        """The decayed counts n_i as of the last event."""
        return self._raw / self._scale

    def score(self, users: Sequence[str]) -> np.ndarray:
        return np.tile(self.counts, (len(users), 1))

    def learn(self, batch: Sequence[Event]) -> None:
        for _, item, *_ in batch:
            self._scale /= self.decay
            self._raw[item] += self._scale
            if self._scale > self.renorm_at:
                self._raw /= self._scale
                self._scale = 1.0


class ItemKNN(_ProfileBeforeEvent):
    """Incremental item-item cosine kNN over user co-occurrence counts.

    ``c_ij`` = number of users who interacted with both i and j, ``c_i`` = number of users who
    interacted with i. When u meets i for the first time: ``c_ij += 1`` and ``c_ji += 1`` for
    every distinct earlier item j of u, and ``c_i += 1`` (a repeat of (u, i) changes nothing,
    so each user-pair counts once). ``sim_ij = c_ij / sqrt(c_i c_j)`` (cosine on binary
    user-item vectors); ``score_i = Σ_{p ∈ profile(u)} sim_pi`` with profile = u's last 50
    distinct items; a user with no profile yet gets the popularity row ``c_i`` instead of
    zeros (it only matters for users scored before their first event is learnt, e.g. within
    a micro-batch). Item-based CF after Sarwar et al., WWW 2001 and Deshpande & Karypis,
    TOIS 2004 (incremental counts as in Papagelis et al., 2005).

    Memory: ``C`` is :func:`pair_weights`'s: dense up to 11,585 items (23 MB for ML-100K's
    1,682), sparse beyond (105k items and more).
    """

    name = "itemknn"

    def __init__(self, n_items: int, profile_size: int = 50) -> None:
        self.n_items = n_items
        self.profile_size = profile_size
        self.cooc = pair_weights(n_items)
        self.counts = np.zeros(n_items)
        self._seen: dict[str, set[int]] = {}
        self._history: dict[str, list[int]] = {}  # distinct items, first-interaction order
        self._profile: dict[str, _RecentDistinct] = {}

    def _score_profiles(self, profiles: list[np.ndarray]) -> np.ndarray:
        weighted = [(items, np.ones(items.size)) for items in profiles]
        out = _cosine_scores(self.cooc, _inv_sqrt(self.counts), weighted)
        cold = [r for r, items in enumerate(profiles) if not items.size]
        out[cold] = self.counts  # no profile yet: popularity (c_i) instead of a row of zeros
        return out

    def learn(self, batch: Sequence[Event]) -> None:
        pairs = []
        for user, item, *_ in batch:
            earlier = self._learn_one(user, item)
            pairs.append((item, earlier, np.ones(earlier.size)))
        _add_both_ways(self.cooc, pairs)

    def _learn_one(self, user: str, item: int) -> np.ndarray:
        """Update u's profile and counts; returns the distinct earlier items `item` now pairs
        with (none for a repeat)."""
        seen = self._seen.setdefault(user, set())
        if user not in self._profile:
            self._profile[user] = _RecentDistinct(self.profile_size)
            self._history[user] = []
        self._profile[user].add(item)
        if item in seen:
            return np.empty(0, dtype=np.intp)
        earlier = np.asarray(self._history[user], dtype=np.intp)
        self.counts[item] += 1.0
        seen.add(item)
        self._history[user].append(item)
        return earlier


def _add_both_ways(cooc: _DenseRows | _GrowingRows,
                   pairs: Sequence[tuple[int, np.ndarray, np.ndarray]]) -> None:
    """``c_ij += w`` and ``c_ji += w`` for each event's (item i, earlier items j, weights w),
    in one call, event by event in stream order: a dense matrix gets the same sums, bit for
    bit, as one event at a time."""
    rows, cols, vals = [], [], []
    for item, earlier, w in pairs:
        mine = np.full(earlier.size, item, dtype=np.intp)
        rows += [mine, earlier]
        cols += [earlier, mine]
        vals += [w, w]
    if rows:
        cooc.add(np.concatenate(rows), np.concatenate(cols), np.concatenate(vals))


@dataclass(eq=False)
class ISGD(_StateAtBatchStart):
    """Incremental SGD matrix factorisation for positive-only feedback (ISGD).

    Vinagre, Jorge & Gama, UMAP 2014, "Fast incremental matrix factorization for
    recommendation with positive-only feedback" (LNCS 8538, pp. 459-470), Algorithm 2. Each
    event (u, i) is a target ``r_ui = 1``; a new user/item gets a latent vector ~ N(0, 0.1)
    (0.1 read as the standard deviation), then one SGD step on ``(1 - p_u·q_i)² + λ(‖p_u‖² +
    ‖q_i‖²)``::

        err = 1 - p_u · q_i
        p_u ← p_u + η (err · q_i − λ p_u)
        q_i ← q_i + η (err · p_u − λ q_i)     # p_u already updated, as in the paper

    Defaults k = 10, η = 0.05, λ = 0.01 (the project's choice; the paper grid-searches these
    per data set). Scoring follows the paper's protocol, where items are ranked by closeness
    of the prediction to the target 1: ``score_ui = 1 − |1 − p_u · q_i|``. Unknown users score
    0 everywhere; items never seen have no vector (q = 0), hence score 0 for everybody.
    """

    name: ClassVar[str] = "isgd"
    n_items: int
    k: int = 10
    learn_rate: float = 0.05
    reg: float = 0.01
    init_std: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self.item_vecs = np.zeros((self.n_items, self.k))
        self.item_known = np.zeros(self.n_items, dtype=bool)
        self.user_vecs: dict[str, np.ndarray] = {}

    def score(self, users: Sequence[str]) -> np.ndarray:
        p = np.zeros((len(users), self.k))
        known = [r for r, u in enumerate(users) if u in self.user_vecs]
        if known:
            p[known] = np.stack([self.user_vecs[users[r]] for r in known])
        return 1.0 - np.abs(1.0 - p @ self.item_vecs.T)  # p = 0 or q = 0 gives exactly 0

    def learn(self, batch: Sequence[Event]) -> None:
        for user, item, *_ in batch:
            self._step(user, item)

    def _step(self, user: str, item: int) -> None:
        p = self.user_vecs.get(user)
        if p is None:
            p = self.user_vecs[user] = self._rng.normal(0.0, self.init_std, self.k)
        if not self.item_known[item]:
            self.item_vecs[item] = self._rng.normal(0.0, self.init_std, self.k)
            self.item_known[item] = True
        q = self.item_vecs[item]  # a view: updated in place below
        err = 1.0 - float(p @ q)
        p += self.learn_rate * (err * q - self.reg * p)
        q += self.learn_rate * (err * p - self.reg * q)


@dataclass(eq=False)
class ItemKNNSeq(_ProfileBeforeEvent):
    """Sequence-aware item-kNN (session-kNN style: distance-decayed co-occurrence + recency).

    Counts: when u interacts with i, each of u's last ``window`` (= 50) earlier *events* j
    (k = distance in u's sequence, 1 = the previous event) adds ``0.9^(k-1)`` to ``c_ij`` and
    ``c_ji`` (pairs with j == i are skipped; a j occurring twice in the window adds twice), and
    ``n_i = c_i += 1`` (every event counts).

    Score: ``score_i = Σ_{p ∈ last 50 distinct items of u} 0.8^age(p) · c_pi / sqrt(c_p c_i)
    + 0.05 · log(1 + n_i)``, age 0 = the most recently interacted item. Vectorised as
    ``W @ (C / sqrt(c c^T)) + 0.05 log1p(n)`` with W the users' profile weights.
    Ideas from sequence-aware neighbourhood methods for session-based recommendation:
    Ludewig & Jannach, UMUAI 2018, "Evaluation of session-based recommendation algorithms"
    (SKNN/V-SKNN position decay), Garg et al., SIGIR 2019 (STAN).

    Memory: C as for :class:`ItemKNN` (:func:`pair_weights`).
    """

    name: ClassVar[str] = "itemknn_seq"
    n_items: int
    window: int = 50
    profile_size: int = 50
    pair_decay: float = 0.9
    recency_decay: float = 0.8
    pop_weight: float = 0.05

    def __post_init__(self) -> None:
        self.cooc = pair_weights(self.n_items)
        self.counts = np.zeros(self.n_items)
        self._recent: dict[str, deque[int]] = {}
        self._profile: dict[str, _RecentDistinct] = {}
        self._pair_w = self.pair_decay ** np.arange(self.window)  # index k-1

    def _score_profiles(self, profiles: list[np.ndarray]) -> np.ndarray:
        ages = [np.arange(items.size)[::-1] for items in profiles]  # newest has age 0
        weighted = [(items, self.recency_decay**age) for items, age in zip(profiles, ages,
                                                                          strict=True)]
        knn = _cosine_scores(self.cooc, _inv_sqrt(self.counts), weighted)
        return knn + self.pop_weight * np.log1p(self.counts)

    def learn(self, batch: Sequence[Event]) -> None:
        _add_both_ways(self.cooc, [(item, *self._learn_one(user, item))
                                   for user, item, *_ in batch])

    def _learn_one(self, user: str, item: int) -> tuple[np.ndarray, np.ndarray]:
        """Update u's sequence, profile and counts; returns the earlier events `item` now
        pairs with (newest first, `item` itself left out) and their weights 0.9^(k-1)."""
        recent = self._recent.get(user)
        if recent is None:
            recent = self._recent[user] = deque(maxlen=self.window)
            self._profile[user] = _RecentDistinct(self.profile_size)
        earlier = np.fromiter(reversed(recent), dtype=np.intp, count=len(recent))
        keep = earlier != item
        w = self._pair_w[: earlier.size][keep]
        self.counts[item] += 1.0
        recent.append(item)
        self._profile[user].add(item)
        return earlier[keep], w


PAIR_DENSE_BYTES = 2**30


def pair_weights(n: int) -> _DenseRows | _GrowingRows:
    """An ``n x n`` matrix of pair weights that only grow: dense while its 8·n² bytes fit
    ``PAIR_DENSE_BYTES`` (1 GiB: up to 11,585 items; the fastest form, and the one every figure
    below 11,585 items was measured with), sparse CSR beyond, whose memory grows with the
    pairs seen instead of n² (a dense one is 82 GiB at 105k items)."""
    return _DenseRows(n) if 8 * n * n <= PAIR_DENSE_BYTES else _GrowingRows(n)


class _DenseRows:
    """A dense ``n x n`` float64 matrix with :class:`_GrowingRows`'s ``add`` and ``product``."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.matrix = np.zeros((n, n))

    def add(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
        """``M[r, c] += v`` for each triple, in order (a repeated cell gets each addition)."""
        np.add.at(self.matrix, (rows, cols), values)

    def product(self, w: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``w @ M[rows]``: dense, shape (len(w), n)."""
        return w @ self.matrix[rows]

    def toarray(self) -> np.ndarray:
        return self.matrix


class _GrowingRows:
    """A non-negative ``n x n`` sparse matrix whose entries only grow, with row sums and maxima.

    CSR (memory grows with the pairs seen, not n²: 10k+ items are fine), in two parts. A
    sum of CSR matrices copies both, so adding each batch to the whole matrix cost O(N) per
    batch for N entries (quadratic over a stream). Here a batch's d entries go into a small
    recent part of R entries, which is merged into the main part once R² > N·d: a batch
    then costs O(R) plus, amortised, O(N·d / R), both O(sqrt(N·d)). Entries only increase,
    so a row's maximum is ``max(old max, the new values of its updated entries)`` and its
    sum ``old sum + added``: both kept incrementally, never by a scan of the matrix.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self._main = sp.csr_array((n, n), dtype=np.float64)
        self._recent = sp.csr_array((n, n), dtype=np.float64)
        self.row_sum = np.zeros(n)
        self.row_max = np.zeros(n)

    def add(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
        if not rows.size:
            return
        delta = sp.coo_array((values, (rows, cols)), shape=(self.n, self.n)).tocsr()
        delta.sum_duplicates()
        self._recent = (self._recent + delta).tocsr()
        np.add.at(self.row_sum, rows, values)
        r, c = delta.nonzero()
        now = np.asarray(self._main[r, c]).ravel() + np.asarray(self._recent[r, c]).ravel()
        np.maximum.at(self.row_max, r, now)
        if self._recent.nnz ** 2 > self._main.nnz * delta.nnz:
            self._main = (self._main + self._recent).tocsr()
            self._recent = sp.csr_array((self.n, self.n), dtype=np.float64)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """Dense copies of the given rows (an empty batch gives shape (0, n))."""
        if not rows.size:
            return np.zeros((0, self.n))
        return self._rows(rows).toarray()

    def product(self, w: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``w @ M[rows]``: dense, shape (len(w), n), without densifying ``M[rows]``."""
        return np.asarray((self._rows(rows).T @ w.T).T)

    def left_product(self, weights: sp.csr_array) -> np.ndarray:
        """``weights @ M`` for sparse (m, n) weights: dense, shape (m, n)."""
        return ((weights @ self._main) + (weights @ self._recent)).toarray()

    def _rows(self, rows: np.ndarray) -> sp.csr_array:
        """``M[rows]``, sparse: the two parts' rows summed before any dense result is made."""
        return self._main[rows] + self._recent[rows]

    def toarray(self) -> np.ndarray:
        return self._main.toarray() + self._recent.toarray()


class _Sequences:
    """Each user's last ``size`` events (a re-seen item kept at every position), newest last."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._recent: dict[str, deque[int]] = {}

    def before(self, user: str) -> np.ndarray:
        """The user's last events, newest first."""
        recent = self._recent.get(user)
        if not recent:
            return np.empty(0, dtype=np.intp)
        return np.fromiter(reversed(recent), dtype=np.intp, count=len(recent))

    def add(self, user: str, item: int) -> None:
        recent = self._recent.get(user)
        if recent is None:
            recent = self._recent[user] = deque(maxlen=self.size)
        recent.append(item)


class SRDecay(_ProfileBeforeEvent):
    """Sequential rules with a decayed profile (SR; Ludewig & Jannach, UMUAI 2018,
    "Evaluation of session-based recommendation algorithms").

    Rules: when u interacts with b, each of u's last ``window`` (W) earlier events a, k steps
    back (k = 1: the previous event), adds ``1/k`` to ``rule(a → b)`` (a == b skipped: a rule
    to itself only points at what was just seen). Over a whole sequence that is
    ``rule(a → b) = Σ_{a before b, k ≤ W} 1/k``: what follows closely counts most, order kept
    (unlike the symmetric co-occurrence of :class:`ItemKNNSeq`).

    Score: ``score_j = Σ_{d=1..L} decay^(d-1) · rule(p_d → j) / max_k rule(p_d → k)
    + 1e-6 · n_j / max n`` over u's last ``profile_size`` (L) distinct items p_d, d = 1 the
    newest (a re-seen item counts once, at its newest place). Each row is scaled by its
    maximum so that a rarely-followed item's rules weigh as much as a popular item's, and
    the count n (events per item) only breaks ties (it ranks users with no profile yet).

    Defaults W = 50, L = 50, decay = 0.9: the best of W ∈ {10, 50} x L ∈ {10, 50} x decay ∈
    {0.8, 0.9} on the first 50,000 events of ML-100K only (batch 64, full ranking, seen items
    excluded; bench/tune_peers.py): NDCG@10 0.0915 (HR@10 0.1781); W = 10 0.0907, L = 10
    0.0886, decay 0.8 0.0881, the worst (10, 10, 0.8) 0.0849. Longer profiles and slower
    decay help: ML-100K's order within a user is weak (ratings entered in bulk sessions).

    Memory: sparse rules (:class:`_GrowingRows`), O(pairs seen).
    """

    name = "sr_decay"

    def __init__(self, n_items: int, window: int = 50, profile_size: int = 50,
                 decay: float = 0.9, pop_weight: float = 1e-6) -> None:
        self.n_items = n_items
        self.window = window
        self.profile_size = profile_size
        self.decay = decay
        self.pop_weight = pop_weight
        self.rules = _GrowingRows(n_items)
        self.counts = np.zeros(n_items)
        self._seq = _Sequences(window)
        self._profile: dict[str, _RecentDistinct] = {}

    def _score_profiles(self, profiles: list[np.ndarray]) -> np.ndarray:
        rows, cols, vals = [], [], []
        for r, items in enumerate(profiles):  # items oldest first: d = size - position
            d = np.arange(items.size, 0, -1)
            top = self.rules.row_max[items]
            w = np.divide(self.decay ** (d - 1.0), top, out=np.zeros(items.size), where=top > 0)
            rows.append(np.full(items.size, r))
            cols.append(items)
            vals.append(w)
        out = self._pop_row(len(profiles))
        if profiles and sum(c.size for c in cols):
            weights = sp.csr_array((np.concatenate(vals), (np.concatenate(rows),
                                    np.concatenate(cols))), shape=(len(profiles), self.n_items))
            out += self.rules.left_product(weights)
        return out

    def _pop_row(self, n_rows: int) -> np.ndarray:
        """``1e-6 · n_j / max n`` for every row: the tie-break."""
        top = self.counts.max(initial=0.0)
        pop = self.counts / top if top > 0 else self.counts
        return np.tile(self.pop_weight * pop, (n_rows, 1))

    def learn(self, batch: Sequence[Event]) -> None:
        rows, cols, vals = [], [], []
        for user, item, *_ in batch:
            earlier = self._seq.before(user)
            k = np.arange(1, earlier.size + 1, dtype=np.float64)
            keep = earlier != item
            rows.append(earlier[keep])
            cols.append(np.full(int(keep.sum()), item, dtype=np.intp))
            vals.append(1.0 / k[keep])
            self._seq.add(user, item)
            self._profile.setdefault(user, _RecentDistinct(self.profile_size)).add(item)
            self.counts[item] += 1.0
        if rows:
            self.rules.add(np.concatenate(rows), np.concatenate(cols), np.concatenate(vals))


class MarkovBackoff(_ProfileBeforeEvent):
    """First-order Markov chain over each user's last item, backing off to ``itemknn_seq``.

    ``score_j = (c(l → j) + α · q_j) / (c(l → ·) + α)`` with l the user's last item,
    ``c(l → j)`` the number of times j directly followed l in any user's sequence and q the
    :class:`ItemKNNSeq` score row of the user (it learns the same events) normalised to sum
    1. This is the posterior mean of P(j | l) under a Dirichlet(α q) prior (MacKay & Peto,
    1995, "A hierarchical Dirichlet language model"): a well-observed transition row speaks
    for itself, a rare one leans on the kNN profile, an unseen one (c(l → ·) = 0) is exactly
    q. A user with no history gets q (itemknn_seq's popularity term).

    Default α = 1e5: the best of α ∈ {1, 10, 100, 1e3, 1e4, 1e5} on the first 50,000 events
    of ML-100K only (batch 64, full ranking, seen items excluded; bench/tune_peers.py):
    NDCG@10 0.0678 for α = 1, 10 and 100 alike, 0.0780 at 1e3, 0.0987 at 1e4, 0.0993 at 1e5
    (itemknn_seq alone: 0.0992). Why so large: q sums to 1 over the whole catalog, so
    ``α · q_j`` stays below one observed transition until α is in the thousands; below that
    the ranking is "transition count first, q breaks ties", which loses to q on ML-100K,
    whose within-user order is weak. At the default the transitions only nudge q: on
    ML-100K this peer is itemknn_seq plus a small Markov tie-break, not a better model.

    Memory: sparse transitions (:class:`_GrowingRows`) plus ItemKNNSeq's matrix.
    """

    name = "markov_backoff"

    def __init__(self, n_items: int, alpha: float = 1e5, **knn_params: Any) -> None:
        self.n_items = n_items
        self.alpha = alpha
        self.knn = ItemKNNSeq(n_items, **knn_params)
        self.profile_size = self.knn.profile_size
        self._profile = self.knn._profile  # the same distinct-item profiles: learnt once
        self.transitions = _GrowingRows(n_items)
        self._last: dict[str, int] = {}

    def _score_profiles(self, profiles: list[np.ndarray]) -> np.ndarray:
        q = self.knn._score_profiles(profiles)
        total = q.sum(axis=1, keepdims=True)
        q = np.divide(q, total, out=np.full_like(q, 1.0 / self.n_items), where=total > 0)
        known = np.array([r for r, items in enumerate(profiles) if items.size], dtype=np.intp)
        if not known.size:
            return q
        last = np.array([profiles[r][-1] for r in known], dtype=np.intp)
        denom = (self.transitions.row_sum[last] + self.alpha)[:, None]
        posterior = (self.transitions.rows(last) + self.alpha * q[known])
        q[known] = np.divide(posterior, denom, out=q[known], where=denom > 0)  # α = 0, no row: q
        return q

    def learn(self, batch: Sequence[Event]) -> None:
        rows, cols = [], []
        for user, item, *_ in batch:
            last = self._last.get(user)
            if last is not None:
                rows.append(last)
                cols.append(item)
            self._last[user] = item
        self.knn.learn(batch)
        self.transitions.add(np.asarray(rows, dtype=np.intp), np.asarray(cols, dtype=np.intp),
                             np.ones(len(rows)))

BASELINES: dict[str, type] = {cls.name: cls for cls in (Pop, PopDecay, ItemKNN, ISGD, ItemKNNSeq,
                                                        SRDecay, MarkovBackoff)}


def make_baseline(name: str, n_items: int, **params: Any) -> StreamModel:
    """Build the peer called ``name`` (a key of ``BASELINES``) over ``n_items`` items."""
    try:
        cls = BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; known: {sorted(BASELINES)}") from None
    return cls(n_items, **params)


__all__ = [
    "BASELINES",
    "ISGD",
    "ItemKNN",
    "ItemKNNSeq",
    "MarkovBackoff",
    "NamedItems",
    "Pop",
    "PopDecay",
    "SRDecay",
    "StreamModel",
    "make_baseline",
]
