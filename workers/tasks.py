"""Celery task bindings: thin wrappers over workers.jobs (the protocol) and webhook delivery."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery

from scalecap.queue_app import enqueue_completion
from scalecap.queue_protocol import (
    EVENT_BATCH_COMPLETED,
    EVENT_JOB_COMPLETED,
    IO_QUEUE,
    TASK_CAPTION,
    TASK_WEBHOOK,
    JobMessage,
    batch_key,
    counts,
    webhook_attempts_key,
)
from scalecap.settings import Settings

log = logging.getLogger(__name__)

_ctx_lock = threading.Lock()


def enqueue_job_event(app: Celery, batch_id: str, job_id: str) -> None:
    """A job of a batch that asked for per-job events reached a final state."""
    app.send_task(TASK_WEBHOOK, args=[batch_id, EVENT_JOB_COMPLETED, job_id], queue=IO_QUEUE)


def results_location(batch: dict[str, str], batch_id: str) -> str:
    """Where a batch's records are, for thin payloads: an S3 prefix or the Redis key prefix."""
    sink = batch.get("sink", "")
    if sink.startswith("s3://"):
        return f"{sink.rstrip('/')}/{batch_id}/"
    return f"redis://scalecap:result:{batch_id}:"


def register_tasks(app: Celery) -> Celery:
    """Add the fleet's tasks to `app` (a worker's; producers only send by name)."""
    settings: Settings = app.conf.scalecap_settings
    state: dict[str, Any] = {}

    def context() -> Any:
        with _ctx_lock:
            if "ctx" not in state:
                import redis

                from workers.jobs import JobContext

                client = redis.Redis.from_url(settings.broker_url)
                state["ctx"] = JobContext(
                    settings,
                    client,
                    on_completed=lambda b: enqueue_completion(app, state["ctx"].store, b),
                    on_job_final=lambda b, j: enqueue_job_event(app, b, j),
                )
            return state["ctx"]

    @app.task(name=TASK_CAPTION, bind=True, max_retries=None, acks_late=True)
    def caption(self: Any, job: dict[str, Any]) -> str:
        import redis

        from workers.jobs import RetryJob, process_caption

        msg = JobMessage.from_json(job)
        try:
            return process_caption(context(), msg)
        except RetryJob as exc:
            raise self.retry(countdown=exc.countdown, exc=exc.cause) from exc
        except redis.RedisError as exc:
            raise self.retry(countdown=2.0, exc=exc) from exc

    @app.task(name=TASK_WEBHOOK, bind=True, max_retries=3, acks_late=True)
    def deliver_webhook(
        self: Any, batch_id: str, kind: str = EVENT_BATCH_COMPLETED, job_id: str | None = None
    ) -> bool:
        from workers.webhook_delivery import deliver_event, event_payload

        ctx = context()
        batch = ctx.store.batch(batch_id)
        if not batch or not batch.get("webhook"):
            return False
        key = webhook_attempts_key(batch_id)
        if kind == EVENT_JOB_COMPLETED and job_id:
            job = ctx.store.job(batch_id, job_id) or {}
            event = event_payload(kind, batch_id, counts(batch), job.get("location") or None,
                                  job_id=job_id, status=job.get("state"))
        else:
            status = "cancelled" if batch.get("cancel_requested") == "1" else "completed"
            event = event_payload(kind, batch_id, counts(batch), results_location(batch, batch_id),
                                  status=status)
        if not settings.webhook_secret:
            log.error("batch %s: no SCALECAP_WEBHOOK_SECRET on this worker; webhook not sent", batch_id)
            ctx.redis.rpush(key, '{"attempt": 0, "error": "no webhook secret configured"}')
            return False
        outcome = deliver_event(
            batch["webhook"],
            event,
            secret=settings.webhook_secret,
            redis_client=ctx.redis,
            attempts_key=key,
            timeout=settings.webhook_timeout,
            max_attempts=settings.webhook_max_attempts,
            allow_private=settings.allow_private_urls,
        )
        if kind == EVENT_BATCH_COMPLETED:
            ctx.redis.hset(batch_key(batch_id), "webhook_status",
                           "delivered" if outcome.delivered else "failed")
        return outcome.delivered

    app.conf.scalecap_tasks = {"caption": caption, "deliver_webhook": deliver_webhook}
    return app
