"""The HTTP API under test: a real `scalecap api` process beside a real fleet, shared by the session.

`api_stack` starts, on a fresh Redis DB of the session's redis-server and the session's S3 server:
a scripted-VLM worker for model "scripted", an I/O worker (webhooks) and the API process, exactly
as an operator would (`python -m scalecap_command api`). Keys for two tenants, an admin, a revoked
key and a read-only key are made through the CLI and parsed from its output.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures_services import free_ports
from tests.fleet_support import REPO, Fleet, make_images

MODEL = "scripted"
"""The model the stack's worker holds."""
IDLE_MODEL = "no-workers"
"""A model no worker holds: its jobs stay queued (quota, cancel and timeout tests)."""
MAX_BODY = 256 * 1024
MAX_UPLOAD = int(os.environ.get("SCALECAP_TEST_MAX_UPLOAD", 48 * 1024 * 1024))
"""The stack's upload limit (the 413 test goes past it); raise it to upload a 1M-line manifest."""


@dataclass
class Key:
    raw: str
    key_id: str
    webhook_secret: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.raw}"}


def cli(env: dict[str, str], *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "scalecap_command", *args], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"scalecap {' '.join(args)} failed ({out.returncode}):\n{out.stderr}")
    return out.stdout


def create_key(env: dict[str, str], name: str, *extra: str) -> Key:
    """`scalecap keys create`, parsed the way the README's scripts parse it."""
    out = cli(env, "keys", "create", "--name", name, *extra)
    raw = re.search(r"^key: (sk_\S+)$", out, re.M)
    kid = re.search(r"^key_id: (\S+)$", out, re.M)
    secret = re.search(r"^webhook_secret: (whsec_\S+)$", out, re.M)
    assert raw and kid and secret, out
    return Key(raw.group(1), kid.group(1), secret.group(1))


class ApiProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> ApiProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scalecap_command", "api", "--host", "127.0.0.1",
             "--port", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"API exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"API not up after {timeout} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class ApiStack:
    url: str
    fleet: Fleet
    api: ApiProcess
    env: dict[str, str]
    images: list[Path]
    bad_image: Path
    tenant_a: Key
    tenant_b: Key
    admin: Key
    revoked: Key
    reader: Key
    http: httpx.Client = field(repr=False)

    def get(self, path: str, key: Key | None = None, **kw: Any) -> httpx.Response:
        headers = {**(key.headers if key else {}), **kw.pop("headers", {})}
        return self.http.get(path, headers=headers, **kw)

    def post(self, path: str, key: Key | None = None, **kw: Any) -> httpx.Response:
        headers = {**(key.headers if key else {}), **kw.pop("headers", {})}
        return self.http.post(path, headers=headers, **kw)

    def submit(self, key: Key, **body: Any) -> str:
        r = self.post("/v1/batches", key, json={"model": MODEL, **body})
        assert r.status_code == 202, r.text
        return r.json()["batch_id"]

    def wait(self, batch_id: str, key: Key, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.get(f"/v1/batches/{batch_id}", key).json()
            if st.get("finished_at") is not None:
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"batch {batch_id} not finished after {timeout} s: {st}")
            time.sleep(0.1)

    def redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.env["SCALECAP_BROKER_URL"])


@pytest.fixture(scope="session")
def api_stack(redis_server: Any, s3_server: Any, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[ApiStack]:
    from scalecap.fleet.signatures import generate_secret

    if not redis_server.running:
        redis_server.start()
    tmp = tmp_path_factory.mktemp("api")
    redis_url = f"{redis_server.url}/{redis_server.fresh_db()}"
    fleet = Fleet(redis_url, tmp, env={
        **s3_server.env(),
        "SCALECAP_MODEL": MODEL,
        "SCALECAP_REMOTE_CONTROL": "1",
        # A fleet-wide secret that no test receiver knows: a webhook verified with a key's own
        # secret proves it was signed with that key's secret, not this one.
        "SCALECAP_WEBHOOK_SECRET": generate_secret(),
        "SCALECAP_API_MAX_BODY_BYTES": str(MAX_BODY),
        "SCALECAP_API_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        "SCALECAP_API_CAPTION_TIMEOUT": "20",
        "SCALECAP_API_RETRY_AFTER": "7",
    })
    api = ApiProcess(fleet.env, tmp / "api.log")
    http = None
    try:
        fleet.scripted(MODEL)
        fleet.io()
        images = make_images(tmp / "imgs", ["red", "green", "blue", "yellow"])
        bad = make_images(tmp / "bad", ["bad"])[0]
        env = fleet.env
        # The stack's tenants read every root and bucket of the fleet (--all-data), as the older
        # tests expect; tests/test_hostile_tenant.py makes its own scoped keys.
        keys = {name: create_key(env, name, "--all-data") for name in ("tenant-a", "tenant-b", "revoked")}
        admin = create_key(env, "ops", "--scopes", "admin")
        reader = create_key(env, "dashboards", "--scopes", "read")
        cli(env, "keys", "revoke", keys["revoked"].key_id)
        api.start()
        http = httpx.Client(base_url=api.url, timeout=60)
        yield ApiStack(api.url, fleet, api, env, images, bad, keys["tenant-a"], keys["tenant-b"], admin,
                       keys["revoked"], reader, http)
    finally:
        if http is not None:
            http.close()
        api.stop()
        fleet.close()
        if os.environ.get("SCALECAP_TEST_SHOW_API_LOG"):
            print(api.log())
