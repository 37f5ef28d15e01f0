"""One submit model: the CLI flags, FleetClient.submit, the API's JSON body and its upload query
parameters all come from SubmitOptions; the batch stores the submitter's scope for the workers."""

from __future__ import annotations

import argparse
import inspect

import pytest

from producer.api.models import BatchRequest
from producer.api.params import upload_query
from producer.cli import add_submit_args
from producer.client import FleetClient
from producer.submit_model import SubmitOptions, api_fields, cli_fields, query_fields
from scalecap.config import ImageScaleCaptionGenerateConfig
from scalecap.fleet.scope import Scope
from scalecap.settings import Settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_submit_args(p)
    return p


def test_every_cli_field_is_a_flag_and_parses_back_into_the_options():
    flags = {a.dest for a in _parser()._actions}
    assert {f.name for f in cli_fields()} <= flags
    args = _parser().parse_args(["m.jsonl", "--sink", "s3://b/p", "--webhook", "https://h/x",
                                 "--webhook-jobs", "--batch-id", "b1", "--model", "org/m",
                                 "--chunk-size", "4",
                                 "--image-column", "url"])
    opts = SubmitOptions.from_args(args, config="cfg")
    assert opts == SubmitOptions(sink="s3://b/p", webhook="https://h/x", webhook_jobs=True, batch_id="b1",
                                 model="org/m", chunk_size=4, image_column="url", config="cfg")
    assert SubmitOptions.from_args(_parser().parse_args(["m.jsonl"])) == SubmitOptions()


def test_the_api_body_and_upload_query_are_the_api_fields_with_their_limits():
    body = set(BatchRequest.model_fields)
    assert body == {"images", "source", *(f.name for f in api_fields())}
    assert not {"owner", "session", "scope", "queue", "chunk_size"} & body  # set by the server
    params = set(inspect.signature(upload_query).parameters)
    assert params == {*(f.name for f in query_fields()), "config"}
    for f in api_fields():
        info = BatchRequest.model_fields[f.name]
        assert info.default == f.default and info.description == f.metadata["help"]
    with pytest.raises(ValueError, match="batch_id"):
        BatchRequest.model_validate({"images": ["s3://b/k"], "batch_id": "no spaces"})


@pytest.mark.services
def test_client_submit_takes_options_or_their_fields_and_the_batch_keeps_its_scope(redis_url):
    c = FleetClient(Settings(broker_url=redis_url))
    scope = Scope.of(roots=["/data/a"], buckets=["bkt/team-a/", "other"])
    sub = c.submit(["/data/a/1.png"], SubmitOptions(model="nobody", batch_id="scoped", scope=scope,
                                                     owner="k1"))
    batch = c.store.batch(sub.batch_id)
    assert Scope.of_batch(batch) == scope and scope.buckets == ("bkt/team-a", "other")
    assert batch["owner"] == "k1"
    again = c.submit(["/data/a/2.png"], model="nobody", batch_id="scoped")  # the same, as keywords
    assert again.submitted == 1 and Scope.of_batch(c.store.batch("scoped")) == scope  # kept
    plain = c.submit(["/x/1.png"], model="nobody")
    assert Scope.of_batch(c.store.batch(plain.batch_id)) is None  # fleet-wide
    with pytest.raises(TypeError):
        c.submit(["/x/1.png"], model="nobody", no_such_option=1)


def test_thresholds_are_worked_out_once():
    cfg = ImageScaleCaptionGenerateConfig
    assert cfg(sentence_filter="yesno", tau_sentence=0.4).thresholds() == (0.0, 0.0)
    assert cfg(tau_sentence=0.3).thresholds() == (0.3, 0.3)
    assert cfg(tau_sentence=0.3, tau_answer=0.1).thresholds() == (0.3, 0.1)
    c = cfg(score_mode="log_ratio")
    assert c.thresholds() == (c.sentence_threshold, c.sentence_threshold)

