"""Prometheus metrics of the API process, on its own registry (one per app), served at /metrics.

- `scalecap_api_requests_total{method,route,code}` and
  `scalecap_api_request_duration_seconds{method,route}`: every request, labelled by the route's
  template (`/v1/batches/{batch_id}`), never by raw paths, so ids cannot blow up the series;
- `scalecap_api_queue_depth{model,queue}`: messages waiting in each model's Celery queue (LLEN of
  the queue's Redis lists, as Celery's docs measure it, and what KEDA scales on), for the server's
  model and every model of the recent batches; a message is a chunk of up to SCALECAP_CHUNK_SIZE
  images, so `scalecap_api_queued_images{model,queue}` gives the images queued for that queue
  (the protocol's own counter, the one submit backpressure reads);
- `scalecap_api_batches{state}` and `scalecap_api_images{state}`: the most recent
  `RECENT_BATCHES` batches by state, and their images by state;
- `scalecap_api_submissions_in_flight`: submissions still publishing in the background.
Gauges are read from Redis when scraped, so every API replica reports the same fleet.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from scalecap.fleet.outcomes import BatchState, JobState
from scalecap.fleet.protocol import gpu_queue, queue_queued_key

log = logging.getLogger(__name__)

RECENT_BATCHES = 500
"""Batches (newest first) that the batch and image gauges count."""
PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
"""kombu's Redis transport keeps priority levels in lists with these suffixes."""
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class FleetCollector(Collector):
    def __init__(self, client: Any, settings: Any, submitter: Any) -> None:
        self.client = client
        self.settings = settings
        self.submitter = submitter

    def collect(self) -> Any:
        depth = GaugeMetricFamily("scalecap_api_queue_depth",
                                  "Caption jobs waiting in each model's queue", labels=["model", "queue"])
        queued = GaugeMetricFamily("scalecap_api_queued_images",
                                   "Images queued for each model's queue (all chunks, both lanes)",
                                   labels=["model", "queue"])
        batches = GaugeMetricFamily("scalecap_api_batches",
                                    f"The {RECENT_BATCHES} most recent batches by state", labels=["state"])
        images = GaugeMetricFamily("scalecap_api_images",
                                   f"Images of the {RECENT_BATCHES} most recent batches by state",
                                   labels=["state"])
        inflight = GaugeMetricFamily("scalecap_api_submissions_in_flight",
                                     "Submissions still publishing jobs in the background")
        inflight.add_metric([], float(getattr(self.submitter, "in_flight", 0)))
        try:
            recent = self.client.list_batches(None, offset=0, limit=RECENT_BATCHES)
            models = {self.settings.model: gpu_queue(self.settings.model)}
            by_state: Tally[str] = Tally()
            by_image: Tally[str] = Tally()
            for st in recent:
                by_state[st["state"]] += 1
                for s in JobState:
                    by_image[s] += int(st.get(s) or 0)
                if st.get("model") and st.get("queue"):
                    models.setdefault(st["model"], st["queue"])
            for state in BatchState:
                by_state.setdefault(state, 0)
            for state, n in sorted(by_state.items()):
                batches.add_metric([state], n)
            for state, n in sorted(by_image.items()):
                images.add_metric([state], n)
            pipe = self.client.redis.pipeline(transaction=False)
            for q in models.values():
                for suffix in PRIORITY_SUFFIXES:
                    pipe.llen(q + suffix)
                pipe.get(queue_queued_key(q))
            values = pipe.execute()
            per = len(PRIORITY_SUFFIXES) + 1
            for i, (model, q) in enumerate(models.items()):
                row = values[i * per : (i + 1) * per]
                depth.add_metric([model, q], sum(row[:-1]))
                queued.add_metric([model, q], max(0, int(row[-1] or 0)))
        except Exception as exc:  # Redis down: the request metrics still come out
            log.warning("fleet metrics unavailable: %s", type(exc).__name__)
        yield from (depth, queued, batches, images, inflight)


class ApiMetrics:
    """The registry of one app, its request metrics, and the ASGI middleware that feeds them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("scalecap_api_requests", "HTTP requests by route and status code",
                                ["method", "route", "code"], registry=self.registry)
        self.latency = Histogram("scalecap_api_request_duration_seconds",
                                 "Seconds from request to the end of the response, by route",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)

    def add_fleet(self, collector: FleetCollector) -> None:
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware (streamed responses pass through untouched) that times each request."""

    def __init__(self, app: Any, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        code = [500]

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                code[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, route, str(code[0])).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)


__all__ = ["ApiMetrics", "FleetCollector", "MetricsMiddleware"]
