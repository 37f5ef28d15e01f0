"""The real fleet the nemesis attacks: redis-server with an append-only file (fsync every second,
as production runs it), SeaweedFS as the S3 sink, scripted `scalecap worker` processes (each in
its own session, so SIGSTOP freezes all its threads), the I/O worker, `scalecap api`, the webhook
receiver, and the TCP proxy every worker reaches Redis through.

Producers (the CLI, the HTTP API) talk to Redis directly; workers go through the proxy.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.chaos.proxy import RedisProxy
from bench.chaos.receiver import ChaosReceiver
from bench.queue_overhead import REPO
from tests.fixtures_services import RedisServer, S3Server, free_ports

MODEL = "chaos"
BUCKET = "chaos"
ENGINE = "tests.fleet_vlms:FleetVLM"
POISON_COLOUR = "black"
"""Images of this colour hang the scripted engine past the job timeout on every attempt: they
are poisoned on purpose and must end dead-lettered, and only they may."""

JOB_TIMEOUT = 5.0
LEASE_SECONDS = 1.5 * JOB_TIMEOUT + 2.0
"""workers/jobs.py lease_seconds: how long a SIGSTOP must last to outlive a claim."""

FLEET_ENV = {
    "SCALECAP_CHUNK_SIZE": "2",
    "SCALECAP_JOB_TIMEOUT": str(JOB_TIMEOUT),
    "SCALECAP_VISIBILITY_TIMEOUT": str(int(2 * JOB_TIMEOUT)),
    "SCALECAP_MAX_ATTEMPTS": "3",
    "SCALECAP_RECONCILE_INTERVAL": "1",
    "SCALECAP_RETENTION": "86400",
    "SCALECAP_WEBHOOK_TIMEOUT": "2",
    "SCALECAP_WEBHOOK_RETRY_MAX_DELAY": "2",
    "SCALECAP_WEBHOOK_MAX_ATTEMPTS": "500",
    "SCALECAP_WEBHOOK_LEASE": "10",  # an event whose delivery task was lost is due again after this
    "SCALECAP_SUBMIT_TIMEOUT": "20",
    "SCALECAP_ALLOW_PRIVATE_URLS": "1",
    "SCALECAP_MODEL": MODEL,
}


def faketime_available() -> bool:
    return shutil.which("faketime") is not None


class Worker:
    """One `scalecap worker` process in its own session (setsid): signals hit its whole group."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path,
                 skew: str | None = None) -> None:
        self.name = name
        self.args = args
        self.env = dict(env)
        self.log_path = log
        self.skew = skew
        self.proc: subprocess.Popen[bytes] | None = None
        if skew:  # time.time() moves, time.monotonic() does not (asyncio stays sane)
            self.env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"

    def argv(self) -> list[str]:
        base = [sys.executable, "-m", "scalecap_command", "worker", *self.args, "--hostname",
                f"{self.name}@chaos", "--loglevel", "INFO"]
        return ["faketime", "-f", self.skew, *base] if self.skew else base

    def _log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 120.0, wait: bool = True, tries: int = 3) -> Worker:
        """Start it; one that exits while starting (Redis cut off just then) is started again, as
        a supervisor (systemd, Kubernetes) would."""
        for attempt in range(tries):
            seen = len(self._log())
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                             cwd=REPO, start_new_session=True)
            if not wait:
                return self
            try:
                self.wait_ready(timeout, seen)
                return self
            except RuntimeError:
                if self.alive or attempt + 1 == tries:
                    raise
                time.sleep(2.0)
        return self

    def wait_ready(self, timeout: float = 120.0, seen: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self._log()[seen:]:
                return
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited while starting:\n{self._log()[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"worker {self.name} not ready after {timeout:.0f} s:\n{self._log()[-3000:]}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """kill -9 of the whole group: no warm shutdown, no acks."""
        if self.proc is not None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (warm shutdown: in-flight chunks finish), then SIGKILL."""
        if not self.alive:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            self.kill()


class ChaosFleet:
    """Starts and stops every process of the fleet; `tmp` holds their data and logs."""

    def __init__(self, tmp: Path, *, workers: int, seed: int, log: Any = print) -> None:
        self.tmp = tmp
        self.n_workers = workers
        self.seed = seed
        self.say = log
        self.logs = tmp / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.vlm_log = self.logs / "vlm-calls.log"
        (tmp / "redis").mkdir(exist_ok=True)
        self.redis = RedisServer(tmp / "redis", persistent=True)
        # As production: the AOF is fsynced once a second, so a kill -9 may lose up to a second.
        self.redis.argv[self.redis.argv.index("always")] = "everysec"
        self.redis_url = f"{self.redis.url}/0"
        self.s3 = S3Server(tmp / "s3")
        self.proxy_port, self.receiver_port, self.api_port = free_ports(3)
        self.proxy = RedisProxy(self.proxy_port, self.redis.port, seed)
        self.fleet_secret = ""
        self.api_key = ""
        self.receiver: ChaosReceiver | None = None
        self.workers: list[Worker] = []
        self.io: Worker | None = None
        self.api: subprocess.Popen[bytes] | None = None
        self.sink = f"s3://{BUCKET}/out"

    # --- environment ---------------------------------------------------------------------

    def env(self, *, via_proxy: bool = False) -> dict[str, str]:
        url = f"redis://127.0.0.1:{self.proxy_port}/0" if via_proxy else self.redis_url
        return {
            **os.environ,
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            **self.s3.env(),
            **FLEET_ENV,
            "SCALECAP_BROKER_URL": url,
            "SCALECAP_ALLOWED_ROOTS": str(self.tmp),
            "SCALECAP_WEBHOOK_SECRET": self.fleet_secret,
            "SCALECAP_TEST_VLM_LOG": str(self.vlm_log),  # "pid colour" per image captioned
        }

    def busiest_worker(self) -> int | None:
        """The worker that captioned an image last (a pause then hits a run in flight)."""
        from tests.fleet_vlms import read_log

        pids = {w.proc.pid: i for i, w in enumerate(self.workers) if w.proc is not None and w.alive}
        for pid, _ in reversed(read_log(self.vlm_log)[-200:]):
            if pid in pids:
                return pids[pid]
        return None

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """`scalecap ARGS` as an operator runs it (straight to Redis)."""
        return subprocess.run([sys.executable, "-m", "scalecap_command", *args], env=self.env(), cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)

    def worker(self, name: str, *, skew: str | None = None, io: bool = False) -> Worker:
        args = ["--io"] if io else ["--backend", ENGINE, "--model", MODEL, "--concurrency", "4",
                                    "--backend-option", "delay=0.01",
                                    "--backend-option", f"slow_colour={POISON_COLOUR}",
                                    "--backend-option", "slow_seconds=3600"]
        return Worker(name, args, self.env(via_proxy=True), self.logs / f"{name}.log", skew=skew)

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        from scalecap.fleet.signatures import generate_secret

        t0 = time.monotonic()
        self.redis.start()
        self.s3.start()
        self.s3.client().create_bucket(Bucket=BUCKET)
        self.proxy.start()
        self.fleet_secret = generate_secret()
        keys = self.cli("keys", "create", "--name", "chaos", "--scopes", "submit,read")
        if keys.returncode != 0:
            raise RuntimeError(f"scalecap keys create failed: {keys.stderr[-2000:]}")
        fields = dict(re.findall(r"^(\w+): (\S+)$", keys.stdout, re.MULTILINE))
        self.api_key = fields["key"]
        self.receiver = ChaosReceiver(self.receiver_port, [self.fleet_secret, fields["webhook_secret"]],
                                      slow_seconds=3.0, seed=self.seed)
        self.receiver.up()
        with open(self.logs / "api.log", "ab") as log:
            self.api = subprocess.Popen(
                [sys.executable, "-m", "scalecap_command", "api", "--port", str(self.api_port),
                 "--log-level", "warning"],
                stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=REPO, start_new_session=True)
        self.workers = [self.worker(f"w{i}") for i in range(self.n_workers)]
        self.io = self.worker("io", io=True)
        for w in [*self.workers, self.io]:  # all start at once; each is waited for below
            w.start(wait=False)
        for w in [*self.workers, self.io]:
            w.wait_ready()
        self._wait_api()
        self.say(f"fleet up in {time.monotonic() - t0:.1f} s: redis :{self.redis.port} (AOF everysec), "
                 f"S3 :{self.s3.port}, proxy :{self.proxy_port}, {len(self.workers)} workers + I/O, "
                 f"API :{self.api_port}, receiver :{self.receiver_port}")

    def _wait_api(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.api is not None and self.api.poll() is not None:
                raise RuntimeError(f"scalecap api exited:\n{(self.logs / 'api.log').read_text()[-3000:]}")
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError("scalecap api did not answer /healthz")

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def redis_client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis_url)

    def s3_client(self) -> Any:
        return self.s3.client()

    def heal(self) -> None:
        """Everything back up: Redis, S3, the receiver answering, the proxy clean, workers running."""
        if not self.redis.running:
            self.redis.start()
        if not self.s3.running:
            self.s3.start()
        self.proxy.drop_replies(0)
        if self.receiver is not None:
            self.receiver.mode = "ok"
            self.receiver.up()
        for w in self.workers:
            if not w.alive:
                w.start()
            else:
                w.signal(signal.SIGCONT)

    def dump_stacks(self) -> list[str]:
        """Every worker's Python stacks into logs/NAME.stacks, when py-spy is installed: why a
        fleet that never went quiet is stuck. Returns the files written."""
        spy = shutil.which("py-spy")
        if spy is None:
            return []
        out = []
        for w in [*self.workers, *([self.io] if self.io else [])]:
            if w.alive and w.proc is not None:
                path = self.logs / f"{w.name}.stacks"
                with contextlib.suppress(Exception), open(path, "w") as f:
                    subprocess.run([spy, "dump", "--pid", str(w.proc.pid)], stdout=f,
                                   stderr=subprocess.STDOUT, timeout=30)
                    out.append(str(path))
        return out

    def close(self) -> None:
        """Stop everything fast: the run is over, nothing of it is kept but the logs."""
        for w in [*self.workers, *([self.io] if self.io else [])]:
            w.kill()
        if self.api is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.api.pid, signal.SIGKILL)
            self.api.wait(10)
        if self.receiver is not None:
            self.receiver.down()
        self.proxy.stop()
        for server in (self.s3, self.redis):
            if server.proc is not None and server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait(10)
            server.proc = None


def join_all(threads: list[threading.Thread], timeout: float) -> None:
    """Join every thread within one shared deadline (each gets at least 0.1 s)."""
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
