"""The queue protocol against a real Redis: names, the job message, and the Lua counter updates.

No workers here: these tests drive BatchStore directly, the way workers and producers do.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from producer.sources import expand
from scalecap.errors import ConfigError
from scalecap.fleet.protocol import (
    IO_QUEUE,
    UNPUBLISHED_KEY,
    BatchStore,
    Chunk,
    JobMessage,
    Outcome,
    check_batch_id,
    counts,
    fleet_job_id,
    gpu_queue,
    slug,
)


def test_queue_names():
    assert gpu_queue("Qwen/Qwen2.5-VL-7B-Instruct") == "scalecap.gpu.qwen-qwen2-5-vl-7b-instruct"
    assert gpu_queue("/models/tiny-qwen2vl/") == "scalecap.gpu.tiny-qwen2vl"
    assert slug("./local/My Model") == "my-model"
    assert IO_QUEUE == "scalecap.io"
    with pytest.raises(ConfigError):
        slug("///")
    with pytest.raises(ConfigError):
        check_batch_id("a/b")


def test_job_message_is_a_json_chunk_and_versioned():
    msg = JobMessage(batch_id="b", jobs=(("j1", "s3://x/y.jpg"), ("j2", "/z.png")))
    data = json.loads(json.dumps(msg.to_json()))
    assert JobMessage.from_json(data) == msg
    q = JobMessage("b", (("j1", "r"),), quarantine=True)
    assert JobMessage.from_json(json.loads(json.dumps(q.to_json()))).quarantine
    with pytest.raises(ValueError):
        JobMessage.from_json({**data, "v": 1})
    with pytest.raises(ValueError):
        JobMessage.from_json({"v": 2, "batch_id": "b"})
    with pytest.raises(ValueError):
        JobMessage.from_json({"v": 2, "batch_id": "b", "jobs": [["only-id"]]})


def test_chunks_split_into_messages_of_k_and_quarantine_one_at_a_time():
    member = json.dumps({"b": "b", "q": "scalecap.gpu.m", "jobs": [[f"j{i}", f"r{i}"] for i in range(5)]})
    chunk = Chunk.parse(member)
    assert [len(m.jobs) for m in chunk.messages(2)] == [2, 2, 1]
    q = Chunk.parse(json.dumps({"b": "b", "q": "scalecap.gpu.m.quarantine",
                                "jobs": [["a", "1"], ["b", "2"]]}))
    assert [len(m.jobs) for m in q.messages(16)] == [1, 1] and all(m.quarantine for m in q.messages(16))


def test_job_id_is_stable_per_image_config_and_model():
    a = fleet_job_id("/x/1.png", "cfg1", "Qwen/A")
    assert a == fleet_job_id("/x/1.png", "cfg1", "Qwen/A")
    assert a != fleet_job_id("/x/1.png", "cfg2", "Qwen/A")
    assert a != fleet_job_id("/x/1.png", "cfg1", "Qwen/B")
    assert a != fleet_job_id("/x/2.png", "cfg1", "Qwen/A")


def _store(redis_url: str) -> BatchStore:
    import redis

    return BatchStore(redis.Redis.from_url(redis_url))


def _batch(store: BatchStore, bid: str = "b1") -> str:
    store.create_batch(bid, config={}, config_hash="h", model="m", queue="q", sink="redis")
    return bid


@pytest.mark.services
def test_job_ids_page_each_job_once_in_arrival_order_even_while_jobs_arrive(redis_url):
    store = _store(redis_url)
    b = _batch(store)
    store.register_jobs(b, [(f"j{i:04d}", f"r{i}", None) for i in range(250)], queue="q")
    seen = []
    for n, j in enumerate(store.job_ids(b, count=100)):
        seen.append(j)
        if n == 150:  # a late chunk of the submission lands mid-iteration
            store.register_jobs(b, [(f"k{i:03d}", f"s{i}", None) for i in range(30)]
                                + [("j0001", "r1", None)], queue="q")
    assert seen == [f"j{i:04d}" for i in range(250)] + [f"k{i:03d}" for i in range(30)]


@pytest.mark.services
def test_exactly_one_caller_completes_the_batch(redis_url):
    """Many threads finish jobs at once; finished_at is set once and one caller sees it."""
    store = _store(redis_url)
    b = _batch(store)
    n = 200
    store.register_jobs(b, [(f"j{i}", f"r{i}", None) for i in range(n)], queue="q")
    assert store.close(b).result == "ok"  # closed, not finished
    results: list[str] = []
    lock = threading.Lock()

    def finish(ids: range) -> None:
        s = _store(redis_url)
        for i in ids:
            c = s.claim(b, [f"j{i}"], token=f"t{i}", lease_seconds=60, max_attempts=3, queue="q")
            r = s.finish(b, [Outcome(f"j{i}", "done" if i % 3 else "failed", f"redis://{i}")],
                         token=f"t{i}", lease=c.lease, max_attempts=3, queue="q", sink="redis").result
            with lock:
                results.append(r)

    threads = [threading.Thread(target=finish, args=(range(k, n, 4),)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("completed") == 1
    batch = store.batch(b)
    c = counts(batch)
    assert c["done"] + c["failed"] == n and c["queued"] == c["running"] == 0
    assert batch["finished_at"]


@pytest.mark.services
def test_close_finishes_an_already_final_batch(redis_url):
    store = _store(redis_url)
    b = _batch(store)
    err = {"stage": "submit", "type": "MalformedLine", "message": "x"}
    store.register_jobs(b, [("j1", "line:1", err)], queue="q")
    assert store.close(b).completed
    assert not store.close(b).completed  # finished_at is set once
    empty = _batch(store, "empty")
    assert store.close(empty).completed


def test_sources_stream_manifest_rows_and_keep_bad_lines(tmp_path: Path):
    img_dir = tmp_path / "imgs"
    (img_dir / "sub").mkdir(parents=True)
    for name in ("b.png", "a.jpg", "sub/c.webp", "notes.txt"):
        (img_dir / name).write_bytes(b"x")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"image": "rel/x.png"}\n'
        "\n"
        "{not json\n"
        '{"other": 1}\n'
        '"plain/string.png"\n'
        '{"image": "s3://bucket/k.jpg"}\n'
    )
    rows = list(expand([str(manifest), str(img_dir), {"image": "https://h/i.png"}, {"x": 1}]))
    refs = [r.ref for r in rows if r.error is None]
    assert refs == [
        str(tmp_path / "rel/x.png"),
        str(tmp_path / "plain/string.png"),
        "s3://bucket/k.jpg",
        str(img_dir / "a.jpg"),
        str(img_dir / "b.png"),
        str(img_dir / "sub/c.webp"),
        "https://h/i.png",
    ]
    errors = [(r.ref, r.error["type"]) for r in rows if r.error]
    assert errors == [
        (f"{manifest}:3", "MalformedLine"),
        (f"{manifest}:4", "MissingImageKey"),
        ("item:4", "MissingImageKey"),
    ]


def test_sources_are_lazy(tmp_path: Path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(f'{{"image": "/x/{i}.png"}}\n' for i in range(1000)))
    it = expand(str(manifest))
    assert next(it).ref == "/x/0.png"  # nothing else needed to be read first


class _Runtime:
    """Stands in for the engine runtime in workers.jobs: returns records or fails like an engine."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls = 0

    def caption_chunk(self, config, items, timeout, watch=None):
        out = []
        for job_id, ref in items:
            self.calls += 1
            if self.fail:
                from scalecap.errors import BackendError

                out.append(BackendError("engine down"))
            else:
                out.append({"final_caption": f"caption of {ref}", "meta": {"job_id": job_id}})
        return out


@pytest.mark.services
def test_chunk_lifecycle_retries_dead_letters_and_reuses_records(redis_url):
    """workers.jobs against real Redis and the Redis sink, without a Celery worker around it."""
    import redis

    from scalecap.settings import Settings
    from workers.jobs import JobContext, process_chunk

    r = redis.Redis.from_url(redis_url)
    settings = Settings(broker_url=redis_url, max_attempts=2, allowed_roots=["/x"])  # the refs below
    broken, healthy = _Runtime(fail=True), _Runtime()
    published: list[Chunk] = []
    def publish(chunk: Chunk) -> None:
        published.append(chunk)

    ctx_broken = JobContext(settings, r, runtime=lambda: broken, publish=publish)
    ctx = JobContext(settings, r, runtime=lambda: healthy, publish=publish)
    store = ctx.store
    for b in ("b1", "b2"):
        store.create_batch(b, config={}, config_hash="h", model="m", queue="q", sink="redis")
        store.register_jobs(b, [("j1", "/x/1.png", None), ("j2", "/x/2.png", None)], queue="q")
        store.close(b)
    msg = lambda b: JobMessage(b, (("j1", "/x/1.png"), ("j2", "/x/2.png")))  # noqa: E731

    # An engine failure is charged and queued again: not published by the worker (a countdown
    # would be an ETA by its clock), but noted in `unpublished`, due later by Redis' clock.
    # Then dead-lettered at max_attempts.
    assert process_chunk(ctx_broken, msg("b1")) == {"retry": 2}
    job = store.job("b1", "j1")
    assert job["state"] == "queued" and job["attempts"] == "1"
    assert json.loads(job["error"])["type"] == "BackendError"
    assert published == []
    (member, due), = [(m, d) for m, d in r.zrange(UNPUBLISHED_KEY, 0, -1, withscores=True)
                      if json.loads(m)["c"].endswith(":r")]
    assert due > store.now()
    chunk = Chunk.parse(member)
    assert chunk.jobs == (("j1", "/x/1.png"), ("j2", "/x/2.png"))
    assert process_chunk(ctx_broken, chunk.messages(16).__next__()) == {"dead": 2}
    st = store.batch("b1")
    assert st["finished_at"] and counts(st)["dead_lettered"] == 2

    # b2: the jobs run, their records go to the sink; a second delivery does nothing.
    assert process_chunk(ctx, msg("b2")) == {"done": 2}
    assert process_chunk(ctx, msg("b2")) == {"final": 2}
    assert healthy.calls == 2
    # A third batch of the same work reuses the records without the engine, copied into b3.
    store.create_batch("b3", config={}, config_hash="h", model="m", queue="q", sink="redis")
    store.register_jobs("b3", [("j1", "/x/1.png", None)], queue="q")
    assert process_chunk(ctx, JobMessage("b3", (("j1", "/x/1.png"),))) == {"reused": 1, "done": 1}
    assert healthy.calls == 2
    loc = store.job("b3", "j1")["location"]
    assert loc.startswith("redis://scalecap:result:b3:j1:")  # this run's own key (fenced)
    meta = json.loads(store.r.get(loc.removeprefix("redis://")))["scalecap_record"]["meta"]
    assert loc.endswith(":" + meta["attempt"]) and meta["worker"]  # the copy names its run
    # A cancelled batch runs nothing.
    store.create_batch("b4", config={}, config_hash="h", model="m", queue="q", sink="redis")
    store.register_jobs("b4", [("j9", "/x/9.png", None)], queue="q")
    store.request_cancel("b4")
    assert process_chunk(ctx, JobMessage("b4", (("j9", "/x/9.png"),))) == {"cancelled": 1}
    assert healthy.calls == 2
