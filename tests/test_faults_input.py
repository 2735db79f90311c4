"""Hostile input on the events topic: >= 10,000 bad records interleaved with good events.

Every bad record must land in the events DLQ with the reason `streams.schemas.parse_event`
(or, for a valid event naming an item the catalog lacks, the processor) gives its category and
its source partition/offset; every good event must be applied exactly once (user states are
compared with what the event list implies); the worker process must survive the whole run
(same pid, counters keep growing) with bounded memory (RSS sampled from /proc).

The records are generated deterministically: one seeded `random.Random` per category, so a
failure reproduces. Expected reasons follow what `parse_event` documents: size first, then
UTF-8/JSON, then the schema. Some "hostile-looking" records are *valid* by design and are
sent as good events that must be applied: control characters inside free text (`text`),
non-ASCII printable scenario names, deeply nested (but within the JSON depth limit) unknown
extra fields. A scenario name is id-like (it names learned parameters): a control character
in it is rejected as in an id.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from helpers import dead_letters, expected_states, index_catalog, make_settings, wait_states

from evaluation.synthetic import SyntheticStream, bad_events, make_world
from streams.clients import kafka_producer
from streams.publish import publish_events
from streams.schemas import EVENT_TYPES, MAX_TS_MS
from streams.supervisor import WorkerProcess, total
from streams.topics import ensure_topics

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.faults]

MAX_EVENT_BYTES = 16_384  # 10k-character ids stay under it (-> too_long, not oversize)
N_WARMUP = 500  # good events applied before the RSS baseline is taken
N_GOOD = 2500  # good events interleaved with the hostile ones
SEED = 20_261_123

#: category -> how many records (sum >= 10,000)
COUNTS = {
    "random_bytes": 1000,
    "invalid_utf8": 1000,
    "truncated_json": 1000,
    "deep_nesting": 1000,
    "oversize": 400,
    "nan_infinity": 1000,
    "bad_timestamp": 1000,
    "unknown_event_type": 1000,
    "long_ids": 1000,
    "control_chars": 1000,
    "unknown_item": 500,
    "empty": 100,
    "strict_value": 500,
    "classic": 500,  # evaluation.synthetic.bad_events: missing field, wrong type, not an object...
}

#: byte values a JSON text can start with (incl. whitespace): random bytes avoid them first
_JSON_START = set(b' \t\r\n{["-0123456789tfn')

Bad = tuple[bytes | None, str]  # (raw value, expected reason)


def _event(rng: random.Random, user: str, item: str, **kw: object) -> dict:
    ev = {"user_id": user, "item_id": item, "event_type": rng.choice(EVENT_TYPES[:4]),
          "ts": 1_700_000_000_000 + rng.randrange(10**9)}
    ev.update(kw)
    return ev


class Hostile:
    """Generators of bad records, one method per category, all drawing from seeded RNGs."""

    def __init__(self, users: list[str], items: list[str], max_bytes: int):
        self.users, self.items, self.max_bytes = users, items, max_bytes

    def ev(self, rng: random.Random, **kw: object) -> dict:
        """A valid event of a real user on a real item (to be broken in one way)."""
        return _event(rng, rng.choice(self.users), rng.choice(self.items), **kw)

    def random_bytes(self, rng: random.Random) -> Bad:
        first = rng.choice([b for b in range(256) if b not in _JSON_START])
        raw = bytes([first]) + rng.randbytes(rng.randrange(0, 300))
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw, "invalid_utf8"
        return raw, "invalid_json"  # valid UTF-8 by chance, but cannot start a JSON text

    def invalid_utf8(self, rng: random.Random) -> Bad:
        junk = rng.choice([b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xff", b"\xfe\xff",
                           b"\xe2\x82", b"\xf8\x88\x80\x80\x80", b"\xf4\x90\x80\x80", b"\xc3\x28"])
        raw = orjson.dumps(self.ev(rng))
        if rng.random() < 0.7:  # inside a string value
            field = rng.choice([b'"user_id":"', b'"item_id":"'])
            at = raw.index(field) + len(field)
            raw = raw[:at] + junk + raw[at:]
        else:  # anywhere (also outside strings)
            at = rng.randrange(len(raw) + 1)
            raw = raw[:at] + junk + raw[at:]
        return raw, "invalid_utf8"

    def truncated_json(self, rng: random.Random) -> Bad:
        raw = orjson.dumps(self.ev(rng, value=rng.random(), scenario="s"))
        return raw[: rng.randrange(1, len(raw))], "invalid_json"  # any proper prefix

    def deep_nesting(self, rng: random.Random) -> Bad:
        kind = rng.randrange(4)
        opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
        if kind == 0:  # a whole record nested past orjson's depth limit (1024)
            depth = rng.randrange(1025, 1800)
            raw = opener * depth + b"1" + closer * depth
            return raw, ("oversize" if len(raw) > self.max_bytes else "invalid_json")
        if kind == 1:  # an extra field nested past the limit inside a valid event
            depth = rng.randrange(1025, 1800)
            head = orjson.dumps(self.ev(rng))[:-1]
            raw = head + b',"x":' + opener * depth + b"1" + closer * depth + b"}"
            return raw, ("oversize" if len(raw) > self.max_bytes else "invalid_json")
        # a nested structure where a scalar field belongs
        depth = rng.randrange(2, 200)
        field = rng.choice(["user_id", "item_id", "ts", "text", "value"])
        nested = orjson.loads(opener * depth + b"1" + closer * depth)
        return orjson.dumps(self.ev(rng, **{field: nested})), "wrong_type"

    def oversize(self, rng: random.Random) -> Bad:
        size = rng.randrange(self.max_bytes + 1, 3 * self.max_bytes)
        if rng.random() < 0.5:  # a valid event with a huge extra field
            head = orjson.dumps(self.ev(rng))[:-1] + b',"pad":"'
            raw = head + b"x" * max(size - len(head) - 2, 0) + b'"}'
        else:  # garbage: size is checked before anything else
            raw = rng.randbytes(size)
        assert len(raw) > self.max_bytes
        return raw, "oversize"

    def nan_infinity(self, rng: random.Random) -> Bad:
        kind = rng.randrange(3)
        if kind == 0:  # non-standard literals: orjson rejects them as JSON
            lit = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"nan", b"inf"])
            field = rng.choice([b"value", b"ts"])
            head = orjson.dumps(self.ev(rng))[:-1]
            return head + b',"' + field + b'":' + lit + b"}", "invalid_json"
        if kind == 1:  # numbers overflowing a double
            lit = rng.choice([b"1e999", b"-1e999", b"1e400", b"2e308"])
            field = rng.choice([b"value", b"ts"])
            head = orjson.dumps(self.ev(rng))[:-1]
            return head + b',"' + field + b'":' + lit + b"}", "invalid_json"
        # strings a lax float parser would turn into NaN/inf: `value` is strict, a wrong type
        text = rng.choice(["NaN", "nan", "Infinity", "-Infinity", "inf", "-inf"])
        return orjson.dumps(self.ev(rng, value=text)), "wrong_type"

    def bad_timestamp(self, rng: random.Random) -> Bad:
        kind = rng.randrange(5)
        if kind == 0:
            ts = -rng.randrange(1, 10**13)
        elif kind == 1:
            ts = -rng.randrange(1, 2**63 + 1)  # down to int64 min
        elif kind == 2:
            ts = rng.randrange(MAX_TS_MS + 1, 10**17)  # far future, micro-/nanoseconds
        elif kind == 3:
            ts = rng.randrange(10**17, 2**64)  # up to uint64 max
        else:
            ts = rng.randrange(2**64, 10**30)  # beyond 64 bits: JSON parsers read a float
        raw = orjson.dumps(self.ev(rng))
        raw = raw.replace(b'"ts":' + str(orjson.loads(raw)["ts"]).encode(),
                          b'"ts":' + str(ts).encode())
        return raw, "bad_timestamp"

    def unknown_event_type(self, rng: random.Random) -> Bad:
        kind = rng.randrange(5)
        if kind == 0:
            et: object = rng.choice(EVENT_TYPES).upper()
        elif kind == 1:
            et = rng.choice(EVENT_TYPES) + rng.choice([" ", "s", "\u200b", "_v2"])
        elif kind == 2:
            et = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz-") for _ in
                         range(rng.randrange(0, 40)))
            if et in EVENT_TYPES:
                et += "x"
        elif kind == 3:
            et = "e" * rng.randrange(1000, 10_000)
        else:  # not a string at all: a wrong type, not an unknown value
            et = rng.choice([None, 3, 0.5, True, ["view"], {"type": "view"}])
            return orjson.dumps(self.ev(rng, event_type=et)), "wrong_type"
        return orjson.dumps(self.ev(rng, event_type=et)), "invalid_value"

    def long_ids(self, rng: random.Random) -> Bad:
        field = rng.choice(["user_id", "item_id", "scenario", "text"])
        alphabet = rng.choice(["ab", "xyz0123456789", "é", "語"])  # 1-, 2- and 3-byte chars
        n = 10_000 if field in ("user_id", "item_id") else rng.randrange(2001, 10_000)
        value = "".join(rng.choice(alphabet) for _ in range(n))
        extra: dict = {field: value}
        if field == "text":
            extra.update(event_type="search", item_id=None)
        raw = orjson.dumps(self.ev(rng, **extra))
        return raw, ("oversize" if len(raw) > self.max_bytes else "too_long")

    def control_chars(self, rng: random.Random) -> Bad:
        if rng.random() < 0.3:  # C1 controls, zero-width and bidi characters: valid JSON
            ctrl = chr(rng.choice([*range(0x80, 0xA0), 0x200B, 0x200C, 0x200D, 0x200E,
                                   0x200F, 0x202A, 0x202E, 0x2060, 0x2066, 0x2069, 0xFEFF]))
            field = rng.choice(["user_id", "item_id"])
            ev = self.ev(rng)
            ev[field] = ev[field] + ctrl if rng.random() < 0.5 else ctrl + ev[field]
            return orjson.dumps(ev), "invalid_value"
        ctrl = chr(rng.choice([*range(0x20), 0x7F]))
        if rng.random() < 0.6:  # escaped (valid JSON) inside an id: ids must be printable
            field = rng.choice(["user_id", "item_id", "scenario"])
            ev = self.ev(rng, scenario="sc")
            at = rng.randrange(len(ev[field]) + 1)
            ev[field] = ev[field][:at] + ctrl + ev[field][at:]
            return orjson.dumps(ev), "invalid_value"
        # raw, unescaped control byte inside a JSON string: not JSON (RFC 8259)
        raw = orjson.dumps(self.ev(rng, scenario="abc"))
        if ctrl == "\x7f":  # DEL may appear raw in JSON strings; put it in an id instead
            raw = raw.replace(b'"user_id":"', b'"user_id":"\x7f', 1)
            return raw, "invalid_value"
        at = raw.index(b'"scenario":"abc') + len(b'"scenario":"a')
        return raw[:at] + ctrl.encode() + raw[at:], "invalid_json"

    def unknown_item(self, rng: random.Random) -> Bad:
        item = rng.choice(["no-such-item", "item-999999", "ITEM-000001", " item-000001"])
        return orjson.dumps(self.ev(rng, item_id=f"{item}-{rng.randrange(10**6)}")), \
            "unknown_item"

    def empty(self, rng: random.Random) -> Bad:
        return rng.choice([None, b"", b" ", b"\n\t  "]), "invalid_json"

    def strict_value(self, rng: random.Random) -> Bad:
        """`value` is a JSON number: true, false, "3" and "3.5" are not silently converted."""
        return orjson.dumps(self.ev(rng, value=rng.choice([True, False, "3", "3.5", "1e2"]))), \
            "wrong_type"


def generate_bad(users: list[str], items: list[str], max_bytes: int
                 ) -> list[tuple[str, bytes | None, str]]:
    """(category, raw, expected reason) for every category of COUNTS, deterministic."""
    gen = Hostile(users, items, max_bytes)
    out: list[tuple[str, bytes | None, str]] = []
    for n, (category, count) in enumerate(COUNTS.items()):
        if category == "classic":
            out += [("classic", raw, reason) for raw, reason in bad_events(count, SEED + n)]
            continue
        rng = random.Random(SEED + n)
        make: Callable[[random.Random], Bad] = getattr(gen, category)
        out += [(category, *make(rng)) for _ in range(count)]
    return out


def valid_oddities(items: list[str]) -> list[dict]:
    """Hostile-looking but valid events (parse_event accepts them): must be applied."""
    rng = random.Random(SEED - 1)
    out = []
    for n in range(200):
        user = f"odd-user-{n % 20}"
        kind = n % 4
        if kind == 0:  # control characters inside free text are allowed (only ids are strict)
            text = "".join(rng.choice(["a", "b", " ", "\x00", "\x07", "\x1b", "\t", "\n"])
                           for _ in range(rng.randrange(1, 80)))
            ev = _event(rng, user, None, event_type="search", text=text + "q")
        elif kind == 1:
            ev = _event(rng, user, rng.choice(items), scenario=rng.choice(["sc-é", "語", "Ω🙂"]))
        elif kind == 2:  # unknown fields, nested within the depth limit (1024), are ignored
            ev = _event(rng, user, rng.choice(items), _depth=rng.randrange(1, 1000))
        else:  # ids with non-ASCII printable characters (zero-width ones are not printable)
            ev = _event(rng, user + rng.choice(["-é", "-語", "-Ω", "-🙂"]),
                        rng.choice(items))
        ev["ts"] = 1_700_000_000_000 + n  # in order per user
        out.append(ev)
    return out


def encode_good(ev: dict) -> bytes:
    """A good event's bytes; `_depth` adds an unknown field nested that deep (orjson cannot
    serialize more than 255 levels, so the nesting is written by hand)."""
    ev = dict(ev)
    depth = ev.pop("_depth", None)
    raw = orjson.dumps(ev)
    if depth is None:
        return raw
    return raw[:-1] + b',"extra":' + b"[" * depth + b"]" * depth + b"}"


def _user_key(raw: bytes | None) -> bytes | None:
    """The record's user id as a Kafka key when it is JSON with a string user_id."""
    try:
        user = orjson.loads(raw) if raw is not None else None
    except orjson.JSONDecodeError:
        return None
    if isinstance(user, dict) and isinstance(user.get("user_id"), str):
        return user["user_id"].encode("utf-8", "surrogatepass")
    return None






def rss_mb(pid: int) -> float:
    """Resident set size of `pid` in MB (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Sampler(threading.Thread):
    """Samples the worker's RSS and events counter every `every` seconds in the background."""

    def __init__(self, worker: WorkerProcess, every: float = 1.0):
        super().__init__(daemon=True)
        self.worker, self.every = worker, every
        self.rss: list[tuple[float, float]] = []
        self.counts: list[float] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.stop_event.is_set():
            try:
                self.rss.append((time.monotonic() - start, rss_mb(self.worker.proc.pid)))
                self.counts.append(total(self.worker.metrics(), "streamrec_events_total"))
            except (OSError, RuntimeError):
                pass
            self.stop_event.wait(self.every)


def _send(s, topic: str, records: list[tuple[bytes | None, bytes | None]]
          ) -> list[tuple[int, int]]:
    """Send all records (acks=all, one in flight: order kept); returns (partition, offset)."""
    producer = kafka_producer(s)
    try:
        futures = [producer.send(topic, key=k, value=v) for k, v in records]
        producer.flush()
        return [(md.partition, md.offset) for md in (f.get(timeout=60) for f in futures)]
    finally:
        producer.close()


def _interleave(good: list[dict], bad: list[tuple[str, bytes, str]]
                ) -> tuple[list[tuple[bytes | None, bytes | None]], list[tuple[str, str | None]]]:
    """Bad records at random places among the good events (which keep their order), keyed as
    a real producer would key them; with each record's (category or "good", reason)."""
    rng = random.Random(SEED + 99)
    slot_set = set(rng.sample(range(len(good) + len(bad)), len(good)))
    records: list[tuple[bytes | None, bytes | None]] = []
    kinds: list[tuple[str, str | None]] = []
    gi = bi = 0
    for pos in range(len(good) + len(bad)):
        if pos in slot_set:
            ev = good[gi]
            gi += 1
            records.append((ev["user_id"].encode(), encode_good(ev)))
            kinds.append(("good", None))
        else:
            category, raw, reason = bad[bi]
            bi += 1
            # by the user id when the record has one (see test_misrouted_event_... for what a
            # foreign key does), else junk keys
            key = _user_key(raw) or (rng.randbytes(rng.randrange(0, 40))
                                     if category == "random_bytes" else f"bad-{bi}".encode())
            records.append((key, raw))
            kinds.append((category, reason))
    return records, kinds


def _assert_each_bad_record_in_the_dlq(s, kinds, records, positions) -> None:  # noqa: ANN001
    """Every bad record in the DLQ, once, with its expected reason, its bytes and its source
    position; no good event there."""
    dlq = dead_letters(s, s.topic(s.events_dlq_topic))
    got = {(int(h["streamrec.source.partition"]), int(h["streamrec.source.offset"])): (v, h)
           for v, h in dlq}
    print(f"[faults-input] DLQ records: {len(dlq)}; reasons "
          f"{dict(Counter(h['streamrec.reason'] for _, h in dlq))}")
    wrong: list[str] = []
    missing = 0
    for (category, reason), (_key, raw), pos in zip(kinds, records, positions, strict=True):
        if reason is None:
            assert pos not in got, f"a good event went to the DLQ: {got[pos][1]}"
            continue
        if pos not in got:
            missing += 1
            continue
        value, headers = got[pos]
        if headers["streamrec.reason"] != reason or value != raw or \
                headers["streamrec.source.topic"] != s.topic(s.events_topic):
            wrong.append(f"{category}: expected {reason}, got {headers['streamrec.reason']} "
                         f"({headers.get('streamrec.detail', '')[:100]}); raw {raw!r:.120}")
    assert missing == 0, f"{missing} bad records not in the DLQ"
    assert not wrong, f"{len(wrong)} wrong DLQ records, e.g. {wrong[:5]}"
    assert len(dlq) == sum(reason is not None for _, reason in kinds)


def _assert_dlq_counters(samples, topic: str, by_reason: Counter) -> None:  # noqa: ANN001
    assert total(samples, "streamrec_events_total", outcome="dlq") == sum(by_reason.values())
    for reason, n in by_reason.items():
        assert total(samples, "streamrec_dlq_total", topic=topic, reason=reason) == n, reason


def _assert_states(states: dict, expected: dict) -> None:
    for user, (items_, n) in expected.items():
        st = states.get(user)
        assert st is not None, f"no state for {user!r}"
        assert st.n_events == n, (user, st.n_events, n)
        assert st.items == items_, user


def _warm_up(s, worker: WorkerProcess, items: list[dict], warmup: list[dict]) -> None:  # noqa: ANN001
    """The catalog indexed and the warm-up events applied: the RSS baseline."""
    index_catalog(s, worker, items)
    publish_events(s, warmup, quiet=True)
    worker.wait_for("streamrec_events_total", len(warmup), timeout=180, outcome="applied")
    worker.wait_idle()


def _print_figures(bad: list[tuple[str, bytes, str]], sampler: Sampler, rss_warm: float
                   ) -> float:
    """The run's figures (shown with -s); returns the largest RSS sampled."""
    rss_values = [r for _, r in sampler.rss]
    rss_max = max(rss_values, default=rss_warm)
    print(f"[faults-input] bad by category: {dict(Counter(c for c, *_ in bad))}\n"
          f"[faults-input] expected reasons: {dict(Counter(r for *_, r in bad))}\n"
          f"[faults-input] RSS warm {rss_warm:.0f} MB, max {rss_max:.0f} MB, "
          f"end {rss_values[-1] if rss_values else float('nan'):.0f} MB "
          f"({len(rss_values)} samples); bound {1.5 * rss_warm + 200:.0f} MB")
    return rss_max


def test_hostile_events_go_to_the_dlq_and_good_ones_are_applied(kafka, tmp_path):
    t0 = time.monotonic()
    s = make_settings(kafka, tmp_path, max_event_bytes=MAX_EVENT_BYTES, batch_size=500)
    ensure_topics(s)
    world = make_world(300, n_topics=6, seed=11)
    items = [it["item_id"] for it in world.items]
    stream = SyntheticStream(world, n_users=120, seed=12)
    warmup = list(stream.events(N_WARMUP))
    good = list(stream.events(N_GOOD)) + valid_oddities(items)
    bad = generate_bad(stream.user_ids, items, MAX_EVENT_BYTES)
    by_reason = Counter(r for *_, r in bad)
    assert len(bad) >= 10_000

    records, kinds = _interleave(good, bad)

    worker = WorkerProcess(s, tmp_path / "worker.log").start()
    sampler = Sampler(worker)
    try:
        _warm_up(s, worker, world.items, warmup)
        pid = worker.proc.pid
        rss_warm = rss_mb(pid)
        sampler.start()
        t_pub = time.monotonic()
        positions = _send(s, s.topic(s.events_topic), records)
        pub_s = time.monotonic() - t_pub
        n_total = N_WARMUP + len(records)
        worker.wait_for("streamrec_events_total", n_total, timeout=600)
        proc_s = time.monotonic() - t_pub
        expected = expected_states(warmup + good, s.learner.history_len)
        states = wait_states(s, expected, timeout=120)
        samples = worker.wait_idle()  # the last batch's counters are in
        alive = worker.proc.poll() is None
        same_pid = worker.proc.pid == pid
    finally:
        sampler.stop_event.set()
        worker.stop()
    sampler.join(5)

    print(f"\n[faults-input] {len(records)} records ({len(bad)} bad, {len(good)} good) + "
          f"{N_WARMUP} warm-up; published in {pub_s:.1f}s, all consumed after {proc_s:.1f}s; "
          f"test {time.monotonic() - t0:.0f}s")
    rss_max = _print_figures(bad, sampler, rss_warm)

    # -- the worker survived: same process, never restarted, counters monotonic -------------
    assert alive and same_pid, worker.log_tail()
    assert sampler.counts == sorted(sampler.counts), "events counter went backwards (restart?)"
    log_text = (tmp_path / "worker.log").read_text(errors="replace")
    assert "crashed" not in log_text.lower(), [ln for ln in log_text.splitlines()
                                               if "crash" in ln.lower()][:5]

    _assert_each_bad_record_in_the_dlq(s, kinds, records, positions)

    # -- every good event applied exactly once ------------------------------------------------
    _assert_states(states, expected)
    assert total(samples, "streamrec_events_total") == n_total
    assert total(samples, "streamrec_events_total", outcome="applied") == N_WARMUP + len(good)
    _assert_dlq_counters(samples, s.topic(s.events_topic), by_reason)

    # -- memory stayed bounded ------------------------------------------------------------------
    assert rss_max < 1.5 * rss_warm + 200, (rss_warm, rss_max)


def test_misrouted_event_does_not_fork_or_reset_user_state(kafka, tmp_path):
    """An event keyed by something else than its user id lands on a foreign partition. The
    user-state table is co-partitioned with the events topic by *record* partition, so such an
    event goes to the DLQ (`misrouted`); it never starts a second, empty state on another
    changelog partition, nor resets the real one (before the fix: both happened)."""
    s = make_settings(kafka, tmp_path)
    ensure_topics(s)
    world = make_world(100, n_topics=4, seed=5)
    items = [it["item_id"] for it in world.items]
    user = "misrouted-user"
    rng = random.Random(SEED + 7)
    good = [_event(rng, user, rng.choice(items), ts=1_700_000_000_000 + n) for n in range(40)]
    topic = s.topic(s.events_topic)
    worker = WorkerProcess(s, tmp_path / "worker.log").start()
    try:
        index_catalog(s, worker, world.items)
        home = _send(s, topic, [(user.encode(), orjson.dumps(ev)) for ev in good[:30]])[0][0]
        worker.wait_for("streamrec_events_total", 30, timeout=120, outcome="applied")
        foreign = (home + 1) % s.partitions
        stray = _event(rng, user, rng.choice(items), ts=1_700_000_000_100)
        producer = kafka_producer(s)
        producer.send(topic, key=b"not-the-user", value=orjson.dumps(stray),
                      partition=foreign).get(timeout=30)
        producer.close()
        worker.wait_for("streamrec_events_total", 31, timeout=120)
        _send(s, topic, [(user.encode(), orjson.dumps(ev)) for ev in good[30:]])
        worker.wait_for("streamrec_events_total", 41, timeout=120)
        worker.wait_idle()
    finally:
        worker.stop()
    from helpers import read_all

    from models.user_state import UserState

    by_partition: dict[int, int] = {}
    for msg in read_all(s, f"{s.app_id}-user-state-changelog"):
        if msg.key == user.encode():
            by_partition[msg.partition] = UserState.from_bytes(msg.value).n_events
    print(f"\n[faults-input] misrouted: home partition {home}, stray on {foreign}; newest "
          f"n_events per changelog partition: {by_partition}")
    assert set(by_partition) == {home}, f"user state forked across partitions: {by_partition}"
    assert by_partition[home] == 40, by_partition
    from helpers import dead_letters

    dlq = [h for _, h in dead_letters(s, s.topic(s.events_dlq_topic))]
    assert [(h["streamrec.reason"], h["streamrec.source.partition"]) for h in dlq] == \
        [("misrouted", str(foreign))]
