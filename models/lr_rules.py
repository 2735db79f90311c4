"""Per-user learning-rate rules for the user residual p_u.

Each rule is one small class with one `step` method, vectorised over the users of a
micro-batch: it gets the users' current rule state, the gradient of each user's loss with
respect to p_u and each user's loss, and returns the update Δp_u (to be *added*), mutating
the state in place. Shared parameters use a global optimizer; only p_u is per user.

A rule's fields are its parameters, validated when it is built: a parameter out of range or
one the rule does not have is an error (`Fixed(alpha0=0.1, beta=2)` raises).
Settings hold the built rule (`RuleChoice`, models/strategy.py): a name alone (`"adaptive"`)
takes the rule's defaults, and a mapping (`{"name": "adaptive", "beta": 0.5}`) sets parameters.

>>> import numpy as np
>>> st = RuleState.fresh(1, alpha0=0.1)
>>> rule = PaperAdaptive(alpha0=0.1, beta=1.0, alpha_min=0.001)
>>> delta = rule.step(st, np.array([[3.0, 4.0]]), np.array([1.0]))   # ||g|| = 5
>>> delta.round(3).tolist(), round(float(st.alpha[0]), 4)           # Δ = -α g ; α / (1 + β·0.5)
([[-0.3, -0.4]], 0.0667)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from models.strategy import choice, strategy

Positive = Annotated[float, Field(gt=0)]
Decay = Annotated[float, Field(gt=0, lt=1)]
Alpha0 = Annotated[float, Field(gt=0, description="Initial per-user step size α0.")]


@dataclass
class RuleRecord:
    """One user's rule state, as the user's state keeps it (`alpha` None: α0, no step yet;
    `loss_ema` None: no loss seen)."""

    alpha: float | None = None
    accum: float = 0.0
    loss_ema: float | None = None
    loss_var: float = 0.0
    steps: int = 0

    def step_size(self, alpha0: float) -> float:
        """The user's current α (α0 before its first step)."""
        return alpha0 if self.alpha is None else self.alpha


@dataclass
class RuleState:
    """Per-user scalars a rule reads and writes (one entry per user of the batch): the
    users' `RuleRecord`s side by side, so one rule step serves the whole batch.

    >>> records = [RuleRecord(), RuleRecord(alpha=0.01, steps=3)]
    >>> batch = RuleState.gather(records, alpha0=0.05)
    >>> batch.alpha.tolist(), batch.steps.tolist()
    ([0.05, 0.01], [0, 3])
    >>> batch.steps += 1; batch.scatter(records); records[0].alpha, records[1].steps
    (0.05, 4)
    """

    alpha: np.ndarray  # current step size α_u
    accum: np.ndarray  # AdaGrad-Norm: running sum of ||g||²
    loss_ema: np.ndarray  # EMA of the user's loss (NaN before the first step)
    loss_var: np.ndarray  # EMA of the squared deviation from loss_ema
    steps: np.ndarray  # number of steps taken for this user

    @classmethod
    def fresh(cls, n: int, alpha0: float) -> RuleState:
        return cls(
            alpha=np.full(n, alpha0, dtype=np.float64),
            accum=np.zeros(n),
            loss_ema=np.full(n, np.nan),
            loss_var=np.zeros(n),
            steps=np.zeros(n, dtype=np.int64),
        )

    @classmethod
    def gather(cls, records: Sequence[RuleRecord], alpha0: float) -> RuleState:
        def column(name: str, missing: float) -> np.ndarray:
            values = (getattr(r, name) for r in records)
            return np.fromiter((missing if v is None else v for v in values), np.float64,
                               len(records))

        return cls(alpha=column("alpha", alpha0), accum=column("accum", 0.0),
                   loss_ema=column("loss_ema", np.nan), loss_var=column("loss_var", 0.0),
                   steps=np.array([r.steps for r in records], dtype=np.int64))

    def scatter(self, records: Sequence[RuleRecord]) -> None:
        """Write each user's entries back into its record (a NaN loss EMA as None)."""
        for j, r in enumerate(records):
            r.alpha, r.accum = float(self.alpha[j]), float(self.accum[j])
            ema = float(self.loss_ema[j])
            r.loss_ema, r.loss_var = (None if np.isnan(ema) else ema), float(self.loss_var[j])
            r.steps = int(self.steps[j])


def _update_loss_stats(state: RuleState, loss: np.ndarray, decay: float) -> np.ndarray:
    """Update loss EMA/variance; returns the z-score of `loss` against the *previous* stats."""
    first = np.isnan(state.loss_ema)
    ema = np.where(first, loss, state.loss_ema)
    std = np.sqrt(state.loss_var) + 1e-6
    z = np.where(first, 0.0, (loss - ema) / std)
    dev = loss - ema
    state.loss_ema = ema + (1 - decay) * dev
    state.loss_var = np.where(first, 0.0, decay * (state.loss_var + (1 - decay) * dev * dev))
    state.steps += 1
    return z


@strategy
class Fixed:
    """α_u = α0 for ever: Δ = -α0 g."""

    name: Literal["fixed"] = "fixed"
    alpha0: Alpha0 = 0.05
    loss_decay: Decay = 0.9

    def step(self, state: RuleState, grad: np.ndarray, loss: np.ndarray) -> np.ndarray:
        _update_loss_stats(state, loss, self.loss_decay)
        state.alpha[:] = self.alpha0
        return -self.alpha0 * grad


@strategy
class AdaGradNorm:
    """AdaGrad-Norm (Ward, Wu & Bottou 2019): one scalar accumulator per user.

    G ← G + ||g||²;  α = α0 / sqrt(G + ε);  Δ = -α g. Scalar rather than per-coordinate so the
    per-user state stays one number (the vector form would double the residual's size).
    """

    name: Literal["adagrad"] = "adagrad"
    alpha0: Alpha0 = 0.05
    eps: Positive = 1e-8
    loss_decay: Decay = 0.9

    def step(self, state: RuleState, grad: np.ndarray, loss: np.ndarray) -> np.ndarray:
        _update_loss_stats(state, loss, self.loss_decay)
        state.accum += np.einsum("ij,ij->i", grad, grad)
        state.alpha[:] = self.alpha0 / np.sqrt(state.accum + self.eps)
        return -state.alpha[:, None] * grad


@strategy
class RMSPropNorm:
    """RMSProp-Norm: one scalar running average of ||g||² per user, forgetting at `rms_decay`.

    v ← ρ v + (1-ρ) ||g||²;  α = α0 / sqrt(v + ε);  Δ = -α g. Like AdaGrad-Norm it makes the
    step length independent of the gradient's scale (a fresh user and a settled one both move
    by ~α0); unlike AdaGrad-Norm its memory is short, so the rate never anneals to nothing and
    a user whose interests drift is followed as quickly as a new one.
    """

    name: Literal["rmsprop"] = "rmsprop"
    alpha0: Alpha0 = 0.05
    rms_decay: Decay = 0.9
    eps: Positive = 1e-8
    loss_decay: Decay = 0.9

    def step(self, state: RuleState, grad: np.ndarray, loss: np.ndarray) -> np.ndarray:
        _update_loss_stats(state, loss, self.loss_decay)
        sq = np.einsum("ij,ij->i", grad, grad)
        first = state.steps == 1
        rho = self.rms_decay
        state.accum = np.where(first, sq, rho * state.accum + (1 - rho) * sq)
        state.alpha[:] = self.alpha0 / np.sqrt(state.accum + self.eps)
        return -state.alpha[:, None] * grad


@strategy
class PaperAdaptive:
    """The source papers' rule, α_{t+1} = max(α_min, α_t / (1 + β·||Δu_t||)), Δu_t = -α_t g_t.

    Alone it only ever shrinks, so a user whose interests change is stuck with a tiny step.
    On a loss jump (loss above its EMA by more than `jump_z` standard deviations, after
    `warmup` steps) α is raised back toward α0 by the fraction `raise_frac`.
    """

    name: Literal["adaptive"] = "adaptive"
    alpha0: Alpha0 = 0.05
    beta: Annotated[float, Field(ge=0)] = 1.0
    alpha_min: Positive = 1e-3
    jump_z: Positive = 2.0
    raise_frac: Annotated[float, Field(ge=0, le=1)] = 0.5
    warmup: Annotated[int, Field(ge=0)] = 3
    loss_decay: Decay = 0.9

    def step(self, state: RuleState, grad: np.ndarray, loss: np.ndarray) -> np.ndarray:
        z = _update_loss_stats(state, loss, self.loss_decay)
        jump = (z > self.jump_z) & (state.steps > self.warmup)
        state.alpha = np.where(jump, state.alpha + self.raise_frac * (self.alpha0 - state.alpha),
                               state.alpha)
        delta = -state.alpha[:, None] * grad
        shrink = 1.0 + self.beta * np.linalg.norm(delta, axis=1)
        state.alpha = np.maximum(self.alpha_min, state.alpha / shrink)
        return delta


Rule = Fixed | AdaGradNorm | RMSPropNorm | PaperAdaptive


RuleChoice = choice(Rule)
"""A settings field holding one built rule: `"rmsprop"`, `{"name": "adaptive", "beta": 0.5}`
or a rule object (models/strategy.py)."""
