"""Transient image-fetch failures are retried inside the job; permanent ones are not.

Real HTTP servers on 127.0.0.1: one serves images after failing N times, one always fails, one
hangs; an S3-speaking one answers SlowDown (SeaweedFS never throttles) before serving, and boto3
talks to it as to any S3 endpoint. Also: the bucket allow-list and the metadata-address refusal.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from PIL import Image

from scalecap.errors import ImageAccessDenied, ImageFetchError, ImageNotFound
from scalecap.images import ImageLimits, load_image

FAST = dict(allow_private_urls=True, http_timeout=5, fetch_backoff=0.01, fetch_backoff_max=0.05)
SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")  # fmt: skip


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


JPEG = _jpeg()


class _Flaky(BaseHTTPRequestHandler):
    """GET /<plan>/<name>: plan 'fail-N-STATUS' fails N times per name then serves; 'always-STATUS'
    never serves; 'hang' sleeps past the client's timeout; '/s3/...' answers like S3."""

    hits: ClassVar[dict[str, int]] = {}
    lock = threading.Lock()

    def do_GET(self) -> None:
        with self.lock:
            n = self.hits[self.path] = self.hits.get(self.path, 0) + 1
        plan = self.path.strip("/").split("/")[0]
        if plan.startswith("fail-"):
            _, count, status = plan.split("-")
            if n <= int(count):
                return self._send(int(status), b"busy", {"Retry-After": "0"} if status == "429" else {})
        elif plan.startswith("always-"):  # a Retry-After the client must cap, not obey
            return self._send(int(plan.split("-")[1]), b"down", {"Retry-After": "30"})
        elif plan == "hang":
            time.sleep(1.5)
        elif plan == "s3":  # path style: /s3/<key>; bucket name 's3'
            key = self.path.split("/", 2)[2]
            fails = int(key.split("-")[1]) if key.startswith("slowdown-") else 0
            if key.startswith("always-slowdown") or n <= fails:
                return self._send(503, SLOWDOWN, {"Content-Type": "application/xml"})
        elif plan == "gone":
            return self._send(404, b"no")
        self._send(200, JPEG, {"Content-Type": "image/jpeg"})

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def flaky() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def hits(path: str) -> int:
    return _Flaky.hits.get(path, 0)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429, 408])
def test_transient_http_status_is_retried_until_it_serves(flaky, status):
    path = f"/fail-2-{status}/a.jpg"
    im = load_image(flaky + path, limits=ImageLimits(**FAST))
    assert im.size == (96, 64)
    assert hits(path) == 3


def test_a_server_that_always_fails_gives_image_fetch_error_after_the_bound(flaky):
    path = "/always-503/b.jpg?sig=secret"
    started = time.monotonic()
    with pytest.raises(ImageFetchError) as info:
        load_image(flaky + path, limits=ImageLimits(**FAST, fetch_retries=2))
    assert hits(path) == 3  # one try and two retries, no more
    assert time.monotonic() - started < 20  # Retry-After: 30 was capped by fetch_backoff_max
    text = str(info.value)
    assert "HTTP 503" in text and "gave up after 3 attempt(s)" in text
    assert "secret" not in text and "/always-503/b.jpg?…" in text


def test_timeouts_are_retried_then_named(flaky):
    path = "/hang/d.jpg"
    with pytest.raises(ImageFetchError, match=r"timed out.*gave up after 2 attempt"):
        load_image(flaky + path, limits=ImageLimits(**{**FAST, "http_timeout": 0.3}, fetch_retries=1))
    assert hits(path) == 2


def test_permanent_errors_are_not_retried(flaky):
    with pytest.raises(ImageNotFound):
        load_image(flaky + "/gone/e.jpg", limits=ImageLimits(**FAST))
    assert hits("/gone/e.jpg") == 1
    with pytest.raises(ImageFetchError, match="gave up after 1 attempt"):
        load_image(flaky + "/always-500/f.jpg", limits=ImageLimits(**FAST, fetch_retries=0))
    assert hits("/always-500/f.jpg") == 1


def _s3_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s",
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "total_max_attempts": 1}),
    )  # fmt: skip


def test_s3_slowdown_is_retried_then_serves(flaky):
    limits = ImageLimits(**FAST, s3_client_factory=lambda: _s3_client(flaky))
    assert load_image("s3://s3/slowdown-2-g.jpg", limits=limits).size == (96, 64)
    assert hits("/s3/slowdown-2-g.jpg") == 3


def test_s3_that_keeps_throttling_gives_image_fetch_error_naming_slowdown(flaky):
    limits = ImageLimits(**FAST, fetch_retries=2, s3_client_factory=lambda: _s3_client(flaky))
    with pytest.raises(ImageFetchError, match=r"S3 SlowDown.*gave up after 3 attempt"):
        load_image("s3://s3/always-slowdown-h.jpg", limits=limits)
    assert hits("/s3/always-slowdown-h.jpg") == 3


def test_s3_endpoint_down_is_retried_then_named():
    limits = ImageLimits(**FAST, fetch_retries=1, s3_client_factory=lambda: _s3_client("http://127.0.0.1:9"))
    with pytest.raises(ImageFetchError, match=r"EndpointConnectionError.*gave up after 2 attempt"):
        load_image("s3://b/k.jpg", limits=limits)


def test_s3_buckets_outside_the_allow_list_are_refused_before_any_request(flaky):
    client_made = []

    def factory() -> Any:
        client_made.append(1)
        return _s3_client(flaky)

    limits = ImageLimits(**FAST, allowed_buckets=["s3"], s3_client_factory=factory)
    assert load_image("s3://s3/ok-i.jpg", limits=limits).size == (96, 64)
    with pytest.raises(ImageAccessDenied, match="'other' is not in allowed_buckets"):
        load_image("s3://other/s3/ok-i.jpg", limits=limits)
    assert len(client_made) == 1 and hits("/other/s3/ok-i.jpg") == 0


@pytest.mark.parametrize(
    "host",
    ["169.254.169.254", "[fd00:ec2::254]", "192.0.0.192", "100.100.100.200",
     "[::ffff:169.254.169.254]", "[64:ff9b::a9fe:a9fe]"],
)  # fmt: skip
def test_cloud_metadata_is_refused_even_with_private_urls_and_networks_allowed(host):
    limits = ImageLimits(**FAST, allowed_networks=["0.0.0.0/0", "::/0"])
    with pytest.raises(ImageAccessDenied, match="cloud metadata address: always refused"):
        load_image(f"http://{host}/latest/meta-data/iam/security-credentials/", limits=limits)
