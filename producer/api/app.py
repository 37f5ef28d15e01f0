"""The HTTP API's app factory: routes, auth, problem details, limits, CORS and metrics in one place.

`create_app(settings, client=...)` builds everything from one Settings object; state the routes
share lives on `app.state` (settings, client, keys, quota, submitter, metrics), which the viewer
(producer/api/web.py) reuses.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from producer.api import batches, captions, health, problems, web
from producer.api.limits import BodyLimitMiddleware
from producer.api.metrics import ApiMetrics, FleetCollector, MetricsMiddleware
from producer.api.models import BatchRequest, CaptionRequest
from producer.api.quota import Quota
from producer.api.submission import Submitter
from producer.client import FleetClient
from scalecap.fleet.keys import KeyStore
from scalecap.settings import Settings

log = logging.getLogger(__name__)

DESCRIPTION = """Submit images to the ScaleCap fleet over HTTP, follow batches, read captions.

Every `/v1` route needs `Authorization: Bearer <key>` (keys come from `scalecap keys create`).
A key sees only its own batches; an admin key sees all. Errors are RFC 9457 problem details.
"""


def create_app(settings: Settings | None = None, *, client: FleetClient | None = None) -> FastAPI:
    settings = settings or (client.settings if client is not None else Settings.from_env())
    client = client or FleetClient(settings)
    submitter = Submitter(client)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        submitter.close()  # let accepted submissions finish publishing

    app = FastAPI(title="ScaleCap Fleet API", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.client = client
    app.state.keys = KeyStore(client.redis)
    app.state.quota = Quota(client)
    app.state.submitter = submitter
    app.state.ready_cache = {}
    app.state.metrics = ApiMetrics()
    app.state.metrics.add_fleet(FleetCollector(client, settings, submitter))

    problems.install(app)
    app.include_router(health.router)
    app.include_router(batches.router)
    app.include_router(captions.router)
    app.include_router(web.router)  # the viewer at / (HTML, not in the OpenAPI schema)

    # Middleware: the last added is the outermost. Metrics see every answer, limits included.
    app.add_middleware(BodyLimitMiddleware, max_body=settings.api_max_body_bytes,
                       max_upload=settings.api_max_upload_bytes)
    if settings.api_cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.api_cors_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key"])
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (BatchRequest, CaptionRequest):
                comps[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
            app.openapi_schema = problems.rewrite_openapi(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


__all__ = ["create_app"]
