"""SCALECAP_* environment variables and flag overrides."""

from __future__ import annotations

import pytest

from scalecap.errors import ConfigError
from scalecap.settings import Settings


def test_defaults_without_environment():
    s = Settings.from_env({})
    assert s.broker_url == "redis://127.0.0.1:6379/0"
    assert s.allowed_roots == [] and s.allow_private_urls is False
    assert s.model == "Qwen/Qwen2.5-VL-3B-Instruct"


def test_environment_is_parsed_by_type():
    s = Settings.from_env({
        "SCALECAP_BROKER_URL": "redis://r:1/2",
        "SCALECAP_MAX_ATTEMPTS": "5",
        "SCALECAP_GPU_MEMORY_UTILIZATION": "0.5",
        "SCALECAP_ALLOW_PRIVATE_URLS": "yes",
        "SCALECAP_ALLOWED_ROOTS": "/data/a, /data/b",
        "SCALECAP_API_KEYS": "k1;k2",
        "SCALECAP_ALLOWED_NETWORKS": "10.1.0.0/16",
        "OTHER": "ignored",
    })
    assert s.broker_url == "redis://r:1/2" and s.max_attempts == 5
    assert s.gpu_memory_utilization == 0.5 and s.allow_private_urls is True
    assert s.allowed_roots == ["/data/a", "/data/b"] and s.api_keys == ["k1", "k2"]
    assert s.allowed_networks == ["10.1.0.0/16"]


def test_flags_override_the_environment():
    s = Settings.from_env({"SCALECAP_MODEL": "env-model", "SCALECAP_CONCURRENCY": "8"})
    t = s.with_overrides(model="flag-model", concurrency=None)
    assert t.model == "flag-model" and t.concurrency == 8


@pytest.mark.parametrize(("name", "value"), [("SCALECAP_MAX_ATTEMPTS", "three"),
                                             ("SCALECAP_ALLOW_PRIVATE_URLS", "perhaps")])
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_s3_client_kwargs_only_set_what_is_given():
    assert Settings.from_env({}).s3_client_kwargs() == {}
    kw = Settings.from_env({"SCALECAP_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
                            "SCALECAP_S3_ACCESS_KEY_ID": "a"}).s3_client_kwargs()
    assert kw == {"endpoint_url": "http://127.0.0.1:9000", "aws_access_key_id": "a"}
