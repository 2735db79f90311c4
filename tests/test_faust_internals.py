"""The private internals of faust-streaming, mode and aiokafka that streamrec relies on are
still there and still behave as streams/faust_internals.py assumes, and no other module
names them. A faust-streaming or aiokafka upgrade that changes one fails here in seconds,
before the fault tests would find it in minutes."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import re
import time
from pathlib import Path

import faust
import pytest
from faust.types import TP

from streams import faust_internals as fi

ROOT = Path(__file__).resolve().parents[1]
PRIVATE = ("_committed_offset", "_acked", "_acked_index", "_n_acked", "_should_commit",
           "_commit_offsets", "_current_event", "_create_worker_consumer",
           "_fetch_max_wait_ms", "_fetch_min_bytes", "_send_req", "_on_sigterm", "_on_sigint",
           "send_changelog")


def test_no_other_module_names_a_private_internal():
    pattern = re.compile(r"\b(" + "|".join(PRIVATE) + r")\b")
    mine = {Path(fi.__file__).resolve(), Path(__file__).resolve()}
    offenders = [f"{path.relative_to(ROOT)}:{n}" for top in ("streams", "models", "index",
                                                              "evaluation", "bench", "tests")
                 for path in sorted((ROOT / top).rglob("*.py")) if path.resolve() not in mine
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if pattern.search(line)]
    assert offenders == []


@pytest.fixture
def consumer():
    """Faust's real consumer object (nothing connects until it starts)."""
    async def make():
        return faust.App("internals", broker="kafka://127.0.0.1:1").consumer

    return asyncio.run(make())


def test_acknowledged_offsets_move_fausts_commit_point(consumer):
    tp = TP("events", 0)
    consumer._committed_offset[tp] = 10
    assert consumer._new_offset(tp) is None  # nothing acked: nothing to commit
    fi.acknowledge(consumer, [(tp, 12), (tp, 10), (tp, 11), (tp, 9), (tp, 11)])
    # 9 is below the committed offset and 11 came twice: neither counts
    assert consumer._acked[tp] == [12, 10, 11] and consumer._n_acked == 3
    assert consumer._new_offset(tp) == 13  # commits past the contiguous run 10..12


def test_commit_past_commits_forward_only(consumer):
    tp, committed = TP("events", 0), {}

    async def record(offsets):
        committed.update(offsets)
        return True

    consumer._committed_offset[tp] = 10
    consumer._commit_offsets = record  # the broker round trip is not what this checks
    asyncio.run(fi.commit_past(consumer, {tp: 8}))
    assert committed == {}
    asyncio.run(fi.commit_past(consumer, {tp: 15}))
    assert committed == {tp: 15}
    assert fi.committed_offset(consumer, tp) == 10  # Faust records it once the broker acks


def test_current_event_is_fausts_context_variable():
    assert isinstance(faust.streams._current_event, contextvars.ContextVar)
    sentinel = object.__new__(faust.Event)
    with fi.current_event(sentinel):
        assert faust.streams._current_event.get()() is sentinel
    assert faust.streams._current_event.get(None) is None


def test_partition_event_routes_to_its_partition():
    async def run():
        app = faust.App("internals", broker="kafka://127.0.0.1:1")
        ev = fi.partition_event(app, TP("events", 3))
        return ev.message.partition, ev.message.tp

    assert asyncio.run(run()) == (3, TP("events", 3))


def test_table_send_changelog_has_the_shape_durable_table_wraps():
    params = list(inspect.signature(faust.Table.send_changelog).parameters)
    assert params[:4] == ["self", "partition", "key", "value"]
    assert fi.DurableTable.send_changelog is not faust.Table.send_changelog


def test_the_fetch_wait_and_minimum_reach_the_stream_consumer():
    """Built as a worker builds it (without connecting): Faust hard-codes 1,500 ms and
    leaves the minimum at aiokafka's 1 byte."""
    from aiokafka import AIOKafkaConsumer

    start = inspect.getsource(AIOKafkaConsumer.start)
    assert "_fetch_max_wait_ms" in start and "_fetch_min_bytes" in start
    fi.tune_stream_fetch(50, 10)
    fi.tune_stream_fetch(77, 4096)  # wraps Faust's original, not the previous wrapper

    async def build() -> tuple[int, int]:
        app = faust.App("internals", broker="kafka://127.0.0.1:9")
        consumer = app.consumer._thread._create_worker_consumer(app.transport)
        try:
            return consumer._fetch_max_wait_ms, consumer._fetch_min_bytes
        finally:
            await consumer.stop()

    assert asyncio.run(build()) == (77, 4096)


def test_take_batches_asks_for_its_wait_before_each_one():
    """A real stream with nothing to take: Faust's `take_events` waits for its buffer again
    and again, each time as long as `within()` says then (10 s for the value it reads once,
    10 ms after), and the stream's own `wait_for_stopped` is back once the batches end."""
    src = inspect.getsource(faust.Stream.take_events)
    assert re.search(r"self\.wait_for_stopped\(\s*buffer_full, timeout=timeout", src)

    async def run() -> tuple[int, bool, bool]:
        app = faust.App("internals", broker="memory://")
        stream = app.stream(app.channel())
        asked: list[float] = []

        def within() -> float:
            asked.append(0.01 if asked else 10.0)
            return asked[-1]

        batches = fi.take_batches(stream, 5, within)
        task = asyncio.ensure_future(anext(batches))
        while len(asked) < 5:  # each 10 ms wait ends, and the next asks again
            await asyncio.sleep(0.005)
        shadowed = "wait_for_stopped" in vars(stream)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await batches.aclose()
        return len(asked), shadowed, "wait_for_stopped" in vars(stream)

    n, shadowed, still = asyncio.run(asyncio.wait_for(run(), 5))
    assert n >= 5 and shadowed and not still


def test_mode_worker_has_the_signal_handlers_worker_chains_to():
    assert callable(faust.Worker._on_sigterm) and callable(faust.Worker._on_sigint)
    assert "install_signal_handlers" in vars(fi.Worker)


@pytest.mark.kafka
def test_membership_is_proved_by_heartbeats_on_a_real_group(kafka):
    """A consumer in a group on the real broker: its JoinGroup, then its SyncGroup and its
    heartbeats each report the group, its generation, a send time and the proof."""
    from aiokafka import AIOKafkaConsumer

    seen: list[tuple[str, int, float, str]] = []
    fi.on_membership_proved(lambda *proof: seen.append(proof))
    group = f"internals-{time.monotonic_ns()}"

    async def run() -> None:
        consumer = AIOKafkaConsumer("internals-topic", bootstrap_servers=kafka.bootstrap,
                                    group_id=group, heartbeat_interval_ms=200)
        await consumer.start()
        try:
            deadline = time.monotonic() + 60
            while (sum(1 for g, *p in seen if g == group and p[-1] == "stable") < 3
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.1)
        finally:
            await consumer.stop()

    try:
        asyncio.run(run())
    finally:
        from streams import group_lease
        group_lease.install()  # the worker's callback again, for later tests in this process
    mine = [(gen, sent, proof) for g, gen, sent, proof in seen if g == group]
    assert len(mine) >= 4, seen
    assert mine[0][::2] == (-1, "joining")  # a first JoinGroup: no generation yet
    stable = [gen for gen, _, proof in mine if proof == "stable"]
    assert len(stable) >= 3 and min(stable) >= 1, mine
    assert [sent for _, sent, _ in mine] == sorted(sent for _, sent, _ in mine)
