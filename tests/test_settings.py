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


def test_security_and_image_settings_reach_the_image_limits():
    from scalecap.images import ImageLimits

    s = Settings.from_env({
        "SCALECAP_MAX_DECODE_PIXELS": "1000000",
        "SCALECAP_MAX_CONCURRENT_DECODES": "2",
        "SCALECAP_FETCH_RETRIES": "0",
        "SCALECAP_FETCH_BACKOFF": "0.25",
        "SCALECAP_ALLOWED_BUCKETS": "images, thumbs",
        "SCALECAP_REDIS_CA_CERT": "/etc/scalecap/ca.pem",
        "SCALECAP_REMOTE_CONTROL": "on",
    })
    assert s.allowed_buckets == ["images", "thumbs"] and s.redis_ca_cert == "/etc/scalecap/ca.pem"
    assert s.remote_control is True and Settings.from_env({}).remote_control is False
    limits = ImageLimits.from_settings(s, max_pixels=5000)
    assert (limits.max_decode_pixels, limits.max_concurrent_decodes) == (1_000_000, 2)
    assert (limits.fetch_retries, limits.fetch_backoff, limits.max_pixels) == (0, 0.25, 5000)
    assert list(limits.allowed_buckets) == ["images", "thumbs"]
    defaults = ImageLimits.from_settings(Settings.from_env({}))
    assert defaults.max_decode_pixels == 40_000_000 and defaults.fetch_retries == 3
    with pytest.raises(ConfigError):
        ImageLimits.from_settings(s, max_concurrent_decodes=0)
