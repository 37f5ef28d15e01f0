"""The viewer: server-rendered pages at `/`, behind the API keys through a login form.

Pages (none in the OpenAPI schema): the caller's batches with live progress bars, one batch
(counts, throughput, failures by error type, dead letters, its images page by page), and one
image's caption with everything the chain decided on the way. Data comes from FleetClient only.

Access: a session cookie names a key (producer/api/session.py); each request looks the key up
again, so a revoked key is logged out at once. A key reads its own batches, an admin key every
batch; anything else is answered exactly like a batch that does not exist (404).
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from producer.api.session import COOKIE, Session, SessionEnds, SessionSigner, same_origin
from producer.api.thumbnails import placeholder_svg, thumbnail
from producer.api.web_views import FILTERS, SEGMENTS, error_types, progress, record_view
from scalecap.errors import ImageError

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
BATCHES_PER_PAGE = 25
IMAGES_PER_PAGE = 48
POLL_SECONDS = 2.0
"""How often open pages ask for fresh counts while a batch runs."""

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(HERE / "templates"))


templates.env.filters.update(FILTERS)


# -- services and the caller ---------------------------------------------------------------------


@dataclass
class Web:
    """What the pages need from the API process: settings, the fleet client, the keys, a signer."""

    settings: Any
    client: Any
    keys: Any
    signer: SessionSigner
    ends: SessionEnds


def web(request: Request) -> Web:
    """The viewer's services for this app, built once from the API's own (app.state)."""
    state = request.app.state
    w = getattr(state, "scalecap_web", None)
    if w is None:
        from producer.client import FleetClient
        from scalecap.fleet.keys import KeyStore
        from scalecap.settings import Settings

        settings = getattr(state, "settings", None) or Settings.from_env()
        client = getattr(state, "client", None) or FleetClient(settings)
        keys = getattr(state, "keys", None) or KeyStore(client.redis)
        w = Web(settings, client, keys, SessionSigner(getattr(settings, "session_secret", None)),
                SessionEnds(client.redis))
        state.scalecap_web = w
    return w


@dataclass
class Viewer:
    key: Any
    session: Session
    csrf: str

    @property
    def can_cancel(self) -> bool:
        return bool(self.key.is_admin or self.key.can("submit"))


def _may_view(key: Any) -> bool:
    return bool(key is not None and not key.revoked and key.can("read"))


def _session_key(w: Web, session: Session) -> Any:
    """The session's key as it is now: None once revoked, deleted or (env keys) changed."""
    if session.fingerprint:  # a bootstrap key from SCALECAP_API_KEYS: still configured?
        from producer.api.auth import _env_key

        for raw in getattr(w.settings, "api_keys", None) or []:
            if hmac.compare_digest(w.signer.fingerprint(raw), session.fingerprint):
                key = _env_key(w.settings, raw)
                return key if key is not None and key.key_id == session.key_id else None
        return None
    return w.keys.get(session.key_id)


def viewer(request: Request) -> Viewer | None:
    """The logged-in caller, or None (no cookie, a forged or expired one, or a revoked key)."""
    w = web(request)
    session = w.signer.read(request.cookies.get(COOKIE))
    if session is None or w.ends.ended(session):
        return None
    key = _session_key(w, session)
    if not _may_view(key):
        return None
    return Viewer(key, session, w.signer.csrf_token(session))


def _safe_next(target: str | None) -> str:
    """Only a path on this site (no scheme, no //host) may be a post-login destination."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    if any(c.isspace() or ord(c) < 32 for c in target):  # browsers drop tabs: "/\t/evil" is "//evil"
        return "/"
    return target


def _to_login(request: Request, back: str | None = None) -> RedirectResponse:
    here = back or request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse("/login?next=" + quote(here, safe="/"), status_code=303)


def _page(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
    nonce = secrets.token_urlsafe(12)
    resp = templates.TemplateResponse(
        request, name, {"nonce": nonce, "poll_ms": int(POLL_SECONDS * 1000), **context},
        status_code=status_code,
    )
    _secure_headers(resp, nonce)
    return resp


def _secure_headers(resp: Response, nonce: str | None = None) -> None:
    script = f"'nonce-{nonce}'" if nonce else "'none'"
    resp.headers["Content-Security-Policy"] = (
        f"default-src 'none'; img-src 'self' data:; style-src 'self'; style-src-attr 'unsafe-inline'; "
        f"script-src {script}; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "same-origin"
    resp.headers["Cache-Control"] = "no-store"


def _not_found(request: Request, who: Viewer, what: str) -> Response:
    """One answer for "does not exist" and "not yours", so a 404 never confirms an id."""
    return _page(request, "not_found.html", {"viewer": who, "what": what}, status_code=404)


def _batch_for(w: Web, who: Viewer, batch_id: str) -> dict[str, Any] | None:
    """The batch's status when this caller may read it, else None (missing or not theirs)."""
    from producer.client import BatchNotFound

    try:
        status = w.client.status(batch_id)
    except (BatchNotFound, ValueError):
        return None
    from producer.api.auth import owns

    return status if owns(who.key, status) else None


def _batch_config(w: Web, batch_id: str) -> dict[str, Any]:
    """The batch's chain config as submitted (public fields only), {} when unreadable."""
    try:
        raw = (w.client.store.batch(batch_id) or {}).get("config") or "{}"
        data = json.loads(raw)
        return data if isinstance(data, dict) else {}
    except (ValueError, TypeError, AttributeError):
        return {}


def _page_number(raw: Any) -> int:
    try:
        return max(1, min(int(raw), 1_000_000))
    except (TypeError, ValueError):
        return 1


# -- static -------------------------------------------------------------------------------------


@router.get("/static/viewer.css")
def stylesheet() -> Response:
    resp = Response((HERE / "static" / "viewer.css").read_bytes(), media_type="text/css")
    resp.headers["Cache-Control"] = "public, max-age=300"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


# -- login / logout -----------------------------------------------------------------------------


@router.get("/login")
def login_form(request: Request, next: str = "/") -> Response:
    return _page(request, "login.html", {"viewer": None, "next": _safe_next(next), "error": None})


@router.post("/login")
def login(request: Request, key: str = Form(""), next: str = Form("/")) -> Response:
    w = web(request)
    target = _safe_next(next)
    if not same_origin(request.headers, request.headers.get("host")):
        return _page(request, "login.html", {"viewer": None, "next": target,
                                             "error": "This form was sent from another site."}, 403)
    from producer.api.auth import authenticate

    raw = key.strip()
    api_key = authenticate(request, raw) if raw else None
    if not _may_view(api_key):
        # One message for a wrong, revoked or read-less key: nothing here tells them apart.
        return _page(request, "login.html", {"viewer": None, "next": target,
                                             "error": "That key is not valid here."}, 401)
    # Redis keys are found by id (revocation shows at once); env keys by a keyed hash of the key.
    fingerprint = w.signer.fingerprint(raw) if w.keys.get(api_key.key_id) is None else ""
    resp = RedirectResponse(target, status_code=303)
    resp.set_cookie(
        COOKIE, w.signer.issue(api_key.key_id, fingerprint=fingerprint), max_age=w.signer.max_age,
        httponly=True, samesite="lax", secure=_https(request), path="/",
    )
    log.info("viewer login for key %s", api_key.key_id)
    return resp


def _https(request: Request) -> bool:
    """Whether the browser talks HTTPS (directly, or to a TLS proxy that says so): the cookie is
    then Secure. Trusting the header here costs nothing: at worst a cookie is marked Secure."""
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"


@router.post("/logout")
def logout(request: Request, csrf: str = Form("")) -> Response:
    w = web(request)
    session = w.signer.read(request.cookies.get(COOKIE))
    if session is not None and not (same_origin(request.headers, request.headers.get("host"))
                                    and w.signer.check_csrf(session, csrf)):
        return Response("Forbidden: bad form token", status_code=403, media_type="text/plain")
    if session is not None:
        w.ends.end(session)  # a copy of the cookie stops working too
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="lax")
    return resp


# -- batch list ---------------------------------------------------------------------------------


@router.get("/")
def batches(request: Request, page: int | str = 1) -> Response:
    who = viewer(request)
    if who is None:
        return _to_login(request)
    w = web(request)
    n = _page_number(page)
    owner = None if who.key.is_admin else who.key.key_id
    rows = w.client.list_batches(owner, offset=(n - 1) * BATCHES_PER_PAGE, limit=BATCHES_PER_PAGE + 1)
    more = len(rows) > BATCHES_PER_PAGE
    rows = rows[:BATCHES_PER_PAGE]
    bars = [progress(st) for st in rows]
    live = [b["batch_id"] for b in bars if b["live"]]
    owners: dict[str, str] = {}
    if who.key.is_admin:  # name the owners: a handful of key lookups per page
        for st in rows:
            kid = st.get("owner")
            if kid and kid not in owners:
                key = w.keys.get(kid)
                owners[kid] = key.name if key is not None else kid
    return _page(request, "batches.html", {
        "viewer": who, "rows": list(zip(rows, bars, strict=True)), "page": n, "more": more,
        "segments": SEGMENTS, "live": live, "admin": who.key.is_admin, "owners": owners,
    })


@router.get("/progress")
def batches_progress(request: Request, ids: str = "") -> Response:
    """Fresh counts of some of the caller's batches (the list page polls this)."""
    who = viewer(request)
    if who is None:
        return JSONResponse({"detail": "log in first"}, status_code=401)
    w = web(request)
    out = []
    for batch_id in [i for i in ids.split(",") if i][:BATCHES_PER_PAGE]:
        status = _batch_for(w, who, batch_id)
        if status is not None:
            out.append(progress(status))
    resp = JSONResponse({"batches": out})
    resp.headers["Cache-Control"] = "no-store"
    return resp


# -- one batch ----------------------------------------------------------------------------------


@router.get("/batches/{batch_id}")
def batch_page(request: Request, batch_id: str, page: int | str = 1) -> Response:
    who = viewer(request)
    if who is None:
        return _to_login(request)
    w = web(request)
    status = _batch_for(w, who, batch_id)
    if status is None:
        return _not_found(request, who, "batch")
    n = _page_number(page)
    jobs = w.client.jobs(batch_id, offset=(n - 1) * IMAGES_PER_PAGE, limit=IMAGES_PER_PAGE + 1)
    more = len(jobs) > IMAGES_PER_PAGE
    jobs = jobs[:IMAGES_PER_PAGE]
    # Listing failures walks the batch's jobs: only when there are some to show.
    failures: dict[str, Any] = {"failed": [], "dead_letters": []}
    if status.get("failed") or status.get("dead_lettered"):
        failures = w.client.failures(batch_id, limit=200)
    return _page(request, "batch.html", {
        "viewer": who, "b": status, "bar": progress(status), "segments": SEGMENTS,
        "config": _batch_config(w, batch_id), "jobs": jobs, "page": n, "more": more,
        "first": (n - 1) * IMAGES_PER_PAGE,
        "failed": failures.get("failed") or [], "dead": failures.get("dead_letters") or [],
        "error_types": error_types(failures.get("failed") or []), "now": time.time(),
    })


@router.get("/batches/{batch_id}/progress")
def batch_progress(request: Request, batch_id: str) -> Response:
    who = viewer(request)
    if who is None:
        return JSONResponse({"detail": "log in first"}, status_code=401)
    status = _batch_for(web(request), who, batch_id)
    if status is None:
        return JSONResponse({"detail": "not found"}, status_code=404)
    resp = JSONResponse({"batches": [progress(status)]})
    resp.headers["Cache-Control"] = "no-store"
    return resp


@router.post("/batches/{batch_id}/cancel")
def cancel(request: Request, batch_id: str, csrf: str = Form("")) -> Response:
    who = viewer(request)
    if who is None:
        return _to_login(request, back=f"/batches/{quote(batch_id)}")
    w = web(request)
    if not (same_origin(request.headers, request.headers.get("host"))
            and w.signer.check_csrf(who.session, csrf)):
        return Response("Forbidden: bad form token", status_code=403, media_type="text/plain")
    status = _batch_for(w, who, batch_id)
    if status is None:
        return _not_found(request, who, "batch")
    if not who.can_cancel:
        return Response("Forbidden: this key may not cancel", status_code=403, media_type="text/plain")
    w.client.cancel(batch_id)
    log.info("viewer: key %s cancelled batch %s", who.key.key_id, batch_id)
    return RedirectResponse(f"/batches/{quote(batch_id)}", status_code=303)


# -- one image ----------------------------------------------------------------------------------


def _job_for(w: Web, who: Viewer, batch_id: str, job_id: str) -> tuple[dict[str, Any], dict[str, str]] | None:
    """(batch status, job fields) when the job belongs to a batch this caller may read."""
    status = _batch_for(w, who, batch_id)
    if status is None:
        return None
    job = w.client.store.job(batch_id, job_id)
    if not job:
        return None
    return status, job


@router.get("/batches/{batch_id}/images/{job_id}")
def image_page(request: Request, batch_id: str, job_id: str, at: int | str | None = None) -> Response:
    who = viewer(request)
    if who is None:
        return _to_login(request)
    w = web(request)
    found = _job_for(w, who, batch_id, job_id)
    if found is None:
        return _not_found(request, who, "image")
    status, job = found
    row = w.client.record(batch_id, job_id)
    record = (row or {}).get("scalecap_record") or {}
    view = record_view(record, _batch_config(w, batch_id)) if row else None
    return _page(request, "image.html", {
        "viewer": who, "b": status, "job_id": job_id, "job": job,
        "ref": (row or {}).get("image") or job.get("ref"), "v": view,
        "attempts": int(job.get("attempts") or 0), "nav": _neighbours(w, batch_id, job_id, at),
    })


def _neighbours(w: Web, batch_id: str, job_id: str, at: Any) -> dict[str, Any] | None:
    """Previous and next image around position `at` of the batch (the batch page's links carry
    it), or None when `at` is missing or no longer points at this job."""
    try:
        n = int(at)
    except (TypeError, ValueError):
        return None
    if n < 0:
        return None
    rows = w.client.jobs(batch_id, offset=max(n - 1, 0), limit=3)
    here = 1 if n > 0 else 0
    if len(rows) <= here or rows[here]["job_id"] != job_id:
        return None
    prev = (rows[here - 1]["job_id"], n - 1) if here else None
    nxt = (rows[here + 1]["job_id"], n + 1) if len(rows) > here + 1 else None
    return {"index": n, "prev": prev, "next": nxt, "page": n // IMAGES_PER_PAGE + 1}


@router.get("/batches/{batch_id}/images/{job_id}/thumbnail")
def image_thumbnail(request: Request, batch_id: str, job_id: str, size: int | str = 640) -> Response:
    who = viewer(request)
    if who is None:
        return Response(status_code=401)
    w = web(request)
    found = _job_for(w, who, batch_id, job_id)
    if found is None:
        return Response(status_code=404)
    ref = found[1].get("ref") or ""
    try:
        px = int(size)
    except (TypeError, ValueError):
        px = 640
    headers = {"Cache-Control": "private, max-age=600", "X-Content-Type-Options": "nosniff"}
    from scalecap.fleet.access import refusal

    if refusal(ref, who.key.scope, w.settings.allowed_roots, w.settings.allowed_buckets):
        # The viewing key's scope, as at submit (it may have been narrowed since).
        return Response(placeholder_svg("ImageAccessDenied"), status_code=403, media_type="image/svg+xml",
                        headers={**headers, "Content-Security-Policy": "default-src 'none'"})
    try:
        body = thumbnail(ref, w.settings, px, owner=who.key.key_id)
    except ImageError as exc:
        # The reason's type only: the message may name places the caller need not see.
        return Response(placeholder_svg(type(exc).__name__), status_code=422, media_type="image/svg+xml",
                        headers={**headers, "Content-Security-Policy": "default-src 'none'"})
    return Response(body, media_type="image/jpeg", headers=headers)


__all__ = ["router"]
