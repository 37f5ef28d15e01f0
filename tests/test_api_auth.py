"""The auth matrix: every route of the live OpenAPI schema against no key, a wrong key, a revoked
key, another tenant's key, a read-only key, the owner's key and an admin key.

Routes come from the running API's /openapi.json, so a route added later is covered (or fails
here) without editing this file.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api_support import IDLE_MODEL, ApiStack, Key

pytestmark = [pytest.mark.services, pytest.mark.slow]

PUBLIC = {("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics")}


@pytest.fixture(scope="module")
def owned(api_stack: ApiStack) -> tuple[str, str]:
    """A finished batch of tenant A and one of its job ids."""
    s = api_stack
    bid = s.submit(s.tenant_a, images=[str(s.images[0])])
    s.wait(bid, s.tenant_a)
    job = s.get(f"/v1/batches/{bid}/jobs", s.tenant_a).json()["items"][0]["job_id"]
    return bid, job


def _routes(s: ApiStack) -> list[tuple[str, str, bool]]:
    schema = s.get("/openapi.json").json()
    out = []
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            out.append((method, path, bool(op.get("security"))))
    return sorted(out)


def _call(s: ApiStack, method: str, path: str, key: Key | str | None, batch: str, job: str) -> httpx.Response:
    url = path.format(batch_id=batch, job_id=job)
    headers: dict[str, str] = {}
    if isinstance(key, Key):
        headers = key.headers
    elif isinstance(key, str):
        headers = {"Authorization": key}
    kw: dict[str, Any] = {}
    if (method, path) == ("post", "/v1/batches"):
        kw["json"] = {"images": [str(s.images[1])], "model": IDLE_MODEL}
    elif (method, path) == ("post", "/v1/captions"):
        kw["json"] = {"image": str(s.images[1]), "model": IDLE_MODEL}
        kw["params"] = {"wait": 0}
    r = s.http.request(method.upper(), url, headers=headers, **kw)
    if r.status_code in (200, 202) and path in ("/v1/batches", "/v1/captions") and method == "post":
        s.post(f"/v1/batches/{r.json()['batch_id']}/cancel", s.admin)  # leave nothing queued
    return r


def _is_problem(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, (r.request.method, r.request.url.path, r.text)
    assert r.headers["content-type"].startswith("application/problem+json")


def test_every_route_is_in_the_matrix(api_stack: ApiStack):
    routes = {(m, p) for m, p, _ in _routes(api_stack)}
    assert routes >= PUBLIC
    assert {("post", "/v1/batches"), ("get", "/v1/batches"), ("get", "/v1/batches/{batch_id}"),
            ("get", "/v1/batches/{batch_id}/results"), ("get", "/v1/batches/{batch_id}/results/{job_id}"),
            ("post", "/v1/batches/{batch_id}/cancel"), ("get", "/v1/batches/{batch_id}/failures"),
            ("post", "/v1/captions")} <= routes
    for method, path, secured in _routes(api_stack):
        assert secured == ((method, path) not in PUBLIC), (method, path)


def test_public_routes_ignore_keys(api_stack: ApiStack, owned):
    s = api_stack
    for method, path in sorted(PUBLIC):
        for key in (None, "Bearer sk_nonsense", s.revoked):
            r = _call(s, method, path, key, *owned)
            assert r.status_code == 200, (path, r.text)


def test_no_wrong_or_revoked_key_is_401_everywhere(api_stack: ApiStack, owned):
    s = api_stack
    a = s.tenant_a
    wrong_secret = a.raw[:-4] + ("AAAA" if not a.raw.endswith("AAAA") else "BBBB")
    bad_keys: list[Key | str | None] = [
        None, "Bearer", "Basic dXNlcjpwYXNz", "Bearer sk_nonsense", f"Bearer {wrong_secret}",
        f"Bearer {a.raw}x", f"bearer  {s.revoked.raw}", s.revoked,
    ]
    for method, path, secured in _routes(s):
        if not secured:
            continue
        for key in bad_keys:
            r = _call(s, method, path, key, *owned)
            _is_problem(r, 401)
            assert r.headers["www-authenticate"].startswith("Bearer")


def test_another_tenant_sees_nothing_of_a_batch(api_stack: ApiStack, owned):
    s = api_stack
    bid, job = owned
    missing = "no-such-batch-0"
    for method, path, _ in _routes(s):
        if "{batch_id}" not in path:
            continue
        for key in (s.tenant_b, s.reader):
            if key is s.reader and method == "post":
                _is_problem(_call(s, method, path, key, bid, job), 403)  # no submit scope
                continue
            theirs = _call(s, method, path, key, bid, job)
            nothing = _call(s, method, path, key, missing, job)
            _is_problem(theirs, 404)
            # Exactly the answer for a batch that does not exist: nothing reveals it.
            strip = lambda r: {k: v for k, v in r.json().items() if k != "instance"}  # noqa: E731
            assert strip(theirs) == strip(nothing)
    listed = s.get("/v1/batches", s.tenant_b, params={"limit": 500}).json()
    assert bid not in [b["batch_id"] for b in listed["items"]]
    assert all(b["owner"] == s.tenant_b.key_id for b in listed["items"])
    st = s.get(f"/v1/batches/{bid}", s.tenant_a).json()
    assert st["state"] == "finished" and st["cancelled"] == 0  # B's cancel did nothing


def test_owner_and_admin_reach_every_route(api_stack: ApiStack, owned):
    s = api_stack
    for key in (s.tenant_a, s.admin):
        for method, path, secured in _routes(s):
            if not secured:
                continue
            r = _call(s, method, path, key, *owned)
            assert r.status_code in (200, 202), (key.key_id, method, path, r.text)
    everything = s.get("/v1/batches", s.admin, params={"limit": 500}).json()
    owners = {b["owner"] for b in everything["items"]}
    assert owned[0] in [b["batch_id"] for b in everything["items"]]
    assert {s.tenant_a.key_id, s.admin.key_id} <= owners


def test_read_scope_cannot_submit_or_cancel(api_stack: ApiStack, owned):
    s = api_stack
    for method, path, secured in _routes(s):
        if secured and method == "post":
            _is_problem(_call(s, method, path, s.reader, *owned), 403)
    assert s.get("/v1/batches", s.reader).status_code == 200
