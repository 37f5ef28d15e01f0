"""A TCP proxy between the workers and Redis that can drop connections and replies.

Debian has no toxiproxy, and a lost reply is the fault that matters: Redis ran the command, the
client never heard back, so redis-py sends it again (a resent claim or finish script), and a
BRPOP whose reply is lost is a task message popped and gone. The proxy runs its own asyncio loop
on a daemon thread; the nemesis flips its modes from other threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from dataclasses import dataclass


@dataclass
class ProxyStats:
    connections: int = 0
    refused: int = 0
    """Client connections closed at once because Redis was not reachable."""
    dropped_connections: int = 0
    dropped_replies: int = 0


class RedisProxy:
    """Listens on `port` (127.0.0.1) and forwards each connection to `upstream_port`."""

    def __init__(self, port: int, upstream_port: int, seed: int) -> None:
        self.port = port
        self.upstream_port = upstream_port
        self.stats = ProxyStats()
        self._rng = random.Random(seed)
        self._reply_drop = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-redis-proxy", daemon=True)

    # --- control (any thread) ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the Redis proxy did not start")

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def drop_connections(self) -> int:
        """Close every open connection now (both sides), as a network blip would."""
        if self._loop is None:
            return 0
        fut = asyncio.run_coroutine_threadsafe(self._close_all(), self._loop)
        return fut.result(5)

    def drop_replies(self, probability: float) -> None:
        """From now on each reply is lost with this probability (0 turns it off): the request
        reached Redis and ran; the client's connection is closed before the answer comes."""
        self._reply_drop = max(0.0, min(1.0, probability))

    # --- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._server = loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True))
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            for client, upstream in list(self._conns):
                client.close()
                upstream.close()
            loop.close()

    async def _close_all(self) -> int:
        pairs = list(self._conns)
        for client, upstream in pairs:
            self._abort(client)
            self._abort(upstream)
        self.stats.dropped_connections += len(pairs)
        return len(pairs)

    @staticmethod
    def _abort(w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            w.transport.abort()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        try:
            up_r, up_w = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.upstream_port), 3)
        except (OSError, TimeoutError):
            self.stats.refused += 1
            self._abort(client_w)
            return
        pair = (client_w, up_w)
        self._conns.add(pair)
        try:
            await asyncio.gather(self._pipe(client_r, up_w, pair, replies=False),
                                 self._pipe(up_r, client_w, pair, replies=True))
        finally:
            self._conns.discard(pair)
            self._abort(client_w)
            self._abort(up_w)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter], *, replies: bool) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                if replies and self._reply_drop and self._rng.random() < self._reply_drop:
                    self.stats.dropped_replies += 1
                    break  # Redis has answered; the client never hears it
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in pair:
                self._abort(w)
