"""Submissions as sessions (docs/protocol.md, Sessions): a batch completes only when every
submission feeding it has ended, and one whose producer is gone is closed by the reconciler.

Real redis-server, real `scalecap worker` processes on the scripted engine, the I/O worker and a
real webhook receiver; each case stops at the exact step that used to go wrong.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from producer.client import FleetClient
from scalecap.fleet.protocol import UNPUBLISHED_KEY, batch_jobs_key, batch_key, job_states_key
from scalecap.fleet.sessions import SESSIONS_KEY, Closed, SessionGone, Sessions, close_expired
from scalecap.settings import Settings
from tests.fleet_support import REPO, Fleet, make_images, wait_until

pytestmark = pytest.mark.services


def _ttls(client: FleetClient, batch_id: str) -> list[int]:
    r = client.redis
    return [r.ttl(batch_key(batch_id)), r.ttl(batch_jobs_key(batch_id)), r.ttl(job_states_key(batch_id))]


def test_two_concurrent_submits_complete_the_batch_once_with_the_full_total(fleet: Fleet, webhook_receiver):
    """Producer A registers its first chunk and stalls; producer B submits to the same batch and
    ends; every job registered so far finishes. The batch must not complete then: A is still
    submitting. When A ends, exactly one batch.completed arrives, counting all of A's and B's."""
    fleet.scripted()
    fleet.io(SCALECAP_WEBHOOK_SECRET=webhook_receiver.secret)
    images = make_images(fleet.tmp / "imgs", ["red", "green", "blue", "white", "yellow"])
    refs = [str(p) for p in images]
    resume, stalled = threading.Event(), threading.Event()
    a_result: list = []

    def source_a() -> Iterator[str]:
        yield refs[0]
        time.sleep(0.3)  # past FLUSH_SECONDS: the next row flushes the first chunk
        yield refs[1]
        stalled.set()
        resume.wait(60)
        yield refs[4]

    opts = {"model": "scripted", "batch_id": "together", "webhook": webhook_receiver.url}
    a = threading.Thread(target=lambda: a_result.append(fleet.client().submit(source_a(), **opts)))
    a.start()
    try:
        assert stalled.wait(30)
        c = fleet.client()
        wait_until(lambda: c.status("together")["total"] == 2, timeout=10, what="A's first chunk")
        b = c.submit(refs[2:4], **opts)
        assert (b.submitted, b.completed) == (2, False)
        wait_until(lambda: c.status("together")["done"] == 4, timeout=60, what="4 jobs done")
        time.sleep(1.5)  # the I/O worker drains every 0.5 s: an early completion would be out
        st = c.status("together")
        assert (st["state"], st["finished_at"]) == ("submitting", None), "completed while A submits"
        assert st["sessions"] == 1  # A's
        assert webhook_receiver.requests == []
    finally:
        resume.set()
        a.join(60)
    assert a_result and a_result[0].submitted == 3
    got = webhook_receiver.wait_for(1, timeout=60)
    st = c.wait("together", timeout=30)
    assert (st["total"], st["done"], st["state"]) == (5, 5, "finished")
    time.sleep(1.5)
    got = list(webhook_receiver.requests)
    assert len(got) == 1 and got[0].status == 200 and got[0].verified
    event = got[0].json()
    assert event["type"] == "batch.completed" and event["data"]["counts"]["total"] == 5
    assert c.redis.zcard(SESSIONS_KEY) == 0
    assert all(t > 0 for t in _ttls(c, "together"))


def test_an_abandoned_submit_is_closed_by_the_reconciler_and_its_keys_get_their_ttl(fleet: Fleet):
    """The producer dies after registering its jobs (SIGKILL at that step) and nobody resubmits.
    The reconciler publishes the jobs, closes the session SCALECAP_SUBMIT_TIMEOUT later, and the
    batch finishes with its retention TTL on every key."""
    fleet.env["SCALECAP_SUBMIT_TIMEOUT"] = "2"
    fleet.scripted()
    images = make_images(fleet.tmp / "imgs", ["red", "green", "blue"])
    args = ["submit", *map(str, images), "--model", "scripted", "--batch-id", "gone", "--broker-url",
            fleet.redis_url]
    code = f"import sys; from scalecap_command import main; sys.exit(main({args!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**fleet.env, "SCALECAP_FAILPOINT": "submit_after_register:exit"}, timeout=120)
    assert proc.returncode == 137, proc.stderr[-2000:]
    c = fleet.client()
    assert c.status("gone")["state"] == "submitting" and c.redis.zcard(SESSIONS_KEY) == 1
    assert _ttls(c, "gone") == [-1, -1, -1]
    fleet.io()  # reconciles every second
    st = wait_until(lambda: (s := c.status("gone"))["finished_at"] and s, timeout=60, what="batch closed")
    assert (st["state"], st["total"], st["done"]) == ("finished", 3, 3)
    assert c.redis.zcard(SESSIONS_KEY) == 0 and c.redis.zcard(UNPUBLISHED_KEY) == 0
    assert all(t > 0 for t in _ttls(c, "gone"))


def test_a_submit_that_fails_before_registering_cancels_its_batch(redis_url):
    """The source breaks before its first chunk: the session closes as failed and the batch, with
    nothing registered, is cancelled (finished, with its TTL). A retry to the same id works."""
    c = FleetClient(Settings(broker_url=redis_url))

    def broken() -> Iterator[str]:
        raise OSError("source gone")
        yield "/x/never.png"

    with pytest.raises(OSError, match="source gone"):
        c.submit(broken(), model="nobody", batch_id="cut")
    st = c.status("cut")
    assert (st["state"], st["total"]) == ("cancelled", 0) and st["finished_at"] is not None
    assert c.redis.ttl(batch_key("cut")) > 0 and c.redis.zcard(SESSIONS_KEY) == 0
    again = c.submit(["/x/1.png"], model="nobody", batch_id="cut")
    st = c.status("cut")
    assert again.submitted == 1 and (st["state"], st["total"], st["queued"]) == ("queued", 1, 1)


def test_a_producer_taken_for_gone_stops_and_a_resent_close_changes_nothing(redis_url):
    c = FleetClient(Settings(broker_url=redis_url))
    sub = c.submit(["/x/1.png"], model="nobody", batch_id="s1")
    sessions = Sessions(c.store, timeout=0)
    assert sessions.open("s1", "late") == "opened" and sessions.open("s1", "late") == "open"
    assert c.status("s1")["state"] == "queued"  # open sessions do not reopen a closed batch
    assert close_expired(c.store, 0) == 1
    with pytest.raises(SessionGone):
        sessions.touch("s1", "late")
    assert sessions.close("s1", "late", Closed.OK) == "gone"
    assert sessions.close("s1", sub.batch_id, Closed.OK) == "gone"
