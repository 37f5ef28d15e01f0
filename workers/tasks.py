"""Celery task bindings: thin wrappers over workers.jobs (the protocol) and webhook delivery.

The webhook task makes one attempt per delivery; a retryable failure schedules the next attempt
in the `webhook_retries` sorted set (due time = backoff), which the I/O worker's maintenance
loop moves back into the event's lane when due. No task sleeps, and nothing waits in a worker's
memory for an ETA.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

from celery import Celery

from scalecap.fleet.layout import results_prefix
from scalecap.fleet.protocol import (
    EVENT_JOB_COMPLETED,
    TASK_CAPTION,
    TASK_WEBHOOK,
    WEBHOOK_ATTEMPTS_KEPT,
    WEBHOOK_RETRIES_KEY,
    Chunk,
    JobMessage,
    batch_key,
    counts,
    webhook_attempts_key,
)
from scalecap.retry import next_delay
from scalecap.settings import Settings

log = logging.getLogger(__name__)

_ctx_lock = threading.Lock()
WEBHOOK_BACKOFF_BASE = 2.0
"""Seconds: the first webhook retry waits up to this, then up to 4x more each time (2, 8, 32...)."""


def results_location(batch: dict[str, str], batch_id: str) -> str:
    """Where a batch's records are, for thin payloads: an S3 prefix or the Redis key prefix.

    Complete: a record reused from an earlier batch is copied under this batch's prefix."""
    sink = batch.get("sink", "")
    if sink.startswith("s3://"):
        return f"{sink.rstrip('/')}/{batch_id}/"
    return "redis://" + results_prefix(batch_id)


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
    from scalecap.fleet import failpoints

    failpoints.install_kombu_hook()  # tests only: `after_pop`, between kombu's pop and its unacked write

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
    def deliver_webhook(self: Any, event: dict[str, Any]) -> bool:
        """One attempt at one event; a retryable failure is scheduled, not slept on."""
        from workers.webhook_delivery import deliver_event, event_payload

        ctx = context()
        batch_id, kind, job_id = event["batch_id"], event["type"], event.get("job_id")
        attempt = int(event.get("attempt", 1))
        batch = ctx.store.batch(batch_id)
        if not batch or not batch.get("webhook"):
            return False
        key = webhook_attempts_key(batch_id)
        if kind == EVENT_JOB_COMPLETED and job_id:
            job = ctx.store.job(batch_id, job_id) or {}
            payload = event_payload(kind, batch_id, counts(batch), job.get("location") or None,
                                    job_id=job_id, status=job.get("state"), timestamp=_iso(event.get("at")))
        else:
            status = "cancelled" if batch.get("cancel_requested") == "1" else "completed"
            payload = event_payload(kind, batch_id, counts(batch), results_location(batch, batch_id),
                                    status=status, timestamp=_iso(event.get("at")))
        secret = webhook_secret(ctx.redis, batch, settings.webhook_secret)

        def record(entry: dict[str, Any]) -> None:
            pipe = ctx.redis.pipeline(transaction=False)
            pipe.rpush(key, json.dumps({"type": kind, "webhook_id": event["id"],
                                        **({"job_id": job_id} if job_id else {}), **entry}))
            pipe.ltrim(key, -WEBHOOK_ATTEMPTS_KEPT, -1)
            if settings.retention > 0:
                pipe.expire(key, settings.retention)
            pipe.execute()

        if not secret:
            log.error("batch %s: no SCALECAP_WEBHOOK_SECRET on this worker; webhook not sent", batch_id)
            record({"attempt": 0, "status": None, "error": "no webhook secret configured"})
            return False
        started = time.monotonic()
        outcome = deliver_event(
            batch["webhook"], payload, secret=secret, redis_client=None, attempts_key=key,
            timeout=settings.webhook_timeout, allow_private=settings.allow_private_urls,
            msg_id=event["id"], attempt=attempt,
        )
        record({"attempt": attempt, "at": _iso(time.time()), "status": outcome.last_status,
                "error": outcome.last_error, "duration_ms": round((time.monotonic() - started) * 1000, 1)})
        status_field = None
        if outcome.delivered:
            status_field = "delivered"
        else:
            if outcome.temporary and attempt < settings.webhook_max_attempts:
                # the receiver's Retry-After when it said when to come back, else the backoff
                delay = next_delay(attempt, base=WEBHOOK_BACKOFF_BASE, factor=4.0,
                                   cap=settings.webhook_retry_max_delay, server_says=outcome.retry_after)
                due = ctx.store.now() + delay  # Redis' clock, as the drain reads it
                ctx.redis.zadd(WEBHOOK_RETRIES_KEY, {json.dumps({**event, "attempt": attempt + 1}): due})
                status_field = "retrying"
            else:
                status_field = "failed"
        if kind != EVENT_JOB_COMPLETED:
            ctx.redis.hset(batch_key(batch_id), "webhook_status", status_field)
        return outcome.delivered

    app.conf.scalecap_tasks = {"caption": caption, "deliver_webhook": deliver_webhook}
    app.conf.scalecap_context = context
    return app
