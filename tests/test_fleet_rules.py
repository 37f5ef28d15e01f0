"""A raw-logits worker serves every rule it can compute (logit_diff, yes/no) and fails the rest at
once; `scalecap submit` warns when no live worker on the queue serves a batch's rule.

Real redis-server, SeaweedFS and `scalecap worker` processes; only the model is scripted (a
FleetVLM whose token scores are raw logits, as vLLM's logprobs_mode="raw_logits" returns)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scalecap.fleet.presence import served_rules, unserved_warning
from scalecap_command import main
from tests.fleet_support import Fleet, make_images, wait_until

pytestmark = [pytest.mark.services, pytest.mark.slow]


def _manifest(path: Path, images: list[Path]) -> Path:
    path.write_text("".join(json.dumps({"image": str(p)}) + "\n" for p in images))
    return path


def test_raw_logits_worker_serves_logit_diff_and_yesno_and_refuses_log_ratio(fleet: Fleet, s3_bucket, capsys):
    queue = "scalecap.gpu.scripted"
    client = fleet.client()
    assert "no live worker on queue" in (unserved_warning(client.redis, queue, "log_ratio") or "")
    fleet.scripted(score_values="logits")
    rules = wait_until(lambda: served_rules(client.redis, queue) and
                       next(iter(served_rules(client.redis, queue).values())), what="the worker's rules")
    assert sorted(rules) == ["logit_diff", "yesno"]
    assert unserved_warning(client.redis, queue, "logit_diff") is None
    assert unserved_warning(client.redis, queue, "yesno") is None
    warning = unserved_warning(client.redis, queue, "log_ratio")
    assert warning and "serves rule 'log_ratio'" in warning and "logit_diff, yesno" in warning

    images = make_images(fleet.tmp / "imgs", ["red", "green"])
    manifest = str(_manifest(fleet.tmp / "m.jsonl", images))
    sink = f"s3://{s3_bucket}/rules"
    authors = client.submit(manifest, sink=sink, model="scripted", config={"preset": "authors"})
    yesno = client.submit(manifest, sink=sink, model="scripted", config={"sentence_filter": "yesno"})
    default = client.submit(manifest, sink=sink, model="scripted", config={})
    for sub in (authors, yesno):
        st = client.wait(sub.batch_id, timeout=60)
        assert (st["done"], st["failed"]) == (2, 0), st
    rows = list(client.results(authors.batch_id))
    meta = rows[0]["scalecap_record"]["meta"]
    assert meta["preset"] == "authors" and meta["rule"]["score_mode"] == "logit_diff"

    st = client.wait(default.batch_id, timeout=60)
    assert (st["done"], st["failed"]) == (0, 2), st
    for row in client.results(default.batch_id):
        err = row["scalecap_record"]["error"]
        assert (err["stage"], err["type"]) == ("config", "ConfigError")
        assert "raw logits" in err["message"]
    jobs = client.jobs(default.batch_id)
    assert {j["error"]["type"] for j in jobs} == {"ConfigError"}
    views = client.store.jobs_view(default.batch_id, [j["job_id"] for j in jobs])
    assert [v["runs"] for v in views] == ["1", "1"], "a rule the worker cannot compute is not retried"

    capsys.readouterr()
    rc = main(["submit", manifest, "--model", "scripted", "--broker-url", fleet.redis_url])
    assert rc == 0
    err = capsys.readouterr().err
    assert "warning: no live worker on queue scalecap.gpu.scripted serves rule 'log_ratio'" in err
    rc = main(["submit", manifest, "--model", "scripted", "--preset", "authors",
               "--broker-url", fleet.redis_url])
    assert rc == 0 and "warning" not in capsys.readouterr().err
