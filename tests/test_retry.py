"""The one retry policy (scalecap.retry): temporary statuses and exceptions, backoff, Retry-After."""

from __future__ import annotations

import email.utils
import random
import socket

import httpx
import pytest

from scalecap.errors import (
    BackendError,
    ConfigError,
    ImageFetchError,
    ImageNotFound,
    RetryableBackendError,
    RetryableError,
    TerminalError,
)
from scalecap.retry import (
    backoff,
    is_temporary_error,
    is_temporary_s3,
    is_temporary_status,
    next_delay,
    retry_after,
)


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504, 507, 599])
def test_overload_and_server_trouble_are_temporary(status):
    assert is_temporary_status(status)


@pytest.mark.parametrize("status", [None, 200, 301, 400, 401, 403, 404, 410, 413, 422, 501, 505])
def test_answers_that_a_retry_cannot_change_are_not(status):
    assert not is_temporary_status(status)


def test_s3_throttling_codes_and_statuses():
    assert is_temporary_s3("SlowDown", 503) and is_temporary_s3("RequestTimeout", 400)
    assert is_temporary_s3("", 500) and is_temporary_s3(None, 429)
    assert not is_temporary_s3("NoSuchKey", 404) and not is_temporary_s3("AccessDenied", 403)


def test_the_error_tree_splits_terminal_from_retryable():
    assert issubclass(ConfigError, TerminalError) and issubclass(ConfigError, ValueError)
    assert issubclass(ImageNotFound, TerminalError) and issubclass(ImageFetchError, TerminalError)
    assert issubclass(RetryableBackendError, RetryableError)
    assert is_temporary_error(RetryableBackendError("overloaded"))
    assert not is_temporary_error(ConfigError("score_mode 'logit_diff' needs raw logits"))
    assert not is_temporary_error(BackendError("bad answer"))
    assert not is_temporary_error(ValueError("a bug"))


def test_network_failures_are_temporary():
    request = httpx.Request("GET", "http://example.invalid/")
    for exc in (
        httpx.ConnectError("refused", request=request),
        httpx.ReadTimeout("slow", request=request),
        httpx.RemoteProtocolError("closed mid-answer", request=request),
        socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
        ConnectionResetError(),
        TimeoutError(),
    ):
        assert is_temporary_error(exc), exc
    assert not is_temporary_error(httpx.UnsupportedProtocol("ftp://", request=request))


def test_a_real_refused_connection_is_temporary():
    with socket.socket() as s:  # bound, never listening: connects are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(httpx.ConnectError) as caught:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
    assert is_temporary_error(caught.value)


def test_botocore_errors():
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")  # fmt: skip

    assert is_temporary_error(client_error("SlowDown", 503))
    assert is_temporary_error(client_error("ThrottlingException", 400))
    assert not is_temporary_error(client_error("NoSuchKey", 404))
    assert is_temporary_error(EndpointConnectionError(endpoint_url="http://s3.local"))
    assert not is_temporary_error(NoCredentialsError())


def test_backoff_is_full_jitter_below_an_exponential_cap():
    rng = random.Random(0)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (12, 8.0)]:
        delays = [backoff(attempt, 0.5, 8.0, rng=rng) for _ in range(300)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.9 * ceiling and min(delays) < 0.1 * ceiling  # spread over all of it
    assert all(backoff(3, 2.0, 1000.0, factor=4.0, rng=rng) <= 32.0 for _ in range(100))
    assert backoff(5, 0.0, 10.0) == 0.0


def test_backoff_is_reproducible_with_a_seeded_rng():
    a = [backoff(n, 1.0, 60.0, rng=random.Random(7)) for n in range(1, 6)]
    b = [backoff(n, 1.0, 60.0, rng=random.Random(7)) for n in range(1, 6)]
    assert a == b


def test_retry_after_reads_seconds_and_http_dates():
    assert retry_after("7") == 7.0 and retry_after(" 2.5 ") == 2.5
    assert retry_after(None) is None and retry_after("") is None
    assert retry_after("soon") is None and retry_after("nan") is None
    assert retry_after("-3") == 0.0
    assert retry_after("3600", cap=60.0) == 60.0 and retry_after("inf", cap=60.0) == 60.0
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert retry_after(date, now=1_000_000) == pytest.approx(30.0)
    assert retry_after(date, now=1_000_000, cap=10.0) == 10.0
    assert retry_after(email.utils.formatdate(10, usegmt=True), now=1_000) == 0.0  # in the past
    assert retry_after("Wed, 21 Oct 2015 07:28:00", now=0) > 0  # no zone: GMT, as HTTP says


def test_next_delay_prefers_the_server_then_backs_off():
    assert next_delay(1, base=1.0, cap=60.0, server_says=7.0) == 7.0
    assert next_delay(1, base=1.0, cap=60.0, server_says=3600.0) == 60.0
    rng = random.Random(1)
    assert 0 <= next_delay(3, base=1.0, cap=60.0, rng=rng) <= 4.0
