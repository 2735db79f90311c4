"""A TCP proxy for network faults between a worker and its broker (tests only).

It forwards a local port to the broker's port on an asyncio loop of its own thread, and can
cut the link (close every connection and refuse new ones), add latency to every chunk in
both directions (pipelined: a chunk leaves `latency` after it arrived, so throughput is
not divided by it), and reset every connection periodically.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from streams.ports import free_port


class Proxy:
    def __init__(self, backend_port: int, port: int | None = None, host: str = "127.0.0.1"):
        self.host, self.backend_port = host, backend_port
        self.port = port or free_port()
        self.latency_s = 0.0
        self.cut = False
        self.resets = 0
        self.connections = 0
        self._streams: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="netproxy")
        self._reset_task: asyncio.Task | None = None

    # -- control (from any thread) ---------------------------------------------------------
    def start(self) -> Proxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def cut_link(self) -> None:
        """Close every connection and refuse new ones until `heal`."""
        self.cut = True
        self._call(self._drop_all)

    def heal(self) -> None:
        self.cut = False

    def reset_every(self, seconds: float | None) -> None:
        """Abort every connection every `seconds` (None: stop)."""
        self._call(self._schedule_resets, seconds)

    def stop(self) -> None:
        self._call(self._shutdown)
        self._thread.join(timeout=10)

    def _call(self, fn, *args) -> None:
        done = threading.Event()

        def run() -> None:
            fn(*args)
            done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(10)

    # -- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._client, self.host, self.port))
        self._ready.set()
        self._loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection(self.host, self.backend_port)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._streams |= {writer, up_w}
        await asyncio.gather(self._pump(reader, up_w), self._pump(up_r, writer),
                             return_exceptions=True)
        for w in (writer, up_w):
            self._streams.discard(w)
            w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def send() -> None:
            while True:
                t, data = await queue.get()
                if data is None:
                    return
                wait = t + self.latency_s - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(send())
        try:
            while not self.cut:
                data = await reader.read(65536)
                if not data:
                    break
                queue.put_nowait((time.monotonic(), data))
        finally:
            queue.put_nowait((0.0, None))
            with contextlib.suppress(Exception):
                await sender
            writer.transport.abort()

    def _drop_all(self) -> None:
        for w in list(self._streams):
            w.transport.abort()
        self._streams.clear()

    def _schedule_resets(self, seconds: float | None) -> None:
        if self._reset_task is not None:
            self._reset_task.cancel()
            self._reset_task = None
        if seconds:
            self._reset_task = self._loop.create_task(self._resetting(seconds))

    async def _resetting(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            self.resets += 1
            self._drop_all()

    def _shutdown(self) -> None:
        self._drop_all()
        self._server.close()
        self._loop.call_soon(self._loop.stop)

