"""A large JSONL upload is read in constant memory by the real API process.

The manifest is generated on the fly and sent chunked (no Content-Length), so neither side ever
holds it; the API's resident memory is sampled while it reads, and its peak growth over a small
warm-up upload must stay far below the upload's own size (had it buffered the body, or the lines,
the growth would exceed the upload).
"""

from __future__ import annotations

import json
import os
import threading
import time

import psutil
import pytest

from tests.api_support import IDLE_MODEL, ApiStack, create_key

pytestmark = [pytest.mark.services, pytest.mark.slow]

LINES = int(os.environ.get("SCALECAP_TEST_UPLOAD_LINES", "50000"))
"""Lines of the large upload (each row costs the fleet a Redis job; 200000 takes minutes here).
A million lines need about 80 MiB: run with SCALECAP_TEST_MAX_UPLOAD=209715200 as well."""
UPLOAD_BYTES = 30 * 2**20
"""About this many bytes, whatever LINES is: long lines when they are few."""


def _manifest(n: int, tag: str, total: int = UPLOAD_BYTES):
    """`n` distinct lines of about `total` bytes in all, yielded 1,000 lines at a time."""
    pad = "p" * max(8, total // n - 70)
    buf: list[str] = []
    for i in range(n):
        buf.append(json.dumps({"image": f"https://images.example.com/{tag}/{i:09d}/{pad}.jpg"}) + "\n")
        if len(buf) == 1000:
            yield "".join(buf).encode()
            buf.clear()
    if buf:
        yield "".join(buf).encode()


def _upload(s: ApiStack, key, n: int, tag: str):
    total = UPLOAD_BYTES if n == LINES else n * 200
    return s.post("/v1/batches", key, params={"model": IDLE_MODEL}, content=_manifest(n, tag, total),
                  headers={"Content-Type": "application/x-ndjson"}, timeout=600)


def test_large_upload_does_not_grow_the_api_memory(api_stack: ApiStack):
    s = api_stack
    key = create_key(s.env, "bulk", "--max-queued", "2000000")  # a million-line run fits
    proc = psutil.Process(s.api.pid)
    upload_bytes = sum(len(c) for c in _manifest(LINES, "big", UPLOAD_BYTES))

    warm = _upload(s, key, 1000, "warm")
    assert warm.status_code == 202, warm.text
    time.sleep(0.5)
    base = proc.memory_info().rss

    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        r = _upload(s, key, LINES, "big")
    finally:
        done.set()
        sampler.join(5)
    seconds = time.monotonic() - started
    assert r.status_code == 202, r.text
    assert r.json()["submission"] == {"submitted": LINES, "failed": 0, "duplicates": 0}
    growth = peak[0] - base
    print(f"upload {LINES} lines, {upload_bytes / 2**20:.1f} MiB in {seconds:.1f} s; API RSS "
          f"{base / 2**20:.1f} MiB after warm-up, peak growth {growth / 2**20:.1f} MiB")
    assert upload_bytes > 25 * 2**20
    assert growth < upload_bytes / 4, f"API memory grew {growth} bytes for a {upload_bytes}-byte upload"
    st = s.get(f"/v1/batches/{r.json()['batch_id']}", key).json()
    assert st["total"] == LINES and st["state"] in ("queued", "running")
    for bid in (warm.json()["batch_id"], r.json()["batch_id"]):
        s.post(f"/v1/batches/{bid}/cancel", key)
