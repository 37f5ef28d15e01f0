"""Result sinks against the real SeaweedFS S3 server and a real Redis (scalecap.fleet.sinks)."""

from __future__ import annotations

import json

import pytest

from scalecap.fleet.sinks import RedisSink, S3Sink, Sink, SinkError, open_sink
from scalecap.settings import Settings

pytestmark = pytest.mark.services

ROW = {"image": "s3://in/a.jpg", "scalecap_record": {"final_caption": "A red kite, ünïcode."}}


@pytest.fixture
def redis_client(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _keys(s3_server, bucket: str) -> list[str]:
    listing = s3_server.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_s3_write_read_overwrite_never_duplicates(s3_server, s3_bucket, redis_client):
    sink = open_sink(f"s3://{s3_bucket}/out", settings=s3_server.settings(), redis_client=None)
    assert isinstance(sink, S3Sink) and isinstance(sink, Sink)
    loc = sink.write("b1", "j1", ROW)
    assert loc == f"s3://{s3_bucket}/out/b1/j1.json"
    assert sink.exists(loc) and sink.read(loc) == ROW
    again = sink.write("b1", "j1", dict(ROW, rerun=True))  # a requeued job runs twice
    assert again == loc and sink.read(loc)["rerun"] is True
    assert _keys(s3_server, s3_bucket) == ["out/b1/j1.json"]
    assert not sink.exists(f"s3://{s3_bucket}/out/b1/missing.json")
    with pytest.raises(ValueError):
        sink.write("b1", "../escape", ROW)


def test_s3_export_jsonl(s3_server, s3_bucket):
    sink = open_sink(f"s3://{s3_bucket}/p/q/", settings=s3_server.settings(), redis_client=None)
    locs = [sink.write("b2", f"j{i}", {"i": i, "text": "x" * 100}) for i in range(25)]
    out = sink.export_jsonl("b2", locs)
    assert out == f"s3://{s3_bucket}/p/q/b2/records.jsonl"
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="p/q/b2/records.jsonl")["Body"]
    lines = body.read().decode().splitlines()
    assert [json.loads(line)["i"] for line in lines] == list(range(25))
    # Without locations it lists the batch, and the export itself is not re-exported.
    again = sink.export_jsonl("b2", key="p/q/b2/all.jsonl")
    text = s3_server.client().get_object(Bucket=s3_bucket, Key="p/q/b2/all.jsonl")["Body"].read()
    assert again.endswith("all.jsonl") and len(text.decode().splitlines()) == 25


def test_s3_export_of_a_large_batch_goes_multipart(s3_server, s3_bucket):
    sink = open_sink(f"s3://{s3_bucket}", settings=s3_server.settings(), redis_client=None)
    big = "y" * (1024 * 1024)  # 10 records of 1 MiB: over boto3's 8 MiB multipart threshold
    locs = [sink.write("b3", f"j{i}", {"i": i, "blob": big}) for i in range(10)]
    sink.export_jsonl("b3", locs)
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="b3/records.jsonl")
    assert head["ContentLength"] > 10 * 1024 * 1024
    assert "-" in head["ETag"]  # multipart ETags are "<md5>-<parts>"


def test_redis_sink_write_read_ttl(redis_client):
    sink = open_sink("redis", settings=Settings(result_ttl=120), redis_client=redis_client)
    assert isinstance(sink, RedisSink) and isinstance(sink, Sink)
    loc = sink.write("b1", "j1", ROW)
    assert loc == "redis://scalecap:result:b1:j1"
    assert sink.exists(loc) and sink.read(loc) == ROW
    assert 0 < redis_client.ttl("scalecap:result:b1:j1") <= 120
    sink.write("b1", "j1", ROW)
    assert redis_client.keys("scalecap:result:*") == [b"scalecap:result:b1:j1"]
    assert not sink.exists("redis://scalecap:result:b1:nope")
    with pytest.raises(SinkError, match="gone"):
        sink.read("redis://scalecap:result:b1:nope")


def test_redis_down_is_a_sink_error():
    import redis

    from tests.fixtures_services import free_ports

    (port,) = free_ports(1)
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis(port=port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    sink = RedisSink(client, ttl=60)
    with pytest.raises(SinkError, match="Redis sink: writing"):
        sink.write("b", "j", ROW)


def test_bad_credentials_and_missing_bucket_are_clear_sink_errors(s3_server, s3_bucket):
    wrong = s3_server.settings(s3_secret_access_key="not-the-secret")
    with pytest.raises(SinkError, match=r"not accessible.*SCALECAP_S3_SECRET_ACCESS_KEY"):
        open_sink(f"s3://{s3_bucket}/out", settings=wrong, redis_client=None)
    with pytest.raises(SinkError, match="'no-such-bucket-x' does not exist"):
        open_sink("s3://no-such-bucket-x/out", settings=s3_server.settings(), redis_client=None)
    with pytest.raises(ValueError, match="unknown sink"):
        open_sink("ftp://x", settings=s3_server.settings(), redis_client=None)


def test_writes_work_again_after_s3_restarts(s3_server, s3_bucket):
    sink = open_sink(f"s3://{s3_bucket}/r", settings=s3_server.settings(), redis_client=None)
    before = sink.write("b", "j1", ROW)
    s3_server.stop()
    down = S3Sink(sink.url, s3_server.client(retries={"max_attempts": 1}))
    with pytest.raises(SinkError, match=r"writing r/b/j2\.json"):
        down.write("b", "j2", ROW)
    s3_server.start()
    assert sink.read(before) == ROW  # data survived the restart
    after = sink.write("b", "j2", ROW)
    assert sink.read(after) == ROW
