"""The per-user step: each user's own parameters move by that user's learning-rate rule.

A user's parameters are the residual p_u of the user vector and θ_u, the user's
correction of the ranker's blend weights (models/model.py). After a micro-batch, for each
user with events in it:

    g_u = ∇_(p_u, θ_u) of the user's weighted mean pair loss   (shared model frozen, each
          pair in its scenario: (p_u + q_s, θ_u + φ_s),
          models/two_tower.py ScenarioTable)
    Δ_u, α_u = rule.step(g_u, loss_u)                           (models/lr_rules.py)
    (p_u, θ_u) ← (p_u, θ_u) + Δ_u

This runs on the serving worker that owns the user, at its snapshot of the shared model:
the shared parameters learn in the trainer (models/trainer.py). Its cost is bounded per
batch: at most `max_pairs_per_step` x `max_steps_per_batch` pairs (a random subset of a
larger batch), so an overloaded worker catches up instead of falling further behind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from models.config import LearnerConfig
from models.lr_rules import Rule, RuleState
from models.model import SharedModel
from models.two_tower import Seqs
from models.user_state import History, UserState


class PersonalStep:
    """One rule step per user of a batch (the module doc's equation), on the served model:

    >>> model = SharedModel(LearnerConfig(device="cpu"), text_dim=4)
    >>> model.upsert_items(["a", "b"], np.eye(2, 4, dtype=np.float32))
    >>> st = UserState(); st.append("a", etype=1, ts=1_000, text_vec=None, max_len=50)
    >>> step = PersonalStep.from_config(model.cfg)          # rmsprop, α0 = 0.05
    >>> step.step_sizes({"u1": st})
    {'u1': 0.05}
    >>> loss = step.step(model, [st.history(model.catalog)], model.catalog.rows_of(["b"]), [1.0],
    ...                  owners=[0], states=[st])           # the pair "after a, b"
    >>> st.residual.shape, step.step_sizes({"u1": st})["u1"] != 0.05   # p_u (64) + θ_u (4)
    ((68,), True)
    """

    def __init__(self, rule: Rule, budget: int, seed: int = 0):
        self.rule, self.budget = rule, budget
        self.rng = np.random.default_rng(seed)

    @classmethod
    def from_config(cls, cfg: LearnerConfig) -> PersonalStep:
        """The per-user step the settings configure."""
        return cls(cfg.lr_rule, cfg.max_pairs_per_step * cfg.max_steps_per_batch, cfg.seed)

    def step_sizes(self, states: Mapping[str, UserState]) -> dict[str, float]:
        """Each user's current α (after this batch's step, when read after `step`)."""
        return {u: st.rule.step_size(self.rule.alpha0) for u, st in states.items()}

    def step(self, model: SharedModel, hists: Sequence[History], targets: Sequence[int],
             weights: Sequence[float], owners: Sequence[int], states: Sequence[UserState],
             scenarios: Sequence[str] | None = None,
             seen: Sequence[np.ndarray] | None = None) -> float:
        """One rule step for every user (`states[owner]`) with pairs here (`scenarios`: each
        pair's scenario; `seen`: the rows each pair's user had seen, left out of its
        negatives); returns the weighted mean pair loss (nan: no pair)."""
        t, w, o = (np.asarray(x) for x in (targets, weights, owners))
        keep = np.flatnonzero(model.catalog.live[t] & (w != 0)) if len(t) else np.zeros(0, int)
        if len(keep) > self.budget:
            keep = np.sort(self.rng.choice(keep, size=self.budget, replace=False))
        if not len(keep) or not model.cfg.use_residual:
            return float("nan")
        t, w, o = t[keep], w[keep], o[keep].astype(np.int64)
        resid = model.residuals(states).requires_grad_(True)
        own = torch.as_tensor(o, device=model.device)
        where = None if scenarios is None else [scenarios[i] for i in keep]
        scen = torch.as_tensor(model.scenario_params(where, len(keep)), device=model.device)
        seqs = Seqs.pad([hists[i] for i in keep],
                        None if seen is None else [seen[i] for i in keep])
        losses = model.pair_losses(seqs, t, w, resid[own] + scen,
                                   np.ones(len(t), bool),
                                   model.sample_negatives(self.rng, t, where), where)
        aw = torch.as_tensor(np.abs(w), dtype=torch.float32, device=model.device)
        n = len(states)
        w_user = torch.zeros(n, device=model.device).index_add_(0, own, aw)
        l_user = torch.zeros(n, device=model.device).index_add_(0, own, losses * aw)
        mean = l_user / w_user.clamp(min=1e-12)
        (grad,) = torch.autograd.grad(mean.sum(), resid)
        has = np.flatnonzero((w_user > 0).cpu().numpy())
        self._apply(grad.cpu().numpy(), mean.detach().cpu().numpy(), has, states, model.n_user)
        return float((l_user.sum() / w_user.sum()).detach())

    def _apply(self, grad: np.ndarray, loss: np.ndarray, idx: np.ndarray,
               states: Sequence[UserState], n_user: int) -> None:
        """The rule's step for users `idx`, written back into their states."""
        picked = [states[i] for i in idx]
        rs = RuleState.gather([st.rule for st in picked], self.rule.alpha0)
        delta = self.rule.step(rs, grad[idx].astype(np.float64), loss[idx].astype(np.float64))
        rs.scatter([st.rule for st in picked])
        for j, st in enumerate(picked):
            base = np.zeros(n_user, np.float32)
            if st.residual is not None:
                base[: len(st.residual)] = st.residual[:n_user]
            st.residual = (base + delta[j]).astype(np.float32)
