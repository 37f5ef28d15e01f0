"""/healthz (the process answers), /readyz (Redis answers and workers hold the model), /metrics.

Workers are seen one of two ways, as the fleet is configured:
- `SCALECAP_REMOTE_CONTROL` on: Celery's `inspect active_queues` broadcast (1 s timeout), which
  names the queues each worker consumes;
- off (Celery ignores broadcasts then): worker heartbeats in Redis (scalecap/fleet/presence.py),
  fresh for 30 s after a worker's last beat.
Either answer is cached for a few seconds so probes cannot flood the broker.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from producer.api.admission import queue_for
from producer.api.models import MODEL_PATTERN, Health, Readiness
from producer.api.params import no_unknown_query
from producer.api.problems import responses
from scalecap.fleet import presence as worker_presence

router = APIRouter(tags=["health"], dependencies=[Depends(no_unknown_query)])

CACHE_SECONDS = 5.0
INSPECT_TIMEOUT = 1.0


@router.get("/healthz", response_model=Health, summary="The API process answers")
def healthz() -> Any:
    return Health(status="ok")


def _remote_control(settings: Any) -> bool:
    return bool(getattr(settings, "remote_control", True))


def _consumers(client: Any) -> dict[str, list[str]]:
    """queue -> nodes consuming it, from one `inspect active_queues` broadcast."""
    replies = client.app.control.inspect(timeout=INSPECT_TIMEOUT).active_queues() or {}
    out: dict[str, list[str]] = {}
    for node, queues in replies.items():
        for q in queues or []:
            out.setdefault(str(q.get("name")), []).append(node)
    return out


def workers_for(request: Request, queue: str) -> tuple[list[str], str]:
    """Nodes consuming `queue`, and the signal that saw them; answers are cached a few seconds."""
    st = request.app.state
    cache: dict[str, tuple[float, Any]] = st.ready_cache
    if _remote_control(st.settings):
        hit = cache.get("inspect")
        if not hit or time.monotonic() - hit[0] >= CACHE_SECONDS:
            hit = cache["inspect"] = (time.monotonic(), _consumers(st.client))
        return sorted(hit[1].get(queue, [])), "inspect"
    hit = cache.get(queue)
    if not hit or time.monotonic() - hit[0] >= CACHE_SECONDS:
        if len(cache) > 256:
            cache.clear()
        hit = cache[queue] = (time.monotonic(), worker_presence.seen(st.client.redis, queue))
    return list(hit[1]), "heartbeat"


@router.get("/readyz", response_model=Readiness, summary="Redis reachable and workers seen for the model",
            responses={503: {"model": Readiness, "description": "Not ready"}, **responses(400)})
def readyz(request: Request,
           model: str | None = Query(default=None, max_length=512, pattern=MODEL_PATTERN,
                                     description="Model to check (default: the server's)")) -> Any:
    settings = request.app.state.settings
    model = model or settings.model
    queue = queue_for(model)
    try:
        redis_ok = bool(request.app.state.client.redis.ping())
    except Exception:
        redis_ok = False
    workers: list[str] = []
    signal = "inspect" if _remote_control(settings) else "heartbeat"
    detail = None
    if redis_ok:
        try:
            workers, signal = workers_for(request, queue)
        except Exception as exc:
            detail = f"cannot ask the workers: {type(exc).__name__}"
        if not workers and detail is None:
            detail = f"no worker seen consuming {queue}"
    else:
        detail = "Redis does not answer"
    ready = redis_ok and bool(workers)
    body = Readiness(status="ready" if ready else "not ready", redis=redis_ok, model=model, queue=queue,
                     workers=workers, signal=signal, detail=detail)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics of the API and the fleet it sees",
            response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}})
def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


__all__ = ["router", "workers_for"]
