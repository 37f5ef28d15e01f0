"""An HTTP upload that breaks off partway closes its submission session (docs/protocol.md,
Sessions): a batch that got nothing is cancelled (and a retry may reuse its id), one that got
some rows finishes with them. Either way its keys get their TTL. Real API process, real fleet."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import pytest

from scalecap.fleet.protocol import batch_jobs_key, batch_key, job_states_key
from scalecap.fleet.sessions import SESSIONS_KEY
from tests.api_support import MODEL, ApiStack
from tests.fleet_support import wait_until

pytestmark = pytest.mark.services


def _cut_upload(s: ApiStack, batch_id: str, parts: list[bytes]) -> None:
    """Send an upload's headers (announcing more bytes than will come) and `parts`, a pause
    after each, then drop the connection: the client went away mid-upload."""
    u = urlsplit(s.url)
    head = (f"POST /v1/batches?batch_id={batch_id}&model={MODEL} HTTP/1.1\r\nHost: {u.netloc}\r\n"
            f"Authorization: {s.tenant_a.headers['Authorization']}\r\n"
            "Content-Type: application/x-ndjson\r\nContent-Length: 1000000\r\n\r\n")
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        sock.sendall(head.encode())
        for part in parts:
            sock.sendall(part)
            time.sleep(0.4)  # past the submit's flush interval: the next row flushes a chunk


def _closed(s: ApiStack, batch_id: str) -> dict:
    def status() -> dict | None:
        st = s.get(f"/v1/batches/{batch_id}", s.tenant_a).json()
        return st if st.get("finished_at") is not None else None

    return wait_until(status, timeout=60, what=f"batch {batch_id} closed")


def _ttls(s: ApiStack, batch_id: str) -> list[int]:
    r = s.redis()
    return [r.ttl(k(batch_id)) for k in (batch_key, batch_jobs_key, job_states_key)]


def test_an_upload_cut_before_any_row_cancels_its_batch_and_a_retry_reuses_the_id(api_stack: ApiStack):
    s = api_stack
    _cut_upload(s, "cut-empty", [b'{"ima'])
    st = _closed(s, "cut-empty")
    assert (st["state"], st["total"]) == ("cancelled", 0)
    assert s.redis().ttl(batch_key("cut-empty")) > 0
    assert not [m for m in s.redis().zrange(SESSIONS_KEY, 0, -1) if m.startswith(b"cut-empty ")]
    body = json.dumps({"image": str(s.images[0])}) + "\n"
    r = s.post("/v1/batches", s.tenant_a, params={"batch_id": "cut-empty", "model": MODEL}, content=body,
               headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 202, r.text
    st = s.wait("cut-empty", s.tenant_a)
    assert (st["state"], st["total"], st["done"]) == ("finished", 1, 1)


def test_an_upload_cut_after_some_rows_finishes_with_them(api_stack: ApiStack):
    s = api_stack
    lines = [json.dumps({"image": str(p)}).encode() + b"\n" for p in s.images[:3]]
    _cut_upload(s, "cut-partial", [lines[0] + lines[1], lines[2], b'{"image": "/tr'])
    st = _closed(s, "cut-partial")
    assert (st["state"], st["total"], st["done"]) == ("finished", 3, 3)
    assert all(t > 0 for t in _ttls(s, "cut-partial"))
    assert not [m for m in s.redis().zrange(SESSIONS_KEY, 0, -1) if m.startswith(b"cut-partial ")]
