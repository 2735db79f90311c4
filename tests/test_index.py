"""Tests for index/: stable item ids and the FAISS item index (real FAISS, fixed seeds)."""

from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from index import faiss_index as fi
from index import topk
from index.faiss_index import FaissIndex, IndexConfig, VersionedIndex
from index.ids import IdCollisionError, item_hash
from index.topk import top_k
from models.items import ItemRows, KeyIndex

DIM = 32
N_ITEMS = 3000
KINDS = ["flat", "hnsw", "flat-gpu"]


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """Random unit vectors: each vector's best inner-product match is itself (score 1)."""
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def embedding_like(n: int, dim: int = 64, rank: int = 8, seed: int = 0) -> np.ndarray:
    """Low-rank signal plus noise, normalised: clustered like real item embeddings."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, dim))
    x += 0.5 * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def item_ids(n: int, start: int = 0) -> np.ndarray:
    """Large, non-sequential ids, as item_hash produces (a label==id bug would show)."""
    return (np.arange(start, start + n, dtype=np.int64) * 1_000_003 + 17) << 20


@pytest.fixture
def config(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> IndexConfig:
    """Config for a kind; 'flat-gpu' fakes a GPU with a CPU IndexFlatIP (same code path)."""
    kind = request.param
    if kind == "flat-gpu":
        monkeypatch.setattr(fi, "_num_gpus", lambda: 1)
        monkeypatch.setattr(fi, "_new_gpu_flat", lambda dim: faiss.IndexFlatIP(dim))
        return IndexConfig(kind="flat", device="auto")
    return IndexConfig(kind=kind, device="cpu")


@pytest.fixture
def built(config: IndexConfig) -> tuple[FaissIndex, np.ndarray, np.ndarray]:
    ids, vecs = item_ids(N_ITEMS), unit_vectors(N_ITEMS, seed=1)
    index = FaissIndex.build(ids, vecs, config)
    index.search(vecs[:1], 1)  # a serving index has been searched: FAISS copies are in sync
    return index, ids, vecs


per_kind = pytest.mark.parametrize("config", KINDS, indirect=True)


# --------------------------------------------------------------------------- ids


def test_item_hash_known_values() -> None:
    # xxh64("") with seed 0 is the published 0xEF46DB3751D8E999; masking clears the top bit.
    assert item_hash("") == 0xEF46DB3751D8E999 & 0x7FFF_FFFF_FFFF_FFFF == 8018337217222601113
    assert item_hash("item-42") == 3751714222725478190
    assert item_hash("ключ/🎵") == 6757710226497438020


@given(st.text())
def test_item_hash_is_a_non_negative_int63(s: str) -> None:
    h = item_hash(s)
    assert 0 <= h < 2**63
    assert h == item_hash(s)


def test_item_rows_map_ids_keys_and_rows_both_ways() -> None:
    rows = ItemRows(capacity=2)
    r = rows.add(["item-42", "a", "item-42"])
    key = item_hash("item-42")
    assert r.tolist() == [1, 2, 1] and rows.key_of("item-42") == key
    assert rows.key_of("other") is None and rows.key_of(None) is None
    assert rows.keys_of_ids(["a", "other", "item-42"]).tolist() == [item_hash("a"), key]
    assert rows.rows_of_keys(np.array([[key, -1], [item_hash("a"), 5]])).tolist() == \
        [[1, -1], [2, -1]]
    assert rows.ids_of_keys([key, -1, item_hash("a")]) == ["item-42", None, "a"]
    rows.add([f"x{k}" for k in range(100)])  # grown: the key view follows
    assert rows.ids_of_keys(rows.keys[[102, 1]]) == ["x99", "item-42"]
    assert rows.rows_of_keys(rows.keys[[102]]).tolist() == [102]


def test_a_key_index_refuses_repeated_keys() -> None:
    """A repeated key has no one position: refused, not answered with one of them."""
    with pytest.raises(ValueError, match="distinct"):
        KeyIndex(np.array([5, 9, 5]))
    assert KeyIndex(np.zeros(0, np.int64)).positions(np.array([1])).tolist() == [-1]


@given(st.lists(st.integers(0, 60), unique=True), st.lists(st.integers(0, 60), unique=True))
def test_an_extended_key_index_answers_as_one_built_whole(a: list[int], b: list[int]) -> None:
    """`extend` merges instead of re-sorting: it must answer exactly as a fresh index over
    both, and refuse a key it already holds."""
    b = [k for k in b if k not in a]
    whole = np.array(a + b, np.int64)
    probe = np.arange(-1, 62)
    extended = KeyIndex(np.array(a, np.int64)).extend(np.array(b, np.int64))
    assert extended.positions(probe).tolist() == KeyIndex(whole).positions(probe).tolist()
    assert extended.keys.tolist() == whole.tolist()
    if a:
        with pytest.raises(ValueError, match="distinct"):
            extended.extend(np.array([a[0]], np.int64))


def test_item_rows_refuse_colliding_keys_and_change_nothing() -> None:
    rows = ItemRows(hash_fn=lambda s: 7 if s in ("a", "b") else len(s))
    assert rows.add(["a"]).tolist() == [1]
    with pytest.raises(IdCollisionError) as err:
        rows.add(["cc", "b"])
    assert (err.value.item_id, err.value.existing, err.value.key) == ("b", "a", 7)
    assert "cc" not in rows.rows and rows.ids_of_keys([7]) == ["a"]  # nothing added
    with pytest.raises(IdCollisionError):
        ItemRows(hash_fn=lambda s: 7).add(["c", "d"])  # within one call too


def test_item_rows_reject_out_of_range_hash() -> None:
    with pytest.raises(ValueError):
        ItemRows(hash_fn=lambda s: -1).add(["x"])
    with pytest.raises(ValueError):
        ItemRows(hash_fn=lambda s: 2**63).add(["x"])



# --------------------------------------------------------------------------- kind / config


def test_the_blas_switch_is_set_by_the_entry_point_and_ranks_the_same() -> None:
    """`use_blas_from` sets FAISS's global and an index's constructor leaves it alone
    (process-wide set-up lives in streams/process.py); either side of the switch returns
    the same top-k."""
    before = faiss.cvar.distance_compute_blas_threshold
    try:
        fi.use_blas_from(123)
        index = FaissIndex.build(item_ids(3000), unit_vectors(3000, 64),
                                 IndexConfig(kind="flat", device="cpu"))
        assert faiss.cvar.distance_compute_blas_threshold == 123
        queries = unit_vectors(40, 64, seed=1)
        everything = np.sort(index.ids())  # a selector: FAISS's scan, not index/topk.py
        fi.use_blas_from(1 << 30)  # every batch scanned without BLAS
        scores_scan, ids_scan = index.search(queries, 10, allowed=everything)
        fi.use_blas_from(0)  # every batch through BLAS
        scores_blas, ids_blas = index.search(queries, 10, allowed=everything)
    finally:
        fi.use_blas_from(before)
    np.testing.assert_array_equal(ids_scan, ids_blas)
    np.testing.assert_allclose(scores_scan, scores_blas, atol=1e-5)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 3000), nq=st.integers(1, 12), k=st.integers(1, 300),
       levels=st.sampled_from([3, 1000]), seed=st.integers(0, 2**16))
def test_blocked_top_k_returns_the_largest_scores_best_first(
        n: int, nq: int, k: int, levels: int, seed: int) -> None:
    """index/topk.py against a full sort, in blocks and without, with many ties (3 levels)
    and few: the same scores, best first, each the score of the row returned."""
    k = min(k, n)
    rng = np.random.default_rng(seed)
    vecs = rng.integers(0, levels, (n, 4)).astype(np.float32)
    queries = rng.integers(0, levels, (nq, 4)).astype(np.float32)
    scores, rows = top_k(queries, vecs, k)
    full = queries @ vecs.T
    np.testing.assert_array_equal(scores, -np.sort(-full, axis=1)[:, :k])
    np.testing.assert_array_equal(scores, np.take_along_axis(full, rows, 1))
    assert all(len(set(r)) == k for r in rows.tolist())


def test_top_k_in_chunks_of_queries_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """10 queries scored one chunk at a time (a chunk of 500 scores: 1 query): the rows of
    a single pass, and its scores up to float rounding (BLAS sums a lone query's products
    in another order)."""
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((500, 8), np.float32)
    queries = rng.standard_normal((10, 8), np.float32)
    whole = top_k(queries, vecs, 20)
    monkeypatch.setattr(topk, "CHUNK_FLOATS", 500)
    chunked = top_k(queries, vecs, 20)
    np.testing.assert_array_equal(chunked[1], whole[1])
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-6)


def test_top_k_split_over_threads_equals_the_caller_s_pass() -> None:
    """`use_threads(2)`: 300 queries in chunks of 150 queries, scored in two threads (which
    the pool names), give the rows and scores of one pass on the caller's thread; fewer
    than 2 * MIN_PART queries stay on the caller's thread."""
    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((3000, 16), np.float32)
    queries = rng.standard_normal((2 * topk.MIN_PART + 44, 16), np.float32)
    alone = top_k(queries, vecs, 40)
    seen: set[str] = set()
    select = topk._select

    def spy(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        seen.add(threading.current_thread().name)
        return select(s, k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(topk, "_select", spy)
        topk.use_threads(2)
        try:
            split = top_k(queries, vecs, 40)
            assert seen and all(name.startswith("top-k") for name in seen)
            seen.clear()
            top_k(queries[: 2 * topk.MIN_PART - 1], vecs, 40)
            assert seen == {threading.current_thread().name}
        finally:
            topk.use_threads(1)
    np.testing.assert_array_equal(split[1], alone[1])
    np.testing.assert_array_equal(split[0], alone[0])


def test_kind_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    auto = IndexConfig(hnsw_threshold=100, device="cpu")
    assert FaissIndex(8, auto, expected_size=99).kind == "flat"
    assert FaissIndex(8, auto, expected_size=100).kind == "hnsw"
    assert FaissIndex.build(item_ids(100), unit_vectors(100, 8), auto).kind == "hnsw"
    assert FaissIndex(8, IndexConfig(kind="hnsw", device="cpu")).kind == "hnsw"
    if faiss.get_num_gpus() == 0:
        with pytest.raises(RuntimeError):
            FaissIndex(8, IndexConfig(device="cuda"))
    monkeypatch.setattr(fi, "_num_gpus", lambda: 1)
    monkeypatch.setattr(fi, "_new_gpu_flat", lambda dim: faiss.IndexFlatIP(dim))
    assert FaissIndex(8, IndexConfig()).kind == "flat-gpu"
    assert FaissIndex(8, IndexConfig(device="cpu")).kind == "flat"
    assert FaissIndex(8, auto, expected_size=100).kind == "hnsw"  # no GPU HNSW in faiss


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        IndexConfig(kind="ivf")
    with pytest.raises(ValueError):
        IndexConfig(rebuild_tombstone_ratio=0)
    with pytest.raises(ValueError):
        IndexConfig(hnsw_treshold=10)  # typo must not be silently ignored


def test_input_validation() -> None:
    index = FaissIndex(4, IndexConfig(kind="flat", device="cpu"))
    with pytest.raises(ValueError):
        index.upsert(np.array([-1]), np.ones((1, 4)))
    with pytest.raises(ValueError):
        index.upsert(np.array([1]), np.ones((1, 5)))
    with pytest.raises(ValueError):
        index.upsert(np.array([1, 2]), np.ones((1, 4)))
    with pytest.raises(ValueError):
        index.upsert(np.array([1]), np.full((1, 4), np.nan))
    with pytest.raises(TypeError):
        index.upsert(np.array([1.5]), np.ones((1, 4)))
    with pytest.raises(ValueError):
        index.search(np.ones((1, 5)), 3)
    index.upsert(np.array([1], dtype=np.uint64), np.ones((1, 4)))  # float64 is converted
    with pytest.raises(ValueError):
        index.search(np.ones((2, 4)), 3, exclude=[[1]])


# --------------------------------------------------------------------------- per kind


@per_kind
def test_build_and_search_exact_vector_first(built) -> None:
    index, ids, vecs = built
    assert len(index) == N_ITEMS and index.dim == DIM
    assert int(ids[5]) in index and 12345 not in index
    queries = np.asfortranarray(vecs[::60].astype(np.float64))  # converted to f32 C order
    scores, found = index.search(queries, 10)
    assert scores.dtype == np.float32 and found.dtype == np.int64 and found.shape == (50, 10)
    np.testing.assert_array_equal(found[:, 0], ids[::60])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # sorted best first
    np.testing.assert_array_equal(index.vector(int(ids[7])), vecs[7])
    np.testing.assert_array_equal(index.vectors(ids[[9, 3]]), vecs[[9, 3]])
    assert index.vector(12345) is None
    with pytest.raises(KeyError):
        index.vectors([int(ids[0]), 12345])
    index.remove(ids[:5])  # swap-removes move the last rows into the holes
    np.testing.assert_array_equal(index.vectors(ids[::-1][:-5]), vecs[::-1][:-5])


@per_kind
def test_upsert_new_ids_are_searchable(built) -> None:
    index, _, _ = built
    new_ids, new_vecs = item_ids(20, start=N_ITEMS), unit_vectors(20, seed=2)
    index.upsert(new_ids, new_vecs)
    assert len(index) == N_ITEMS + 20
    _, found = index.search(new_vecs, 5)
    np.testing.assert_array_equal(found[:, 0], new_ids)


@per_kind
def test_upsert_existing_id_replaces(built) -> None:
    index, ids, vecs = built
    target, fresh = ids[:10], unit_vectors(10, seed=3)
    index.upsert(target, fresh)
    assert len(index) == N_ITEMS
    np.testing.assert_array_equal(index.vectors(target), fresh)
    _, found = index.search(fresh, 3)
    np.testing.assert_array_equal(found[:, 0], target)
    # The old vectors are gone: no result scores as a self-match, and each id appears at
    # most once (it was replaced, not duplicated).
    scores, found = index.search(vecs[:10], 50)
    assert (scores < 0.999).all()
    for row in found:
        assert len(set(row.tolist())) == len(row)
    if index.kind == "hnsw":
        assert index.tombstones == 10


@per_kind
def test_duplicate_ids_in_one_batch_last_wins(config: IndexConfig) -> None:
    index = FaissIndex(DIM, config)
    vecs = unit_vectors(3, seed=4)
    index.upsert(np.array([5, 6, 5]), vecs)
    assert len(index) == 2
    np.testing.assert_array_equal(index.vector(5), vecs[2])


@per_kind
def test_removed_ids_are_never_returned(built) -> None:
    index, ids, vecs = built
    gone = ids[::30]  # 100 of 3000: below the HNSW rebuild ratio, so tombstones are used
    index.remove(gone)
    index.remove(gone)  # replayed delete is a no-op
    live = np.setdiff1d(ids, gone)
    assert len(index) == len(live)
    assert all(int(g) not in index and index.vector(int(g)) is None for g in gone)
    if index.kind == "hnsw":
        assert index.tombstones == len(gone)
    # Ask for *every* live item, from the deleted vectors themselves and random queries:
    # the results must be exactly live items, never a deleted one.
    queries = np.vstack([vecs[::30], unit_vectors(20, seed=5)])
    _, found = index.search(queries, len(live))
    assert not np.isin(found, gone).any()
    assert np.isin(found[found >= 0], live).all()
    _, found = index.search(queries, 10)
    assert (found >= 0).all() and not np.isin(found, gone).any()
    np.testing.assert_array_equal(np.sort(index.ids()), live)


@per_kind
def test_remove_then_add_before_next_search(built) -> None:
    # Deletes move rows (swap-remove) and appends refill them before any search: the FAISS
    # copy must still be resynced, not just topped up.
    index, ids, vecs = built
    gone = ids[:300:3]
    index.remove(gone)
    new_ids, new_vecs = item_ids(len(gone), start=N_ITEMS), unit_vectors(len(gone), seed=12)
    index.upsert(new_ids, new_vecs)
    assert len(index) == N_ITEMS
    _, found = index.search(np.vstack([new_vecs, vecs[-100:]]), 5)
    np.testing.assert_array_equal(found[:, 0], np.concatenate([new_ids, ids[-100:]]))
    _, found = index.search(vecs[:300:3], 20)
    assert not np.isin(found, gone).any()


@per_kind
def test_many_removes_trigger_rebuild(built) -> None:
    index, ids, vecs = built
    gone = ids[: N_ITEMS // 3]
    for end in range(100, len(gone) + 1, 100):
        index.remove(gone[end - 100 : end])
        _, found = index.search(vecs[:50], 10)
        assert not np.isin(found, gone[:end]).any()
    assert len(index) == N_ITEMS - len(gone)
    if index.kind == "hnsw":  # rebuilt after 700 (> 0.2 * 3000) tombstones, 300 since
        assert index.tombstones == 300
    keep = slice(len(gone), None, 50)
    _, found = index.search(vecs[keep], 1)
    np.testing.assert_array_equal(found[:, 0], ids[keep])


@per_kind
def test_exclude_filters_and_still_returns_k(built) -> None:
    index, ids, vecs = built
    queries = unit_vectors(8, seed=6)
    _, full = index.search(queries, 30)
    exclude = [set(row[:5].tolist()) | {int(ids[0]), 999} for row in full]
    scores, found = index.search(queries, 10, exclude=exclude)
    assert (found >= 0).all() and np.isfinite(scores).all()
    for row, ex in zip(found, exclude, strict=True):
        assert not set(row.tolist()) & ex
    if index.kind != "hnsw":  # exact: the next 10 after the excluded ones, in order
        expected = [
            [i for i in row if i not in ex][:10] for row, ex in zip(full, exclude, strict=True)
        ]
        np.testing.assert_array_equal(found, expected)


@per_kind
def test_pads_with_minus_one_when_k_exceeds_items(config: IndexConfig) -> None:
    index = FaissIndex(DIM, config)
    scores, found = index.search(unit_vectors(2, seed=7), 4)  # empty index
    assert (found == -1).all() and np.isneginf(scores).all()
    ids, vecs = item_ids(5), unit_vectors(5, seed=8)
    index.upsert(ids, vecs)
    scores, found = index.search(vecs, 8)
    assert sorted(found[0, :5].tolist()) == sorted(ids.tolist())
    assert (found[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
    assert np.isfinite(scores[:, :5]).all()
    _, found = index.search(vecs[:1], 8, exclude=[{int(ids[0]), int(ids[1])}])
    assert (found[0, :3] >= 0).all() and (found[0, 3:] == -1).all()
    assert index.search(vecs, 0)[1].shape == (5, 0)


def test_hnsw_recall_vs_flat() -> None:
    vecs = embedding_like(5000, seed=9)
    ids, queries = item_ids(5000), embedding_like(200, seed=10)
    flat = FaissIndex.build(ids, vecs, IndexConfig(kind="flat", device="cpu"))
    hnsw = FaissIndex.build(ids, vecs, IndexConfig(kind="hnsw", device="cpu"))
    _, truth = flat.search(queries, 10)
    _, approx = hnsw.search(queries, 10)
    recall = np.mean([len(set(a) & set(t)) / 10 for a, t in zip(approx, truth, strict=True)])
    assert recall >= 0.9, recall


def test_compacted_drops_tombstones_and_rechooses_kind() -> None:
    ids, vecs = item_ids(400), unit_vectors(400, seed=11)
    cfg = IndexConfig(hnsw_threshold=380, device="cpu")
    index = FaissIndex.build(ids, vecs, cfg)
    assert index.kind == "hnsw"
    index.remove(ids[:50])
    assert index.tombstones == 50
    small = index.compacted()
    assert small.kind == "flat" and small.tombstones == 0 and len(small) == 350
    np.testing.assert_array_equal(np.sort(small.ids()), np.sort(ids[50:]))
    np.testing.assert_array_equal(small.vectors(ids[50:]), vecs[50:])


# --------------------------------------------------------------------------- versions


def marker_index(marker: int) -> FaissIndex:
    """Small index whose top hit for the query e_0 is `marker` (identifies the index)."""
    vecs = unit_vectors(50, dim=8, seed=marker) * 0.5
    vecs[0] = np.eye(8, dtype=np.float32)[0] * 10
    ids = np.arange(50, dtype=np.int64) + 1000
    ids[0] = marker
    return FaissIndex.build(ids, vecs, IndexConfig(kind="flat", device="cpu"))


def test_versioned_swap_increments() -> None:
    holder = VersionedIndex()
    assert holder.current() == (None, 0) and holder.version == 0
    a, b = marker_index(1), marker_index(2)
    assert holder.swap(a) == 1 and holder.current() == (a, 1)
    assert holder.swap(b) == 2 and holder.current() == (b, 2) and holder.version == 2
    assert VersionedIndex(a).current() == (a, 0)
    with pytest.raises(TypeError):
        holder.swap(None)  # type: ignore[arg-type]


def test_concurrent_readers_see_consistent_pairs() -> None:
    holder = VersionedIndex(marker_index(0))
    pool = [marker_index(m) for m in range(1, 6)]
    published: dict[int, int] = {0: 0}  # version -> marker, filled in by swappers
    seen: list[tuple[int, int]] = []
    stop = threading.Event()
    query = np.eye(8, dtype=np.float32)[:1]

    def swapper(offset: int) -> None:
        for i in range(40):
            new = pool[(i + offset) % len(pool)]
            marker = int(new.search(query, 1)[1][0, 0])
            published[holder.swap(new)] = marker

    def reader() -> None:
        local = []
        while not stop.is_set():
            index, version = holder.current()
            local.append((version, int(index.search(query, 1)[1][0, 0])))
        seen.extend(local)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    swappers = [threading.Thread(target=swapper, args=(o,)) for o in (0, 2)]
    for t in readers + swappers:
        t.start()
    for t in swappers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert holder.version == 80 and sorted(published) == list(range(81))
    assert seen and all(published[v] == marker for v, marker in seen)


def test_swap_in_background() -> None:
    old = marker_index(1)
    holder = VersionedIndex(old)
    assert holder.swap_in_background(old.compacted).result(timeout=10) == 1
    new, version = holder.current()
    assert version == 1 and new is not old and len(new) == len(old)

    def broken() -> FaissIndex:
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        holder.swap_in_background(broken).result(timeout=10)
    assert holder.current() == (new, 1)


# --------------------------------------------------------------------------- model check

ID_SPACE = 30
ops_strategy = st.lists(
    st.one_of(
        st.tuples(
            st.just("upsert"),
            st.lists(st.integers(0, ID_SPACE), min_size=1, max_size=8),
            st.integers(0, 2**16),
        ),
        st.tuples(st.just("remove"), st.lists(st.integers(0, ID_SPACE), max_size=8)),
    ),
    max_size=25,
)


def op_vector(item: int, seed: int) -> np.ndarray:
    """Distinct unit vector per (item, seed): a live vector's best match is itself."""
    x = np.random.default_rng([seed, item]).standard_normal(16).astype(np.float32)
    return x / np.linalg.norm(x)


def check_against_model(index: FaissIndex, model: dict[int, np.ndarray]) -> None:
    assert len(index) == len(model)
    assert [i in index for i in range(ID_SPACE + 1)] == [i in model for i in range(ID_SPACE + 1)]
    assert sorted(index.ids().tolist()) == sorted(model)
    if not model:
        assert (index.search(op_vector(0, 0)[None], 3)[1] == -1).all()
        return
    keys = list(model)
    queries = np.stack([model[k] for k in keys])
    np.testing.assert_array_equal(index.vectors(keys), queries)
    _, found = index.search(queries, len(model) + 2)
    assert found[:, 0].tolist() == keys
    assert (found[:, -2:] == -1).all()
    assert all(sorted(row[:-2].tolist()) == sorted(keys) for row in found)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
@settings(max_examples=60, deadline=None)
@given(ops=ops_strategy)
def test_random_ops_match_dict_model(kind: str, ops: list[tuple]) -> None:
    # A low rebuild ratio makes HNSW rebuild often, so rebuilds are checked too. Checking
    # after every op (i.e. searching between mutations) also exercises the lazy FAISS sync.
    index = FaissIndex(16, IndexConfig(kind=kind, device="cpu", rebuild_tombstone_ratio=0.3))
    model: dict[int, np.ndarray] = {}
    for op in ops:
        if op[0] == "upsert":
            _, keys, seed = op
            vecs = np.stack([op_vector(k, seed) for k in keys])
            index.upsert(np.array(keys, dtype=np.int64), vecs)
            model.update(zip(keys, vecs, strict=True))
        else:
            index.remove(op[1])
            for key in op[1]:
                model.pop(key, None)
        check_against_model(index, model)
