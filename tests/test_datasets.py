"""Synthetic world/stream, malformed-record generator and real-data readers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import orjson
import pytest

from evaluation.datasets import (
    load_events,
    load_items,
    movielens_events,
    movielens_items,
    read_jsonl,
)
from evaluation.synthetic import (
    TOPICS,
    SyntheticStream,
    SyntheticWorld,
    bad_events,
    make_world,
    topic_hit_rate,
)
from streams.schemas import BehaviorEvent, InvalidRecord, Item, parse_event

ML100K = Path("/work/shared/data/ml-100k")


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return make_world(n_items=800, n_topics=16, seed=1)


# --- make_world -------------------------------------------------------------------------


def test_topic_vocabularies_are_disjoint_and_sized() -> None:
    counts = Counter(w for words in TOPICS.values() for w in words)
    assert [w for w, c in counts.items() if c > 1] == []
    assert len(TOPICS) >= 16
    assert all(20 <= len(words) <= 30 for words in TOPICS.values())


def test_world_is_deterministic(world: SyntheticWorld) -> None:
    assert make_world(800, 16, seed=1) == world
    assert make_world(800, 16, seed=2).items != world.items


def test_world_items_are_even_unique_and_valid(world: SyntheticWorld) -> None:
    ids = [it["item_id"] for it in world.items]
    assert len(set(ids)) == len(ids) == 800
    assert ids[0] == "item-000000"
    assert set(Counter(world.item_topic.values()).values()) == {50}
    titles = [it["title"] for it in world.items]
    assert len(set(titles)) >= 0.99 * len(titles)
    for it in world.items:
        Item.model_validate(it)
        topic = world.topic_names[world.item_topic[it["item_id"]]]
        assert it["category"] == topic
        assert len(it["tags"]) == 2 and set(it["tags"]) <= set(TOPICS[topic])
        title_words = it["title"].lower().split()
        assert sum(w in TOPICS[topic] for w in title_words) >= 3


def test_world_rejects_too_many_topics() -> None:
    with pytest.raises(ValueError):
        make_world(10, n_topics=len(TOPICS) + 1)


# --- SyntheticStream --------------------------------------------------------------------


def test_stream_is_deterministic_and_valid(world: SyntheticWorld) -> None:
    a = list(SyntheticStream(world, n_users=50, seed=3).events(2000))
    b = list(SyntheticStream(world, n_users=50, seed=3).events(2000))
    assert a == b
    assert a != list(SyntheticStream(world, n_users=50, seed=4).events(2000))
    for ev in a:
        BehaviorEvent.model_validate(ev)
    ts = [ev["ts"] for ev in a]
    assert ts == sorted(ts) and ts[0] == 1_700_000_000_000 and ts[1] - ts[0] == 10
    types = Counter(ev["event_type"] for ev in a)
    assert {"view", "click", "search", "dislike", "rate"} <= set(types)
    assert types["view"] > types["click"] > types["purchase"]


def test_stream_event_shapes(world: SyntheticWorld) -> None:
    for ev in SyntheticStream(world, n_users=20, seed=0, search_prob=0.2).events(1000):
        if ev["event_type"] == "search":
            assert ev["item_id"] is None and 2 <= len(ev["text"].split()) <= 3
        else:
            assert ev["item_id"] in world.item_topic
        if ev["event_type"] == "rate":
            assert ev["value"] in (1.0, 2.0, 3.0, 4.0, 5.0)
        else:
            assert ev["value"] is None


def test_noise_free_stream_stays_on_topic(world: SyntheticWorld) -> None:
    stream = SyntheticStream(world, n_users=30, seed=5, noise=0.0, drift_prob=0.0,
                             search_prob=0.1, dislike_prob=0.1)
    seen = Counter()
    for ev in stream.events(3000):
        topic = stream.current_topic(ev["user_id"])
        seen[ev["event_type"]] += 1
        if ev["event_type"] == "search":
            assert set(ev["text"].split()) <= set(TOPICS[world.topic_names[topic]])
        elif ev["event_type"] == "dislike":
            assert world.item_topic[ev["item_id"]] != topic
        else:
            assert world.item_topic[ev["item_id"]] == topic
    assert seen["search"] > 0 and seen["dislike"] > 0


def test_drift_changes_topics(world: SyntheticWorld) -> None:
    stream = SyntheticStream(world, n_users=20, seed=6, drift_prob=0.05)
    before = [stream.current_topic(u) for u in stream.user_ids]
    list(stream.events(5000))
    after = [stream.current_topic(u) for u in stream.user_ids]
    assert sum(b != a for b, a in zip(before, after, strict=True)) >= 10
    still = SyntheticStream(world, n_users=20, seed=6, drift_prob=0.0)
    before = [still.current_topic(u) for u in still.user_ids]
    list(still.events(2000))
    assert [still.current_topic(u) for u in still.user_ids] == before


def test_user_activity_is_skewed(world: SyntheticWorld) -> None:
    users = Counter(ev["user_id"] for ev in SyntheticStream(world, n_users=100).events(5000))
    counts = sorted(users.values(), reverse=True)
    assert counts[0] > 5 * counts[-1]


def test_stream_is_resumable(world: SyntheticWorld) -> None:
    one = SyntheticStream(world, n_users=40, seed=7)
    two = SyntheticStream(world, n_users=40, seed=7)
    first = list(one.events(500)) + list(one.events(500))
    assert first == list(two.events(1000))
    assert [one.current_topic(u) for u in one.user_ids] == [
        two.current_topic(u) for u in two.user_ids
    ]


def test_now_ms_stamps_events(world: SyntheticWorld) -> None:
    clock = iter(range(5, 100))
    evs = list(SyntheticStream(world, n_users=5).events(3, now_ms=lambda: next(clock)))
    assert [ev["ts"] for ev in evs] == [5, 6, 7]


def test_current_topic_unknown_user(world: SyntheticWorld) -> None:
    with pytest.raises(KeyError):
        SyntheticStream(world, n_users=5).current_topic("nobody")


# --- hit rates --------------------------------------------------------------------------


def test_chance_hit_rate_is_one_over_topics(world: SyntheticWorld) -> None:
    stream = SyntheticStream(world, n_users=30)
    assert stream.chance_hit_rate() == pytest.approx(1 / 16)
    assert stream.chance_hit_rate("user-00003") == pytest.approx(1 / 16)


def test_chance_hit_rate_uneven_world() -> None:
    w = SyntheticWorld(
        items=[{"item_id": i} for i in "abcd"],
        item_topic={"a": 0, "b": 0, "c": 0, "d": 1},
        n_topics=2,
        topic_names=["x", "y"],
    )
    stream = SyntheticStream(w, n_users=4, seed=0)
    expected = [0.75 if stream.current_topic(u) == 0 else 0.25 for u in stream.user_ids]
    assert stream.chance_hit_rate("user-00000") == expected[0]
    assert stream.chance_hit_rate() == pytest.approx(sum(expected) / 4)


def test_topic_hit_rate_exact() -> None:
    w = SyntheticWorld(
        items=[], item_topic={"a": 0, "b": 0, "c": 1, "d": 1, "e": 2}, n_topics=3,
        topic_names=["x", "y", "z"],
    )
    topics = {"u1": 0, "u2": 1, "u3": 2, "u4": 0}
    recs = {
        "u1": ["a", "b", "c", "d"],  # 2/4
        "u2": ["c", "zzz"],  # 1/2 (unknown item is a miss; fewer than k items)
        "u3": ["e", "a", "b"],  # k=2 -> ["e", "a"] -> 1/2
        "u4": [],  # 0
    }
    assert topic_hit_rate(w, recs, topics.__getitem__, k=2) == pytest.approx(
        (1.0 + 0.5 + 0.5 + 0.0) / 4
    )
    assert topic_hit_rate(w, recs, topics.__getitem__, k=10) == pytest.approx(
        (0.5 + 0.5 + 1 / 3 + 0.0) / 4
    )
    assert topic_hit_rate(w, {}, topics.__getitem__) == 0.0


# --- bad_events -------------------------------------------------------------------------


def test_bad_events_reasons_match_parser() -> None:
    bad = bad_events(25, seed=3)
    assert len(bad) == 25
    assert [r for _, r in bad[:10]] == [
        "invalid_json", "invalid_json", "invalid_utf8", "not_object", "missing_field",
        "wrong_type", "invalid_value", "empty_id", "too_long", "bad_timestamp",
    ]
    for raw, reason in bad:
        assert isinstance(raw, bytes)
        with pytest.raises(InvalidRecord) as info:
            parse_event(raw, 65536)
        assert info.value.reason.value == reason, (raw[:80], info.value.detail)
    assert bad_events(10, seed=3) == bad[:10]


# --- read_jsonl / MovieLens -------------------------------------------------------------


def test_read_jsonl_skips_blanks_and_names_bad_line(tmp_path: Path) -> None:
    p = tmp_path / "e.jsonl"
    p.write_bytes(b'{"a": 1}\n\n  \n{"a": 2}\n{"a": \n')
    it = read_jsonl(p)
    assert next(it) == {"a": 1} and next(it) == {"a": 2}
    with pytest.raises(ValueError, match=r"e\.jsonl:5"):
        next(it)
    p.write_bytes(b'{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=":2: expected a JSON object"):
        list(read_jsonl(p))


GENRES = "unknown|0\nAction|1\nComédie|2\n\n"
ITEMS = [
    "1|Toy Story (1995)|01-Jan-1995||http://x/1|0|1|1",
    "2|Misérables, Les (1995)|01-Jan-1995||http://x/2|0|0|1",
    "3|unknown||||1|0|0",
    "10|No Genre (1990)|01-Jan-1990||http://x/10|0|0|0",
]
DATA = ["1\t2\t5\t300", "2\t1\t3\t100", "1\t1\t4\t300", "3\t10\t1\t200", "2\t3\t2\t300"]


@pytest.fixture()
def ml_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ml"
    d.mkdir()
    (d / "u.genre").write_text(GENRES, encoding="latin-1")
    (d / "u.item").write_text("\n".join(ITEMS) + "\n", encoding="latin-1")
    (d / "u.data").write_text("\n".join(DATA) + "\n", encoding="latin-1")
    return d


def test_movielens_items(ml_dir: Path) -> None:
    items = movielens_items(ml_dir)
    assert [it["item_id"] for it in items] == ["1", "2", "3", "10"]
    assert items[0] == {"item_id": "1", "title": "Toy Story (1995)", "text": None,
                        "tags": ["Action", "Comédie"], "category": "Action", "deleted": False}
    assert items[1]["title"] == "Misérables, Les (1995)"
    assert items[1]["tags"] == ["Comédie"]
    assert items[2]["tags"] == ["unknown"] and items[3]["category"] is None
    for it in items:
        Item.model_validate(it)


def test_movielens_events_sorted_and_stable(ml_dir: Path) -> None:
    evs = movielens_events(ml_dir)
    assert [(e["user_id"], e["item_id"], e["ts"]) for e in evs] == [
        ("2", "1", 100_000), ("3", "10", 200_000),
        ("1", "2", 300_000), ("1", "1", 300_000), ("2", "3", 300_000),
    ]
    assert [e["value"] for e in evs] == [3.0, 1.0, 5.0, 4.0, 2.0]
    for e in evs:
        assert e["event_type"] == "rate"
        BehaviorEvent.model_validate(e)


def test_load_dispatch(ml_dir: Path, tmp_path: Path) -> None:
    assert load_items(ml_dir) == movielens_items(ml_dir)
    assert load_items(ml_dir / "u.item") == movielens_items(ml_dir)
    assert load_events(ml_dir) == movielens_events(ml_dir)
    assert load_events(ml_dir / "u.data") == movielens_events(ml_dir)
    p = tmp_path / "items.jsonl"
    p.write_bytes(b"\n".join(orjson.dumps(it) for it in movielens_items(ml_dir)))
    assert load_items(p) == movielens_items(ml_dir)
    with pytest.raises(FileNotFoundError):
        load_events(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="cannot load"):
        load_events(tmp_path / "x.csv")


@pytest.mark.skipif(not (ML100K / "u.data").exists(), reason="MovieLens 100K not present")
def test_real_movielens_100k() -> None:
    evs = load_events(ML100K)
    items = load_items(ML100K)
    assert len(evs) == 100_000
    assert len({e["user_id"] for e in evs}) == 943
    assert len(items) == 1682
    ts = [e["ts"] for e in evs]
    assert ts == sorted(ts)
    assert {e["item_id"] for e in evs} <= {it["item_id"] for it in items}
    by_id = {it["item_id"]: it for it in items}
    assert by_id["543"]["title"].startswith("Misérables")


# --- Ciao (generated in Ciao's format: the project does not ship the data) ------------------

CIAO_HEADER = "user_id,item_id,category_id,rating,helpfulness,timestamp,category"
DAY = 86_400
CIAO_ROWS = [  # (user, item, category id, rating, helpfulness, seconds, category), unsorted
    (2, 20, 1, 4, 3, 3 * DAY, "DVDs"),
    (1, 10, 1, 5, 4, 1 * DAY, "DVDs"),
    (1, 11, 7, 3, 4, 1 * DAY, "Ciao Café"),
    (2, 10, 1, 5, 4, 2 * DAY, "DVDs"),
    (3, 11, 4, 2, 2, 2 * DAY, "Books"),  # item 11 is listed under two categories
    (1, 10, 1, 4, 4, 3 * DAY, "DVDs"),  # a repeat of (1, 10): kept as an event
]


def write_ciao(d: Path, rows: list = CIAO_ROWS, header: str = CIAO_HEADER) -> Path:
    import gzip

    d.mkdir(exist_ok=True)
    lines = [header] + [",".join(map(str, r)) for r in rows]
    with gzip.open(d / "interactions.csv.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return d


def test_ciao_items_and_events(tmp_path: Path) -> None:
    from evaluation.datasets import ciao

    items, events = ciao(write_ciao(tmp_path / "ciao"))
    assert [(e["user_id"], e["item_id"], e["ts"], e["scenario"]) for e in events] == [
        ("1", "10", 1 * DAY * 1000, "DVDs"), ("1", "11", 1 * DAY * 1000, "Ciao Café"),
        ("2", "10", 2 * DAY * 1000, "DVDs"), ("3", "11", 2 * DAY * 1000, "Books"),
        ("2", "20", 3 * DAY * 1000, "DVDs"), ("1", "10", 3 * DAY * 1000, "DVDs"),
    ]  # time order; the file's order within a day
    assert [e["value"] for e in events] == [5.0, 3.0, 5.0, 2.0, 4.0, 4.0]
    by_id = {it["item_id"]: it for it in items}
    assert set(by_id) == {"10", "11", "20"}
    assert by_id["11"]["scenarios"] == ["Ciao Café", "Books"]
    assert by_id["10"]["scenarios"] == ["DVDs"] and by_id["10"]["text"] == "DVDs"
    from models.encoder import item_text

    assert item_text(by_id["11"]) == "Ciao Café, Books"  # the category is the only text
    for e in events:
        BehaviorEvent.model_validate(e)
    for it in items:
        assert Item.model_validate(it).scenarios == it["scenarios"]


def test_ciao_subsets_and_bad_files(tmp_path: Path) -> None:
    from evaluation.datasets import ciao

    d = write_ciao(tmp_path / "ciao")
    items, events = ciao(d, last_days=2)
    assert {e["ts"] // 1000 // DAY for e in events} == {2, 3}
    assert {it["item_id"] for it in items} == {"10", "11", "20"}
    assert next(it for it in items if it["item_id"] == "11")["scenarios"] == ["Books"]
    items, events = ciao(d, min_item_events=2)
    assert {e["item_id"] for e in events} == {"10", "11"} and len(events) == 5
    assert len(ciao(d, last_days=100)[1]) == len(CIAO_ROWS)
    write_ciao(tmp_path / "bad", header="user,item,cat,rating,help,ts,category")
    with pytest.raises(ValueError, match="expected columns"):
        ciao(tmp_path / "bad")
    write_ciao(tmp_path / "bad2", rows=[(1, "x", 1, 5, 4, DAY, "DVDs")])
    with pytest.raises(ValueError, match="interactions.csv.gz:2"):
        ciao(tmp_path / "bad2")


def test_jsonl_loaders_keep_scenarios(tmp_path: Path) -> None:
    items = [{"item_id": "a", "title": "A", "scenarios": ["books"]}, {"item_id": "b"}]
    events = [{"user_id": "u", "item_id": "a", "event_type": "view", "ts": 1,
               "scenario": "books"}, {"user_id": "u", "item_id": "b", "event_type": "view",
                                      "ts": 2}]
    (tmp_path / "i.jsonl").write_bytes(b"\n".join(orjson.dumps(x) for x in items))
    (tmp_path / "e.jsonl").write_bytes(b"\n".join(orjson.dumps(x) for x in events))
    assert load_items(tmp_path / "i.jsonl")[0]["scenarios"] == ["books"]
    assert load_events(tmp_path / "e.jsonl")[0]["scenario"] == "books"
    from evaluation.comparison import make_dataset

    data = make_dataset("t", load_items(tmp_path / "i.jsonl"), load_events(tmp_path / "e.jsonl"),
                        lambda texts: [[float(len(t)), 1.0] for t in texts])
    assert data.events == [("u", 0, 1, "books"), ("u", 1, 2, "default")]
    assert data.item_scenarios == [["books"], None]
    assert data.text_vectors.shape == (2, 2) and data.text_vectors[0, 0] == len("A")
    with pytest.raises(ValueError, match="item 'a' more than once"):
        make_dataset("t", [*items, {"item_id": "a"}], events, lambda texts: [[1.0]] * len(texts))
