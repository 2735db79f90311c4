"""models/user_state.py `SeenItems`: every item a user interacted with; the exclusion rule."""

from __future__ import annotations

import numpy as np
import orjson
from hypothesis import example, given, settings
from hypothesis import strategies as st

from models.items import KeyIndex, find_sorted
from models.user_state import EXACT_MAX, Exclusion, SeenItems, UserState, exclusions, item_keys

keys_st = st.lists(st.integers(min_value=0, max_value=2**63 - 1), max_size=60)


@settings(max_examples=100, deadline=None)
@given(keys_st, keys_st)
def test_exact_set_has_no_false_answers_and_survives_the_wire(added, probed):
    s = SeenItems()
    s.add(np.array(added, np.int64))
    got = s.contains(np.array(probed + added, np.int64))
    want = [k in set(added) for k in probed + added]
    assert got.tolist() == want
    assert len(s) == len(set(added)) and s.exact
    assert SeenItems.from_wire(orjson.loads(orjson.dumps(s.to_wire()))) == s


def test_past_the_exact_bound_a_bloom_filter_keeps_every_key_and_few_false_ones():
    rng = np.random.default_rng(0)
    added = rng.integers(0, 2**63 - 1, size=5 * EXACT_MAX, dtype=np.int64)
    s = SeenItems()
    for chunk in np.array_split(added, 50):
        s.add(chunk)
    assert not s.exact and len(s) == len(np.unique(added))
    assert s.contains(added).all()  # no false negatives: a seen item is never served
    others = rng.integers(0, 2**63 - 1, size=100_000, dtype=np.int64)
    assert s.contains(others).mean() < 1e-3  # 5,120 keys in 2^17 bits, 7 probes: ~4e-5
    back = SeenItems.from_wire(orjson.loads(orjson.dumps(s.to_wire())))
    assert back == s and back.contains(added).all()


def test_the_rule_by_mode_and_its_snapshot():
    st_ = UserState()
    for k in range(8):
        st_.append(f"i{k}", 1, k, None, 3)  # the ring keeps i5, i6, i7
    every, old, recent = item_keys([f"i{k}" for k in range(8)]), item_keys(["i0"]), \
        item_keys(["i7"])
    assert exclusions(st_, "all").contains(every).all()
    assert exclusions(st_, "recent").contains(recent).all()
    assert not exclusions(st_, "recent").contains(old).any()
    assert not exclusions(st_, "none").contains(every).any()
    snap = exclusions(st_, "all")
    st_.append("later", 1, 9, None, 3)
    assert not snap.contains(item_keys(["later"])).any()  # what it was at the time
    assert isinstance(snap, Exclusion) and len(snap) == 8


def test_a_version_1_user_state_loads_with_its_history_as_seen():
    """States written before `seen` existed: their ring is all that is known."""
    v1 = orjson.dumps({"v": 1, "items": ["a", None, "b"], "types": [1, 6, 1], "ts": [1, 2, 3],
                       "texts": [None, None, None], "residual": None, "alpha": None,
                       "accum": 0.0, "loss_ema": None, "loss_var": 0.0, "steps": 0,
                       "n_events": 3, "offsets": {"0": 7}})
    st_ = UserState.from_bytes(v1)
    assert st_.seen.contains(item_keys(["a", "b", "c"])).tolist() == [True, True, False]
    assert orjson.loads(st_.to_bytes())["v"] == 2


@settings(max_examples=40, deadline=None)
@example(list(range(1100)), "all")  # past EXACT_MAX: a Bloom filter
@given(st.lists(st.integers(0, 3000), max_size=1500), st.sampled_from(["all", "recent", "none"]))
def test_exclusion_mask_is_exactly_what_it_contains(seen, mode):
    """`mask` looks an exact exclusion up in the catalog instead of the catalog in it: the
    same answer as `contains`, for exact sets, rings, nothing, and Bloom filters (over
    EXACT_MAX distinct items, where it falls back to `contains`)."""
    state = UserState()
    for k in seen:
        state.append(f"i{k}", 1, 0, None, 50)
    catalog = item_keys([f"i{k}" for k in range(0, 2500, 3)])  # some seen items are not in it
    ex = exclusions(state, mode)
    assert np.array_equal(ex.mask(KeyIndex(catalog)), ex.contains(catalog))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-2**62, 2**62), max_size=40, unique=True),
       st.lists(st.integers(-2**62, 2**62), min_size=1, max_size=3000))
def test_find_sorted_finds_what_searchsorted_finds(catalog_keys, probes):
    """Few or many keys (many are looked up in sorted order), the answer is the same."""
    hay = np.sort(np.array(catalog_keys, np.int64))
    keys = np.array(probes + catalog_keys, np.int64)
    pos, found = find_sorted(hay, keys)
    assert found.tolist() == [k in set(catalog_keys) for k in keys.tolist()]
    if len(hay):
        assert (hay[pos[found]] == keys[found]).all()
        assert pos.tolist() == np.minimum(np.searchsorted(hay, keys), len(hay) - 1).tolist()
