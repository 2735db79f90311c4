"""Learner configuration: every knob of the online two-tower learner, with its default and why.

The same object configures the Faust agent (nested in `streams.settings.Settings` as
`learner`, env `STREAMREC_LEARNER__<FIELD>`), the offline evaluator and the benchmarks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.candidates import CovisitCandidates, SourceChoice, TowerCandidates
from models.losses import AutoSoftmax, SoftmaxChoice
from models.lr_rules import AdaGradNorm, RMSPropNorm, RuleChoice

EVENT_TYPE_IDS: dict[str, int] = {
    "view": 1,
    "click": 2,
    "add_to_cart": 3,
    "purchase": 4,
    "rate": 5,
    "search": 6,
    "comment": 7,
    "dislike": 8,
}
"""Event type -> embedding row (0 is padding, 9 is the query token)."""

TEXT_ONLY_TYPES = frozenset({"search"})
"""Event types that are never a prediction target (they carry text, not a chosen item)."""


class LearnerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dim: int = Field(64, ge=4, description="Size of user and item vectors (FAISS dimension).")
    history_len: int = Field(
        50, ge=1, le=1000, description="Events kept per user (ring buffer) and seen by the encoder."
    )
    encoder_window: int = Field(
        20,
        ge=1,
        description="Newest events the sequence encoder reads (of the history_len kept): "
        "measured on ML-100K, 20 is as good as 50 at 2.5x less compute; the co-visitation "
        "profile still uses the whole history.",
    )
    item_tower: Literal["both", "id", "text"] = Field(
        "both",
        description="Item vector = learned ID embedding + projection of the frozen text "
        "embedding (`both`); `id` / `text` are ablations.",
    )
    user_tower: Literal["transformer", "gru", "none"] = Field(
        "transformer",
        description="Sequence encoder over the user's history; `none` = per-user residual only "
        "(the naive design, kept as an ablation).",
    )
    use_residual: bool = Field(
        True, description="Add a per-user residual vector p_u, updated with the per-user LR rule."
    )
    n_layers: int = Field(1, ge=1, le=6, description="Encoder layers (1 measured best online).")
    n_heads: int = Field(2, ge=1, description="Attention heads of the transformer encoder.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout in the encoder (0: online).")
    lr: float = Field(3e-3, gt=0, description="Adam step size of the shared parameters.")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay (dense parameters).")
    steps_per_batch: int = Field(1, ge=1, description="Gradient steps per micro-batch.")
    max_pairs_per_step: int = Field(
        32,
        ge=1,
        description="(history -> next item) pairs per gradient step: a larger micro-batch takes "
        "several steps, so how much is learned per event does not depend on the batch size. "
        "32 trains 1.36x faster than 16 (bench.scaleout trainer, 50k items) at the same "
        "quality within seeds' spread (README, Quality).",
    )
    max_steps_per_batch: int = Field(
        4,
        ge=1,
        description="Compute budget per micro-batch: above max_steps_per_batch × "
        "max_pairs_per_step pairs, a random subset trains (the rest only enters the replay), "
        "so an overloaded worker (large batches) catches up instead of falling further behind; "
        "every event is still served and stored. Batches up to 128 events train on every pair.",
    )
    replay_ratio: float = Field(
        1.0,
        ge=0,
        description="Past pairs replayed per new pair in each step (0 = off); curbs forgetting. "
        "A ratio, not a count, so the compute per event does not depend on the batch size.",
    )
    replay_capacity: int = Field(10_000, ge=0, description="Recent pairs kept for replay.")
    softmax: SoftmaxChoice = Field(
        default_factory=AutoSoftmax,
        description="The loss's softmax and its parameters (models/losses.py): `auto` (full up "
        "to `max_items` live items, sampled above), `full` (over the catalog), `sampled` "
        "(`n_negatives` popularity-sampled negatives with logQ correction); a name, or "
        "`{\"name\": \"auto\", \"max_items\": 50000}`.",
    )
    exclude_history_negatives: bool = Field(
        True,
        description="An item in a pair's history is no negative of its softmax (its own "
        "target excepted): serving never shows a user an item they interacted with "
        "(`exclude_seen` `all` or `recent`), so the loss does not spend itself pushing such "
        "items down. With `exclude_seen: all` the training example also carries the user's "
        "seen set (while exact: up to 1,024 items), and those items are left out too. "
        "ML-100K: +1.0% NDCG@10, and the seen set a further +1% (docs/quality.md). Must be "
        "false with `exclude_seen: none`, where seen items are served again.",
    )
    dislike_weight: float = Field(
        0.5, ge=0, description="Weight of the push-down term for `dislike` events."
    )
    event_weights: dict[str, float] = Field(
        default_factory=lambda: {
            "view": 1.0,
            "click": 1.0,
            "add_to_cart": 1.0,
            "purchase": 1.0,
            "rate": 1.0,
            "comment": 1.0,
        },
        description="Loss weight of each positive event type (equal by default: no data-free "
        "reason to prefer one).",
    )
    covisit: bool = Field(
        True,
        description="Add a learned co-visitation + popularity prior to the item scores "
        "(sequence-aware item-kNN statistics, see models/covisit.py).",
    )
    head_lr: float = Field(
        0.003, gt=0, description="Adam step size of the ranker's few blend weights (faster than "
        "the towers': a handful of scalars can follow the stream quickly), once "
        "`head_lr_start` has decayed to it.",
    )
    head_lr_start: float = Field(
        0.03, gt=0, description="The ranker's first step size, decaying as "
        "head_lr_start / sqrt(1 + t / head_lr_decay_steps) over its steps t down to `head_lr`: "
        "on a new stream the blend weights start far from their fit (no decay: set it to "
        "`head_lr`). 0.01 / 0.03 / 0.1 measured (docs/quality.md): 0.03 lifts three Ciao "
        "subsets ~1% over 0.01 and ties on ML-100K, where 0.1 costs 0.4%.",
    )
    head_lr_decay_steps: int = Field(
        1000, ge=1, description="τ of that decay, in the ranker's steps: its step size is "
        "head_lr_start / sqrt(2) after τ steps and half of head_lr_start after 3τ.",
    )
    covisit_window: int = Field(50, ge=1, description="Earlier events paired with each event.")
    covisit_pair_decay: float = Field(0.9, gt=0, le=1, description="Pair weight per step apart.")
    covisit_recencies: tuple[float, ...] = Field(
        (0.8,),
        description="Profile weight per item back, one co-visitation feature each (several "
        "let the ranker weigh 'just now' against 'long-term'; on ML-100K one measured best).",
    )
    covisit_profile: int = Field(50, ge=1, description="Distinct recent items in the profile.")
    candidate_sources: tuple[SourceChoice, ...] = Field(
        (TowerCandidates(), CovisitCandidates()),
        min_length=1,
        description="Where the ranker's candidates come from, each a name or its parameters "
        "(models/candidates.py): `tower`, the index's `count` nearest items to the user "
        "vector, and `covisit`, the `per_seed` items co-visited most with each of the user's "
        "`seeds` newest items; the ranker scores their union.",
    )
    covisit_max_neighbours: int = Field(
        500,
        ge=1,
        description="Memory bound of the co-visitation counts: an item followed by more than "
        "twice this many others keeps its this-many strongest (models/covisit.py `prune`), "
        "so the counts grow with the catalog, not with its square.",
    )
    lr_rule: RuleChoice = Field(
        default_factory=RMSPropNorm,
        description="Per-user LR rule for the residual and its parameters (models/lr_rules.py):"
        " `rmsprop` (scale-free steps with a short memory, so a drifting user is followed), "
        "`adaptive` (the source papers' α ← α / (1 + β·||Δu||)), `adagrad`, `fixed`; a name, "
        "or `{\"name\": \"adaptive\", \"beta\": 0.5}`. On ML-100K the rules differ by "
        "< 0.001 NDCG@10 (README, Quality): the residual carries little signal next to the "
        "sequence encoder.",
    )
    scenario_params: bool = Field(
        True,
        description="Per-scenario parameters (q_s, φ_s) added to the user vector and the "
        "ranker's weights, learned online from zero by the scenario's own LR rule "
        "(models/two_tower.py ScenarioTable); False: one shared model, the scenario only "
        "filters items.",
    )
    scenario_history: bool = Field(
        True,
        description="Co-visitation features read a query's history within its scenario: "
        "the items it allows (the whole history when it holds none), with recency counted "
        "there, as a model of that scenario alone would; False: the whole history.",
    )
    scenario_lr_rule: RuleChoice = Field(
        default_factory=AdaGradNorm,
        description="LR rule of each scenario's parameters, as `lr_rule`. A scenario takes "
        "a step with every trainer step, thousands where a user takes a few: a rule whose "
        "rate anneals (`adagrad`) settles, where `rmsprop`'s constant step length keeps it "
        "wandering.",
    )
    max_scenarios: int = Field(
        64,
        ge=1,
        le=100_000,
        description="Scenarios with their own parameters; a worker sends events of a "
        "scenario beyond this bound to the DLQ (`scenario_limit`).",
    )
    device: str = Field("auto", description="`auto` (CUDA if present), `cpu` or `cuda[:n]`.")
    seed: int = Field(0, description="Seed of parameter init and sampling.")

    @model_validator(mode="after")
    def _sources_rankable(self) -> LearnerConfig:
        names = [s.name for s in self.candidate_sources]
        if len(set(names)) < len(names):
            raise ValueError(f"candidate_sources repeats a source: {names}")
        if not self.covisit and "tower" not in names:
            raise ValueError("without co-visitation (covisit=false) the `tower` candidate "
                             "source is the only one that finds items: add it")
        return self
