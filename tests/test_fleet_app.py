"""The Celery app's delivery settings (no broker needed: configuration only)."""

from __future__ import annotations

from scalecap.fleet.app import create_app, transport_options
from scalecap.settings import Settings


def test_app_is_json_only_late_ack_prefetch_one():
    app = create_app(Settings.from_env({}))
    c = app.conf
    assert c.task_serializer == "json" and list(c.accept_content) == ["json"]
    assert c.task_acks_late is True and c.task_reject_on_worker_lost is True
    assert c.worker_prefetch_multiplier == 1
    assert c.broker_transport_options["visibility_timeout"] == 3600


def test_restore_sweep_and_its_mutex_follow_the_visibility_timeout():
    short = transport_options(Settings.from_env({"SCALECAP_VISIBILITY_TIMEOUT": "5"}))
    assert short["unacked_restore_interval"] * short["unacked_restore_throttle"] <= 5
    # a worker killed while holding the sweep's mutex must not stop restores for kombu's 300 s
    assert short["unacked_mutex_expire"] <= 10
    long = transport_options(Settings.from_env({"SCALECAP_VISIBILITY_TIMEOUT": "7200"}))
    assert long["visibility_timeout"] == 7200 and long["unacked_mutex_expire"] <= 60
