"""http(s) image fetch: bounded, redirects followed by hand, every connect vetted by the address
guard (scalecap.netguard: loopback, private and link-local refused unless allowed, cloud metadata
always), temporary failures (scalecap.retry) retried (transient.py)."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urljoin, urlsplit

from scalecap.errors import ImageAccessDenied, ImageError, ImageNotFound, ImageTooLarge
from scalecap.images.limits import READ_CHUNK, ImageLimits, address_policy
from scalecap.images.refs import describe_source
from scalecap.images.transient import Transient, with_retries
from scalecap.netguard import AddressRefused, guarded_transport
from scalecap.retry import is_temporary_error, is_temporary_status, retry_after

__all__ = ["MAX_REDIRECTS", "fetch_http"]

MAX_REDIRECTS = 5
_USER_AGENT = "scalecap-fleet image loader"


def fetch_http(url: str, limits: ImageLimits, desc: str) -> tuple[bytes, str]:
    """The body and its content type; transient failures retried (each try with its own timeout)."""
    return with_retries(lambda: _fetch_http_once(url, limits, desc), limits, desc)
def _fetch_http_once(url: str, limits: ImageLimits, desc: str) -> tuple[bytes, str]:
    """One try; redirects followed by hand so each hop is checked, every connect vetted."""
    import httpx

    deadline = time.monotonic() + limits.http_timeout
    client = httpx.Client(
        transport=guarded_transport(address_policy(limits)),
        timeout=limits.http_timeout,
        follow_redirects=False,
        trust_env=False,
        # identity: images are compressed already, and a gzip bomb expands a chunk 1000-fold.
        headers={
            "User-Agent": _USER_AGENT,
            "Accept": "image/*,*/*;q=0.5",
            "Accept-Encoding": "identity",
        },
    )
    current = url
    with client:
        for hop in range(MAX_REDIRECTS + 1):
            where = desc if hop == 0 else f"{desc} (redirected to {describe_source(current)})"
            if urlsplit(current).scheme.lower() not in ("http", "https"):
                raise ImageAccessDenied(f"{where}: redirects only to http(s) are followed")
            try:
                with client.stream("GET", current) as resp:
                    if resp.is_redirect:
                        current = urljoin(current, resp.headers["location"])
                        continue
                    _check_status(resp, where)
                    ctype = resp.headers.get("content-type", "")
                    return _read_capped(resp, limits, where, deadline), ctype
            except AddressRefused as exc:
                raise ImageAccessDenied(f"{where}: {exc}") from exc
            except httpx.TimeoutException as exc:
                raise Transient(f"{where}: timed out ({type(exc).__name__})") from exc
            except httpx.TransportError as exc:  # connect refused/reset, broken response: retried
                text = f"{where}: fetch failed: {type(exc).__name__}: {exc}"
                raise (Transient(text) if is_temporary_error(exc) else ImageError(text)) from exc
            except httpx.HTTPError as exc:
                raise ImageError(f"{where}: fetch failed: {type(exc).__name__}: {exc}") from exc
    raise ImageError(f"{desc}: more than {MAX_REDIRECTS} redirects")


def _check_status(resp: Any, where: str) -> None:
    status = resp.status_code
    if status < 400:
        return
    text = f"{where}: HTTP {status} {resp.reason_phrase}".rstrip()
    if status in (404, 410):
        raise ImageNotFound(text)
    if status in (401, 403):
        raise ImageAccessDenied(text)
    if is_temporary_status(status):  # scalecap.retry: 408, 425, 429, 5xx but 501/505
        raise Transient(text, retry_after(resp.headers.get("retry-after")))
    raise ImageError(text)


def _read_capped(resp: Any, limits: ImageLimits, where: str, deadline: float) -> bytes:
    declared = resp.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_bytes:
        raise ImageTooLarge(f"{where}: Content-Length {declared} is over max_bytes={limits.max_bytes}")
    buf = bytearray()
    for chunk in resp.iter_bytes(READ_CHUNK):
        buf += chunk
        if len(buf) > limits.max_bytes:
            raise ImageTooLarge(f"{where}: body is over max_bytes={limits.max_bytes}")
        if time.monotonic() > deadline:
            raise Transient(f"{where}: timed out after {limits.http_timeout} s reading the body")
    return bytes(buf)
