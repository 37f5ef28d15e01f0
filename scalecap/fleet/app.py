"""The Celery app, built from Settings so producers and workers agree on every delivery rule.

Shared by producers (which only send tasks by name) and workers (which register them in
workers.tasks), so it lives beside the queue protocol; Celery is imported only when an app is made.

Delivery is at-least-once: acks happen after the task returns (`task_acks_late`), each worker
thread reserves one message at a time (`worker_prefetch_multiplier=1`), and Redis hands an
unacknowledged message to another worker after `visibility_timeout`. `task_reject_on_worker_lost`
stays on but does nothing with the thread pool the workers use: leases, the reconciler and the
quarantine lane take its place (docs/protocol.md). Exactly-once *effects* come from the queue protocol (atomic
state transitions and idempotent sink keys), not from the broker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scalecap.fleet.protocol import (
    IO_QUEUE,
    TASK_CAPTION,
    TASK_WEBHOOK,
    gpu_queue,
)
from scalecap.settings import Settings

if TYPE_CHECKING:
    from celery import Celery


def transport_options(settings: Settings) -> dict[str, Any]:
    """Redis transport options; the restore sweep runs often enough for the visibility timeout.

    kombu scans for expired unacknowledged messages every `interval * throttle` seconds (100 s by
    default), which would dwarf a short visibility timeout; scale the sweep with it instead.
    The sweep holds a Redis mutex that expires after 300 s by default: a worker killed while
    holding it (a poison job's os._exit, an OOM kill) would stop every restore in the fleet for
    five minutes, so it expires with the visibility timeout too.
    """
    vt = int(settings.visibility_timeout)
    return {
        "visibility_timeout": vt,
        "unacked_restore_interval": max(1, min(10, vt // 5)),
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": max(5, min(60, vt)),
    }


def create_app(settings: Settings | None = None, *, name: str = "scalecap") -> Celery:
    """A Celery app bound to `settings.broker_url`; tasks are registered by workers.tasks."""
    from celery import Celery

    settings = settings or Settings.from_env()
    from scalecap.fleet.redis import broker_use_ssl, celery_broker_url

    app = Celery(name, broker=celery_broker_url(settings.broker_url), set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_routes={
            TASK_WEBHOOK: {"queue": IO_QUEUE},
            # Caption jobs name their model's queue when sent; this is the fallback.
            TASK_CAPTION: {"queue": settings.queue or gpu_queue(settings.model)},
        },
        task_default_queue=IO_QUEUE,
        worker_hijack_root_logger=False,
        # Task events (and worker heartbeats, see workers/cli.py) are what Flower shows.
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        # Off unless SCALECAP_REMOTE_CONTROL: anyone who can publish to the broker could
        # otherwise shut workers down, change rate limits or read their state (docs/security.md).
        worker_enable_remote_control=settings.remote_control,
        broker_use_ssl=broker_use_ssl(settings.broker_url, settings),
        broker_heartbeat=0,
    )
    app.conf.scalecap_settings = settings
    return app

