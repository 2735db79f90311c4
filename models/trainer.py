"""The trainer: the one place the shared parameters learn.

Serving workers apply events and publish one training example per event
(models/examples.py); the trainer takes them in order and, per call of `train`:

1. skips every example whose source (partition, offset) it has already trained, so that
   examples published twice (a replayed batch) are trained once;
2. takes one gradient step per `max_pairs_per_step` examples, each with a replay sample of
   `replay_ratio` past pairs, moving the towers and the ranker by Adam (SparseAdam's step,
   as models/row_adam.py takes it, for the item embeddings E);
3. steps each scenario's own parameters (models/two_tower.py ScenarioTable) by the gradient
   of that scenario's mean pair loss, through the scenario's learning-rate rule
   (models/lr_rules.py);
4. adds the examples' co-visitation pairs and popularity to the counts, and keeps what it
   added, and which E rows moved, for the next snapshot delta (models/snapshot.py).

With K ranks (torch.distributed), each rank trains the examples of its own source
partitions and `Sync` all-reduces the gradients (E's sparse ones included) and all-gathers
the co-visitation increments every step, so the ranks' parameters and counts stay
identical: one model, trained on all examples.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save

from models.covisit import Increment
from models.examples import TrainingExample
from models.lr_rules import RuleRecord, RuleState
from models.model import SharedModel
from models.row_adam import RowAdam
from models.snapshot import load_covis, load_tensors, read_header
from models.snapshot import structural as snapshot_structural
from models.two_tower import Seqs, seen_matrix


@dataclass
class TrainResult:
    trained: int = 0  # examples trained now
    duplicates: int = 0  # examples skipped: their source was trained before
    dropped: int = 0  # examples whose target is not a live item here
    loss: float = float("nan")  # weighted mean pair loss of the last step


class Sync:
    """Rank-to-rank agreement; this one is a single rank (no process group)."""

    rank, world = 0, 1

    def total_weight(self, w: float) -> float:
        return w

    def reduce_grads(self, dense: Sequence[torch.nn.Parameter],
                     sparse: Sequence[torch.nn.Parameter]) -> None:
        pass

    def gather(self, inc: Increment | None) -> list[Increment]:
        return [] if inc is None else [inc]

    def steps(self, n: int) -> int:
        """How many steps every rank takes this round (the most any rank needs)."""
        return n

    def max_int(self, n: int) -> int:
        return n

    def sum(self, x: np.ndarray) -> np.ndarray:
        """Element-wise sum of every rank's `x`."""
        return x

    def union(self, names: Sequence[str]) -> list[str]:
        """Every rank's `names`, in rank order, each once (so all ranks register alike)."""
        return list(dict.fromkeys(names))


@dataclass
class _Pending:
    """What the next snapshot delta must carry (since the last one)."""

    touched: set[int] = field(default_factory=set)  # rows whose E moved
    # co-visitation changes in order: an Increment added, or (j, i) pairs pruned
    covis: list[Increment | tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    counts: dict[int, float] = field(default_factory=dict)  # row -> popularity added


class Trainer:
    """Steps the shared model on training examples, each exactly once (the module doc):

    >>> from models.config import LearnerConfig
    >>> from models.user_state import UserState
    >>> model = SharedModel(LearnerConfig(device="cpu"), text_dim=4)
    >>> trainer = Trainer(model)
    >>> trainer.upsert_items(["a", "b", "c"], np.eye(3, 4, dtype=np.float32))
    >>> st = UserState(); st.append("a", etype=1, ts=1_000, text_vec=None, max_len=50)
    >>> b = np.array(model.catalog.rows_of(["b"]))
    >>> before = model.scores([st.history(model.catalog)], [None], b)
    >>> examples = [TrainingExample.cut(st, "u1", "b", "view", 1.0, 2_000, "default",
    ...                                 partition=0, offset=k) for k in (7, 8)]
    >>> trainer.train(examples).trained, trainer.progress   # "after a, b", twice
    (2, {0: 8})
    >>> trainer.train(examples).duplicates                  # published again: not retrained
    2
    >>> bool(model.scores([st.history(model.catalog)], [None], b) > before)   # b rose after a
    True
    """

    def __init__(self, model: SharedModel, sync: Sync | None = None):
        self.model = model
        self.cfg = model.cfg
        self.sync = sync or Sync()
        self.rng = np.random.default_rng(self.cfg.seed + self.sync.rank)
        self.replay = Replay(self.cfg.replay_capacity, self.cfg.history_len)
        self.steps = 0
        self.trained = 0  # examples trained, each exactly once
        self.pair_steps = 0  # pairs (fresh and replayed) summed over steps: budget spent
        self.progress: dict[int, int] = {}  # source partition -> newest offset trained
        self.counted: dict[int, int] = {}  # source partition -> newest offset counted
        self.pending = _Pending()
        self.scenario_rule = self.cfg.scenario_lr_rule
        self.scenario_rules: list[RuleRecord] = [RuleRecord()]  # per scenario row
        self._make_optimizers()

    # ---------------------------------------------------------------- catalog
    def upsert_items(self, item_ids: Sequence[str], text_vectors: np.ndarray,
                     scenarios: Sequence[Sequence[str] | None] | None = None) -> None:
        self._keep_optimizers(lambda: self.model.upsert_items(item_ids, text_vectors,
                                                              scenarios))

    def add_rows(self, item_ids: Sequence[str]) -> np.ndarray:
        out: list[np.ndarray] = []
        self._keep_optimizers(lambda: out.append(self.model.add_rows(item_ids)))
        return out[0]

    def _keep_optimizers(self, change) -> None:
        """Run a catalog change; if it grew E, carry its Adam moments over."""
        cap = self.model.items.capacity
        change()
        if self.model.items.capacity == cap:
            return
        old = self.sparse_opt.state.get(self._E)
        self._make_optimizers(keep_dense=True)
        if old:
            pad = self.model.items.capacity - old["exp_avg"].shape[0]
            self.sparse_opt.state[self.model.items.E] = {
                "step": old["step"],
                "exp_avg": F.pad(old["exp_avg"], (0, 0, 0, pad)),
                "exp_avg_sq": F.pad(old["exp_avg_sq"], (0, 0, 0, pad)),
            }

    def _make_optimizers(self, keep_dense: bool = False) -> None:
        cfg = self.cfg
        if not keep_dense:
            named = [(n, p) for n, p in self.model.named_parameters()
                     if n not in ("items.E", "scenarios.P")]  # those have their own steps
            groups = [{"params": [p for n, p in named if not n.startswith("head.")]},
                      {"params": [p for n, p in named if n.startswith("head.")],
                       "lr": cfg.head_lr, "weight_decay": 0.0}]
            self.dense_opt = torch.optim.Adam([g for g in groups if g["params"]],
                                              lr=cfg.lr, weight_decay=cfg.weight_decay,
                                              foreach=True)  # (the same bits as the loop)
        self._E = self.model.items.E
        self.sparse_opt = RowAdam([self._E], lr=cfg.lr)

    def _decay_head_lr(self) -> None:
        """Set the ranker's step size for this step: head_lr_start / sqrt(1 + t / τ), never
        below `head_lr`, with t its Adam steps so far (in the optimizer's state, so a restored
        trainer goes on where it stopped, and every rank computes the same). A new stream's
        blend weights start far from their fit: over Ciao's first 15,000 events the
        popularity weight climbs from 0.25 towards 1, which the constant 0.003 took the whole
        stream to approach (docs/quality.md)."""
        head = self.model.head
        if head is None:
            return
        group = self.dense_opt.param_groups[-1]  # the ranker's (`_make_optimizers`)
        t = float(self.dense_opt.state.get(head.tower_w, {}).get("step", 0))
        group["lr"] = max(self.cfg.head_lr,
                          self.cfg.head_lr_start / math.sqrt(1 + t / self.cfg.head_lr_decay_steps))

    # ---------------------------------------------------------------- training
    def train(self, examples: Sequence[TrainingExample]) -> TrainResult:
        """Train every example not trained before (each exactly once), in order."""
        out = TrainResult()
        fresh, countable = [], []
        for ex in examples:
            new_train = ex.offset > self.progress.get(ex.partition, -1)
            new_count = ex.offset > self.counted.get(ex.partition, -1)
            if not new_train and not new_count:
                out.duplicates += 1
                continue
            if self.model.catalog.live_row(ex.target) is None:
                out.dropped += 1  # (the caller syncs the catalog first: a deleted item)
            else:
                if new_train:
                    fresh.append(ex)
                if new_count:
                    countable.append(ex)
            if new_train:
                self.progress[ex.partition] = ex.offset
            self.counted[ex.partition] = max(ex.offset, self.counted.get(ex.partition, -1))
        out.trained = len(fresh)
        self._register(fresh)
        out.loss = self._learn(fresh)
        self._count(countable)
        self.trained += len(fresh)
        return out

    def _register(self, examples: list[TrainingExample]) -> None:
        """Rows for the examples' new scenarios (up to the bound), alike on every rank."""
        table = self.model.scenarios
        new = [ex.scenario for ex in examples if ex.scenario not in table.rows]
        for _ in table.register(self.sync.union(new)):
            self.scenario_rules.append(RuleRecord())

    def _learn(self, examples: list[TrainingExample]) -> float:
        """Gradient steps over `examples` (and replayed pairs), then keep them for replay."""
        m, cfg = self.model, self.cfg
        cap = self.sync.max_int(m.items.capacity)  # ranks' sparse gradients must line up
        if cap > m.items.capacity:
            self._keep_optimizers(lambda: m.reserve(cap))
        seqs = Seqs.pad([ex.history(m.catalog) for ex in examples],
                        [ex.seen_rows(m.catalog) for ex in examples]) if examples else None
        targets = np.array([m.catalog.live_row(ex.target) for ex in examples], np.int64)
        weights = np.array([ex.weight for ex in examples], np.float64)
        resid = torch.as_tensor(m.own_params([ex.residual for ex in examples], 0),
                                device=m.device)
        scen = m.scenarios.rows_of([ex.scenario for ex in examples])
        size = cfg.max_pairs_per_step
        chunks = [np.arange(i, min(i + size, len(examples)))
                  for i in range(0, len(examples), size)]
        loss = float("nan")
        for _ in range(cfg.steps_per_batch):
            for k in range(self.sync.steps(len(chunks))):
                chunk = chunks[k] if k < len(chunks) else np.zeros(0, np.int64)
                loss = self._step(seqs, targets, weights, resid, scen, chunk)
        if examples:
            self.replay.add(seqs.newest(cfg.history_len), targets, weights, scen)
        return loss

    def _step(self, seqs: Seqs | None, targets: np.ndarray, weights: np.ndarray,
              resid: torch.Tensor, scen: np.ndarray, chunk: np.ndarray) -> float:
        """One step on the pairs `chunk` plus a replay sample; every rank takes it."""
        m = self.model
        parts = []
        if len(chunk):
            parts.append((seqs.take(chunk), targets[chunk], weights[chunk], resid[chunk],
                          np.ones(len(chunk), bool), scen[chunk]))
        replay = self.replay.sample(int(round(self.cfg.replay_ratio * len(chunk))), self.rng)
        if replay is not None:
            r_seqs, r_t, r_w, r_s = replay
            parts.append((r_seqs, r_t, r_w, torch.zeros(len(r_t), m.n_user, device=m.device),
                          np.zeros(len(r_t), bool), r_s))
        s, t, w, r, fresh, sc = _stack(parts)
        keep = (m.catalog.live[t] if len(t) else np.zeros(0, bool)) & (w != 0)
        s, t, w, r, fresh, sc = (s.take(np.flatnonzero(keep)) if s is not None else None,
                                 t[keep], w[keep], r[torch.as_tensor(keep)], fresh[keep],
                                 sc[keep])
        total = self.sync.total_weight(float(np.abs(w).sum()))
        self.dense_opt.zero_grad(set_to_none=True)
        self.sparse_opt.zero_grad(set_to_none=True)
        m.scenarios.P.grad = None
        loss_val, losses = float("nan"), torch.zeros(0)
        if len(t):
            if self.cfg.scenario_params:
                r = r + m.scenarios.P[torch.as_tensor(sc, device=m.device)]
            names = [m.scenarios.names[k] for k in sc.tolist()]
            losses = m.pair_losses(s, t, w, r, fresh, m.sample_negatives(self.rng, t, names),
                                   names)
            loss = (losses * torch.as_tensor(np.abs(w), dtype=torch.float32,
                                             device=m.device)).sum() / total
            loss.backward()
            loss_val = float(loss.detach()) * total / max(float(np.abs(w).sum()), 1e-12)
        self.sync.reduce_grads([p for k, p in m.named_parameters() if k != "items.E"],
                               [m.items.E])
        if total > 0:
            self._step_scenarios(sc, np.abs(w), losses.detach().cpu().numpy(), total)
            self._decay_head_lr()
            self.dense_opt.step()
            self.pair_steps += len(t)
            if m.items.E.grad is not None:
                m.items.E.grad = m.items.E.grad.coalesce()  # (once: RowAdam reads it as is)
                self.pending.touched.update(m.items.E.grad.indices()[0].tolist())
                self.sparse_opt.step()
            self.steps += 1
        return loss_val

    def _step_scenarios(self, rows: np.ndarray, aw: np.ndarray, losses: np.ndarray,
                        total: float) -> None:
        """Each scenario's rule step on the gradient of its own weighted mean pair loss
        (the step's gradient is of the mean over all pairs: rescaled by total / w_s)."""
        P = self.model.scenarios.P
        if not self.cfg.scenario_params or P.grad is None:
            return
        size = len(P)
        sums = self.sync.sum(np.stack([np.bincount(rows, aw, size),
                                       np.bincount(rows, aw * losses, size)]))
        idx = np.flatnonzero(sums[0] > 0)
        idx = idx[idx > 0]  # row 0 (no scenario parameters) stays zero
        if not len(idx):
            return
        grad = P.grad.detach().cpu().numpy()[idx].astype(np.float64)
        grad *= (total / sums[0, idx])[:, None]
        records = [self.scenario_rules[r] for r in idx]
        rs = RuleState.gather(records, self.scenario_rule.alpha0)
        delta = self.scenario_rule.step(rs, grad, sums[1, idx] / sums[0, idx])
        rs.scatter(records)
        with torch.no_grad():
            P[torch.as_tensor(idx, device=P.device)] += torch.as_tensor(
                delta, dtype=P.dtype, device=P.device)

    def _count(self, examples: list[TrainingExample]) -> None:
        """Co-visitation pairs and popularity of the positive examples (all ranks' alike)."""
        m = self.model
        pos = [ex for ex in examples if ex.weight > 0]
        targets = np.array([m.catalog.live_row(ex.target) for ex in pos], np.int64)
        local = None
        if m.covis is not None and pos:
            local = m.covis.increment([(ex.history(m.catalog).rows, int(t))
                                       for ex, t in zip(pos, targets, strict=True)])
        elif pos:  # no co-visitation: the popularity counts alone
            local = Increment(*(np.zeros(0, np.int64),) * 2, np.zeros(0, np.float32),
                              *np.unique(targets, return_counts=True))
        gathered = self.sync.gather(local)
        for inc in gathered:
            if m.covis is not None:
                m.covis.add(inc)
            np.add.at(m.counts, inc.targets, inc.n.astype(np.float64))
            self.pending.covis.append(inc)
        if m.covis is not None and gathered:  # every rank alike: they hold the same counts
            removed = m.covis.prune(self.cfg.covisit_max_neighbours)
            if removed is not None:
                self.pending.covis.append(removed)

    def take_pending(self) -> _Pending:
        """What changed since the last call (for a snapshot delta), and start afresh."""
        out, self.pending = self.pending, _Pending()
        return out


def _stack(parts: list[tuple]) -> tuple:
    """Concatenate (seqs, targets, weights, resid, fresh, scenario rows) parts into one."""
    if not parts:
        return (None, np.zeros(0, np.int64), np.zeros(0), torch.zeros(0, 1), np.zeros(0, bool),
                np.zeros(0, np.int64))
    s = parts[0][0]
    for p in parts[1:]:
        s = s.concat(p[0])
    return (s, *(np.concatenate([p[k] for p in parts]) for k in (1, 2)),
            torch.cat([p[3] for p in parts]), *(np.concatenate([p[k] for p in parts])
                                                for k in (4, 5)))


class Replay:
    """Ring buffer of recent (history -> target) pairs, replayed to curb forgetting.

    Text vectors of search events are not kept (they would dominate its memory): replayed
    search positions keep their event type but no text. The rows of the seen set a pair's
    example carried are kept (one array per pair, as long as the set).
    """

    def __init__(self, capacity: int, history_len: int):
        self.cap, self.H = capacity, history_len
        self.rows = np.zeros((capacity, history_len), dtype=np.int64)
        self.types = np.zeros((capacity, history_len), dtype=np.int64)
        self.gaps = np.zeros((capacity, history_len), dtype=np.int64)
        self.target = np.zeros(capacity, dtype=np.int64)
        self.weight = np.zeros(capacity, dtype=np.float64)
        self.scenario = np.zeros(capacity, dtype=np.int64)  # scenario row
        self.seen: list[np.ndarray] = [np.zeros(0, np.int64)] * capacity
        self.n = 0
        self.pos = 0

    def add(self, s: Seqs, targets: np.ndarray, weights: np.ndarray, scenarios: np.ndarray
            ) -> None:
        if self.cap == 0:
            return
        L = s.rows.shape[1]
        seen = s.seen_rows()
        for p in range(len(targets)):
            i = self.pos
            self.seen[i] = seen[p]
            for arr, src in ((self.rows, s.rows), (self.types, s.types), (self.gaps, s.gaps)):
                arr[i] = 0
                arr[i, self.H - L:] = src[p]
            self.target[i], self.weight[i], self.scenario[i] = \
                targets[p], weights[p], scenarios[p]
            self.pos = (self.pos + 1) % self.cap
            self.n = min(self.n + 1, self.cap)

    def sample(self, k: int, rng: np.random.Generator) -> tuple | None:
        if k == 0 or self.n == 0:
            return None
        idx = rng.choice(self.n, size=min(k, self.n), replace=False)
        seqs = Seqs(self.rows[idx], self.types[idx], self.gaps[idx], [],
                    seen_matrix([self.seen[i] for i in idx]))
        return seqs, self.target[idx], self.weight[idx], self.scenario[idx]


# ---------------------------------------------------------------- checkpoints
CHECKPOINT_FORMAT = "streamrec-trainer-1"
#: The previous release's worker checkpoints (each worker wrote its whole learner).
LEGACY_FORMAT = "streamrec-learner-1"


def checkpoint(trainer: Trainer, extra: dict[str, str] | None = None) -> bytes:
    """The trainer's own state: parameters, optimizer moments, its progress. Not the counts:
    those are the snapshot log's (models/snapshot.py), which a restarted trainer reloads.
    `extra` rides along in the metadata (e.g. the examples topic's positions)."""
    m = trainer.model
    n = len(m.catalog.ids)
    tensors = {f"param.{k}": (p.detach()[:n] if k == "items.E" else p.detach()).cpu()
               .contiguous() for k, p in m.named_parameters()}
    for k, p in m.named_parameters():
        opt = trainer.sparse_opt if k == "items.E" else trainer.dense_opt
        for name, v in opt.state.get(p, {}).items():
            t = torch.as_tensor(v).detach().cpu()
            tensors[f"opt.{k}.{name}"] = t.reshape(-1).clone() if name == "step" else \
                (t[:n] if k == "items.E" else t).contiguous()
    meta = {"format": CHECKPOINT_FORMAT, "config": snapshot_structural(m),
            "ids": json.dumps(m.catalog.ids), "steps": str(trainer.steps),
            "trained": str(trainer.trained),
            "progress": json.dumps({str(p): o for p, o in trainer.progress.items()}),
            "scenarios": json.dumps(m.scenarios.names[1:]),
            "scenario_rules": json.dumps([asdict(r) for r in trainer.scenario_rules]),
            **(extra or {})}
    return st_save(tensors, metadata=meta)


def restore(trainer: Trainer, data: bytes) -> dict[str, str]:
    """Load a checkpoint into `trainer` (its rows are matched by item id); returns the
    metadata, `extra` included. Raises ValueError if the shapes differ from the config.

    Also takes the previous release's worker checkpoints (format streamrec-learner-1): their
    parameters, optimizer moments and co-visitation counts, so an upgrade keeps the learned
    model (the trainer's first snapshot, a base, carries the counts to every worker)."""
    m = trainer.model
    header, body = read_header(data)
    meta = _checkpoint_meta(header)
    legacy = meta["format"] == LEGACY_FORMAT
    config = json.loads(meta["config"]) | ({"text_dim": int(meta["text_dim"])} if legacy else {})
    if config != json.loads(snapshot_structural(m)):
        raise ValueError(f"checkpoint shape config {config} != {snapshot_structural(m)}")
    tensors = load_tensors(header, body)
    ids = json.loads(meta["ids"])
    rows = torch.as_tensor(trainer.add_rows(ids[1:]))
    params = dict(m.named_parameters())
    with torch.no_grad():
        for k, p in params.items():
            src = tensors.get(f"param.{k}")
            if k == "items.E":
                p[rows] = src[1 : len(ids)].to(m.device)
            elif k == "scenarios.P":  # absent before scenarios; its bound may have changed
                m.scenarios.load(src, json.loads(meta.get("scenarios", "[]")))
            else:
                p.copy_(src.to(m.device))
    for k, p in params.items():
        state = {name.rsplit(".", 1)[1]: v for name, v in tensors.items()
                 if name.startswith(f"opt.{k}.") and name.count(".") == k.count(".") + 2}
        if state:
            trainer_opt_state(trainer, k, p, state, rows)
    trainer.steps = int(meta["steps"])
    if legacy:
        _import_counts(m, rows.numpy(), tensors, len(ids))
        return meta
    trainer.trained = int(meta["trained"])
    trainer.progress = {int(p): o for p, o in json.loads(meta["progress"]).items()}
    rules = [RuleRecord(**r) for r in json.loads(meta.get("scenario_rules", "[{}]"))]
    trainer.scenario_rules = rules[: len(m.scenarios.names)]
    return meta


def _import_counts(m: SharedModel, rows: np.ndarray, tensors: dict, n: int) -> None:
    """A legacy checkpoint's popularity and co-visitation counts, into this model's rows."""
    m.counts[rows] = tensors["counts"].numpy()[1:n]
    if m.covis is None or "covis.n" not in tensors:
        return
    arrays = {k[6:]: v.numpy() for k, v in tensors.items() if k.startswith("covis.")}
    size = len(arrays["n"])
    for name in ("C", "F"):  # rows beyond the ids hold nothing: keep the ids' square
        full = sp.csr_matrix((arrays[f"{name}.data"], arrays[f"{name}.indices"],
                              arrays[f"{name}.indptr"]), shape=(size, size))[:n, :n]
        arrays[f"{name}.data"], arrays[f"{name}.indices"], arrays[f"{name}.indptr"] = \
            full.data, full.indices, full.indptr
    arrays["n"] = arrays["n"][:n]
    load_covis(m, rows, arrays)


def trainer_opt_state(trainer: Trainer, name: str, p: torch.nn.Parameter,
                      state: dict[str, torch.Tensor], rows: torch.Tensor) -> None:
    """Optimizer moments back in place (E's rows re-indexed like E itself)."""
    dev = trainer.model.device
    if name == "items.E":
        full = {}
        for key in ("exp_avg", "exp_avg_sq"):
            full[key] = torch.zeros_like(p)
            full[key][rows] = state[key][1 : len(rows) + 1].to(dev)
        full["step"] = int(state["step"].reshape(-1)[0])
        trainer.sparse_opt.state[p] = full
        return
    out = {k: v.to(dev) for k, v in state.items() if k != "step"}
    out["step"] = state["step"].reshape(())
    trainer.dense_opt.state[p] = out


def _checkpoint_meta(header: dict[str, Any]) -> dict[str, str]:
    meta = header.get("__metadata__", {})
    if meta.get("format") not in (CHECKPOINT_FORMAT, LEGACY_FORMAT):
        raise ValueError(f"not a {CHECKPOINT_FORMAT} checkpoint (format "
                         f"{meta.get('format')!r})")
    return meta
