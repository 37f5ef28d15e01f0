"""Bearer keys: `require(scope)` is the FastAPI dependency every protected route declares.

401 for no key, a malformed, wrong or revoked key (one answer, so a caller learns nothing about
which); 403 for a live key without the scope. Keys come from `scalecap keys create` (a hash in
Redis, scalecap/fleet/keys.py) or, for bootstrapping, `SCALECAP_API_KEYS` (admin keys named env-1,
env-2, ...). Neither the key nor its hash is ever logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from producer.api.problems import ApiProblem
from scalecap.fleet.keys import SCOPES, ApiKey

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer sk_...`")

_UNAUTHORIZED = {"WWW-Authenticate": 'Bearer realm="scalecap"'}


def _env_key(settings: Any, raw: str) -> ApiKey | None:
    """A bootstrap admin key from SCALECAP_API_KEYS, compared in constant time."""
    digest = hashlib.sha256(raw.encode("utf-8")).digest()
    found = None
    for n, k in enumerate(getattr(settings, "api_keys", None) or [], 1):
        if hmac.compare_digest(hashlib.sha256(k.encode("utf-8")).digest(), digest) and found is None:
            found = ApiKey(f"env-{n}", f"SCALECAP_API_KEYS[{n}]", frozenset({"admin"}), None, 0.0, False)
    return found


def authenticate(request: Request, raw: str | None) -> ApiKey | None:
    """The live key behind `raw`, or None."""
    if not raw:
        return None
    state = request.app.state
    return state.keys.verify(raw) or _env_key(state.settings, raw)


def require(scope: str) -> Callable[..., ApiKey]:
    """Dependency: the caller's ApiKey, which holds `scope` (admin holds every scope)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    def dependency(request: Request,
                   credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ApiKey:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise ApiProblem(401, "unauthorized", "an API key is required: Authorization: Bearer <key>",
                             headers=_UNAUTHORIZED)
        key = authenticate(request, credentials.credentials)
        if key is None:
            raise ApiProblem(401, "unauthorized", "the API key is not valid", headers=_UNAUTHORIZED)
        if not key.can(scope):
            raise ApiProblem(403, "forbidden", f"this key lacks the {scope!r} scope")
        request.state.api_key = key
        return key

    dependency.__name__ = f"require_{scope}"
    return dependency


def owns(key: ApiKey, status: dict[str, Any]) -> bool:
    """Whether `key` may see this batch: its own, or any for an admin key."""
    return key.is_admin or (status.get("owner") or None) == key.key_id


__all__ = ["authenticate", "bearer", "owns", "require"]
