"""A synthetic catalog and event stream whose users have *known*, drifting interests.

Real data sets do not say what a user wants right now, so they cannot show whether an online
learner tracks a change of taste. Here every user has a true current topic; the demo compares
``topic_hit_rate`` (share of recommended items on that topic) with ``chance_hit_rate``.
Topic words are ordinary English so a sentence encoder places same-topic titles together, and
everything is deterministic given a seed so tests and benchmarks are reproducible.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate

import numpy as np
import orjson

#: Hand-written topics; the words of different topics are disjoint (a test checks it).
TOPICS: dict[str, tuple[str, ...]] = {name: tuple(words.split()) for name, words in {
    "astronomy": """galaxy telescope nebula comet planet asteroid orbit star meteor eclipse
        cosmos supernova quasar constellation observatory lunar solar pulsar crater
        satellite spectrum zodiac equinox universe stargazing""",
    "cooking": """skillet recipe saute simmer spice garlic onion stew broth sauce marinade
        grill braise chef kitchen knife pepper herbs risotto curry roast seasoning wok
        casserole stock""",
    "football": """goal striker midfielder penalty referee stadium league tackle dribble
        corner offside goalkeeper defender jersey cleats kickoff header volley championship
        derby fans coach pitch trophy crossbar""",
    "jazz": """saxophone trumpet improvisation swing bebop trombone bass piano quartet
        bandleader blues syncopation ballad standards clarinet drummer vibraphone melody
        chord groove scat nightclub ensemble solo fusion""",
    "gardening": """compost seedling tulip shovel mulch soil fertilizer hedge pruning
        greenhouse rose trowel perennial bulb weeding watering orchard lawn vegetable
        flowerbed hose rake sprout trellis seeds""",
    "programming": """python compiler algorithm debugger function variable database software
        code syntax recursion keyboard terminal repository framework server javascript
        refactoring testing linux bytecode git kernel programmer developer""",
    "hiking": """trail backpack summit boots canyon ridge wilderness campsite switchback
        trekking compass map waterfall forest valley altitude tent hiker mountain footpath
        poles lantern meadow cairn trek""",
    "painting": """canvas brush watercolor acrylic easel palette portrait landscape oil
        pigment sketch gallery impressionism fresco mural stroke gouache varnish turpentine
        masterpiece hue shading artist studio abstract""",
    "chess": """checkmate bishop knight rook pawn queen king gambit opening endgame
        grandmaster castling tournament stalemate sicilian board blitz tactics sacrifice
        fianchetto elo clock chessboard middlegame zugzwang""",
    "cycling": """bicycle pedal derailleur helmet saddle chain spokes peloton sprint
        handlebar tire gear crankset velodrome cyclist criterium cadence brake wheel frame
        lycra tandem climb breakaway bikepacking""",
    "photography": """camera lens aperture shutter tripod exposure flash darkroom zoom focus
        pixel sensor viewfinder film negative print lighting snapshot photographer bokeh
        megapixel autofocus filter panorama photo""",
    "sailing": """sailboat mast rudder hull anchor keel jib mainsail harbor regatta sailor
        wind tack deck yacht knot navigation catamaran marina starboard buoy spinnaker
        dinghy tiller ocean""",
    "baking": """flour dough oven bread yeast pastry croissant sourdough cake muffin cookie
        butter sugar whisk loaf icing frosting baguette cupcake pie crust kneading biscuit
        scone meringue""",
    "poetry": """sonnet verse stanza rhyme haiku poet meter ode limerick elegy lyric
        metaphor couplet quatrain anthology recitation iambic imagery alliteration muse epic
        villanelle rhythm poem sestina""",
    "cinema": """movie director screenplay actor actress premiere blockbuster cinematography
        projector popcorn trailer sequel documentary hollywood oscar editing montage
        soundtrack thriller comedy matinee screening festival casting script""",
    "robotics": """robot servo actuator lidar arduino microcontroller gripper automation
        android drone motor circuit kinematics manipulator autonomous firmware humanoid
        exoskeleton roboticist cyborg gyroscope battery controller mechatronics pathfinding""",
}.items()}

GENERIC_WORDS: tuple[str, ...] = (
    "guide", "kit", "deluxe", "handbook", "essentials", "collection", "starter", "classic",
    "premium", "compact", "edition", "set", "primer", "companion", "basics", "pro",
)

_TEXT_NOUNS: tuple[str, ...] = ("guide", "handbook", "primer", "companion", "collection")
_TEXT_TEMPLATES: tuple[str, ...] = (
    "A {t} {g} about {a}, {b} and {c}.",
    "Everything you need on {a} and {b}, with notes on {c}.",
    "A {t} favourite covering {a}, {b} and {c}.",
    "Learn about {a} and {b}; includes a section on {c}.",
)

#: Weights of the ordinary (item-bearing) event types; normalised, search/dislike come first.
_EVENT_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("view", 0.6), ("click", 0.2), ("add_to_cart", 0.07), ("purchase", 0.05), ("rate", 0.05),
)
_UNIFORMS_PER_EVENT = 8  # fixed draw count per event, so the stream depends only on its index
_BLOCK = 4096  # events' worth of uniforms drawn from the generator at a time


@dataclass(frozen=True)
class SyntheticWorld:
    """A catalog whose items each belong to one known topic."""

    items: list[dict]
    item_topic: dict[str, int]
    n_topics: int
    topic_names: list[str]

    def topic_sizes(self) -> list[int]:
        """Number of catalog items per topic (the base of the chance hit rate)."""
        sizes = [0] * self.n_topics
        for t in self.item_topic.values():
            sizes[t] += 1
        return sizes


def _make_title(rng: random.Random, words: Sequence[str], used: set[str]) -> list[str]:
    """3–4 topic words plus maybe a generic word; retried a few times to keep titles unique."""
    for _ in range(30):
        picked = rng.sample(list(words), rng.choice((3, 4)))
        if rng.random() < 0.5:
            picked.append(rng.choice(GENERIC_WORDS))
        title = " ".join(w.capitalize() for w in picked)
        if title not in used:
            break
    used.add(title)
    return picked


def _make_item(rng: random.Random, i: int, topic: str, used: set[str]) -> dict:
    """One Item dict for topic `topic`: title, describing sentence, two tags, category."""
    words = TOPICS[topic]
    picked = _make_title(rng, words, used)
    a, b, c = rng.sample(list(words), 3)
    text = rng.choice(_TEXT_TEMPLATES).format(a=a, b=b, c=c, t=topic, g=rng.choice(_TEXT_NOUNS))
    return {
        "item_id": f"item-{i:06d}",
        "title": " ".join(w.capitalize() for w in picked),
        "text": text,
        "tags": rng.sample(list(words), 2),
        "category": topic,
        "deleted": False,
    }


def make_world(n_items: int = 2000, n_topics: int = 16, seed: int = 0) -> SyntheticWorld:
    """Build a catalog of `n_items` spread evenly over the first `n_topics` topics."""
    if not 1 <= n_topics <= len(TOPICS):
        raise ValueError(f"n_topics must be in 1..{len(TOPICS)}, got {n_topics}")
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    names = list(TOPICS)[:n_topics]
    rng = random.Random(seed)
    used: set[str] = set()
    items = [_make_item(rng, i, names[i % n_topics], used) for i in range(n_items)]
    item_topic = {it["item_id"]: i % n_topics for i, it in enumerate(items)}
    return SyntheticWorld(items=items, item_topic=item_topic, n_topics=n_topics, topic_names=names)


def _zipf_cum(n: int, exponent: float) -> list[float]:
    """Cumulative Zipf weights over ranks 1..n, for sampling with bisect."""
    return list(accumulate(1.0 / (r ** exponent) for r in range(1, n + 1)))


def _pick(cum: list[float], u: float) -> int:
    """Index drawn from cumulative weights `cum` with a uniform `u` in [0, 1)."""
    return min(bisect.bisect_right(cum, u * cum[-1]), len(cum) - 1)


class SyntheticStream:
    """Users with a current interest topic that drifts; yields events in time order.

    Each event consumes a fixed number of uniforms, so the stream depends only on the seed and
    the event index: ``events(500)`` twice equals ``events(1000)`` once.
    """

    def __init__(
        self,
        world: SyntheticWorld,
        n_users: int = 500,
        seed: int = 0,
        drift_prob: float = 0.02,
        noise: float = 0.1,
        start_ts_ms: int = 1_700_000_000_000,
        step_ms: int = 10,
        search_prob: float = 0.02,
        dislike_prob: float = 0.01,
    ):
        if n_users < 1:
            raise ValueError(f"n_users must be >= 1, got {n_users}")
        if search_prob + dislike_prob > 1.0:
            raise ValueError("search_prob + dislike_prob must be <= 1")
        self.world = world
        self.drift_prob, self.noise = drift_prob, noise
        self.search_prob, self.dislike_prob = search_prob, dislike_prob
        self.start_ts_ms, self.step_ms = start_ts_ms, step_ms
        self._rng = np.random.default_rng(seed)
        self.user_ids = [f"user-{u:05d}" for u in range(n_users)]
        self._user_index = {uid: u for u, uid in enumerate(self.user_ids)}
        self._topics = [int(t) for t in self._rng.integers(0, world.n_topics, size=n_users)]
        self._user_cum = _zipf_cum(n_users, 0.8)
        self._init_topic_items()
        self._buf: list[list[float]] = []
        self._pos = 0
        self.n_generated = 0

    def _init_topic_items(self) -> None:
        """Per topic: its items in a seeded popularity order, with Zipf cumulative weights."""
        per_topic: list[list[str]] = [[] for _ in range(self.world.n_topics)]
        for item in self.world.items:
            per_topic[self.world.item_topic[item["item_id"]]].append(item["item_id"])
        self._topic_items = [
            [ids[j] for j in self._rng.permutation(len(ids))] for ids in per_topic
        ]
        self._topic_cum = [_zipf_cum(len(ids), 1.0) if ids else [] for ids in self._topic_items]
        self._all_items = [it["item_id"] for it in self.world.items]
        self._event_cum = list(accumulate(w for _, w in _EVENT_WEIGHTS))

    def _uniforms(self) -> list[float]:
        """The next event's fixed-size slice of uniforms (refilled in fixed-size blocks)."""
        if self._pos >= len(self._buf):
            self._buf = self._rng.random((_BLOCK, _UNIFORMS_PER_EVENT)).tolist()
            self._pos = 0
        row = self._buf[self._pos]
        self._pos += 1
        return row

    def events(self, n: int, now_ms: Callable[[], int] | None = None) -> Iterator[dict]:
        """Yield the next `n` events; `now_ms` (e.g. wall clock) overrides the synthetic ts."""
        for _ in range(n):
            u = self._uniforms()
            ts = int(now_ms()) if now_ms else self.start_ts_ms + self.n_generated * self.step_ms
            self.n_generated += 1
            yield self._event(u, ts)

    def _event(self, u: list[float], ts: int) -> dict:
        """One event from its 8 uniforms: user, drift, kind, item, type and value."""
        user = _pick(self._user_cum, u[0])
        if u[1] < self.drift_prob:
            self._topics[user] = self._other_topic(self._topics[user], u[2])
        topic = self._topics[user]
        event = {"user_id": self.user_ids[user], "item_id": None, "event_type": "view", "ts": ts,
                 "value": None, "text": None, "scenario": "default"}
        if u[3] < self.search_prob:
            event.update(event_type="search", text=self._query(topic, u[7]))
        elif u[3] < self.search_prob + self.dislike_prob:
            other = self._other_topic(topic, u[5])
            event.update(event_type="dislike", item_id=self._topic_item(other, u[6], uniform=True))
        else:
            self._fill_interaction(event, topic, u)
        return event

    def _fill_interaction(self, event: dict, topic: int, u: list[float]) -> None:
        """An ordinary interaction: on-topic (popularity-skewed) or, with prob `noise`, random."""
        if u[4] < self.noise:
            item = self._all_items[min(int(u[5] * len(self._all_items)), len(self._all_items) - 1)]
        else:
            item = self._topic_item(topic, u[5], uniform=False)
        etype = _EVENT_WEIGHTS[_pick(self._event_cum, u[6])][0]
        event.update(item_id=item, event_type=etype)
        if etype == "rate":  # on-topic items get good ratings, others poor ones
            on_topic = self.world.item_topic[item] == topic
            event["value"] = float((3 if on_topic else 1) + min(int(u[7] * 3), 2))

    def _other_topic(self, topic: int, u: float) -> int:
        """A uniformly chosen topic different from `topic` (itself when there is only one)."""
        n = self.world.n_topics
        if n == 1:
            return topic
        t = min(int(u * (n - 1)), n - 2)
        return t + 1 if t >= topic else t

    def _topic_item(self, topic: int, u: float, uniform: bool) -> str:
        """An item of `topic`, Zipf-skewed by popularity unless `uniform`; any item if empty."""
        ids = self._topic_items[topic] or self._all_items
        if uniform or not self._topic_items[topic]:
            return ids[min(int(u * len(ids)), len(ids) - 1)]
        return ids[_pick(self._topic_cum[topic], u)]

    def _query(self, topic: int, u: float) -> str:
        """A 2–3 word search query from the topic's vocabulary."""
        rng = random.Random(int(u * 2**53))
        words = TOPICS[self.world.topic_names[topic]]
        return " ".join(rng.sample(list(words), rng.choice((2, 3))))

    def current_topic(self, user_id: str) -> int:
        """The user's true current interest, after the events generated so far."""
        try:
            return self._topics[self._user_index[user_id]]
        except KeyError:
            raise KeyError(f"unknown synthetic user {user_id!r}") from None

    def chance_hit_rate(self, user_id: str | None = None) -> float:
        """Hit rate of random recommendations: share of the catalog in the current topic."""
        sizes = self.world.topic_sizes()
        total = len(self.world.items)
        if user_id is not None:
            return sizes[self.current_topic(user_id)] / total
        return sum(sizes[t] for t in self._topics) / (total * len(self._topics))


def topic_hit_rate(
    world: SyntheticWorld,
    recs: Mapping[str, Sequence[str]],
    current_topic: Callable[[str], int],
    k: int = 10,
) -> float:
    """Mean over users of the share of their top-k items on their current true topic.

    Items unknown to the world count as misses; a user with an empty list scores 0, and an
    empty `recs` gives 0.0 (nothing recommended is nothing learned).
    """
    if not recs:
        return 0.0
    total = 0.0
    for user_id, items in recs.items():
        top = list(items)[:k]
        if not top:
            continue
        topic = current_topic(user_id)
        total += sum(world.item_topic.get(i) == topic for i in top) / len(top)
    return total / len(recs)


def _valid_event(rng: random.Random) -> dict:
    """A well-formed event to break in exactly one way."""
    return {
        "user_id": f"user-{rng.randrange(100000):05d}",
        "item_id": f"item-{rng.randrange(1000000):06d}",
        "event_type": "click",
        "ts": 1_700_000_000_000 + rng.randrange(10**9),
    }


def _bad_case(case: int, rng: random.Random) -> tuple[bytes, str]:
    """Malformed record number `case` (0..9) and the reason the parser must give."""
    ev = _valid_event(rng)
    if case == 0:
        return b"{not json", "invalid_json"
    if case == 1:
        raw = orjson.dumps(ev)
        return raw[: len(raw) // 2], "invalid_json"
    if case == 2:
        return b"\xff\xfe" + orjson.dumps(ev), "invalid_utf8"
    if case == 3:
        return orjson.dumps([ev]), "not_object"
    broken: dict[int, tuple[dict, str]] = {
        4: ({k: v for k, v in ev.items() if k != "event_type"}, "missing_field"),
        5: ({**ev, "ts": "abc"}, "wrong_type"),
        6: ({**ev, "event_type": "teleport"}, "invalid_value"),
        7: ({**ev, "user_id": ""}, "empty_id"),
        8: ({**ev, "event_type": "search", "item_id": None, "text": "a" * 2001}, "too_long"),
        9: ({**ev, "ts": -1 - rng.randrange(1000)}, "bad_timestamp"),
    }
    obj, reason = broken[case]
    return orjson.dumps(obj), reason


def bad_events(n: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """`n` malformed raw Kafka values with the expected DLQ reason, cycling over 10 kinds."""
    rng = random.Random(seed)
    return [_bad_case(i % 10, rng) for i in range(n)]
