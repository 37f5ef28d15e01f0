"""The fleet end to end with real redis-server, SeaweedFS and `scalecap worker` processes.

Only the model's content is scripted (tests/fleet_vlms.py); the queue, the workers, the sinks and
the webhooks are the real ones. Model work is counted from the workers' call log.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from tests.fleet_support import Fleet, make_images, s3_objects, wait_until

pytestmark = [pytest.mark.services, pytest.mark.slow]


def _manifest(path: Path, images: list[Path], extra_lines: tuple[str, ...] = ()) -> Path:
    lines = [json.dumps({"image": str(p)}) for p in images] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_batch_into_s3_with_bad_image_and_bad_lines(fleet: Fleet, s3_server, s3_bucket):
    """Good images get records; a bad image is an error record in S3, counted failed; bad
    manifest lines are failed jobs with error rows, not dropped."""
    fleet.scripted()
    images = make_images(fleet.tmp / "imgs", ["red", "green", "bad", "blue"])
    manifest = _manifest(fleet.tmp / "m.jsonl", images, ("{broken json", '{"no_image": 1}'))
    client = fleet.client()
    sink = f"s3://{s3_bucket}/runs"
    sub = client.submit(str(manifest), sink=sink, model="scripted", config={"max_questions": 4})
    assert (sub.submitted, sub.failed, sub.duplicates) == (4, 2, 0)
    st = client.wait(sub.batch_id, timeout=60)
    assert (st["total"], st["done"], st["failed"], st["queued"], st["running"]) == (6, 3, 3, 0, 0)
    assert st["state"] == "finished" and st["finished_at"] >= st["closed_at"]

    keys = s3_objects(s3_server.client(), s3_bucket, f"runs/{sub.batch_id}/")
    assert len(keys) == 4  # 3 records + the bad image's error record

    rows = list(client.results(sub.batch_id))
    assert len(rows) == 6 and len({r["image"] for r in rows}) == 6
    by_image = {r["image"]: r["scalecap_record"] for r in rows}
    bad = by_image[str(images[2])]
    assert bad["error"]["stage"] == "load" and "final_caption" not in bad
    assert by_image[str(images[0])]["final_caption"].startswith("FINAL[")
    assert by_image[str(images[0])]["meta"]["config_hash"] == st["config_hash"]
    line_errors = sorted(
        r["scalecap_record"]["error"]["type"] for r in rows if r["image"].startswith(str(manifest))
    )
    assert line_errors == ["MalformedLine", "MissingImageKey"]

    export = client.export(sub.batch_id)
    body = s3_server.client().get_object(Bucket=s3_bucket, Key=export.split("/", 3)[3])["Body"].read()
    assert len(body.decode().splitlines()) == 4


def test_resubmission_does_no_model_work_and_reused_records_complete_the_batch_prefix(
    fleet: Fleet, s3_server, s3_bucket
):
    fleet.scripted()
    images = make_images(fleet.tmp / "imgs", ["red", "green", "blue"])
    client = fleet.client()
    sink = f"s3://{s3_bucket}/out"
    first = client.submit([str(p) for p in images], sink=sink, model="scripted")
    client.wait(first.batch_id, timeout=60)
    calls = len(fleet.vlm_calls())
    objects = s3_objects(s3_server.client(), s3_bucket)
    assert calls == 3 and len(objects) == 3

    # The same batch again: every job is already in it.
    again = client.submit([str(p) for p in images], sink=sink, model="scripted", batch_id=first.batch_id)
    assert (again.submitted, again.duplicates) == (0, 3)
    # A new batch of the same work: its jobs find the finished records and reuse them.
    second = client.submit([str(p) for p in images], sink=sink, model="scripted")
    st = client.wait(second.batch_id, timeout=60)
    assert st["done"] == 3 and st["failed"] == 0
    assert len(fleet.vlm_calls()) == calls
    # The first batch's records are untouched; the second batch's prefix is complete because
    # the reused records were copied into it (its webhook's results location lists them all).
    after = s3_objects(s3_server.client(), s3_bucket)
    assert sorted(k for k in after if k.startswith(f"out/{first.batch_id}/")) == sorted(objects)
    assert len([k for k in after if k.startswith(f"out/{second.batch_id}/")]) == 3
    assert len(after) == 6
    assert sorted(r["image"] for r in client.results(second.batch_id)) == sorted(map(str, images))
    # A changed config is new work.
    third = client.submit([str(images[0])], sink=sink, model="scripted", config={"max_questions": 3})
    client.wait(third.batch_id, timeout=60)
    assert len(fleet.vlm_calls()) == calls + 1


def test_cancel_leaves_queued_jobs_unrun(fleet: Fleet):
    fleet.scripted(concurrency=2, slow_colour="yellow", slow_seconds=1.0)
    images = make_images(fleet.tmp / "imgs", ["yellow"] * 10)
    client = fleet.client()
    sub = client.submit([str(p) for p in images], sink="redis", model="scripted")
    wait_until(fleet.vlm_calls, timeout=30, what="the first job to start")
    client.cancel(sub.batch_id)
    st = client.wait(sub.batch_id, timeout=60)
    assert st["state"] == "cancelled"
    assert st["done"] >= 1  # jobs already running finish
    assert st["cancelled"] >= 6  # at most the 2 jobs in flight and 2 reserved ones can run
    assert st["done"] + st["cancelled"] == 10 and st["failed"] == 0
    assert len(fleet.vlm_calls()) == st["done"]  # no model work for a cancelled job
    assert len(list(client.results(sub.batch_id))) == st["done"]


def test_webhook_retried_until_accepted_and_attempts_visible(fleet: Fleet, webhook_receiver):
    """The receiver fails twice, then accepts: batch.completed arrives signed, every attempt is
    recorded and shown by `scalecap status`."""
    fleet.scripted()
    fleet.io(SCALECAP_WEBHOOK_SECRET=webhook_receiver.secret)
    webhook_receiver.fail_next(2)
    images = make_images(fleet.tmp / "imgs", ["red", "blue"])
    client = fleet.client()
    sub = client.submit([str(p) for p in images], sink="redis", model="scripted",
                        webhook=webhook_receiver.url)
    got = webhook_receiver.wait_for(3, timeout=60)
    assert [r.status for r in got] == [500, 500, 200]
    assert all(r.verified for r in got)
    assert len({r.headers["webhook-id"] for r in got}) == 1  # one event, retried
    event = got[-1].json()
    assert event["type"] == "batch.completed"
    assert event["data"]["batch_id"] == sub.batch_id
    assert event["data"]["counts"]["done"] == 2
    assert "final_caption" not in got[-1].body.decode()  # thin payload

    from scalecap_command import main

    def status() -> dict:
        out = io.StringIO()
        with redirect_stdout(out):
            assert main(["status", sub.batch_id, "--broker-url", fleet.redis_url]) == 0
        return json.loads(out.getvalue())

    st = wait_until(lambda: (s := status())["webhook_status"] and s, timeout=10, what="webhook status")
    assert st["webhook_status"] == "delivered"
    assert [a["status"] for a in st["webhook_attempts"]] == [500, 500, 200]
    assert [a["attempt"] for a in st["webhook_attempts"]] == [1, 2, 3]


def test_per_job_events_with_webhook_jobs(fleet: Fleet, webhook_receiver):
    """With webhook_jobs, every image's final state is a signed job.completed event (a bad image
    included, with its state), and the batch still ends with one batch.completed."""
    fleet.scripted()
    fleet.io(SCALECAP_WEBHOOK_SECRET=webhook_receiver.secret)
    images = make_images(fleet.tmp / "imgs", ["red", "green", "bad"])
    client = fleet.client()
    sub = client.submit([str(p) for p in images], sink="redis", model="scripted",
                        webhook=webhook_receiver.url, webhook_jobs=True)
    got = webhook_receiver.wait_for(4, timeout=60)
    assert all(r.verified and r.status == 200 for r in got)
    events = [r.json() for r in got]
    jobs = [e for e in events if e["type"] == "job.completed"]
    batches = [e for e in events if e["type"] == "batch.completed"]
    assert len(jobs) == 3 and len(batches) == 1
    assert len({e["data"]["job_id"] for e in jobs}) == 3
    assert sorted(e["data"]["status"] for e in jobs) == ["done", "done", "failed"]
    assert all(e["data"]["batch_id"] == sub.batch_id and e["data"]["results"] for e in jobs)
    assert len({r.headers["webhook-id"] for r in got}) == 4, "each event has its own id"
    # each attempt is recorded after its response: wait for the last records to land
    st = wait_until(lambda: (s := client.status(sub.batch_id)) and len(s["webhook_attempts"]) == 4 and s,
                    timeout=10, what="4 recorded attempts")
    kinds = sorted(a["type"] for a in st["webhook_attempts"])
    assert kinds == ["batch.completed"] + ["job.completed"] * 3
