"""Flower, the real `celery flower`, watches a real fleet: it lists the worker and the caption tasks.

Task events come from the fleet's Celery settings (SCALECAP_TASK_EVENTS, on by default); Flower's
worker details and queue lengths need the workers' remote control (SCALECAP_REMOTE_CONTROL, off by
default), which this test turns on as docs/deploy.md tells Flower users to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_services import free_ports
from tests.fleet_support import SCRIPTED, Fleet, make_images, wait_until

pytestmark = [pytest.mark.services, pytest.mark.slow]


class Flower:
    def __init__(self, broker_url: str, log_path: Path) -> None:
        (self.port,) = free_ports(1)
        self.log_path = log_path
        # As deploy/k8s/flower.yaml runs it: the broker from CELERY_BROKER_URL. Flower 2 guards its
        # HTTP API unless told otherwise.
        env = {**os.environ, "CELERY_BROKER_URL": broker_url, "FLOWER_UNAUTHENTICATED_API": "true"}
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "flower",
                 f"--port={self.port}", "--address=127.0.0.1", "--inspect_timeout=3000"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except OSError as exc:
            return getattr(exc, "code", 0) or 0, str(exc)

    def json(self, path: str) -> Any:
        status, body = self.get(path)
        return json.loads(body) if status == 200 else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def flower(redis_url: str, tmp_path: Path) -> Iterator[Flower]:
    f = Flower(redis_url, tmp_path / "flower.log")
    try:
        wait_until(lambda: f.get("/healthcheck") == (200, "OK") or f.proc.poll() is not None, timeout=60,
                   what="flower up")
        assert f.proc.poll() is None, f.log()[-3000:]
        yield f
    finally:
        f.stop()


def test_flower_lists_the_worker_and_its_caption_tasks(redis_url: str, tmp_path: Path, flower: Flower):
    fleet = Fleet(redis_url, tmp_path, env={"SCALECAP_REMOTE_CONTROL": "1"})
    try:
        worker = fleet.worker("--backend", SCRIPTED, "--model", "scripted", "--concurrency", "2")
        hostname = worker.args[worker.args.index("--hostname") + 1]
        # Remote control: Flower's inspect reaches the worker (and learns its queues).
        workers = wait_until(lambda: (w := flower.json("/api/workers?refresh=1")) and hostname in w and w,
                             timeout=30, what="the worker in /api/workers")
        queues = {q["name"] for q in workers[hostname]["active_queues"]}
        assert "scalecap.gpu.scripted" in queues

        images = make_images(tmp_path / "imgs", ["red", "green", "blue"])
        client = fleet.client()
        sub = client.submit([str(p) for p in images], sink="redis", model="scripted")
        assert client.wait(sub.batch_id, timeout=60)["done"] == 3

        # Task events: the caption tasks, sent by the producer and run by this worker, succeeded.
        def caption_tasks() -> list[dict[str, Any]]:
            tasks = flower.json("/api/tasks?taskname=scalecap.caption") or {}
            done = [t for t in tasks.values() if t.get("state") == "SUCCESS"]
            return done if done and all(t.get("worker") == hostname for t in done) else []

        tasks = wait_until(caption_tasks, timeout=30, what="succeeded caption tasks in /api/tasks")
        assert all(t["name"] == "scalecap.caption" for t in tasks)
        # Each task is a chunk; its result counts the images it ran: three images in all.
        assert sum(json.loads(t["result"].replace("'", '"')).get("done", 0) for t in tasks) == 3
        assert all(t["sent"] or t["received"] for t in tasks)

        # The pages people look at: the workers page names the worker, the task list the task.
        status, page = flower.get("/workers")
        assert status == 200 and hostname in page
        status, page = flower.get("/tasks")
        assert status == 200 and "scalecap.caption" in flower.get("/api/task/types")[1]
    finally:
        fleet.close()
