"""Every error of the HTTP API in one shape: RFC 9457 problem details (application/problem+json).

`{"type", "title", "status", "detail", "instance"}` plus, where useful, `errors` (which field of
the request was wrong). Bad input is always a 4xx with a message that names the problem; a 5xx
means a bug or an unreachable Redis, and its detail never echoes internals.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from scalecap.config import ConfigFieldError
from scalecap.errors import ConfigError

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"
_TYPE = "urn:scalecap:problem:"


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = Field(description="URI naming the kind of problem",
                      examples=["urn:scalecap:problem:not-found"])
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="Per-field errors of a request that did not validate")


class ApiProblem(Exception):
    """Raise anywhere in a route to answer with a problem."""

    def __init__(self, status: int, kind: str, detail: str, *, headers: dict[str, str] | None = None,
                 errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail
        self.headers = headers or {}
        self.errors = errors


def bad_request(detail: str, kind: str = "bad-request") -> ApiProblem:
    return ApiProblem(400, kind, detail)


def not_found(detail: str = "no such batch") -> ApiProblem:
    return ApiProblem(404, "not-found", detail)


def problem_response(request: Request | None, status: int, kind: str, detail: str | None, *,
                     headers: dict[str, str] | None = None,
                     errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body: dict[str, Any] = {"type": _TYPE + kind, "title": title, "status": status, "detail": detail,
                            "instance": request.url.path if request is not None else None}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers, media_type=MEDIA_TYPE)


def config_field_problem(exc: ConfigFieldError) -> ApiProblem:
    """422 naming the config field that is invalid or over an operator limit."""
    return ApiProblem(422, "config-limit", f"config.{exc}",
                      errors=[{"loc": ["config", exc.field], "msg": str(exc), "type": "config_limit"}])


def config_field_response(request: Request | None, exc: ConfigFieldError) -> JSONResponse:
    p = config_field_problem(exc)
    return problem_response(request, p.status, p.kind, p.detail, errors=p.errors)


_KINDS = {400: "bad-request", 401: "unauthorized", 403: "forbidden", 404: "not-found",
          405: "method-not-allowed", 406: "not-acceptable", 409: "conflict", 413: "too-large",
          415: "unsupported-media-type", 422: "config-limit", 429: "quota-exceeded"}


def _clean_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for e in exc.errors()[:20]:
        out.append({"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))[:300],
                    "type": str(e.get("type", ""))})
    return out


def install(app: FastAPI) -> None:
    """Exception handlers that turn every error into one problem shape."""

    @app.exception_handler(ApiProblem)
    async def _api_problem(request: Request, exc: ApiProblem) -> JSONResponse:
        return problem_response(request, exc.status, exc.kind, exc.detail, headers=exc.headers,
                                errors=exc.errors)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _clean_errors(exc)
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        detail = f"{'.'.join(first['loc'])}: {first['msg']}" if first["loc"] else first["msg"]
        return problem_response(request, 400, "invalid-request", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem_response(request, exc.status_code, _KINDS.get(exc.status_code, "error"),
                                str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(ConfigFieldError)
    async def _config_field(request: Request, exc: ConfigFieldError) -> JSONResponse:
        return config_field_response(request, exc)

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        return problem_response(request, 400, "invalid-request", "the request is nested too deeply")

    @app.exception_handler(ConfigError)
    async def _config(request: Request, exc: ConfigError) -> JSONResponse:
        return problem_response(request, 400, "bad-config", str(exc))

    for unavailable in _broker_errors():

        @app.exception_handler(unavailable)
        async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
            log.warning("Redis unavailable on %s %s: %s", request.method, request.url.path,
                        type(exc).__name__)
            return problem_response(request, 503, "unavailable", "the fleet's Redis does not answer; retry",
                                    headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(request, 500, "internal", "internal error; see the API's log")


def _broker_errors() -> tuple[type[Exception], ...]:
    """Redis and kombu connection errors: the fleet is unreachable, not the request wrong."""
    out: list[type[Exception]] = []
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        out += [RedisConnectionError, RedisTimeoutError]
    except ImportError:
        pass
    try:
        from kombu.exceptions import OperationalError

        out.append(OperationalError)
    except ImportError:
        pass
    return tuple(out)


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these problem status codes."""
    out: dict[int | str, dict[str, Any]] = {}
    for c in codes:
        out[c] = {"model": Problem, "description": HTTPStatus(c).phrase}
    return out


def rewrite_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """Problems are application/problem+json, and validation errors are 400 (not FastAPI's 422;
    a 422 is a config field over an operator limit)."""
    for path in schema.get("paths", {}).values():
        for op in path.values():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            rs = op["responses"]
            ref422 = (rs.get("422", {}).get("content", {}).get("application/json", {})
                      .get("schema", {}).get("$ref", ""))
            if ref422.endswith("/HTTPValidationError"):  # FastAPI's own: ours are 400
                rs.pop("422")
                rs.setdefault("400", {"description": "Bad Request"})
            for code, r in rs.items():
                js = r.get("content", {}).get("application/json", {}).get("schema") or {}
                is_problem = not r.get("content") or js.get("$ref", "").endswith("/Problem")
                if code.isdigit() and int(code) >= 400 and is_problem:
                    r["content"] = {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
            # Bytes that are not valid HTTP (a control character in a header, say) never reach
            # the app: the HTTP server answers them itself with a plain-text 400.
            rs.setdefault("400", {"description": "Bad Request"}).setdefault("content", {})[
                "text/plain"] = {"schema": {"type": "string"}}
            rs["400"]["description"] = ("Bad Request (problem details; a request that is not valid HTTP "
                                        "gets the server's plain-text 400)")
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    comps.pop("HTTPValidationError", None)
    comps.pop("ValidationError", None)
    comps["Problem"] = Problem.model_json_schema()
    return schema
