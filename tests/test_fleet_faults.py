"""Fault injection against real redis-server, SeaweedFS, `scalecap worker` processes and an HTTP
receiver, with named failpoints (scalecap/fleet/failpoints.py, `SCALECAP_FAILPOINT=name:exit`).

Each case ends with every record exactly once, the batch finished, each event delivered with its
own webhook-id, and no job charged for another's crash (attempts stay 0 unless the job itself
failed). Cases that can share the machine run at the same time, each on its own Redis DB.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from scalecap.fleet.protocol import OUTBOX_KEY, UNPUBLISHED_KEY
from tests.fixtures_services import WebhookReceiver, _handler
from tests.fleet_support import REPO, Fleet, make_images, s3_objects, wait_until

pytestmark = [pytest.mark.services, pytest.mark.slow]

FAST = {  # a dead worker's message comes back after 5 s; a lease lasts 1.5 x 2 + 2 s
    "SCALECAP_VISIBILITY_TIMEOUT": "5",
    "SCALECAP_JOB_TIMEOUT": "2",
    "SCALECAP_RECONCILE_INTERVAL": "1",
    "SCALECAP_MAX_ATTEMPTS": "2",
}


def _fleet(redis_server, tmp: Path, s3_server, name: str, **env: str) -> Fleet:
    tmp = tmp / name
    tmp.mkdir()
    url = f"{redis_server.url}/{redis_server.fresh_db()}"
    return Fleet(url, tmp, env={**s3_server.env(), **FAST, **env})


def _exactly_once(fleet: Fleet, client, batch_id: str, images: list[Path], s3, bucket: str, prefix: str,
                  orphans: int = 0):
    """Every image done once; `orphans`: records a killed run wrote under its own attempt key
    (fenced: the batch credits, and results read, only the winning run's)."""
    st = client.status(batch_id)
    assert st["state"] == "finished", st
    assert (st["done"], st["failed"], st["queued"], st["running"]) == (len(images), 0, 0, 0), st
    keys = s3_objects(s3, bucket, f"{prefix}/{batch_id}/")
    assert len(keys) == len(images) + orphans, "every record once in the sink, beside a dead run's"
    credited = {j["job_id"]: client.store.job(batch_id, j["job_id"])["location"]
                for j in client.jobs(batch_id, limit=1000)}
    assert {loc.removeprefix(f"s3://{bucket}/") for loc in credited.values()} <= set(keys)
    for job_id, loc in credited.items():  # each credited record names the run the batch credits
        meta = client.record(batch_id, job_id)["scalecap_record"]["meta"]
        assert loc.endswith(f".{meta['attempt']}.json") and meta["worker"]
    rows = list(client.results(batch_id))
    assert sorted(r["image"] for r in rows) == sorted(map(str, images))
    jobs = client.jobs(batch_id, limit=1000)
    assert [j["attempts"] for j in jobs] == [0] * len(images), "charged for a crash not its own"
    return st


# --------------------------------------------------------------------------- the producer


def test_producer_killed_mid_submit_then_resubmitted(redis_server, tmp_path, s3_server, s3_bucket):
    """The producer dies after registering its jobs and before publishing them: nothing runs,
    nothing is lost. A resubmission with the same batch id publishes every job not final; the
    batch completes once the dead producer's session is closed (SCALECAP_SUBMIT_TIMEOUT)."""
    fleet = _fleet(redis_server, tmp_path, s3_server, "producer", SCALECAP_SUBMIT_TIMEOUT="2")
    try:
        images = make_images(fleet.tmp / "imgs", ["red", "green", "blue", "white", "yellow", "red"])
        fleet.scripted(concurrency=2)
        sink = f"s3://{s3_bucket}/p"
        args = ["submit", *map(str, images), "--sink", sink, "--model", "scripted", "--batch-id", "crash1",
                "--broker-url", fleet.redis_url]
        code = f"import sys; from scalecap_command import main; sys.exit(main({args!r}))"
        env = {**fleet.env, "SCALECAP_FAILPOINT": "submit_after_register:exit"}
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == 137, proc.stderr[-2000:]
        client = fleet.client()
        st = client.status("crash1")
        assert (st["state"], st["total"], st["queued"]) == ("submitting", 6, 6)
        assert client.redis.zcard(UNPUBLISHED_KEY) == 1  # the repair note the crash left
        time.sleep(1.0)
        assert fleet.vlm_calls() == [], "a job ran without a message?"

        again = client.submit([str(p) for p in images], sink=sink, model="scripted", batch_id="crash1")
        assert (again.submitted, again.duplicates, again.republished) == (0, 6, 6)
        wait_until(lambda: client.status("crash1")["done"] == 6, timeout=60, what="6 done")
        assert client.status("crash1")["state"] == "submitting", "the dead producer's session is open"
        from scalecap.fleet.sessions import close_expired

        wait_until(lambda: close_expired(client.store, 2) == 1, timeout=10, what="its session expired")
        assert client.status("crash1")["state"] == "finished"
        _exactly_once(fleet, client, "crash1", images, s3_server.client(), s3_bucket, "p")
        assert len(fleet.vlm_calls()) == 6, "no image captioned twice"

        # The crashed producer's note is still there: the reconciler publishes it once; the
        # workers find every job final and do nothing.
        from scalecap_command import main

        assert main(["reconcile", "--grace", "0", "--broker-url", fleet.redis_url]) == 0
        assert client.redis.zcard(UNPUBLISHED_KEY) == 0
        time.sleep(1.0)
        assert len(fleet.vlm_calls()) == 6
    finally:
        fleet.close()


# --------------------------------------------------------------------------- workers


def _killed_worker_case(fleet: Fleet, s3_server, bucket: str, point: str, receiver, out: dict) -> None:
    """Worker A dies at `point` on its first chunk; B (started after) and an I/O worker finish."""
    try:
        colours = ["red", "green", "blue", "white"]
        images = make_images(fleet.tmp / "imgs", colours)
        a = fleet.scripted(concurrency=2, env={"SCALECAP_FAILPOINT": f"{point}:exit"})
        client = fleet.client()
        sub = client.submit([str(p) for p in images], sink=f"s3://{bucket}/{point}", model="scripted",
                            webhook=receiver.url)
        fleet.wait_dead(a)
        fleet.scripted(concurrency=2)
        fleet.io(SCALECAP_WEBHOOK_SECRET=receiver.secret)
        client.wait(sub.batch_id, timeout=120)
        _exactly_once(fleet, client, sub.batch_id, images, s3_server.client(), bucket, point,
                      orphans=2 if point == "after_sink_write" else 0)  # A's chunk of 2
        out[point] = {"calls": len(fleet.vlm_calls()), "batch_id": sub.batch_id}
    except BaseException as exc:  # reported by the test thread
        out[point] = exc


def test_workers_killed_after_claim_and_after_the_sink_write(redis_server, tmp_path, s3_server, s3_bucket,
                                                            webhook_receiver):
    """kill at `after_claim` (nothing run) and at `after_sink_write` (records written, finish not
    run), both at once: the dead run's jobs come back (visibility timeout, expired lease), run
    alone in the quarantine lane uncharged, and each record is written once per key."""
    fleets = {p: _fleet(redis_server, tmp_path, s3_server, p) for p in ("after_claim", "after_sink_write")}
    out: dict = {}
    threads = [threading.Thread(target=_killed_worker_case,
                                args=(f, s3_server, s3_bucket, p, webhook_receiver, out))
               for p, f in fleets.items()]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
    finally:
        for f in fleets.values():
            f.close()
    for point, res in out.items():
        if isinstance(res, BaseException):
            raise AssertionError(f"{point}: {res}") from res
    assert set(out) == set(fleets)
    assert out["after_claim"]["calls"] == 4  # A died before any model work
    assert out["after_sink_write"]["calls"] == 6  # A's chunk of 2 ran, then ran again
    webhook_receiver.wait_for(2, timeout=30)
    time.sleep(1.5)
    got = list(webhook_receiver.requests)
    assert sorted(r.json()["data"]["batch_id"] for r in got) == sorted(o["batch_id"] for o in out.values())
    assert all(r.verified and r.json()["type"] == "batch.completed" for r in got)
    assert len({r.headers["webhook-id"] for r in got}) == 2


def test_worker_killed_after_finish_before_the_outbox_drains(redis_server, tmp_path, s3_server, s3_bucket,
                                                             webhook_receiver):
    """The worker that finished the batch dies right after its finish script; no I/O worker was
    up. The batch.completed event was written by that script, so it is delivered once when an
    I/O worker comes."""
    fleet = _fleet(redis_server, tmp_path, s3_server, "finish")
    try:
        images = make_images(fleet.tmp / "imgs", ["red", "green"])  # one chunk: its finish ends the batch
        a = fleet.scripted(concurrency=2, env={"SCALECAP_FAILPOINT": "after_finish:exit"})
        client = fleet.client()
        sub = client.submit([str(p) for p in images], sink=f"s3://{s3_bucket}/f", model="scripted",
                            webhook=webhook_receiver.url)
        fleet.wait_dead(a)
        assert client.status(sub.batch_id)["state"] == "finished"
        assert client.redis.llen(OUTBOX_KEY) == 1
        fleet.io(SCALECAP_WEBHOOK_SECRET=webhook_receiver.secret)
        got = webhook_receiver.wait_for(1, timeout=30)
        wait_until(lambda: client.redis.llen(OUTBOX_KEY) == 0, timeout=10, what="outbox drained")
        time.sleep(1.5)
        got = list(webhook_receiver.requests)
        assert len(got) == 1 and got[0].verified and got[0].status == 200
        assert got[0].json()["data"]["batch_id"] == sub.batch_id
        _exactly_once(fleet, client, sub.batch_id, images, s3_server.client(), s3_bucket, "f")
    finally:
        fleet.close()


# --------------------------------------------------------------------------- outages


class _Receiver:
    """A webhook receiver that can go down (connection refused) and come back on its port."""

    def __init__(self, secret: str) -> None:
        self.state = WebhookReceiver(url="", secret=secret)
        self.server: ThreadingHTTPServer | None = None
        self.port = 0

    def start(self) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self.state))
        server.daemon_threads = True
        server.block_on_close = False
        self.port = server.server_address[1]
        self.state.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        self.server = server

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def test_s3_down_30s_receiver_down_2min_and_a_job_past_its_deadline(redis_server, tmp_path, s3_server,
                                                                      s3_bucket):
    """One batch meets three faults at once: S3 is down for 30 s (records are written when it is
    back; nobody is charged), the webhook receiver refuses connections for 2 minutes (every
    per-job and batch event still arrives, each once, with its own id), and one image hangs past
    the job timeout (cancelled each time, charged, dead-lettered as JobTimeout)."""
    from scalecap.fleet.signatures import generate_secret

    receiver = _Receiver(generate_secret())
    receiver.start()
    fleet = _fleet(redis_server, tmp_path, s3_server, "outages",
                   SCALECAP_VISIBILITY_TIMEOUT="10", SCALECAP_JOB_TIMEOUT="2",
                   SCALECAP_WEBHOOK_RETRY_MAX_DELAY="8", SCALECAP_WEBHOOK_MAX_ATTEMPTS="60",
                   SCALECAP_WEBHOOK_SECRET=receiver.state.secret)
    try:
        good = make_images(fleet.tmp / "imgs", ["red", "green", "blue", "white", "red", "green"])
        slow = make_images(fleet.tmp / "slow", ["yellow"])
        fleet.scripted(concurrency=4, slow_colour="yellow", slow_seconds=30)
        fleet.io()
        client = fleet.client()
        sink = f"s3://{s3_bucket}/o"
        client.sink(sink)  # checked (and kept open) while S3 is up: the submit itself needs no S3
        receiver.stop()  # down for the whole batch and 2 minutes
        down_at = time.monotonic()
        s3_server.stop()
        sub = client.submit([str(p) for p in good + slow], sink=sink, model="scripted",
                            webhook=receiver.state.url, webhook_jobs=True)
        time.sleep(30)
        assert client.status(sub.batch_id)["done"] == 0, "records written while S3 was down?"
        s3_server.start()
        st = client.wait(sub.batch_id, timeout=120)
        assert (st["done"], st["failed"], st["dead_lettered"]) == (6, 1, 1), st
        jobs = {j["image"]: j for j in client.jobs(sub.batch_id)}
        hung = jobs[str(slow[0])]
        assert hung["error"]["type"] == "JobTimeout" and hung["attempts"] == 2
        assert all(jobs[str(p)]["attempts"] == 0 for p in good), "charged for S3's outage"
        keys = s3_objects(s3_server.client(), s3_bucket, f"o/{sub.batch_id}/")
        assert len(keys) == 6

        time.sleep(max(0.0, 120 - (time.monotonic() - down_at)))
        assert receiver.state.requests == []
        receiver.start()
        got = receiver.state.wait_for(8, timeout=60)  # 7 job events + the batch event
        time.sleep(3.0)  # nothing more should come
        got = list(receiver.state.requests)
        events = [r.json() for r in got]
        assert len(got) == 8 and all(r.verified and r.status == 200 for r in got)
        assert len({r.headers["webhook-id"] for r in got}) == 8, "each event once, its own id"
        assert sorted(e["type"] for e in events) == ["batch.completed"] + ["job.completed"] * 7
        st = client.status(sub.batch_id)
        assert st["webhook_status"] == "delivered"
        assert st["webhook_attempts_total"] > 8  # the refused attempts are recorded too
        assert all(json.loads(json.dumps(a))["webhook_id"] for a in st["webhook_attempts"])
    finally:
        if not s3_server.running:
            s3_server.start()
        receiver.stop()
        fleet.close()
