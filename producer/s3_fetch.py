"""Many small S3 objects, fetched at once: the read path of `scalecap results` for S3 sinks.

A batch's records are one small JSON object each. boto3 spends a millisecond or more of Python per
request (signing, event hooks, parsing), so a thread pool of boto3 calls is CPU-bound in the GIL
long before the network is busy. Here one asyncio loop (in a background thread) keeps up to
`connections` keep-alive HTTP/1.1 connections busy with SigV4-signed GETs (signing key cached per
day, UNSIGNED-PAYLOAD as for any GET), and a caller asks for a window of objects at a time, so
memory is bounded by the window. Anything but a plain `200` with a Content-Length (an error, a
redirect, a chunked body) is fetched again with boto3, which turns it into the usual error.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import ssl
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any
from urllib.parse import quote, urlsplit

from scalecap.runtime import BackgroundLoop

_MAX_HEADER_LINES = 100


class _Fallback(Exception):
    """This object needs the boto3 path (an error status or an unusual response)."""


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


class SigV4:
    """AWS Signature Version 4 for a GET with no body (header form)."""

    def __init__(self, access_key: str, secret_key: str, region: str, token: str | None = None) -> None:
        self.access_key, self.secret_key, self.region, self.token = access_key, secret_key, region, token
        self._keys: dict[str, bytes] = {}

    def _key(self, date: str) -> bytes:
        key = self._keys.get(date)
        if key is None:
            key = _hmac(("AWS4" + self.secret_key).encode(), date)
            for part in (self.region, "s3", "aws4_request"):
                key = _hmac(key, part)
            self._keys = {date: key}
        return key

    def headers(self, host: str, path: str, now: datetime.datetime | None = None) -> dict[str, str]:
        """Headers for `GET path` on `host`; `path` already percent-encoded."""
        now = now or datetime.datetime.now(datetime.UTC)
        amz = now.strftime("%Y%m%dT%H%M%SZ")
        date = amz[:8]
        h = {"host": host, "x-amz-content-sha256": "UNSIGNED-PAYLOAD", "x-amz-date": amz}
        if self.token:
            h["x-amz-security-token"] = self.token
        names = ";".join(sorted(h))
        canonical = "\n".join(["GET", path, "", *(f"{k}:{h[k]}" for k in sorted(h)), "", names,
                               "UNSIGNED-PAYLOAD"])
        scope = f"{date}/{self.region}/s3/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{amz}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        sig = hmac.new(self._key(date), to_sign.encode(), hashlib.sha256).hexdigest()
        h["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
                              f"SignedHeaders={names}, Signature={sig}")
        return h


class S3Fetcher:
    """`get_many(["s3://bucket/key", ...])` returns the objects' bodies in order.

    `fallback(url)` (boto3 by default) reads one object the slow, thorough way: it runs for any
    response this client does not take as a plain success, and its exceptions propagate."""

    def __init__(
        self,
        settings: Any,
        *,
        connections: int = 32,
        fallback: Callable[[str], bytes] | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.connections = max(1, int(connections))
        self.timeout = timeout
        self._boto = None
        self._fallback = fallback or self._boto_get
        self._settings = settings
        creds, region = self._credentials(settings)
        self._signer = SigV4(creds[0], creds[1], region, creds[2]) if creds else None
        endpoint = settings.s3_endpoint_url or f"https://s3.{region}.amazonaws.com"
        parts = urlsplit(endpoint)
        self._path_style = bool(settings.s3_endpoint_url)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._tls else 80)
        self._base_path = parts.path.rstrip("/")
        self._loop = BackgroundLoop(name="scalecap-s3-fetch")
        self._idle: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}
        self._ssl = ssl.create_default_context() if self._tls else None
        self.fallbacks = 0
        """Objects that went the boto3 way (errors, redirects, unusual responses)."""

    @staticmethod
    def _credentials(settings: Any) -> tuple[tuple[str, str, str | None] | None, str]:
        region = settings.s3_region or "us-east-1"
        if settings.s3_access_key_id and settings.s3_secret_access_key:
            return (settings.s3_access_key_id, settings.s3_secret_access_key, None), region
        try:  # the usual AWS chain: environment, profile, instance role
            import boto3

            session = boto3.Session()
            region = settings.s3_region or session.region_name or region
            c = session.get_credentials()
            if c is None:
                return None, region
            f = c.get_frozen_credentials()
            return (f.access_key, f.secret_key, f.token), region
        except Exception:
            return None, region

    def _boto_get(self, url: str) -> bytes:
        from scalecap.fleet.sinks import parse_s3_url
        from scalecap.images import s3_client

        if self._boto is None:
            self._boto = s3_client(self._settings, max_pool_connections=4)
        bucket, key = parse_s3_url(url)
        return self._boto.get_object(Bucket=bucket, Key=key)["Body"].read()

    # --- one request ------------------------------------------------------------------------

    def _target(self, url: str) -> tuple[str, str]:
        bucket, _, key = url[5:].partition("/")
        if self._path_style:
            return self._host_header(self._host), f"{self._base_path}/{bucket}/{quote(key, safe='/~')}"
        return self._host_header(f"{bucket}.{self._host}"), f"/{quote(key, safe='/~')}"

    def _host_header(self, host: str) -> str:
        default = 443 if self._tls else 80
        return host if self._port == default else f"{host}:{self._port}"

    async def _connection(self, host: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        idle = self._idle.setdefault(host, [])
        while idle:
            reader, writer = idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        return await asyncio.open_connection(name, self._port, ssl=self._ssl,
                                             server_hostname=name if self._ssl else None)

    async def _get(self, url: str) -> bytes:
        if self._signer is None:
            raise _Fallback("no credentials for signing")
        host, path = self._target(url)
        headers = self._signer.headers(host, path)
        request = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        for attempt in (0, 1):  # a kept-alive connection the server closed: one fresh try
            reader, writer = await self._connection(host)
            try:
                writer.write(request.encode())
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    if attempt == 0 and not exc.partial:
                        writer.close()
                        continue
                    raise
                status, length, keep = self._parse_head(head)
                if length is None or status != 200:
                    writer.close()
                    raise _Fallback(f"HTTP {status}")
                body = await reader.readexactly(length)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                writer.close()
                if attempt == 0:
                    continue
                raise _Fallback(str(exc)) from exc
            except BaseException:
                writer.close()
                raise
            if keep:
                self._idle.setdefault(host, []).append((reader, writer))
            else:
                writer.close()
            return body
        raise _Fallback("connection closed twice")

    @staticmethod
    def _parse_head(head: bytes) -> tuple[int, int | None, bool]:
        """(status, Content-Length or None when the body is chunked or unsized, keep-alive)."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        length, keep = None, True
        for line in lines[1:_MAX_HEADER_LINES]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length" and value.strip().isdigit():
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                keep = False
            elif name == "transfer-encoding":
                return status, None, False
        return status, length, keep

    async def _many(self, urls: Sequence[str]) -> list[bytes | None]:
        sem = asyncio.Semaphore(self.connections)
        out: list[bytes | None] = [None] * len(urls)

        async def one(i: int, url: str) -> None:
            async with sem:
                try:
                    async with asyncio.timeout(self.timeout):
                        out[i] = await self._get(url)
                except (_Fallback, OSError, ValueError, TimeoutError):
                    out[i] = None  # the caller's thread fetches it with boto3

        await asyncio.gather(*(one(i, u) for i, u in enumerate(urls)))
        return out

    def submit(self, urls: Sequence[str]) -> Future[list[bytes | None]]:
        """Start fetching `urls` (the caller keeps working meanwhile); `collect` finishes."""
        return self._loop.submit(self._many(list(urls)))

    def collect(self, urls: Sequence[str], pending: Future[list[bytes | None]]) -> list[bytes | Exception]:
        """The bodies in order; an object that failed both ways is its exception, in its place."""
        out: list[bytes | Exception] = []
        for url, body in zip(urls, pending.result(), strict=True):
            if body is None:
                self.fallbacks += 1
                try:
                    body = self._fallback(url)
                except Exception as exc:
                    out.append(exc)
                    continue
            out.append(body)
        return out

    def get_many(self, urls: Sequence[str]) -> list[bytes]:
        """The bodies in order; the first object that cannot be read raises."""
        out = self.collect(urls, self.submit(urls))
        for body in out:
            if isinstance(body, Exception):
                raise body
        return out  # type: ignore[return-value]

    def close(self) -> None:
        async def shut() -> None:
            for conns in self._idle.values():
                for _, writer in conns:
                    writer.close()
            self._idle.clear()

        try:
            self._loop.run(shut(), timeout=5)
        finally:
            self._loop.stop()

    def __enter__(self) -> S3Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
