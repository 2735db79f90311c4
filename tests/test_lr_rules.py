"""Tests for models/lr_rules.py: each per-user LR rule against an independent reference.

The references below are written from the formulas (plain Python floats, one user at a
time), not by calling the rules, so a rule that drifts from its formula fails here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.config import LearnerConfig
from models.examples import Interaction
from models.learner import OnlineLearner
from models.lr_rules import (
    AdaGradNorm,
    Fixed,
    PaperAdaptive,
    RMSPropNorm,
    RuleState,
)
from models.user_state import UserState

# Hand-chosen gradients (one user, d = 3) and losses: six steps, varied norms.
GRADS = [
    [3.0, 4.0, 0.0],  # ||g|| = 5
    [1.0, -2.0, 2.0],  # 3
    [0.0, 0.0, 0.5],  # 0.5
    [-6.0, 0.0, 8.0],  # 10
    [0.3, 0.4, 1.2],  # 1.3
    [2.0, 2.0, 1.0],  # 3
]
STABLE_LOSSES = [2.0, 2.1, 1.9, 2.0, 2.05, 1.95]


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


class RefLossStats:
    """Reference EMA / EW-variance of the loss; z-score against the *previous* stats."""

    def __init__(self, decay: float):
        self.decay = decay
        self.ema: float | None = None
        self.var = 0.0
        self.steps = 0

    def update(self, loss: float) -> float:
        self.steps += 1
        if self.ema is None:
            self.ema, self.var = loss, 0.0
            return 0.0
        z = (loss - self.ema) / (math.sqrt(self.var) + 1e-6)
        dev = loss - self.ema
        self.ema += (1 - self.decay) * dev
        self.var = self.decay * (self.var + (1 - self.decay) * dev * dev)
        return z


def _one(g: list[float]) -> np.ndarray:
    return np.array([g], dtype=np.float64)


def _loss(x: float) -> np.ndarray:
    return np.array([x], dtype=np.float64)


# --------------------------------------------------------------------------- Fixed


def test_fixed_rule_is_plain_sgd_with_constant_alpha():
    a0 = 0.07
    rule = Fixed(alpha0=a0)
    st = RuleState.fresh(1, a0)
    ref = RefLossStats(0.9)
    for g, loss in zip(GRADS, STABLE_LOSSES, strict=True):
        delta = rule.step(st, _one(g), _loss(loss))
        ref.update(loss)
        np.testing.assert_allclose(delta[0], [-a0 * x for x in g], rtol=1e-12)
        assert st.alpha[0] == a0
        assert st.steps[0] == ref.steps
        assert st.loss_ema[0] == pytest.approx(ref.ema, rel=1e-12)
        assert st.accum[0] == 0.0


# --------------------------------------------------------------------------- AdaGrad-Norm


def test_adagrad_norm_accumulates_squared_norms():
    a0, eps = 0.5, 1e-8
    rule = AdaGradNorm(alpha0=a0, eps=eps)
    st = RuleState.fresh(1, a0)
    G = 0.0
    alphas = []
    for g, loss in zip(GRADS, STABLE_LOSSES, strict=True):
        delta = rule.step(st, _one(g), _loss(loss))
        G += _norm(g) ** 2
        alpha = a0 / math.sqrt(G + eps)
        alphas.append(alpha)
        assert st.accum[0] == pytest.approx(G, rel=1e-12)
        assert st.alpha[0] == pytest.approx(alpha, rel=1e-12)
        # the step uses the α *after* this step's accumulation
        np.testing.assert_allclose(delta[0], [-alpha * x for x in g], rtol=1e-12)
    # first step: G = 25 -> α = 0.5 / 5
    assert alphas[0] == pytest.approx(0.1, rel=1e-9)
    assert all(b < a for a, b in zip(alphas, alphas[1:], strict=False))


# --------------------------------------------------------------------------- RMSProp-Norm


def test_rmsprop_norm_keeps_a_forgetting_mean_of_squared_norms():
    a0, rho, eps = 0.5, 0.9, 1e-8
    rule = RMSPropNorm(alpha0=a0, rms_decay=rho, eps=eps)
    st = RuleState.fresh(1, a0)
    v = None
    for g, loss in zip(GRADS, STABLE_LOSSES, strict=True):
        delta = rule.step(st, _one(g), _loss(loss))
        sq = _norm(g) ** 2
        v = sq if v is None else rho * v + (1 - rho) * sq  # the first step starts the mean
        alpha = a0 / math.sqrt(v + eps)
        assert st.accum[0] == pytest.approx(v, rel=1e-12)
        assert st.alpha[0] == pytest.approx(alpha, rel=1e-12)
        np.testing.assert_allclose(delta[0], [-alpha * x for x in g], rtol=1e-12)
    # first step: v = 25 -> a step of length exactly α0, whatever the gradient's scale
    first = RuleState.fresh(1, a0)
    assert np.linalg.norm(rule.step(first, _one([30.0, 40.0, 0.0]), _loss(1.0))) == \
        pytest.approx(a0, rel=1e-6)


def test_rmsprop_norm_recovers_its_rate_after_large_gradients_unlike_adagrad():
    """After a burst of large gradients, small ones bring RMSProp-Norm's α back up (short
    memory); AdaGrad-Norm's α only ever falls."""
    grads = [[10.0, 0.0, 0.0]] * 5 + [[0.1, 0.0, 0.0]] * 80
    rms, ada = RMSPropNorm(alpha0=0.1), AdaGradNorm(alpha0=0.1)
    s_rms, s_ada = RuleState.fresh(1, 0.1), RuleState.fresh(1, 0.1)
    after_burst = None
    for k, g in enumerate(grads):
        rms.step(s_rms, _one(g), _loss(1.0))
        ada.step(s_ada, _one(g), _loss(1.0))
        if k == 4:
            after_burst = (s_rms.alpha[0], s_ada.alpha[0])
    assert s_rms.alpha[0] > 20 * after_burst[0]
    assert s_ada.alpha[0] < after_burst[1]


# --------------------------------------------------------------------------- PaperAdaptive


def _ref_adaptive(grads, losses, *, a0, beta, a_min, jump_z, raise_frac, warmup, decay):
    """Yields (alpha used for Δ, Δ, alpha after, jumped) per step."""
    stats = RefLossStats(decay)
    alpha = a0
    for g, loss in zip(grads, losses, strict=True):
        z = stats.update(loss)
        jumped = z > jump_z and stats.steps > warmup
        if jumped:
            alpha = alpha + raise_frac * (a0 - alpha)
        used = alpha
        delta = [-used * x for x in g]
        alpha = max(a_min, alpha / (1 + beta * _norm(delta)))
        yield used, delta, alpha, jumped


def test_paper_adaptive_docstring_example():
    st = RuleState.fresh(1, alpha0=0.1)
    rule = PaperAdaptive(alpha0=0.1, beta=1.0, alpha_min=0.001)
    delta = rule.step(st, np.array([[3.0, 4.0]]), np.array([1.0]))
    np.testing.assert_allclose(delta, [[-0.3, -0.4]], rtol=1e-12)
    assert st.alpha[0] == pytest.approx(0.1 / 1.5, rel=1e-12)


def test_paper_adaptive_stable_loss_only_shrinks():
    params = dict(a0=0.2, beta=2.0, a_min=1e-3, jump_z=2.0, raise_frac=0.5, warmup=3, decay=0.9)
    rule = PaperAdaptive(alpha0=0.2, beta=2.0, alpha_min=1e-3, jump_z=2.0, raise_frac=0.5,
                         warmup=3, loss_decay=0.9)
    st = RuleState.fresh(1, 0.2)
    prev = 0.2
    for (used, ref_delta, ref_alpha, jumped), g, loss in zip(
        _ref_adaptive(GRADS, STABLE_LOSSES, **params), GRADS, STABLE_LOSSES, strict=True
    ):
        assert not jumped
        delta = rule.step(st, _one(g), _loss(loss))
        assert used == pytest.approx(prev, rel=1e-12)  # no raise: Δ uses the previous α
        np.testing.assert_allclose(delta[0], ref_delta, rtol=1e-12)
        assert st.alpha[0] == pytest.approx(ref_alpha, rel=1e-12)
        # explicit formula, independent of the generator above
        assert st.alpha[0] == pytest.approx(max(1e-3, prev / (1 + 2.0 * prev * _norm(g))))
        assert st.alpha[0] <= prev
        prev = float(st.alpha[0])


def test_paper_adaptive_is_floored_at_alpha_min():
    a_min = 0.01
    rule = PaperAdaptive(alpha0=0.5, beta=10.0, alpha_min=a_min)
    st = RuleState.fresh(1, 0.5)
    big = [10.0, 0.0, 0.0]
    for k in range(6):
        delta = rule.step(st, _one(big), _loss(1.0))
        assert st.alpha[0] >= a_min
        if k >= 2:  # 0.5 -> 0.5/51 -> floor
            assert st.alpha[0] == a_min
            np.testing.assert_allclose(delta[0], [-a_min * 10.0, 0.0, 0.0], rtol=1e-12)


def test_paper_adaptive_loss_jump_raises_alpha_before_the_step():
    a0, beta, a_min, raise_frac, warmup = 0.2, 2.0, 1e-3, 0.5, 3
    rule = PaperAdaptive(alpha0=a0, beta=beta, alpha_min=a_min, jump_z=2.0,
                         raise_frac=raise_frac, warmup=warmup, loss_decay=0.9)
    st = RuleState.fresh(1, a0)
    losses = [2.0, 2.1, 1.9, 2.0, 2.05, 9.0]  # step 6: far above the EMA
    for g, loss in zip(GRADS[:5], losses[:5], strict=True):
        rule.step(st, _one(g), _loss(loss))
    before = float(st.alpha[0])
    assert before < a0 / 2  # it has shrunk
    g = GRADS[5]
    delta = rule.step(st, _one(g), _loss(losses[5]))
    raised = before + raise_frac * (a0 - before)  # exact raise toward α0
    np.testing.assert_allclose(delta[0], [-raised * x for x in g], rtol=1e-12)
    assert st.alpha[0] == pytest.approx(max(a_min, raised / (1 + beta * raised * _norm(g))),
                                        rel=1e-12)
    # and the whole trajectory matches the reference, including which step jumped
    ref = list(_ref_adaptive(GRADS, losses, a0=a0, beta=beta, a_min=a_min, jump_z=2.0,
                             raise_frac=raise_frac, warmup=warmup, decay=0.9))
    assert [j for *_, j in ref] == [False] * 5 + [True]
    assert ref[-1][0] == pytest.approx(raised, rel=1e-12)
    assert st.alpha[0] == pytest.approx(ref[-1][2], rel=1e-12)


def test_paper_adaptive_no_jump_during_warmup():
    rule = PaperAdaptive(alpha0=0.2, beta=2.0, alpha_min=1e-3, warmup=3)
    st = RuleState.fresh(1, 0.2)
    rule.step(st, _one(GRADS[0]), _loss(1.0))
    before = float(st.alpha[0])
    # step 2: a huge loss jump, but only 2 steps taken (<= warmup): no raise
    delta = rule.step(st, _one(GRADS[1]), _loss(100.0))
    np.testing.assert_allclose(delta[0], [-before * x for x in GRADS[1]], rtol=1e-12)
    assert st.alpha[0] < before


def test_paper_adaptive_loss_drop_is_not_a_jump():
    rule = PaperAdaptive(alpha0=0.2, beta=2.0, alpha_min=1e-3, warmup=3)
    st = RuleState.fresh(1, 0.2)
    for g, loss in zip(GRADS[:5], STABLE_LOSSES[:5], strict=True):
        rule.step(st, _one(g), _loss(loss))
    before = float(st.alpha[0])
    delta = rule.step(st, _one(GRADS[5]), _loss(0.01))  # far *below* the EMA
    np.testing.assert_allclose(delta[0], [-before * x for x in GRADS[5]], rtol=1e-12)


# --------------------------------------------------------------------------- vectorised


@pytest.mark.parametrize("name", ["fixed", "adagrad", "rmsprop", "adaptive"])
def test_two_users_in_one_call_equal_two_single_calls(name):
    params = dict(alpha0=0.2, beta=2.0, alpha_min=1e-3, jump_z=2.0, raise_frac=0.5,
                  loss_decay=0.9)
    rule = LearnerConfig(lr_rule={"name": name, "alpha0": 0.2, "loss_decay": 0.9} | (
        params if name == "adaptive" else {})).lr_rule
    both = RuleState.fresh(2, 0.2)
    single = [RuleState.fresh(1, 0.2), RuleState.fresh(1, 0.2)]
    # user 0 has a loss jump at the last step, user 1 is stable; different gradients
    losses = [[2.0, 1.0], [2.1, 1.1], [1.9, 0.9], [2.0, 1.0], [2.05, 1.05], [9.0, 1.0]]
    grads1 = [[-g for g in reversed(v)] for v in GRADS]
    for t in range(6):
        gb = np.array([GRADS[t], grads1[t]])
        lb = np.array(losses[t])
        db = rule.step(both, gb, lb)
        for u in range(2):
            du = rule.step(single[u], gb[u : u + 1], lb[u : u + 1])
            np.testing.assert_array_equal(db[u], du[0])
            for f in ("alpha", "accum", "loss_ema", "loss_var", "steps"):
                np.testing.assert_array_equal(getattr(both, f)[u], getattr(single[u], f)[0])
    if name == "adaptive":  # the jump did happen for user 0 only
        assert both.alpha[0] > both.alpha[1]


def test_settings_build_a_rule_from_its_name_or_its_parameters():
    """A name takes the rule's defaults; a mapping sets parameters; the settings' dump reads
    back as the same rule (what `streamrec config` prints is what a worker would run)."""
    assert LearnerConfig().lr_rule == RMSPropNorm(alpha0=0.05, rms_decay=0.9, loss_decay=0.9)
    assert LearnerConfig().scenario_lr_rule == AdaGradNorm()
    for name, rule in (("fixed", Fixed), ("adagrad", AdaGradNorm), ("rmsprop", RMSPropNorm),
                       ("adaptive", PaperAdaptive)):
        assert LearnerConfig(lr_rule=name).lr_rule == rule()
    cfg = LearnerConfig(lr_rule={"name": "adaptive", "alpha0": 0.1, "beta": 0.5,
                                 "alpha_min": 0.002})
    assert cfg.lr_rule == PaperAdaptive(alpha0=0.1, beta=0.5, alpha_min=0.002)
    assert LearnerConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    with pytest.raises(ValueError, match="beta"):
        Fixed(alpha0=0.1, beta=2.0)  # a rule built alone checks the same


@pytest.mark.parametrize(("choice", "says"), [
    ("sgd", "does not match any of the expected tags: 'fixed', 'adagrad'"),  # no such rule
    ({"beta": 2.0}, "Unable to extract tag using discriminator 'name'"),  # no name
    ({"name": "fixed", "beta": 2.0}, "fixed.beta"),  # another rule's parameter
    ({"name": "rmsprop", "rms_decay": 1.5}, "rmsprop.rms_decay"),  # out of range
    ({"name": "adaptive", "alpha0": 0.0}, "adaptive.alpha0"),
    ({"name": "adaptive", "warmup": -1}, "adaptive.warmup"),
])
def test_settings_reject_an_unknown_rule_or_a_parameter_it_does_not_have(choice, says):
    with pytest.raises(ValueError, match=says):
        LearnerConfig(lr_rule=choice)


def test_rule_state_fresh():
    st = RuleState.fresh(3, 0.05)
    assert st.alpha.tolist() == [0.05] * 3
    assert st.accum.tolist() == [0.0] * 3
    assert np.isnan(st.loss_ema).all()
    assert st.steps.tolist() == [0, 0, 0]


# --------------------------------------------------------------------------- learner level


def test_interest_change_raises_adaptive_alpha_again():
    """One user views topic-A items for many batches (α shrinks), then switches to topic B:
    the loss jump must raise α above its value just before the switch."""
    text_dim, n_per_topic = 32, 25
    rng = np.random.default_rng(7)
    centroids = rng.standard_normal((2, text_dim))
    ids, vecs = [], []
    for t in range(2):
        for k in range(n_per_topic):
            v = centroids[t] + 0.3 * rng.standard_normal(text_dim)
            ids.append(f"t{t}-{k}")
            vecs.append(v / np.linalg.norm(v))
    cfg = LearnerConfig(dim=16, history_len=10, lr_rule={"name": "adaptive", "beta": 10.0},
                        seed=0, device="cpu", replay_ratio=0.0)
    learner = OnlineLearner(cfg, text_dim=text_dim, capacity=64)
    learner.upsert_items(ids, np.asarray(vecs, dtype=np.float32))
    states = {"u": UserState()}
    ts = 1_000_000

    def batch(topic: int) -> list[Interaction]:
        nonlocal ts
        out = []
        for _ in range(4):
            ts += 1000
            out.append(Interaction("u", f"t{topic}-{int(rng.integers(n_per_topic))}", "view", ts))
        return out

    alphas = []
    for _ in range(40):
        alphas.append(learner.learn_batch(batch(0), states).alphas["u"])
    assert alphas[-1] < alphas[0] < cfg.lr_rule.alpha0
    before = alphas[-1]
    after = learner.learn_batch(batch(1), states).alphas["u"]
    assert after > 1.1 * before
    assert states["u"].rule.alpha == after
