"""Request body size limits: 413 before a byte is parsed.

`BodyLimitMiddleware` refuses any request whose Content-Length is over the limit (a JSONL
manifest upload may be larger than other bodies); `read_json` also counts the bytes of a body
sent without a length (chunked), so no route ever buffers more than `api_max_body_bytes`.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from producer.api.problems import ApiProblem, problem_response

NDJSON_TYPES = (
    "application/x-ndjson", "application/jsonl", "application/jsonlines", "application/x-jsonlines",
)


def is_ndjson(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() in NDJSON_TYPES


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
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiProblem(400, "invalid-json", f"the body is not valid JSON: {exc}") from exc


__all__ = ["BodyLimitMiddleware", "is_ndjson", "read_json", "too_large"]
