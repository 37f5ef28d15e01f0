"""Real `scalecap worker` processes for the fleet tests, and small helpers around them.

Workers are started exactly as an operator would (`python -m scalecap_command worker ...`) with their
own environment; a worker counts as up when Celery logs "ready.". Every worker a test starts is
stopped (SIGTERM, then SIGKILL) when the `fleet` fixture tears down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.scripted_vlm import COLOURS  # one palette for every scripted image

REPO = Path(__file__).resolve().parents[1]
SCRIPTED = "tests.fleet_vlms:FleetVLM"


def make_images(folder: Path, spec: list[str], size: tuple[int, int] = (64, 48)) -> list[Path]:
    """One PNG per entry of `spec` (a colour name, or "bad" for bytes that are not an image)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, colour in enumerate(spec):
        if colour == "bad":
            p = folder / f"{i:03d}-bad.jpg"
            p.write_bytes(b"this is not an image")
        else:
            p = folder / f"{i:03d}-{colour}.png"
            # A per-file pixel keeps every image's bytes distinct while the colour dominates.
            img = Image.new("RGB", size, COLOURS[colour])
            img.putpixel((0, 0), (i % 256, (i // 256) % 256, 7))
            img.save(p)
        paths.append(p)
    return paths


class WorkerProcess:
    """One `scalecap worker` subprocess with its log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scalecap_command", "worker", *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready after {timeout} s:\n{self.log()[-4000:]}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """kill -9: no warm shutdown, no acks; its reserved jobs stay unacknowledged in Redis."""
        if self.alive:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(10)  # type: ignore[union-attr]

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL after `timeout`."""
        if self.proc is None:
            return None
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


class Fleet:
    """Starts workers against one Redis URL with a shared environment; stops them all at the end."""

    def __init__(self, redis_url: str, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.redis_url = redis_url
        self.tmp = tmp
        self.vlm_log = tmp / "vlm-calls.log"
        self.workers: list[WorkerProcess] = []
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "SCALECAP_BROKER_URL": redis_url,
            "SCALECAP_ALLOWED_ROOTS": str(tmp),
            "SCALECAP_ALLOW_PRIVATE_URLS": "1",
            "SCALECAP_TEST_VLM_LOG": str(self.vlm_log),
            # Small chunks so a few images still spread over workers; quick repair and retries.
            "SCALECAP_CHUNK_SIZE": "2",
            "SCALECAP_JOB_TIMEOUT": "300",  # vLLM on a loaded CPU is slow; fault tests set 2
            "SCALECAP_RECONCILE_INTERVAL": "1",
            "SCALECAP_WEBHOOK_RETRY_MAX_DELAY": "2",
            **(env or {}),
        }

    def settings(self, **overrides: Any) -> Any:
        from scalecap.settings import Settings

        return Settings.from_env(self.env, **overrides)

    def client(self, **overrides: Any) -> Any:
        from producer.client import FleetClient

        return FleetClient(self.settings(**overrides))

    def worker(self, *args: str, env: dict[str, str] | None = None, start: bool = True) -> WorkerProcess:
        n = len(self.workers)
        w = WorkerProcess(
            [*args, "--hostname", f"w{n}-{os.getpid()}@test", "--loglevel", "INFO"],
            {**self.env, **(env or {})},
            self.tmp / f"worker-{n}.log",
        )
        self.workers.append(w)
        return w.start() if start else w

    def scripted(self, model: str = "scripted", concurrency: int = 4, *, env: dict[str, str] | None = None,
                 start: bool = True, **options: Any) -> WorkerProcess:
        """A worker on the scripted VLM (fast; only the model's content is scripted)."""
        import json

        opts = [f"--backend-option={k}={json.dumps(v)}" for k, v in options.items()]
        return self.worker("--backend", SCRIPTED, "--model", model, "--concurrency", str(concurrency), *opts,
                           env=env, start=start)

    def io(self, **env: str) -> WorkerProcess:
        return self.worker("--io", env=env)

    def wait_dead(self, w: WorkerProcess, timeout: float = 60.0) -> None:
        """Until `w` exited by itself (a failpoint's exit)."""
        wait_until(lambda: not w.alive, timeout=timeout, what=f"worker {w.pid} to die")

    def vlm_calls(self) -> list[tuple[int, str]]:
        from tests.fleet_vlms import read_log

        return read_log(self.vlm_log)

    def close(self) -> None:
        for w in self.workers:
            w.stop(timeout=15)


@pytest.fixture
def fleet(redis_url: str, tmp_path: Path, s3_server: Any) -> Iterator[Fleet]:
    """A Fleet on a fresh Redis DB, pointed at the session's S3 server."""
    f = Fleet(redis_url, tmp_path, env=s3_server.env())
    try:
        yield f
    finally:
        f.close()


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.1, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


def s3_objects(client: Any, bucket: str, prefix: str = "") -> list[str]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys
