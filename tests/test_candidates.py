"""Candidate sources (models/candidates.py): chosen by name in settings, validated, and each
serving exactly what it finds through the real FAISS server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from test_covisit import _cycle_learner

from models.candidates import CovisitCandidates, Source, TowerCandidates
from models.config import LearnerConfig
from models.serving import Server


@pytest.mark.parametrize("bad", [
    {"candidate_sources": ("tower", "popular")},           # no such source
    {"candidate_sources": ()},                              # nothing to rank
    {"candidate_sources": ("tower", "tower")},              # a source twice
    {"candidate_sources": ("covisit",), "covisit": False},  # finds nothing without counts
    {"candidate_sources": ({"name": "tower", "count": 0},)},  # out of range
    {"candidate_sources": ({"name": "tower", "seeds": 5},)},  # another source's parameter
])
def test_settings_that_cannot_rank_are_refused(bad):
    with pytest.raises(ValidationError):
        LearnerConfig(**bad)


def test_sources_are_built_once_from_their_settings():
    cfg = LearnerConfig(candidate_sources=({"name": "covisit", "seeds": 3, "per_seed": 4},
                                           {"name": "tower", "count": 7}))
    assert cfg.candidate_sources == (CovisitCandidates(seeds=3, per_seed=4),
                                     TowerCandidates(count=7))
    assert LearnerConfig(candidate_sources=("tower",)).candidate_sources == (TowerCandidates(),)
    with pytest.raises(ValueError, match="does not match any of the expected tags"):
        LearnerConfig(candidate_sources=("tower", "popular"))


def _served(learner, ids, states, sources: tuple[Source, ...]) -> dict[str, set[str]]:
    """What a server of `learner`'s model recommends (top 10) with `sources` only."""
    model = learner.model
    model.sources = sources
    server = Server(model, exclude_seen="none")
    server.add_items(ids)
    server.refresh()
    users = list(states.values())
    recs, _ = server.recommend(users, k=10)
    return {u: {r.item_id for r in rec} for u, rec in zip(states, recs, strict=True)}


def test_each_source_alone_serves_what_it_finds_and_both_serve_their_union():
    three, pairs = TowerCandidates(count=3), CovisitCandidates(seeds=1, per_seed=2)
    learner, ids, states, _ = _cycle_learner(covisit=True, candidate_sources=(three, pairs))
    model = learner.model
    co_visited = {u: set(model.catalog.ids_of(pairs.rows(model, st.history(model.catalog))))
                  for u, st in states.items()}
    tower = _served(learner, ids, states, (three,))
    covisit = _served(learner, ids, states, (pairs,))
    both = _served(learner, ids, states, (three, pairs))
    for u in states:
        assert 0 < len(tower[u]) <= 3                         # the index's 3 nearest
        assert covisit[u] == co_visited[u] and covisit[u]     # exactly the co-visited ones
        assert both[u] == tower[u] | covisit[u]               # the ranker scores the union
    assert any(tower[u] != covisit[u] for u in states)        # the sources differ
