"""scalecap.fleet.redact and scalecap.fleet.redis: what is masked, and which TLS options each URL gets."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from scalecap.errors import ConfigError
from scalecap.fleet.redact import redact_text, redact_url, settings_secrets, url_password
from scalecap.fleet.redis import broker_use_ssl, celery_broker_url, ssl_options
from scalecap.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://fleet:s3cret@host:6380/1?ssl_ca_certs=/ca.pem", "rediss://fleet:***@host:6380/1?…"),
        ("redis://fleet@host/0", "redis://fleet@host/0"),
        ("https://hooks.example.com/h/1?token=abc#frag", "https://hooks.example.com/h/1?…"),
        ("http://u:p%40ss@[::1]:8080/x", "http://u:***@[::1]:8080/x"),
        (None, None),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_redact_text_masks_urls_inside_messages_and_named_secrets():
    text = ("Error connecting to redis://admin:hunter2@10.0.0.5:6379/0; webhook "
            "https://h.example/x?sig=zzz failed; key sk-live-123456 leaked")  # fmt: skip
    out = redact_text(text, ["sk-live-123456", "abc"])
    assert "hunter2" not in out and "zzz" not in out and "sk-live-123456" not in out
    assert "redis://admin:***@10.0.0.5:6379/0" in out and "https://h.example/x?…" in out
    assert redact_text("abc stays: too short to be a secret", ["abc"]).startswith("abc")


def test_settings_secrets_collects_every_secret():
    s = Settings(broker_url="redis://u:p%2Fw0rd@h/0", webhook_secret="whsec_xyz",
                 s3_secret_access_key="S3KEY", llm_api_key="llmkey", api_keys=["k-one"])  # fmt: skip
    secrets = settings_secrets(s)
    assert {"p/w0rd", "p%2Fw0rd", "whsec_xyz", "S3KEY", "llmkey", "k-one"} <= set(secrets)
    assert url_password("redis://h/0") is None


def test_log_records_and_uncaught_tracebacks_are_scrubbed():
    """In a fresh process: a library logs a URL with a password, then an exception escapes."""
    script = (
        "import logging, sys\n"
        "from scalecap.fleet.redact import protect_process\n"
        "from scalecap.settings import Settings\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
        "protect_process(Settings(broker_url='redis://:TopSecret1@h/0', webhook_secret='whsec_Hidden99'))\n"
        "logging.getLogger('kombu').info('Cannot connect to %s', 'redis://x:TopSecret1@h/0')\n"
        "try:\n"
        "    raise RuntimeError('secret whsec_Hidden99')\n"
        "except RuntimeError:\n"
        "    logging.getLogger('w').exception('failed')\n"
        "raise ValueError('auth TopSecret1 refused')\n"
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "Cannot connect to redis://x:***@h/0" in r.stderr
    assert "RuntimeError: secret ***" in r.stderr and "ValueError: auth *** refused" in r.stderr
    assert "TopSecret1" not in r.stderr + r.stdout and "whsec_Hidden99" not in r.stderr


def test_tls_options_per_url():
    assert ssl_options("redis://h/0") == {} and broker_use_ssl("redis://h/0") is None
    s = Settings(redis_ca_cert="/etc/ca.pem")
    want = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/etc/ca.pem"}
    assert ssl_options("rediss://h/0", s) == want
    url = "rediss://h/0?ssl_ca_certs=/url/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem&health_check_interval=5"
    opts = broker_use_ssl(url, s)
    assert opts == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/url/ca.pem",
                    "ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem"}  # fmt: skip
    assert celery_broker_url(url) == "rediss://h/0?health_check_interval=5"
    assert ssl_options("rediss://h/0?ssl_cert_reqs=none")["ssl_cert_reqs"] == ssl.CERT_NONE
    with pytest.raises(ConfigError):
        ssl_options("rediss://h/0?ssl_cert_reqs=maybe")


@pytest.mark.parametrize("line", [
    '127.0.0.1:5 - "POST /v1/batches?webhook=https%3A%2F%2Fh%2Fx%3Ftoken%3DSECRET1 HTTP/1.1" 202',
    '127.0.0.1:5 - "POST /v1/batches?config=%7B%22llm_api_key%22%3A%22SECRET1%22%7D HTTP/1.1" 400',
    '127.0.0.1:5 - "GET /v1/batches?api_key=sk_0123456789abcdef_SECRET1 HTTP/1.1" 400',
    'batch config {"llm_api_key": "SECRET1", "max_questions": 3}',
    "retrying with token=SECRET1 and webhook_secret: SECRET1",
])
def test_access_lines_lose_query_strings_and_secret_fields(line):
    out = redact_text(line)
    assert "SECRET1" not in out
    assert redact_text("max_init_tokens: 512, GET / HTTP/1.1") == "max_init_tokens: 512, GET / HTTP/1.1"
