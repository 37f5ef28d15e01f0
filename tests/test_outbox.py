"""Events never lost (docs/protocol.md, Outbox): one atomic hand-over per event, pending until
its delivery task settles it, so any failure on the way leaves it due again.

Real redis-server; a second drainer in its own process; real I/O workers and a real receiver.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest

from producer.client import FleetClient
from scalecap.fleet.outbox import PENDING_KEY, Outbox
from scalecap.fleet.protocol import IO_JOBS_QUEUE, IO_QUEUE, OUTBOX_KEY, webhook_attempts_key
from scalecap.settings import Settings
from tests.fleet_support import REPO, Fleet, make_images, wait_until

pytestmark = pytest.mark.services


def _sent_ids(r) -> Counter:
    """Event ids of every webhook task message waiting in the two I/O lanes."""
    import base64

    ids: Counter = Counter()
    for lane in (IO_QUEUE, IO_JOBS_QUEUE):
        for raw in r.lrange(lane, 0, -1):
            event, member = json.loads(base64.b64decode(json.loads(raw)["body"]))[0]
            assert json.loads(member) == event
            ids[event["id"]] += 1
    return ids


def _events(c: FleetClient, n_batches: int, tag: str) -> set[str]:
    """n_batches cancelled batches of two images with per-job events: 3 events each."""
    before = {json.loads(x)["id"] for x in c.redis.lrange(OUTBOX_KEY, 0, -1)}
    for i in range(n_batches):
        sub = c.submit([f"/x/{tag}{i}a.png", f"/x/{tag}{i}b.png"], model="nobody",
                       webhook="http://h/x", webhook_jobs=True)
        c.cancel(sub.batch_id)
    return {json.loads(x)["id"] for x in c.redis.lrange(OUTBOX_KEY, 0, -1)} - before


def test_a_second_drainer_at_the_same_time_loses_no_event(redis_url):
    """Drainer A (its own process) takes one event and stalls before publishing it; drainer B
    drains everything else meanwhile, and new events arrive. When A goes on, every event has
    been handed over exactly once, and each stays pending until a delivery task settles it."""
    c = FleetClient(Settings(broker_url=redis_url))
    first = _events(c, 3, "a")
    code = ("from producer.client import FleetClient; from scalecap.settings import Settings; "
            f"c = FleetClient(Settings(broker_url={redis_url!r})); "
            "from scalecap.fleet.outbox import Outbox; print(Outbox(c.redis).drain(c.app).events)")
    a = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO),
                              "SCALECAP_FAILPOINT": "drain_after_take:sleep=2"})
    try:
        wait_until(lambda: c.redis.llen(OUTBOX_KEY) == len(first) - 1, timeout=30, what="A took one")
        b = Outbox(c.redis)
        assert b.drain(c.app).events == len(first) - 1  # B, while A holds its event
        later = _events(c, 1, "b")  # arrive while A is still stalled
        out, _ = a.communicate(timeout=60)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 0 and int(out) >= 1
    b.drain(c.app)  # whatever A left
    sent = _sent_ids(c.redis)
    assert set(sent) == first | later and set(sent.values()) == {1}, sent
    assert c.redis.llen(OUTBOX_KEY) == 0 and b.pending() == len(first | later)
    member = c.redis.zrange(PENDING_KEY, 0, 0)[0].decode()
    assert b.settle(member) and not b.settle(member)  # settled once; a second copy changes nothing
    assert b.pending() == len(first | later) - 1


def test_a_redis_error_inside_the_webhook_task_leaves_the_event_due(fleet: Fleet, webhook_receiver):
    """The webhook is POSTed, then recording the attempt fails with a Redis error (its attempts
    key holds the wrong type). The event stays pending; its lease lapses and it is delivered
    again, with the same webhook-id, and settled once the task gets through."""
    fleet.scripted()
    fleet.io(SCALECAP_WEBHOOK_SECRET=webhook_receiver.secret, SCALECAP_WEBHOOK_LEASE="2")
    c = fleet.client()
    c.redis.set(webhook_attempts_key("wrongtype"), "not a list")  # RPUSH on it: WRONGTYPE
    images = make_images(fleet.tmp / "imgs", ["red"])
    c.submit([str(p) for p in images], model="scripted", batch_id="wrongtype", webhook=webhook_receiver.url)
    first = webhook_receiver.wait_for(1, timeout=60)[0]
    assert first.status == 200 and first.verified
    time.sleep(1.0)
    assert c.redis.zcard(PENDING_KEY) == 1, "the event was lost with the failed task"
    assert c.redis.llen(OUTBOX_KEY) == 0
    c.redis.delete(webhook_attempts_key("wrongtype"))  # Redis is healthy again
    got = webhook_receiver.wait_for(2, timeout=60)
    assert {r.headers["webhook-id"] for r in got} == {first.headers["webhook-id"]}
    wait_until(lambda: c.redis.zcard(PENDING_KEY) == 0, timeout=30, what="the event settled")
    st = c.status("wrongtype")
    assert st["webhook_status"] == "delivered" and st["webhook_attempts_total"] >= 1


def test_a_publish_that_fails_leaves_the_event_due(redis_url):
    """The broker refuses the webhook task's message: the event, already handed over, is not
    lost; when its lease lapses the next drain hands it over again."""
    from scalecap.fleet.app import create_app
    from tests.fixtures_services import free_ports

    c = FleetClient(Settings(broker_url=redis_url))
    ids = _events(c, 1, "p")
    dead = create_app(Settings(broker_url=f"redis://127.0.0.1:{free_ports(1)[0]}/0"))
    outbox = Outbox(c.redis, lease=0.5)
    with pytest.raises(Exception):  # noqa: B017 - kombu's connection error, whatever its class
        outbox.drain(dead)
    assert c.redis.llen(OUTBOX_KEY) == len(ids) - 1 and outbox.pending() == 1
    time.sleep(0.6)
    assert outbox.drain(c.app).retries_due == 1  # the one that failed, due again
    assert set(_sent_ids(c.redis)) == ids and outbox.pending() == len(ids)


def test_a_webhook_host_that_does_not_resolve_is_retried(fleet: Fleet):
    """The receiver's name does not resolve (an .invalid name never does, RFC 6761): each attempt
    is recorded with the resolver's error and the next one is scheduled, as for a refused
    connection; the event stays pending, never marked failed after one try."""
    fleet.scripted()
    from scalecap.fleet.signatures import generate_secret

    fleet.io(SCALECAP_WEBHOOK_SECRET=generate_secret(), SCALECAP_WEBHOOK_RETRY_MAX_DELAY="0.5")
    c = fleet.client()
    images = make_images(fleet.tmp / "imgs", ["red"])
    c.submit([str(p) for p in images], model="scripted", batch_id="nodns",
             webhook="http://scalecap-test-receiver.invalid/hook")
    st = wait_until(lambda: (s := c.status("nodns"))["webhook_attempts_total"] >= 2 and s, timeout=60,
                    what="a second attempt")
    assert st["webhook_status"] == "retrying"
    attempts = st["webhook_attempts"]
    assert [a["attempt"] for a in attempts[:2]] == [1, 2]
    assert all("resolve" in (a["error"] or "") for a in attempts), attempts
    pending = [json.loads(m) for m in c.redis.zrange(PENDING_KEY, 0, -1)]
    assert len(pending) == 1 and pending[0]["batch_id"] == "nodns"
