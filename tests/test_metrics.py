"""Worker metrics and probes, scraped over HTTP from real `scalecap worker --metrics-port` processes.

The worker runs the scripted VLM on a real Redis (and SeaweedFS for the dead-letter case); the
counters are compared with what the batch's records say, not with constants.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures_services import free_ports
from tests.fleet_support import Fleet, make_images, wait_until
from tests.fleet_vlms import FleetVLM

pytestmark = [pytest.mark.services, pytest.mark.slow]


class FailingVLM(FleetVLM):
    """The fleet's scripted VLM, whose caption call raises for images of `fail_colour`."""

    @classmethod
    async def create(cls, model: str = "scripted-vlm", **options: Any) -> FailingVLM:
        fail = options.pop("fail_colour", None)
        vlm = await super().create(model, **options)
        vlm.fail_colour = fail
        return vlm  # type: ignore[return-value]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there is none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def compose_healthcheck(port: int) -> int:
    """Run docker-compose.yml's GPU worker healthcheck command here; its exit status."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    compose = yaml.safe_load((Path(__file__).resolve().parents[1] / "docker-compose.yml").read_text())
    kind, *argv = compose["services"]["worker-gpu0"]["healthcheck"]["test"]
    assert kind == "CMD" and argv[0] == "python"
    env = {**os.environ, "SCALECAP_METRICS_PORT": str(port)}
    return subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30).returncode


def test_counters_and_histograms_match_the_batch(fleet: Fleet):
    (port,) = free_ports(1)
    fleet.worker("--backend", "tests.test_metrics:FailingVLM", "--model", "scripted", "--concurrency", "2",
                 "--backend-option=fail_colour=blue", "--metrics-port", str(port),
                 env={"SCALECAP_METRICS_HOST": "127.0.0.1"})
    before = scrape(port)
    assert value(before, "scalecap_worker_images_total") == 0
    assert value(before, "scalecap_worker_engine_start_seconds", model="scripted") >= 0
    assert value(before, "scalecap_worker_engine_started_timestamp_seconds", model="scripted") > 0
    (info,) = [dict(labels) for (name, labels) in before if name == "scalecap_worker_info"]
    assert info["model"] == "scripted" and "scalecap.gpu.scripted" in info["queues"].split(",")
    status, report = probe(port, "/readyz")
    assert status == 200 and report["ready"] and report["engine_ready"] and report["consuming"]

    images = make_images(fleet.tmp / "imgs", ["red", "green", "blue", "bad", "red"])
    client = fleet.client()
    sub = client.submit([str(p) for p in images], sink="redis", model="scripted")
    st = client.wait(sub.batch_id, timeout=60)
    assert (st["done"], st["failed"]) == (3, 2)  # blue: the engine raised; bad: not an image
    records = [r["scalecap_record"] for r in client.results(sub.batch_id)]

    # The counters are updated after the task returns, a moment after the batch's state moves.
    wait_until(lambda: value(scrape(port), "scalecap_worker_images_total") == 5, timeout=10,
               what="five images in the metrics")
    after = scrape(port)
    assert value(after, "scalecap_worker_task_seconds_count") >= 1  # chunks of up to 16 images
    assert value(after, "scalecap_worker_image_seconds_count", model="scripted") == 5
    assert value(after, "scalecap_worker_images_total", model="scripted", outcome="done") == 3
    assert value(after, "scalecap_worker_images_total", model="scripted", outcome="failed") == 2
    assert value(after, "scalecap_worker_images_in_flight", model="scripted") == 0
    assert value(after, "scalecap_worker_record_errors_total", stage="caption", type="RuntimeError") == 1
    assert value(after, "scalecap_worker_record_errors_total", stage="load") == 1

    # Each chain stage's histogram holds exactly what the records' meta.stage_seconds hold.
    stages: dict[str, list[float]] = {}
    for rec in records:
        for stage, seconds in rec["meta"]["stage_seconds"].items():
            stages.setdefault(stage, []).append(seconds)
    assert {"load", "caption", "fusion"} <= set(stages)
    for stage, secs in stages.items():
        labels = {"model": "scripted", "stage": stage}
        assert value(after, "scalecap_worker_stage_seconds_count", **labels) == len(secs), stage
        assert value(after, "scalecap_worker_stage_seconds_sum", **labels) == pytest.approx(sum(secs))
        assert value(after, "scalecap_worker_stage_seconds_bucket", le="+Inf", **labels) == len(secs)
    for kind in ("prompt", "completion"):
        total = sum(rec["meta"]["tokens"][kind] for rec in records if "tokens" in rec["meta"])
        assert total > 0
        assert value(after, "scalecap_worker_tokens_total", model="scripted", kind=kind) == total
    assert value(after, "scalecap_worker_retries_total") == 0
    assert value(after, "scalecap_worker_dead_letters_total") == 0
    assert value(after, "scalecap_worker_ready") == 1
    assert probe(port, "/healthz")[0] == 200
    assert compose_healthcheck(port) == 0


def test_retries_and_dead_letters_are_counted(fleet: Fleet):
    """Images slower than the job timeout: each attempt is cancelled and charged (a retry), and
    after SCALECAP_MAX_ATTEMPTS the job is dead-lettered. A green image passes on the side."""
    (port,) = free_ports(1)
    fleet.worker("--backend", "tests.fleet_vlms:FleetVLM", "--model", "scripted", "--concurrency", "4",
                 "--backend-option=slow_colour=\"black\"", "--backend-option=slow_seconds=5",
                 "--metrics-port", str(port),
                 env={"SCALECAP_METRICS_HOST": "127.0.0.1", "SCALECAP_MAX_ATTEMPTS": "2",
                      "SCALECAP_JOB_TIMEOUT": "1"})
    fleet.io()  # publishes the charged jobs again when due (by Redis' clock)
    images = make_images(fleet.tmp / "imgs", ["black", "black", "green"])
    client = fleet.client()
    sub = client.submit([str(p) for p in images], sink="redis", model="scripted")
    st = client.wait(sub.batch_id, timeout=60)
    assert (st["done"], st["failed"], st["dead_lettered"]) == (1, 2, 2)
    wait_until(lambda: value(scrape(port), "scalecap_worker_dead_letters_total") == 2, timeout=10,
               what="two dead letters in the metrics")
    m = scrape(port)
    assert value(m, "scalecap_worker_retries_total", task="scalecap.caption", reason="retry") == 2
    assert value(m, "scalecap_worker_images_total", outcome="retry") == 2
    assert value(m, "scalecap_worker_images_total", outcome="dead") == 2
    assert value(m, "scalecap_worker_images_total", outcome="done") == 1
    assert value(m, "scalecap_worker_images_in_flight") == 0
    # Cancelled chains return no record: only the green image reached the histograms.
    assert value(m, "scalecap_worker_image_seconds_count") == 1
    assert value(m, "scalecap_worker_stage_seconds_count", stage="caption") == 1


def test_io_worker_counts_webhook_attempts(fleet: Fleet, webhook_receiver):
    """The I/O worker is ready without an engine and counts each delivery attempt: the receiver
    refuses the first, accepts the scheduled retry."""
    fleet.scripted()
    (port,) = free_ports(1)
    env = {"SCALECAP_METRICS_HOST": "127.0.0.1", "SCALECAP_WEBHOOK_SECRET": webhook_receiver.secret}
    fleet.worker("--io", "--metrics-port", str(port), env=env)
    status, report = probe(port, "/readyz")
    assert status == 200 and report["engine_ready"] and report["consuming"]
    webhook_receiver.fail_next(1)
    images = make_images(fleet.tmp / "imgs", ["red"])
    client = fleet.client()
    client.submit([str(p) for p in images], sink="redis", model="scripted", webhook=webhook_receiver.url)
    assert [r.status for r in webhook_receiver.wait_for(2, timeout=60)] == [500, 200]
    wait_until(lambda: value(scrape(port), "scalecap_worker_webhooks_total", outcome="delivered") == 1,
               timeout=10, what="the delivery in the metrics")
    m = scrape(port)
    assert value(m, "scalecap_worker_webhooks_total", outcome="not_delivered") == 1
    assert value(m, "scalecap_worker_images_total") == 0


def test_healthz_fails_while_an_image_is_stuck_and_recovers(fleet: Fleet):
    """An engine that stops finishing images (here: one that takes 7 s against a 2 s stall limit)
    fails liveness while it is stuck, then passes again."""
    (port,) = free_ports(1)
    fleet.worker("--backend", "tests.fleet_vlms:FleetVLM", "--model", "scripted", "--concurrency", "2",
                 "--backend-option=slow_colour=\"black\"", "--backend-option=slow_seconds=7",
                 "--metrics-port", str(port),
                 env={"SCALECAP_METRICS_HOST": "127.0.0.1", "SCALECAP_STALL_TIMEOUT": "2"})
    assert probe(port, "/healthz")[0] == 200
    images = make_images(fleet.tmp / "imgs", ["black"])
    client = fleet.client()
    sub = client.submit([str(p) for p in images], sink="redis", model="scripted")
    _, report = wait_until(lambda: (r := probe(port, "/healthz"))[0] == 503 and r, timeout=15,
                           what="a failing liveness probe")
    assert report["in_flight"] == 1 and "none finished" in report["problems"][0]
    assert probe(port, "/readyz")[0] == 503
    assert compose_healthcheck(port) != 0  # docker compose ps would call it unhealthy
    assert value(scrape(port), "scalecap_worker_images_in_flight") == 1
    assert client.wait(sub.batch_id, timeout=30)["done"] == 1
    wait_until(lambda: probe(port, "/healthz")[0] == 200, timeout=10, what="liveness back")
    assert probe(port, "/readyz")[0] == 200


def test_heartbeat_stops_when_the_engine_loop_is_blocked():
    """The heartbeat runs inside the engine's event loop: a coroutine that blocks the loop (as a
    synchronous call inside an engine would) stops it, and liveness fails until the loop is free."""
    from scalecap.runtime import BackgroundLoop
    from workers import metrics

    health = metrics.health()
    saved = health.heartbeat_max_age
    loop = BackgroundLoop(name="test-heartbeat")
    try:
        health.heartbeat_max_age = 0.5
        beating = metrics.start_heartbeat(loop, interval=0.05)
        time.sleep(0.3)
        assert health.problems() == []

        async def block() -> None:
            time.sleep(1.5)  # blocking the loop is the point

        blocked = loop.submit(block())
        wait_until(lambda: health.problems(), timeout=5, what="a silent heartbeat")
        assert "event loop silent" in health.problems()[0]
        assert health.report()["live"] is False
        blocked.result(5)
        wait_until(lambda: not health.problems(), timeout=5, what="the heartbeat back")
        beating.cancel()
        time.sleep(0.2)  # the loop runs the cancellation
    finally:
        health.heartbeat_max_age = saved
        loop.stop()
