"""Celery task bindings: thin wrappers over workers.jobs (the protocol) and webhook delivery.

The webhook task makes one attempt per delivery (workers/webhook_task.py); a retryable failure
replaces the pending event in the `webhook_retries` sorted set by its next attempt (due time =
backoff), which the I/O worker's maintenance loop hands back to the event's lane when due. No
task sleeps, and nothing waits in a worker's memory for an ETA.
"""

from __future__ import annotations

import logging
import random
import threading
from datetime import UTC, datetime
from typing import Any

from celery import Celery

from scalecap.fleet.protocol import (
    TASK_CAPTION,
    TASK_WEBHOOK,
    Chunk,
    JobMessage,
)
from scalecap.settings import Settings

log = logging.getLogger(__name__)

_ctx_lock = threading.Lock()
_RETRY_STATUSES = frozenset({408, 425, 429})


def results_location(batch: dict[str, str], batch_id: str) -> str:
    """Where a batch's records are, for thin payloads: an S3 prefix or the Redis key prefix.

    Complete: a record reused from an earlier batch is copied under this batch's prefix."""
    sink = batch.get("sink", "")
    if sink.startswith("s3://"):
        return f"{sink.rstrip('/')}/{batch_id}/"
    return f"redis://scalecap:result:{batch_id}:"


def webhook_retry_delay(attempt: int, cap: float) -> float:
    """Seconds before attempt `attempt + 1`: 2, 8, 32, 128 s ... up to `cap`, equal jitter."""
    full = min(cap, 2.0 * 4 ** max(0, attempt - 1))
    return full / 2 + random.uniform(0, full / 2)


def webhook_secret(redis_client: Any, batch: dict[str, str], default: str | None) -> str | None:
    """The batch owner's own secret (HTTP API keys) when there is one, else the fleet's."""
    owner = batch.get("owner")
    if owner:
        try:
            from scalecap.fleet.keys import KeyStore  # the HTTP API's key store, when installed
        except ImportError:
            KeyStore = None
        if KeyStore is not None:
            try:
                secret = KeyStore(redis_client).webhook_secret(owner)
            except Exception as exc:  # a broken key record must not stop the fleet's webhooks
                log.warning("batch owner %s: webhook secret lookup failed: %s", owner, exc)
                secret = None
            if secret:
                return secret
    return default


def _iso(at: Any) -> str | None:
    try:
        t = datetime.fromtimestamp(float(at), UTC)
    except (TypeError, ValueError):
        return None
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def register_tasks(app: Celery) -> Celery:
    """Add the fleet's tasks to `app` (a worker's; producers only send by name)."""
    settings: Settings = app.conf.scalecap_settings
    state: dict[str, Any] = {}

    def publish(chunk: Chunk, countdown: float) -> None:
        from scalecap.fleet.reconcile import publish_chunk

        publish_chunk(app, chunk, settings.chunk_size, countdown)

    def context() -> Any:
        with _ctx_lock:
            if "ctx" not in state:
                from scalecap.fleet.redis import redis_client
                from workers.jobs import JobContext

                client = redis_client(settings.broker_url, settings)
                results = redis_client(settings.results_url, settings) if settings.results_url else None
                state["ctx"] = JobContext(settings, client, publish=publish, results_client=results)
            return state["ctx"]

    @app.task(name=TASK_CAPTION, bind=True, max_retries=None, acks_late=True)
    def caption(self: Any, job: dict[str, Any]) -> dict[str, int]:
        import redis

        from workers.jobs import process_chunk

        msg = JobMessage.from_json(job)
        try:
            return process_chunk(context(), msg)
        except redis.RedisError as exc:  # Redis restarting: the whole chunk again, later
            raise self.retry(countdown=2.0, exc=exc) from exc

    @app.task(name=TASK_WEBHOOK, bind=True, max_retries=0, acks_late=True)
    def deliver_webhook(self: Any, event: dict[str, Any], member: str | None = None) -> bool:
        """One attempt at one handed-over event (workers/webhook_task.py); an error leaves it due."""
        from workers.webhook_task import deliver_webhook_event

        return deliver_webhook_event(context(), settings, event, member)

    app.conf.scalecap_tasks = {"caption": caption, "deliver_webhook": deliver_webhook}
    app.conf.scalecap_context = context
    return app
