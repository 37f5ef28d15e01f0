"""The fleet against a locked-down Redis: password, ACL user, TLS; and no secret in any output.

One real redis-server serves a password-protected plain port and a TLS port (self-signed
certificate made with openssl) and has an ACL user. Real `scalecap worker` processes, the real
`scalecap` CLI and the producer client run batches through it; a failing run's every output
(CLI stdout/stderr, worker logs, `status`) is searched for the secrets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_services import RedisServer, free_ports
from tests.fleet_support import REPO, Fleet, make_images, wait_until

pytestmark = [pytest.mark.services, pytest.mark.slow]

PASSWORD = "pw-Default-9f3c1a"
ACL_USER, ACL_PASSWORD = "fleet", "pw-Acl-77b2e0"
TOKEN = "tok-Webhook-5d1e"


class SecureRedis(RedisServer):
    """requirepass on the plain port, plus a TLS port with a self-signed certificate."""

    name = "redis-server (auth, tls)"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.cert, key = workdir / "cert.pem", workdir / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
             "-out", str(self.cert), "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.tls_port = free_ports(1)[0]
        self.argv += [
            "--requirepass", PASSWORD,
            "--tls-port", str(self.tls_port), "--tls-cert-file", str(self.cert),
            "--tls-key-file", str(key), "--tls-ca-cert-file", str(self.cert), "--tls-auth-clients", "no",
        ]  # fmt: skip

    def client(self, db: int = 0, **kwargs: Any):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=db, password=PASSWORD, **kwargs)

    def start(self, timeout: float = 30.0) -> None:
        super().start(timeout)
        admin = self.client()
        admin.execute_command("ACL", "SETUSER", ACL_USER, "on", f">{ACL_PASSWORD}", "~*", "&*", "+@all")


@pytest.fixture(scope="module")
def secure_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRedis]:
    server = SecureRedis(tmp_path_factory.mktemp("secure-redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scalecap_command", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def urls(server: SecureRedis) -> dict[str, tuple[str, dict[str, str]]]:
    """Named broker URLs and the extra environment each needs."""
    db = server.fresh_db
    plain, tls = f"127.0.0.1:{server.port}", f"127.0.0.1:{server.tls_port}"
    return {
        "password": (f"redis://:{PASSWORD}@{plain}/{db()}", {}),
        "acl-user-tls-ca-setting": (f"rediss://{ACL_USER}:{ACL_PASSWORD}@{tls}/{db()}",
                                    {"SCALECAP_REDIS_CA_CERT": str(server.cert)}),
        "tls-ca-in-url": (f"rediss://:{PASSWORD}@{tls}/{db()}?ssl_ca_certs={server.cert}", {}),
    }  # fmt: skip


@pytest.mark.parametrize("kind", ["password", "acl-user-tls-ca-setting", "tls-ca-in-url"])
def test_fleet_runs_through_a_protected_redis(secure_redis, tmp_path, kind):
    url, extra = urls(secure_redis)[kind]
    remote = kind == "tls-ca-in-url"  # one worker with remote control on, to see both ways
    fleet = Fleet(url, tmp_path, env={**extra, "SCALECAP_REMOTE_CONTROL": "1" if remote else "0"})
    try:
        fleet.scripted(concurrency=2)
        images = make_images(tmp_path / "imgs", ["red", "blue"])
        # The CLI: submit and wait, then status; the worker's own Redis clients move the jobs.
        r = cli("submit", *map(str, images), "--model", "scripted", "--wait", env=fleet.env)
        assert r.returncode == 0, r.stderr[-3000:]
        final = json.loads(r.stdout.strip().splitlines()[-1])
        assert (final["done"], final["failed"], final["state"]) == (2, 0, "finished")
        r = cli("status", final["batch_id"], env=fleet.env)
        assert r.returncode == 0 and json.loads(r.stdout)["done"] == 2, r.stderr
        # The producer client, in process.
        client = fleet.client()
        sub = client.submit([str(images[0])], model="scripted")
        assert client.wait(sub.batch_id, timeout=60)["done"] == 1
        # Remote control: only answered where it was switched on.
        replies = client.app.control.ping(timeout=2.0)
        assert bool(replies) is remote, replies
    finally:
        fleet.close()


def test_tls_verifies_the_server_certificate(secure_redis, tmp_path):
    """Without the CA the self-signed server is refused, with a clear, password-free error."""
    url = f"rediss://:{PASSWORD}@127.0.0.1:{secure_redis.tls_port}/0"
    env = {**os.environ, "SCALECAP_BROKER_URL": url}
    r = cli("status", "nope", env=env)
    assert r.returncode == 1
    assert "certificate verify failed" in r.stderr and "Traceback" not in r.stderr
    assert PASSWORD not in r.stdout + r.stderr


def test_remote_control_is_off_by_default_and_events_still_flow(secure_redis, tmp_path):
    """Flower's basic view lives on task events, not on remote control."""
    from scalecap.fleet.app import create_app
    from scalecap.settings import Settings

    url, _ = urls(secure_redis)["password"]
    assert create_app(Settings(broker_url=url)).conf.worker_enable_remote_control is False
    assert create_app(Settings(broker_url=url, remote_control=True)).conf.worker_enable_remote_control
    fleet = Fleet(url, tmp_path)
    events: list[str] = []
    try:
        app = create_app(fleet.settings())
        ready = threading.Event()

        def listen() -> None:
            with app.connection() as conn:
                recv = app.events.Receiver(conn, handlers={"*": lambda e: events.append(e["type"])})
                ready.set()
                try:
                    recv.capture(limit=None, timeout=30, wakeup=False)
                except Exception:
                    pass

        threading.Thread(target=listen, daemon=True).start()
        assert ready.wait(10)
        fleet.scripted(concurrency=1)
        client = fleet.client()
        sub = client.submit([str(make_images(tmp_path / "imgs", ["green"])[0])], model="scripted")
        assert client.wait(sub.batch_id, timeout=60)["done"] == 1
        wait_until(lambda: "task-succeeded" in events, timeout=20, what="a task-succeeded event")
        assert client.app.control.ping(timeout=1.0) == []
    finally:
        fleet.close()


def test_a_failing_run_prints_no_secret(secure_redis, tmp_path):
    """Wrong password at the CLI and at a worker; a right one with a webhook that fails: every
    output is searched for the passwords and the webhook URL's token."""
    wrong = "pw-Wrong-c0ffee42"
    plain = f"127.0.0.1:{secure_redis.port}"
    image = make_images(tmp_path / "imgs", ["red"])[0]
    outputs: list[str] = []

    bad_env = {**os.environ, "SCALECAP_BROKER_URL": f"redis://{ACL_USER}:{wrong}@{plain}/0",
               "SCALECAP_WEBHOOK_SECRET": "whsec_" + "A" * 32}  # fmt: skip
    for args in (["submit", str(image), "--model", "scripted"], ["status", "b1"], ["results", "b1"]):
        r = cli(*args, env=bad_env)
        assert r.returncode != 0 and "error" in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        outputs += [r.stdout, r.stderr]
    r = cli("submit", str(image), "--broker-url", f"redis://:{wrong}@{plain}/0", env=dict(os.environ))
    assert r.returncode != 0
    outputs += [r.stdout, r.stderr]

    # A worker with the wrong password keeps retrying its broker connection, saying why.
    fleet_bad = Fleet(f"redis://:{wrong}@{plain}/0", tmp_path / "bad")
    (tmp_path / "bad").mkdir()
    bad_worker = fleet_bad.worker("--io", start=False)
    url, _ = urls(secure_redis)["password"]
    closed_port = free_ports(1)[0]
    hook = f"http://127.0.0.1:{closed_port}/hook?token={TOKEN}"
    fleet = Fleet(url, tmp_path, env={"SCALECAP_WEBHOOK_SECRET": "whsec_" + "B" * 32,
                                      "SCALECAP_WEBHOOK_MAX_ATTEMPTS": "1"})  # fmt: skip
    try:
        bad_worker.proc = subprocess.Popen(
            [sys.executable, "-m", "scalecap_command", "worker", *bad_worker.args],
            stdout=open(bad_worker.log_path, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
            env=bad_worker.env, cwd=REPO, start_new_session=True,
        )
        fleet.scripted(concurrency=1)
        fleet.io()
        r = cli("submit", str(image), str(tmp_path / "missing.png"), "--model", "scripted",
                "--webhook", hook, "--wait", env=fleet.env)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        outputs += [r.stdout, r.stderr]
        batch_id = json.loads(r.stdout.strip().splitlines()[0])["batch_id"]

        client = fleet.client()
        wait_until(lambda: client.status(batch_id)["webhook_attempts"], timeout=60, interval=0.2,
                   what="a webhook attempt")  # fmt: skip
        st = cli("status", batch_id, env=fleet.env)
        outputs += [st.stdout, st.stderr]
        status = json.loads(st.stdout)
        assert status["webhook"].endswith("/hook?…") and status["failed"] == 1
        wait_until(lambda: "Cannot connect" in bad_worker.log() or "uthentication" in bad_worker.log(),
                   timeout=30, what="the bad worker's connection error")  # fmt: skip
    finally:
        fleet.close()
        bad_worker.stop(timeout=10)
    logs = [w.log() for w in fleet.workers] + [bad_worker.log()]
    assert any("webhook" in log for log in logs), "the webhook failure was logged"
    everything = "\n".join(outputs + logs)
    for secret in (wrong, PASSWORD, TOKEN, "A" * 32, "B" * 32):
        assert secret not in everything, f"{secret} printed"
