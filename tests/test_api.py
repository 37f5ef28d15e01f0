"""The HTTP API end to end: a real `scalecap api` process, real Redis, S3 and workers (scripted VLM).

Submit (JSON and streamed JSONL), follow, read results, cancel, quotas, idempotent retries, the
synchronous caption call, per-key webhook signatures, size limits, path refusal, readiness and
metrics. Keys are made with the CLI.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.api_support import IDLE_MODEL, MAX_BODY, MAX_UPLOAD, MODEL, ApiStack, create_key
from tests.fleet_support import wait_until

pytestmark = [pytest.mark.services, pytest.mark.slow]


def _problem(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status and body["type"].startswith("urn:scalecap:problem:") and body["detail"]
    return body


def test_json_batch_runs_to_results_failures_and_one_record(api_stack: ApiStack):
    s, a = api_stack, api_stack.tenant_a
    refs = [str(p) for p in s.images[:2]] + [str(s.bad_image)]
    r = s.post("/v1/batches", a, json={"images": refs, "model": MODEL, "config": {"max_questions": 3}})
    assert r.status_code == 202, r.text
    body = r.json()
    bid = body["batch_id"]
    assert body["status_url"].endswith(f"/v1/batches/{bid}") and r.headers["location"] == f"/v1/batches/{bid}"

    st = s.wait(bid, a)
    assert (st["total"], st["done"], st["failed"], st["state"]) == (3, 2, 1, "finished")
    assert st["owner"] == a.key_id and st["model"] == MODEL

    res = s.get(f"/v1/batches/{bid}/results", a)
    assert res.status_code == 200 and res.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(line) for line in res.text.splitlines()]
    assert sorted(r["image"] for r in rows) == sorted(refs)  # each image once
    good = next(r for r in rows if r["image"] == refs[0])["scalecap_record"]
    assert good["final_caption"]

    jobs = s.get(f"/v1/batches/{bid}/jobs", a).json()["items"]
    assert len(jobs) == 3
    jid = next(j["job_id"] for j in jobs if j["image"] == refs[0])
    one = s.get(f"/v1/batches/{bid}/results/{jid}", a)
    assert one.status_code == 200 and one.json()["scalecap_record"]["final_caption"] == good["final_caption"]
    _problem(s.get(f"/v1/batches/{bid}/results/nosuchjob", a), 404)

    fails = s.get(f"/v1/batches/{bid}/failures", a).json()
    assert [f["image"] for f in fails["failed"]] == [str(s.bad_image)]
    assert fails["failed"][0]["error"]["stage"] == "load"

    listed = s.get("/v1/batches", a, params={"limit": 500}).json()
    assert bid in [b["batch_id"] for b in listed["items"]]
    assert all(b["owner"] == a.key_id for b in listed["items"])


def test_jsonl_upload_streams_rows_and_refuses_bad_lines_one_by_one(api_stack: ApiStack):
    s, a = api_stack, api_stack.tenant_a
    lines = [json.dumps({"image": str(s.images[2])}), json.dumps(str(s.images[3])), "{broken",
             json.dumps({"image": "/etc/passwd"}), json.dumps({"image": str(s.images[2])}),
             json.dumps({"no_image": 1})]
    r = s.post("/v1/batches", a, params={"model": MODEL}, content="\n".join(lines).encode(),
               headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["submission"] == {"submitted": 2, "failed": 3, "duplicates": 1}
    st = s.wait(body["batch_id"], a)
    assert (st["total"], st["done"], st["failed"]) == (5, 2, 3)
    fails = s.get(f"/v1/batches/{body['batch_id']}/failures", a).json()["failed"]
    types = sorted(f["error"]["type"] for f in fails)
    assert types == ["ImageAccessDenied", "MalformedLine", "MissingImageKey"]


def test_local_paths_outside_the_roots_are_refused(api_stack: ApiStack, tmp_path):
    s, a = api_stack, api_stack.tenant_a
    root = s.env["SCALECAP_ALLOWED_ROOTS"]
    link = os.path.join(root, "escape.png")
    if not os.path.lexists(link):
        os.symlink("/etc/passwd", link)
    for ref in ["/etc/passwd", f"{root}/../../etc/passwd", "file:///etc/passwd", link]:
        body = _problem(s.post("/v1/batches", a, json={"images": [ref], "model": MODEL}), 403)
        assert body["detail"].startswith("images[0]:") and "SCALECAP_ALLOWED_ROOTS" in body["detail"], body
    for ref in ["relative/x.png", "gopher://x/y", f"file://evil.example{root}/a.png", root + "/\x00x"]:
        body = _problem(s.post("/v1/batches", a, json={"images": [ref], "model": MODEL}), 400)
        assert body["detail"].startswith("images[0]:"), body
    # a directory or manifest inside the roots is one image reference, never expanded by the API
    r = s.post("/v1/batches", a, json={"images": [root], "model": MODEL})
    assert r.status_code == 202
    st = s.wait(r.json()["batch_id"], a)
    assert (st["total"], st["failed"]) == (1, 1)


def test_idempotency_key_and_batch_id_make_retries_safe(api_stack: ApiStack):
    s, a, b = api_stack, api_stack.tenant_a, api_stack.tenant_b
    body = {"images": [str(s.images[0])], "model": MODEL}
    first = s.post("/v1/batches", a, json=body, headers={"Idempotency-Key": "retry-1"})
    assert first.status_code == 202
    bid = first.json()["batch_id"]
    s.wait(bid, a)
    again = s.post("/v1/batches", a, json=body, headers={"Idempotency-Key": "retry-1"})
    assert again.status_code == 200 and again.json() == {**first.json(), "replayed": True}
    # The same Idempotency-Key from another tenant is another batch.
    other = s.post("/v1/batches", b, json=body, headers={"Idempotency-Key": "retry-1"})
    assert other.status_code == 202 and other.json()["batch_id"] != bid

    # A client batch_id: a retry adds nothing twice.
    name = f"nightly-{time.time_ns()}"
    s.submit(a, images=[str(p) for p in s.images[:2]], batch_id=name)
    s.submit(a, images=[str(p) for p in s.images[:3]], batch_id=name)
    st = s.wait(name, a)
    assert (st["total"], st["done"]) == (3, 3)
    # Another tenant cannot add to it (and learns nothing but that the id is taken).
    _problem(s.post("/v1/batches", b, json={**body, "batch_id": name}), 409)
    assert s.wait(name, a)["total"] == 3


def test_quota_answers_429_with_retry_after_and_cuts_uploads(api_stack: ApiStack):
    s = api_stack
    q = create_key(s.env, "small", "--max-queued", "3", "--all-data")
    r = s.post("/v1/batches", q, json={"images": [str(p) for p in s.images[:4]], "model": IDLE_MODEL})
    body = _problem(r, 429)
    assert r.headers["retry-after"] == "7" and "quota" in body["detail"]
    first = s.post("/v1/batches", q, json={"images": [str(p) for p in s.images[:2]], "model": IDLE_MODEL})
    assert first.status_code == 202
    wait_until(lambda: s.get(f"/v1/batches/{first.json()['batch_id']}", q).json()["queued"] == 2)
    # One more image fits: an upload of three gets one queued and two QuotaExceeded rows.
    lines = "\n".join(json.dumps({"image": str(p)}) for p in s.images[1:4])
    up = s.post("/v1/batches", q, params={"model": IDLE_MODEL}, content=lines,
                headers={"Content-Type": "application/x-ndjson"})
    assert up.status_code == 202 and up.json()["submission"] == {"submitted": 1, "failed": 2, "duplicates": 0}
    fails = s.get(f"/v1/batches/{up.json()['batch_id']}/failures", q).json()["failed"]
    assert [f["error"]["type"] for f in fails] == ["QuotaExceeded", "QuotaExceeded"]
    r = s.post("/v1/captions", q, json={"image": str(s.images[0]), "model": IDLE_MODEL})
    _problem(r, 429)
    # Cancelling frees the quota.
    s.post(f"/v1/batches/{first.json()['batch_id']}/cancel", q)
    s.post(f"/v1/batches/{up.json()['batch_id']}/cancel", q)
    again = s.post("/v1/batches", q, json={"images": [str(s.images[0])], "model": IDLE_MODEL})
    assert again.status_code == 202
    s.post(f"/v1/batches/{again.json()['batch_id']}/cancel", q)


def test_cancel_stops_queued_jobs(api_stack: ApiStack):
    s, a = api_stack, api_stack.tenant_a
    bid = s.submit(a, images=[str(p) for p in s.images], model=IDLE_MODEL)
    wait_until(lambda: s.get(f"/v1/batches/{bid}", a).json()["state"] == "queued")
    r = s.post(f"/v1/batches/{bid}/cancel", a)
    assert r.status_code == 200 and r.json()["cancelled"] == 4
    st = s.wait(bid, a)
    assert st["state"] == "cancelled" and st["done"] == 0


def test_caption_call_is_synchronous_then_202_to_poll(api_stack: ApiStack):
    s, a = api_stack, api_stack.tenant_a
    r = s.post("/v1/captions", a, json={"image": str(s.images[1]), "model": MODEL, "config": {"seed": 7}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["state"] == "done" and body["record"]["scalecap_record"]["final_caption"]
    slow = s.post("/v1/captions", a, params={"wait": 0.2},
                  json={"image": str(s.images[1]), "model": IDLE_MODEL})
    assert slow.status_code == 202 and slow.json()["record"] is None
    assert slow.headers["location"] == slow.json()["result_url"]
    poll = s.get(slow.json()["result_url"].removeprefix(s.url), a)
    _problem(poll, 409)
    s.post(f"/v1/batches/{slow.json()['batch_id']}/cancel", a)


def test_webhook_signed_with_the_keys_own_secret(api_stack: ApiStack, webhook_receiver):
    s, a, b = api_stack, api_stack.tenant_a, api_stack.tenant_b
    webhook_receiver.secret = a.webhook_secret
    bid = s.submit(a, images=[str(s.images[0])], webhook=webhook_receiver.url)
    got = webhook_receiver.wait_for(1, timeout=60)
    assert got[0].json()["type"] == "batch.completed" and got[0].json()["data"]["batch_id"] == bid
    assert got[0].verified, "not signed with the key's own webhook secret"
    from scalecap.fleet.signatures import verify_webhook

    # Neither the other tenant's secret nor the fleet's shared one verifies it.
    assert not verify_webhook(b.webhook_secret, got[0].headers, got[0].body)
    assert not verify_webhook(s.env["SCALECAP_WEBHOOK_SECRET"], got[0].headers, got[0].body)


def test_size_limits_and_bad_bodies_are_4xx(api_stack: ApiStack):
    s, a = api_stack, api_stack.tenant_a
    big = {"images": ["data:image/png;base64," + "A" * MAX_BODY], "model": MODEL}
    _problem(s.post("/v1/batches", a, json=big), 413)

    def chunked():  # no Content-Length: the limit is counted while reading
        yield b'{"images": ["data:,'
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"A" * 65536
        yield b'"]}'

    _problem(s.post("/v1/batches", a, content=chunked(), headers={"Content-Type": "application/json"}), 413)

    def huge_upload():  # long lines: few rows, many bytes
        line = (json.dumps({"image": "data:," + "B" * 900_000}) + "\n").encode()
        for _ in range(MAX_UPLOAD // len(line) + 2):
            yield line

    r = s.post("/v1/batches", a, params={"model": IDLE_MODEL}, content=huge_upload(),
               headers={"Content-Type": "application/x-ndjson"})
    _problem(r, 413)
    for bad in [b"{", b"[]", b'{"images": []}', b'{"images": ["x"], "source": "s3://b/p"}',
                b'{"images": [1]}', b'{"images": ["https://x.example/a.png"], "sink": "ftp://x"}',
                b'{"images": ["https://x.example/a.png"], "config": {"llm_base_url": "http://evil"}}',
                b'{"images": ["https://x.example/a.png"], "model": "///"}',
                b'{"images": ["https://x.example/a.png"], "webhook": "ftp://x"}',
                b'{"images": ["https://x.example/a.png"], "config": {"nope": 1}}',
                b'{"source": "s3://no-such-bucket-here/prefix/"}', b'{"images": ["x"], "extra": 1}']:
        r = s.post("/v1/batches", a, content=bad, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (bad, r.text)
        _problem(r, 400)
    for bad in [b'{"images": ["https://x.example/a.png"], "config": {"max_questions": -1}}',
                b'{"images": ["https://x.example/a.png"], "config": {"temperature": "hot"}}']:
        # a config field that is invalid or over the operator's limits: 422 naming it
        r = s.post("/v1/batches", a, content=bad, headers={"Content-Type": "application/json"})
        body = _problem(r, 422)
        assert body["errors"][0]["loc"][0] == "config"
    _problem(s.post("/v1/batches", a, content=b"x", headers={"Content-Type": "text/plain"}), 415)


def test_s3_source_prefix(api_stack: ApiStack, s3_server, s3_bucket):
    s, a = api_stack, api_stack.tenant_a
    c = s3_server.client()
    for p in s.images[:2]:
        c.put_object(Bucket=s3_bucket, Key=f"in/{p.name}", Body=p.read_bytes())
    bid = s.submit(a, source=f"s3://{s3_bucket}/in/", sink=f"s3://{s3_bucket}/out")
    st = s.wait(bid, a)
    assert (st["total"], st["done"]) == (2, 2)
    rows = [json.loads(x) for x in s.get(f"/v1/batches/{bid}/results", a).text.splitlines()]
    assert sorted(r["image"] for r in rows) == sorted(f"s3://{s3_bucket}/in/{p.name}" for p in s.images[:2])


def test_readyz_healthz_and_metrics(api_stack: ApiStack):
    s = api_stack
    assert s.get("/healthz").json() == {"status": "ok"}
    ready = s.get("/readyz")
    assert ready.status_code == 200 and ready.json()["workers"] and ready.json()["signal"] == "inspect"
    idle = s.get("/readyz", params={"model": IDLE_MODEL})
    assert idle.status_code == 503 and idle.json()["workers"] == [] and idle.json()["redis"] is True
    bid = s.submit(s.tenant_b, images=[str(s.images[0])], model=IDLE_MODEL)
    wait_until(lambda: s.get(f"/v1/batches/{bid}", s.tenant_b).json()["state"] == "queued")
    text = s.get("/metrics").text
    assert f'scalecap_api_queue_depth{{model="{IDLE_MODEL}",queue="scalecap.gpu.{IDLE_MODEL}"}}' in text
    prefix = f'scalecap_api_queue_depth{{model="{IDLE_MODEL}"'
    depth = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    assert float(depth[0].split()[-1]) >= 1
    images_prefix = f'scalecap_api_queued_images{{model="{IDLE_MODEL}"'
    queued = [ln for ln in text.splitlines() if ln.startswith(images_prefix)]
    assert float(queued[0].split()[-1]) >= 1
    assert 'scalecap_api_batches{state="queued"}' in text and 'scalecap_api_batches{state="finished"}' in text
    assert 'scalecap_api_requests_total{code="202",method="POST",route="/v1/batches"}' in text
    assert 'route="/v1/batches/{batch_id}"' in text  # templates, never raw ids
    assert bid not in text
    assert 'scalecap_api_request_duration_seconds_bucket{le="0.005",method="GET",route="/healthz"}' in text
    s.post(f"/v1/batches/{bid}/cancel", s.tenant_b)
    for page in ("/openapi.json", "/docs"):
        assert s.get(page).status_code == 200
    # CORS is off unless configured: no browser origin is allowed.
    pre = s.http.options("/v1/batches", headers={"Origin": "https://evil.example",
                                                 "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers
    got = s.get("/v1/batches", s.tenant_b, headers={"Origin": "https://evil.example"})
    assert got.status_code == 200 and "access-control-allow-origin" not in got.headers
    # Keys never reach the API's log.
    log = s.api.log()
    for k in (s.tenant_a, s.tenant_b, s.admin, s.revoked):
        secret = k.raw.split("_", 2)[2]  # sk_<key id>_<secret>; the secret may hold "_" itself
        assert k.raw not in log and secret not in log


def test_redis_down_is_503_not_a_crash(tmp_path):
    """An API whose Redis does not answer stays up: health 200, readiness and routes 503."""
    from tests.api_support import ApiProcess
    from tests.fixtures_services import free_ports
    from tests.fleet_support import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "SCALECAP_BROKER_URL": f"redis://127.0.0.1:{free_ports(1)[0]}/0"}
    api = ApiProcess(env, tmp_path / "api.log").start()
    try:
        import httpx

        with httpx.Client(base_url=api.url, timeout=30) as http:
            assert http.get("/healthz").status_code == 200
            ready = http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["redis"] is False
            r = http.get("/v1/batches", headers={"Authorization": "Bearer sk_0123456789abcdef_" + "x" * 40})
            _problem(r, 503)
            assert r.headers["retry-after"] == "5"
    finally:
        api.stop()


def test_readyz_reads_worker_heartbeats_when_remote_control_is_off(api_stack: ApiStack, tmp_path):
    """With Celery remote control off, readiness comes from heartbeats in Redis (written here as a
    worker would write them with scalecap.fleet.presence.beat)."""
    import httpx

    from scalecap.fleet import presence as worker_presence
    from tests.api_support import ApiProcess

    api = ApiProcess({**api_stack.env, "SCALECAP_REMOTE_CONTROL": "0"}, tmp_path / "api.log").start()
    try:
        with httpx.Client(base_url=api.url, timeout=30) as http:
            worker_presence.beat(api_stack.redis(), "w-test@host", ["scalecap.gpu.heartbeat-model"])
            beating = http.get("/readyz", params={"model": "heartbeat-model"})
            assert beating.status_code == 200 and beating.json()["workers"] == ["w-test@host"]
            assert beating.json()["signal"] == "heartbeat"
            silent = http.get("/readyz", params={"model": IDLE_MODEL})
            assert silent.status_code == 503 and silent.json()["workers"] == []
            # The stack's real scripted worker beats by itself (workers/cli.py start_presence).
            real = http.get("/readyz", params={"model": MODEL})
            assert real.status_code == 200 and real.json()["signal"] == "heartbeat", real.text
            assert len(real.json()["workers"]) == 1
    finally:
        api.stop()


def test_cors_only_for_configured_origins(api_stack: ApiStack, tmp_path):
    import httpx

    from tests.api_support import ApiProcess

    env = {**api_stack.env, "SCALECAP_API_CORS_ORIGINS": "https://app.example"}
    api = ApiProcess(env, tmp_path / "api.log").start()
    try:
        with httpx.Client(base_url=api.url, timeout=30) as http:
            for origin, allowed in (("https://app.example", True), ("https://evil.example", False)):
                pre = http.options("/v1/batches", headers={"Origin": origin,
                                                           "Access-Control-Request-Method": "POST",
                                                           "Access-Control-Request-Headers": "authorization"})
                assert (pre.headers.get("access-control-allow-origin") == origin) is allowed
                got = http.get("/v1/batches", headers={"Origin": origin, **api_stack.tenant_a.headers})
                assert got.status_code == 200
                assert (got.headers.get("access-control-allow-origin") == origin) is allowed
    finally:
        api.stop()


def test_s3_source_with_webdataset_shards_and_hf_parquet(api_stack: ApiStack, s3_server, s3_bucket, tmp_path):
    """A source prefix holding a WebDataset shard and an HF datasets Parquet file: every member and
    row is its own job, sidecars and ids travel into meta.source, as with `scalecap submit`."""
    from tests.test_shards import _hf_parquet, wds_samples, write_tar

    s, a = api_stack, api_stack.tenant_a
    c = s3_server.client()
    shard = write_tar(tmp_path / "00000.tar", wds_samples(["red", "blue"]))
    c.put_object(Bucket=s3_bucket, Key="ds/shards/00000.tar", Body=shard.read_bytes())
    bid = s.submit(a, source=f"s3://{s3_bucket}/ds/shards/{{00000..00000}}.tar")
    st = s.wait(bid, a)
    assert (st["total"], st["done"]) == (2, 2), st
    rows = [json.loads(x) for x in s.get(f"/v1/batches/{bid}/results", a).text.splitlines()]
    metas = [r["scalecap_record"]["meta"]["source"] for r in rows]
    sources = sorted((m["key"], m["txt"]) for m in metas)
    assert sources == [("000000", "alt text red"), ("000001", "alt text blue")]
    assert all(r["image"].startswith(f"wds+s3://{s3_bucket}/ds/shards/00000.tar#") for r in rows)

    pq = _hf_parquet(tmp_path / "train.parquet", ["green", "white", "yellow"])
    c.put_object(Bucket=s3_bucket, Key="ds/hf/train.parquet", Body=pq.read_bytes())
    bid = s.submit(a, source=f"s3://{s3_bucket}/ds/hf/", image_column="image", id_column="uid")
    st = s.wait(bid, a)
    assert (st["total"], st["done"]) == (3, 3), st
    rows = [json.loads(x) for x in s.get(f"/v1/batches/{bid}/results", a).text.splitlines()]
    assert sorted(r["scalecap_record"]["meta"]["source"]["id"] for r in rows) == ["uid-0", "uid-1", "uid-2"]


def test_shard_references_are_vetted_by_what_they_open(api_stack: ApiStack):
    """A wds+/pq+ reference names a file a worker will open: it gets the same guard as a path."""
    s, a = api_stack, api_stack.tenant_a
    r = s.post("/v1/batches", a, json={"images": ["wds+file:///etc/shadow.tar#key=x&ext=jpg&offset=0&size=9"]})
    _problem(r, 403)
    assert "SCALECAP_ALLOWED_ROOTS" in r.json()["detail"]
    r = s.post("/v1/batches", a, json={"images": ["pq+s3://b/f.parquet#garbage"]})
    _problem(r, 400)
    assert "shard reference" in r.json()["detail"]
