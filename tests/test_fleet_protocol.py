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
from scalecap.queue_protocol import (
    DEAD_LETTER_KEY,
    IO_QUEUE,
    BatchStore,
    JobMessage,
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


def test_job_message_is_json_and_versioned():
    msg = JobMessage(batch_id="b", job_id="j", ref="s3://x/y.jpg")
    data = json.loads(json.dumps(msg.to_json()))
    assert JobMessage.from_json(data) == msg
    with pytest.raises(ValueError):
        JobMessage.from_json({**data, "v": 99})
    with pytest.raises(ValueError):
        JobMessage.from_json({"v": 1, "batch_id": "b"})


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
def test_register_dedupes_and_counts(redis_url):
    store = _store(redis_url)
    b = _batch(store)
    err = {"stage": "submit", "type": "MalformedLine", "message": "x"}
    assert store.register_jobs(b, [("j1", "r1", None), ("j2", "r2", None), ("j1", "r1", None),
                                   ("j3", "line:3", err)]) == [True, True, False, True]
    c = counts(store.batch(b))
    assert (c["total"], c["queued"], c["failed"]) == (3, 2, 1)
    assert json.loads(store.job(b, "j3")["error"]) == err


@pytest.mark.services
def test_job_ids_page_each_job_once_in_arrival_order_even_while_jobs_arrive(redis_url):
    store = _store(redis_url)
    b = _batch(store)
    store.register_jobs(b, [(f"j{i:04d}", f"r{i}", None) for i in range(250)])
    seen = []
    for n, j in enumerate(store.job_ids(b, count=100)):
        seen.append(j)
        if n == 150:  # a late chunk of the submission lands mid-iteration
            store.register_jobs(b, [(f"k{i:03d}", f"s{i}", None) for i in range(30)]
                                + [("j0001", "r1", None)])
    assert seen == [f"j{i:04d}" for i in range(250)] + [f"k{i:03d}" for i in range(30)]


@pytest.mark.services
def test_transitions_move_one_count_and_final_states_stick(redis_url):
    store = _store(redis_url)
    b = _batch(store)
    store.register_jobs(b, [("j1", "r1", None), ("j2", "r2", None)])
    assert store.claim(b, "j1", 3) == ("run", 1)
    assert counts(store.batch(b))["running"] == 1
    assert store.transition(b, "j1", "done", location="redis://x").result == "ok"
    # A second delivery of a finished job changes nothing.
    assert store.transition(b, "j1", "failed").result == "final:done"
    assert store.claim(b, "j1", 3) == ("final:done", 0)
    # Cancel only what is still queued.
    assert store.transition(b, "j2", "cancelled", expected="running").result == "skip:queued"
    c = counts(store.batch(b))
    assert (c["queued"], c["running"], c["done"], c["cancelled"]) == (1, 0, 1, 0)
    assert store.transition(b, "missing", "done").result == "missing"


@pytest.mark.services
def test_claim_counts_attempts_and_dead_letters(redis_url):
    store = _store(redis_url)
    b = _batch(store)
    store.register_jobs(b, [("j1", "r1", None)])
    assert store.claim(b, "j1", 2) == ("run", 1)
    assert store.claim(b, "j1", 2) == ("run", 2)  # a redelivery after a worker died
    assert store.claim(b, "j1", 2) == ("exhausted", 3)
    entry = {"batch_id": b, "job_id": "j1", "attempts": 2}
    store.close(b)
    t = store.transition(b, "j1", "failed", dead_letter=entry, error={"type": "WorkerLost"})
    assert t.completed
    batch = store.batch(b)
    assert counts(batch)["dead_lettered"] == 1 and counts(batch)["failed"] == 1
    assert json.loads(store.r.lindex(DEAD_LETTER_KEY, 0)) == entry


@pytest.mark.services
def test_exactly_one_caller_completes_the_batch(redis_url):
    """Many threads finish jobs at once; finished_at is set once and one caller sees it."""
    store = _store(redis_url)
    b = _batch(store)
    n = 200
    store.register_jobs(b, [(f"j{i}", f"r{i}", None) for i in range(n)])
    assert store.close(b).result == "ok"  # closed, not finished
    results: list[str] = []
    lock = threading.Lock()

    def finish(ids: range) -> None:
        s = _store(redis_url)
        for i in ids:
            r = s.transition(b, f"j{i}", "done" if i % 3 else "failed").result
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
    store.register_jobs(b, [("j1", "line:1", err)])
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
    """Stands in for the engine runtime in workers.jobs: returns a record or fails like an engine."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls = 0

    def caption(self, config, ref, job_id):
        self.calls += 1
        if self.fail:
            from scalecap.errors import BackendError

            raise BackendError("engine down")
        return {"final_caption": f"caption of {ref}", "meta": {"job_id": job_id}}


@pytest.mark.services
def test_job_lifecycle_retries_dead_letters_and_reuses_records(redis_url):
    """workers.jobs against real Redis and the Redis sink, without a Celery worker around it."""
    import redis

    from scalecap.settings import Settings
    from workers.jobs import JobContext, RetryJob, process_caption

    r = redis.Redis.from_url(redis_url)
    settings = Settings(broker_url=redis_url, max_attempts=2)
    broken, healthy = _Runtime(fail=True), _Runtime()
    completed: list[str] = []
    ctx_broken = JobContext(settings, r, runtime=lambda: broken, on_completed=completed.append)
    ctx = JobContext(settings, r, runtime=lambda: healthy, on_completed=completed.append)
    store = ctx.store
    for b in ("b1", "b2"):
        store.create_batch(b, config={}, config_hash="h", model="m", queue="q", sink="redis")
        store.register_jobs(b, [("j1", "/x/1.png", None)])
        store.close(b)

    # An engine failure is retried (state back to queued), then dead-lettered at max_attempts.
    with pytest.raises(RetryJob):
        process_caption(ctx_broken, JobMessage("b1", "j1", "/x/1.png"))
    job = store.job("b1", "j1")
    assert job["state"] == "queued" and job["attempts"] == "1"
    assert json.loads(job["error"])["type"] == "BackendError"
    assert process_caption(ctx_broken, JobMessage("b1", "j1", "/x/1.png")) == "dead-lettered"
    assert counts(store.batch("b1"))["dead_lettered"] == 1 and completed == ["b1"]

    # b2: the job runs, its record goes to the sink; a second delivery does nothing.
    assert process_caption(ctx, JobMessage("b2", "j1", "/x/1.png")) == "done"
    assert process_caption(ctx, JobMessage("b2", "j1", "/x/1.png")) == "duplicate"
    assert healthy.calls == 1 and completed == ["b1", "b2"]
    # A third batch of the same work reuses the record without the engine.
    store.create_batch("b3", config={}, config_hash="h", model="m", queue="q", sink="redis")
    store.register_jobs("b3", [("j1", "/x/1.png", None)])
    assert process_caption(ctx, JobMessage("b3", "j1", "/x/1.png")) == "reused"
    assert healthy.calls == 1
    assert store.job("b3", "j1")["location"] == store.job("b2", "j1")["location"]
    # A cancelled batch runs nothing.
    store.create_batch("b4", config={}, config_hash="h", model="m", queue="q", sink="redis")
    store.register_jobs("b4", [("j9", "/x/9.png", None)])
    store.request_cancel("b4")
    assert process_caption(ctx, JobMessage("b4", "j9", "/x/9.png")) == "cancelled"
    assert healthy.calls == 1
