"""Candidate sources: which items the ranker scores for a query.

    tower     C(u) = the `count` items j with the largest u·v_j (the FAISS index; exact in the
              evaluator) that the query's scenario allows and the user has not excluded
    covisit   C(h) = ∪ over the `seeds` newest distinct items i of the history h of the
              `per_seed` items j with the largest co-visitation count c(i, j) (models/covisit.py)

The ranker scores the union of the chosen sources' candidates, minus deleted, disallowed and
excluded items (models/serving.py `rank_candidates`, which serving and the evaluator share).
The two sources find different items: the tower what resembles the user's taste, co-visitation
what other users went on to after the same items.

Each source is a strategy (models/strategy.py): a small class whose fields are its validated
parameters, chosen and built once by the settings (`learner__candidate_sources`:
`["tower", {"name": "covisit", "seeds": 5}]`).

>>> from models.user_state import Exclusion
>>> keys = np.array([[7, 3, -1, 5], [3, 9, 8, 6]])   # index results, best first; -1: padding
>>> TowerCandidates(count=2).select(keys, [Exclusion(), Exclusion()]).astype(int)
array([[1, 1, 0, 0],
       [1, 1, 0, 0]])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
from pydantic import Field

from models.strategy import choice, strategy
from models.user_state import Exclusion, first_unexcluded

if TYPE_CHECKING:
    from models.model import SharedModel
    from models.user_state import History

Count = Annotated[int, Field(ge=1)]


@strategy
class TowerCandidates:
    """The `count` nearest items to the user vector. The index search is the caller's (the
    FAISS index in serving, an exact order in the evaluator); this picks among its results."""

    name: Literal["tower"] = "tower"
    count: Count = 200

    def select(self, keys: np.ndarray, excluded: Sequence[Exclusion]) -> np.ndarray:
        """Mask over index results `keys` (n, fetch; best first; -1 = padding): the first
        `count` of each row that are real and not excluded."""
        return first_unexcluded(keys, excluded, self.count)


@strategy
class CovisitCandidates:
    """The items co-visited most with the user's newest items: found from the history alone,
    so an item the tower ranks low (new, or a taste the user vector has not caught) can
    still reach the ranker."""

    name: Literal["covisit"] = "covisit"
    seeds: Count = 10
    per_seed: Count = 50

    def rows(self, model: SharedModel, hist: History) -> np.ndarray:
        """Live item rows co-visited most with the `seeds` newest distinct items of `hist`
        (an item may appear more than once); none without co-visitation counts."""
        if model.covis is None:
            return np.zeros(0, dtype=np.int64)
        newest = list(dict.fromkeys(r for r in reversed(hist.rows) if r))[: self.seeds]
        rows = model.covis.neighbours(np.asarray(newest, dtype=np.int64), self.per_seed)
        live = model.catalog.live
        return rows[(rows < len(live)) & live[np.minimum(rows, len(live) - 1)]]


Source = TowerCandidates | CovisitCandidates
SourceChoice = choice(Source)


def tower_of(sources: Sequence[Source]) -> TowerCandidates | None:
    """The `tower` source among `sources`, if chosen."""
    return next((s for s in sources if isinstance(s, TowerCandidates)), None)


def history_rows(sources: Sequence[Source], model: SharedModel, hist: History) -> np.ndarray:
    """The candidates of the sources that read the history alone (all but `tower`)."""
    parts = [s.rows(model, hist) for s in sources if not isinstance(s, TowerCandidates)]
    return np.concatenate([np.zeros(0, np.int64), *parts])

