"""SCALECAP_ALLOWED_BUCKETS at submit time: a reference outside it fails at once, with the reason.

(Workers refuse such references before any S3 request too: tests/test_fetch_retries.py.)
"""

from __future__ import annotations

import pytest

from producer.client import FleetClient
from scalecap.settings import Settings

pytestmark = pytest.mark.services


def test_submit_fails_images_in_buckets_outside_the_allow_list(redis_url):
    client = FleetClient(Settings(broker_url=redis_url, allowed_buckets=["images"]))
    refs = ["s3://images/a.jpg", "s3://secrets/b.jpg", "s3://images-evil/c.jpg"]
    sub = client.submit(refs, model="scripted")
    assert (sub.submitted, sub.failed) == (1, 2)
    failed = {f["image"]: f["error"] for f in client.failures(sub.batch_id)["failed"]}
    assert set(failed) == {"s3://secrets/b.jpg", "s3://images-evil/c.jpg"}
    err = failed["s3://secrets/b.jpg"]
    assert (err["stage"], err["type"]) == ("submit", "ImageAccessDenied")
    assert "'secrets' is not in allowed_buckets" in err["message"]
    # No allow-list: any bucket goes.
    open_client = FleetClient(Settings(broker_url=redis_url))
    assert open_client.submit(refs[1:], model="scripted").submitted == 2
