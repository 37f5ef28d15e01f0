"""The webhook receiver the nemesis points every batch at: it verifies signatures, records each
event id, and can be down (connection refused), slow (answers after the sender gave up) or
answering 5xx, as a customer's endpoint is on a bad day.

It listens on one fixed port for the whole run, so "down then up" is the same URL again.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from scalecap.fleet.signatures import verify_webhook


@dataclass
class Delivery:
    """One POST as the receiver saw it."""

    event_id: str
    type: str
    batch_id: str
    job_id: str | None
    verified: bool
    status: int
    at: float

    @property
    def accepted(self) -> bool:
        """A verified event the receiver answered 2xx: delivered, from the receiver's side."""
        return self.verified and 200 <= self.status < 300

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ChaosReceiver:
    """`mode`: "ok", "5xx" or "slow"; `down()`/`up()` close and reopen the listening socket."""

    def __init__(self, port: int, secrets: list[str], *, slow_seconds: float, seed: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}/hook"
        self.secrets = list(secrets)
        self.slow_seconds = slow_seconds
        self.mode = "ok"
        self.deliveries: list[Delivery] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def up(self) -> None:
        if self._server is not None:
            return
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,),
                                        name="chaos-receiver", daemon=True)
        self._thread.start()

    def down(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def _verify(self, headers: dict[str, str], body: bytes) -> bool:
        return any(verify_webhook(s, headers, body) for s in self.secrets)

    def _answer(self, headers: dict[str, str], body: bytes) -> int:
        """Record the request; the status to answer (after any deliberate delay)."""
        mode = self.mode
        status = 200
        if mode == "5xx":
            status = self._rng.choice((500, 502, 503))
        elif mode == "slow":
            time.sleep(self.slow_seconds)
        try:
            payload = json.loads(body)
            data = payload.get("data") or {}
        except ValueError:
            payload, data = {}, {}
        d = Delivery(headers.get("webhook-id", ""), str(payload.get("type", "")),
                     str(data.get("batch_id", "")), data.get("job_id"),
                     self._verify(headers, body), status, time.time())
        with self._lock:
            self.deliveries.append(d)
        return status

    def snapshot(self) -> list[Delivery]:
        with self._lock:
            return list(self.deliveries)


def _handler(receiver: ChaosReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            status = receiver._answer(headers, body)
            with contextlib.suppress(OSError):  # a sender that timed out has gone
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
