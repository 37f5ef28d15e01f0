"""Prometheus metrics and a liveness heartbeat for one `scalecap worker` process.

The protocol code stays free of metric calls: Celery's task signals report each task's result
(a chunk's images counted by outcome), whole-task retries and the task's time in the worker. The
engine wraps each image's chain in `track` (in flight, progress for the stall check) and hands
each record to `observe_record`, whose `meta` already carries seconds per chain stage and tokens.
Metric names are a public interface (deploy/grafana/ and docs/deploy.md use them, and
tests/test_metrics_dashboard.py checks the dashboard against them); rename only with both.

`serve()` answers on `--metrics-port`:
- `/metrics`: Prometheus text format;
- `/healthz`: liveness. 503 when the engine's event loop has not run its heartbeat for
  `heartbeat_max_age` seconds (something blocks the loop) or when images are in flight and none
  finished for `stall_timeout` seconds (the engine hangs);
- `/readyz`: 200 once the engine is up and Celery consumes, and while live; 503 during shutdown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable
from concurrent.futures import Future
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app

from scalecap.fleet.outcomes import ClaimCode, RunOutcome
from scalecap.fleet.protocol import TASK_CAPTION, TASK_WEBHOOK

log = logging.getLogger(__name__)

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
JOB_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

IMAGES = Counter(
    "scalecap_worker_images", "Images (jobs) of the caption tasks this worker handled, by outcome: done, "
    "failed (error record), reused, retry (charged failure, queued again), requeue (sink outage, "
    "not charged), dead (dead-lettered), cancelled, final/busy/skip/quarantined/stale (protocol "
    "bookkeeping); error: the task raised", ["model", "outcome"])
TASK_SECONDS = Histogram(
    "scalecap_worker_task_seconds", "Seconds one caption task (a chunk of up to SCALECAP_CHUNK_SIZE "
    "images: claim, load, chain, sink writes, finish) spent in the worker", ["model"], buckets=JOB_BUCKETS)
IMAGE_SECONDS = Histogram(
    "scalecap_worker_image_seconds", "Seconds one image's chain ran on the engine (returned records)",
    ["model"], buckets=JOB_BUCKETS)
STAGE_SECONDS = Histogram(
    "scalecap_worker_stage_seconds", "Seconds per chain stage of one image (record meta.stage_seconds)",
    ["model", "stage"], buckets=STAGE_BUCKETS)
TOKENS = Counter(
    "scalecap_worker_tokens", "Tokens the engine read (prompt) and wrote (completion) for records",
    ["model", "kind"])
RECORD_ERRORS = Counter(
    "scalecap_worker_record_errors", "Error records (bad image, engine failure) by stage and type",
    ["model", "stage", "type"])
IN_FLIGHT = Gauge("scalecap_worker_images_in_flight", "Images in this worker's chain now", ["model"])
ENGINE_START = Gauge(
    "scalecap_worker_engine_start_seconds", "Seconds the engine took to start", ["model", "backend"])
ENGINE_STARTED = Gauge(
    "scalecap_worker_engine_started_timestamp_seconds", "Unix time the engine finished starting",
    ["model", "backend"])
RETRIES = Counter(
    "scalecap_worker_retries", "Work sent back to the queue for another attempt: reason retry (an "
    "image's charged failure) or requeue (sink outage) per image; an exception type when the "
    "whole task was retried (Redis down)", ["model", "task", "reason"])
DEAD_LETTERS = Counter(
    "scalecap_worker_dead_letters", "Jobs this worker moved to the dead-letter list", ["model"])
WEBHOOKS = Counter(
    "scalecap_worker_webhooks", "Webhook delivery attempts of an I/O worker: delivered, not_delivered "
    "(this attempt failed and a retry is scheduled or the event gave up, or nothing to send), error "
    "(the task raised)", ["outcome"])
READY = Gauge("scalecap_worker_ready", "1 while ready: engine up, consuming, live, not shutting down")
HEARTBEAT_AGE = Gauge(
    "scalecap_worker_heartbeat_age_seconds",
    "Seconds since the engine's event loop last ran its heartbeat (0 before the engine loop exists)")
INFO = Gauge("scalecap_worker_info", "What this worker runs (always 1; join on instance for the model)",
             ["model", "backend", "queues", "hostname"])


class Health:
    """Liveness and readiness of one worker, fed by the heartbeat and the task signals."""

    def __init__(self, *, heartbeat_max_age: float = 60.0, stall_timeout: float = 1800.0) -> None:
        self.heartbeat_max_age = heartbeat_max_age
        self.stall_timeout = stall_timeout
        self.engine_ready = False
        self.consuming = False
        self.shutting_down = False
        self.last_beat: float | None = None
        self.last_progress = time.monotonic()
        self.in_flight = 0
        self._lock = threading.Lock()

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def heartbeat_age(self) -> float:
        return 0.0 if self.last_beat is None else time.monotonic() - self.last_beat

    def image_started(self) -> None:
        with self._lock:
            if self.in_flight == 0:
                self.last_progress = time.monotonic()  # an idle worker has not stalled
            self.in_flight += 1

    def image_finished(self, *, completed: bool) -> None:
        """`completed`: the chain returned a record (an error record too: the engine answered).
        A chain that raised or was cancelled is no progress."""
        with self._lock:
            self.in_flight = max(0, self.in_flight - 1)
            if completed:
                self.last_progress = time.monotonic()

    def problems(self) -> list[str]:
        """Why this worker is not live; empty when it is."""
        out = []
        age = self.heartbeat_age()
        if age > self.heartbeat_max_age:
            out.append(f"engine event loop silent for {age:.0f} s (limit {self.heartbeat_max_age:g} s)")
        with self._lock:
            idle_for = time.monotonic() - self.last_progress
            if self.in_flight and idle_for > self.stall_timeout:
                out.append(f"{self.in_flight} image(s) in flight and none finished for {idle_for:.0f} s "
                           f"(limit {self.stall_timeout:g} s)")
        return out

    def report(self) -> dict[str, Any]:
        problems = self.problems()
        ready = not problems and self.engine_ready and self.consuming and not self.shutting_down
        with self._lock:
            in_flight, idle_for = self.in_flight, time.monotonic() - self.last_progress
        return {
            "live": not problems,
            "ready": ready,
            "problems": problems,
            "engine_ready": self.engine_ready,
            "consuming": self.consuming,
            "shutting_down": self.shutting_down,
            "in_flight": in_flight,
            "heartbeat_age_s": round(self.heartbeat_age(), 3),
            "seconds_since_progress": round(idle_for, 3),
        }


_model = ""
_health = Health()
HEARTBEAT_AGE.set_function(lambda: _health.heartbeat_age())
READY.set_function(lambda: 1.0 if _health.report()["ready"] else 0.0)
_starts: dict[str, float] = {}
_beating: Future[None] | None = None


def health() -> Health:
    return _health


def configure(settings: Any, *, io: bool, queues: list[str], hostname: str) -> None:
    """Name this worker in every metric and set its health limits (the worker CLI calls this once,
    with its `scalecap.settings.Settings`)."""
    global _model
    _model = "" if io else settings.model
    _health.heartbeat_max_age = settings.heartbeat_max_age
    _health.stall_timeout = settings.stall_timeout
    if io:
        _health.engine_ready = True  # an I/O worker has no engine to wait for
    INFO.labels(_model, "" if io else settings.backend, ",".join(queues), hostname).set(1)


# -- records and engine ---------------------------------------------------------------------------

def observe_record(record: dict[str, Any]) -> dict[str, Any]:
    """Count one record's stage seconds, tokens and error; returns it unchanged."""
    meta = record.get("meta") if isinstance(record, dict) else None
    if isinstance(meta, dict):
        for stage, seconds in (meta.get("stage_seconds") or {}).items():
            if isinstance(seconds, (int, float)):
                STAGE_SECONDS.labels(_model, str(stage)).observe(seconds)
        tokens = meta.get("tokens") or {}
        for kind in ("prompt", "completion"):
            n = tokens.get(kind)
            if isinstance(n, int) and n > 0:
                TOKENS.labels(_model, kind).inc(n)
    error = record.get("error") if isinstance(record, dict) else None
    if isinstance(error, dict):
        RECORD_ERRORS.labels(_model, str(error.get("stage", "")), str(error.get("type", ""))).inc()
    return record


async def track(chain_call: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Await one image's chain on the engine's loop, counting it in flight until it returns (or
    raises, or is cancelled at the job timeout). Only a returned record is progress."""
    IN_FLIGHT.labels(_model).inc()
    _health.image_started()
    started = time.monotonic()
    completed = False
    try:
        record = await chain_call
        completed = True
        IMAGE_SECONDS.labels(_model).observe(time.monotonic() - started)
        return record
    finally:
        IN_FLIGHT.labels(_model).dec()
        _health.image_finished(completed=completed)


def engine_started(model: str, backend: str, seconds: float) -> None:
    ENGINE_START.labels(model, backend).set(seconds)
    ENGINE_STARTED.labels(model, backend).set(time.time())
    _health.engine_ready = True


def start_heartbeat(loop: Any, interval: float = 1.0) -> Future[None]:
    """Beat from inside the engine's event loop (a `scalecap.runtime.BackgroundLoop`): if anything
    blocks that loop, the beats stop and /healthz says so. Cancel the returned future to stop."""

    async def heartbeat() -> None:
        while True:
            _health.beat()
            await asyncio.sleep(interval)

    global _beating
    _health.beat()
    _beating = loop.submit(heartbeat())
    return _beating


def stop_heartbeat() -> None:
    """Before the engine's loop stops (a pending heartbeat would be reported as destroyed)."""
    if _beating is not None:
        _beating.cancel()


# -- Celery signals -------------------------------------------------------------------------------

def _prerun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    if getattr(sender, "name", None) == TASK_CAPTION and task_id:
        _starts[task_id] = time.monotonic()


def _postrun(sender: Any = None, task_id: str | None = None, retval: Any = None,
             state: str | None = None, **_: Any) -> None:
    name = getattr(sender, "name", None)
    if name == TASK_CAPTION:
        started = _starts.pop(task_id or "", None)
        if started is None:
            return
        TASK_SECONDS.labels(_model).observe(time.monotonic() - started)
        if isinstance(retval, dict):  # workers.jobs.process_chunk: {outcome: images}
            for outcome, n in retval.items():
                if not isinstance(n, int) or n <= 0:
                    continue
                IMAGES.labels(_model, str(outcome)).inc(n)
                if outcome == ClaimCode.DEAD:  # claim and finish both answer DEAD
                    DEAD_LETTERS.labels(_model).inc(n)
                elif outcome in (RunOutcome.RETRY, RunOutcome.REQUEUE):
                    RETRIES.labels(_model, TASK_CAPTION, str(outcome)).inc(n)
        elif state not in ("RETRY", "SUCCESS"):
            IMAGES.labels(_model, "error").inc()
    elif name == TASK_WEBHOOK and state in ("SUCCESS", "FAILURE"):
        outcome = "delivered" if retval is True else "error" if state == "FAILURE" else "not_delivered"
        WEBHOOKS.labels(outcome).inc()


def _retry(sender: Any = None, reason: Any = None, **_: Any) -> None:
    cause = getattr(reason, "exc", None) or reason
    RETRIES.labels(_model, str(getattr(sender, "name", "")), type(cause).__name__).inc()


def _worker_ready(**_: Any) -> None:
    _health.consuming = True


def _shutting_down(**_: Any) -> None:
    _health.shutting_down = True


def install_signals() -> None:
    """Connect the task and worker signals (idempotent; Celery signals are process-wide)."""
    from celery import signals

    for signal, handler in ((signals.task_prerun, _prerun), (signals.task_postrun, _postrun),
                            (signals.task_retry, _retry), (signals.worker_ready, _worker_ready),
                            (signals.worker_shutting_down, _shutting_down)):
        signal.connect(handler, weak=False, dispatch_uid=f"scalecap.metrics.{handler.__name__}")


# -- HTTP -----------------------------------------------------------------------------------------

class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: no log lines
        pass


def app(registry: Any = REGISTRY) -> Any:
    """The WSGI app: /healthz and /readyz here, everything else is prometheus_client's /metrics."""
    metrics = make_wsgi_app(registry)

    def wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            report = _health.report()
            ok = report["live"] if path == "/healthz" else report["ready"]
            body = json.dumps(report).encode()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        return metrics(environ, start_response)

    return wsgi


def serve(host: str, port: int) -> WSGIServer:
    """Answer /metrics, /healthz and /readyz on a daemon thread; returns the server (its port
    is `server.server_port`, useful with port 0)."""
    server = make_server(host, port, app(), _Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="scalecap-metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics (health: /healthz, /readyz)", host, server.server_port)
    return server
