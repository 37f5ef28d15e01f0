"""A terminal error fails its image on the first run: not retried, not charged, not dead-lettered.

The real fleet (redis-server, a `scalecap worker` process on the scripted VLM). The scripted
model returns logprobs, as vLLM does unless started with `--raw-logits`
(logprobs_mode='raw_logits'), so a batch asking for `score_mode=logit_diff` gets the same
ConfigError from the chain's backend check that a vLLM worker raises.
"""

from __future__ import annotations

import pytest

from tests.fleet_support import Fleet, make_images

pytestmark = [pytest.mark.services, pytest.mark.slow]

MAX_ATTEMPTS = 3


@pytest.fixture
def fleet(redis_url, tmp_path, s3_server):
    f = Fleet(redis_url, tmp_path, env={**s3_server.env(), "SCALECAP_MAX_ATTEMPTS": str(MAX_ATTEMPTS)})
    try:
        yield f
    finally:
        f.close()


def test_config_error_fails_each_image_at_once(fleet: Fleet):
    worker = fleet.scripted(concurrency=2)  # no --raw-logits: token scores are logprobs
    images = make_images(fleet.tmp / "imgs", ["red", "green", "blue"])
    client = fleet.client()

    sub = client.submit([str(p) for p in images], sink="redis", model="scripted",
                        config={"score_mode": "logit_diff"})  # fmt: skip
    st = client.wait(sub.batch_id, timeout=60)
    assert (st["total"], st["done"], st["failed"], st["dead_lettered"]) == (3, 0, 3, 0)
    assert client.dead_letters() == []

    jobs = client.jobs(sub.batch_id)
    views = client.store.jobs_view(sub.batch_id, [j["job_id"] for j in jobs])
    assert [v["runs"] for v in views] == ["1"] * 3, "a terminal error was run again"
    assert all(j["state"] == "failed" and j["attempts"] == 0 for j in jobs), "charged as a retry"
    assert all(j["error"]["type"] == "ConfigError" for j in jobs)
    assert all(j["has_record"] for j in jobs)

    rows = {r["image"]: r["scalecap_record"] for r in client.results(sub.batch_id)}
    assert sorted(rows) == sorted(map(str, images))
    for record in rows.values():
        assert record["error"]["type"] == "ConfigError" and record["error"]["stage"] == "config"
        assert "logit_diff" in record["error"]["message"] and "raw logits" in record["error"]["message"]
    assert fleet.vlm_calls() == []  # the check runs before any model work

    # The same worker serves a config its engine can: the failure was the config's, not the worker's.
    ok = client.submit([str(p) for p in images], sink="redis", model="scripted",
                       config={"score_mode": "log_ratio"})  # fmt: skip
    st = client.wait(ok.batch_id, timeout=60)
    assert (st["done"], st["failed"], st["dead_lettered"]) == (3, 0, 0)
    assert worker.alive
