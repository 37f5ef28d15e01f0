"""Request body size limits: 413 before a byte is parsed.

`BodyLimitMiddleware` refuses any request whose Content-Length is over the limit (a JSONL
manifest upload may be larger than other bodies); `read_json` also counts the bytes of a body
sent without a length (chunked), so no route ever buffers more than `api_max_body_bytes`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request

from producer.api.problems import ApiProblem, problem_response

NDJSON_TYPES = (
    "application/x-ndjson", "application/jsonl", "application/jsonlines", "application/x-jsonlines",
)


def is_ndjson(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() in NDJSON_TYPES


MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects in a request body (or an upload line)."""
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def json_depth(data: bytes, limit: int = MAX_JSON_DEPTH) -> int:
    """The nesting depth of the JSON text `data`, counted without parsing it (strings skipped);
    stops counting once past `limit`, so a body nested 10^6 deep costs one linear scan."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return limit  # cannot be deeper: no scan needed
    depth = deepest = 0
    for m in _TOKENS.finditer(data):
        c = m.group()[:1]
        if c in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif c in (b"]", b"}"):
            depth -= 1
    return deepest


def loads_bounded(data: bytes | str, what: str = "the body") -> Any:
    """json.loads, refusing nesting deeper than MAX_JSON_DEPTH before parsing (400)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise ApiProblem(400, "invalid-json", f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiProblem(400, "invalid-json", f"{what} is not valid JSON: {exc}"[:300]) from None


def too_large(limit: int) -> ApiProblem:
    return ApiProblem(413, "too-large", f"request body over the limit of {limit} bytes")


class BodyLimitMiddleware:
    def __init__(self, app: Any, max_body: int, max_upload: int) -> None:
        self.app = app
        self.max_body = max_body
        self.max_upload = max_upload

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length")
            ctype = headers.get(b"content-type", b"").decode("latin-1")
            limit = self.max_upload if is_ndjson(ctype) else self.max_body
            if length is not None:
                try:
                    n = int(length)
                except ValueError:
                    n = -1
                if n < 0 or n > limit:
                    detail = (f"request body over the limit of {limit} bytes" if n >= 0
                              else "invalid Content-Length")
                    resp = problem_response(None, 413 if n >= 0 else 400,
                                            "too-large" if n >= 0 else "bad-request", detail)
                    resp.headers["connection"] = "close"
                    await resp(scope, receive, send)
                    return
        await self.app(scope, receive, send)


async def read_json(request: Request, limit: int) -> Any:
    """The JSON body, read up to `limit` bytes (413 beyond), or a 400 problem."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise too_large(limit)
    if not data:
        raise ApiProblem(400, "invalid-request", "a JSON body is required")
    return loads_bounded(bytes(data))


__all__ = ["MAX_JSON_DEPTH", "BodyLimitMiddleware", "is_ndjson", "json_depth", "loads_bounded", "read_json",
           "too_large"]
