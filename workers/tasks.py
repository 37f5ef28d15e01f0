"""Celery task bindings: thin wrappers over workers.jobs (the protocol) and webhook delivery.

The webhook task makes one attempt per delivery (workers/webhook_task.py); a retryable failure
replaces the pending event in the `webhook_retries` sorted set by its next attempt (due time =
backoff), which the I/O worker's maintenance loop hands back to the event's lane when due. No
task sleeps, and nothing waits in a worker's memory for an ETA.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery

from scalecap.fleet.protocol import (
    TASK_CAPTION,
    TASK_WEBHOOK,
    Chunk,
    JobMessage,
)
from scalecap.settings import Settings
from workers.webhook_task import results_location, webhook_secret  # noqa: F401 (their old home)

log = logging.getLogger(__name__)

_ctx_lock = threading.Lock()

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
        from workers.sink_gate import SinkDown

        msg = JobMessage.from_json(job)
        try:
            return process_chunk(context(), msg)
        except SinkDown as exc:  # nothing claimed: the message comes back when a probe is due
            raise self.retry(countdown=exc.delay, exc=exc) from exc
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
