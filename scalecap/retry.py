"""One retry policy: which failures are temporary, how long to wait, and what Retry-After means.

Image fetch (HTTP and S3), the OpenAI backend, webhook delivery and jobs all decide with this
module, so a 503 or a reset connection is temporary everywhere and a 404 nowhere.
It lives at the chain's top level, not in scalecap/fleet: the chain (images, backends) uses it
and may not import fleet code; the fleet may import the chain.

No HTTP or AWS library is imported here: an httpx or botocore exception can only exist once its
library is loaded, so the checks look the modules up in `sys.modules`.
"""

from __future__ import annotations

import email.utils
import math
import random
import socket
import sys
import time
from datetime import UTC

from scalecap.errors import RetryableError, TerminalError

TEMPORARY_STATUSES: frozenset[int] = frozenset({408, 425, 429}) | frozenset(range(500, 600)) - {501, 505}
"""HTTP statuses worth another try: the union of what our four callers used to retry.

408 Request Timeout and 425 Too Early ask for the same request again; 429 is overload, as is
every 5xx (a proxy's 502/504, a restarting server's 503) except two that no retry mends:
501 Not Implemented and 505 HTTP Version Not Supported (a server without /tokenize answers 501,
and the OpenAI backend must hear that at once to turn scoring off)."""

S3_TEMPORARY_CODES: frozenset[str] = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestLimitExceeded", "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
})  # fmt: skip
"""S3/botocore error codes of throttling and server trouble (their HTTP status may be 400 or 503)."""

_BOTOCORE_TEMPORARY = ("ConnectionClosedError", "ConnectTimeoutError", "EndpointConnectionError",
                       "ReadTimeoutError", "ResponseStreamingError")  # fmt: skip
"""botocore.exceptions names of connection-level failures (no credentials etc. are not here)."""


def is_temporary_status(status: int | None) -> bool:
    """True for an HTTP status in TEMPORARY_STATUSES (None, no answer at all, is not a status)."""
    return status in TEMPORARY_STATUSES


def is_temporary_s3(code: str | None, status: int | None) -> bool:
    """An S3 error reply (its `Error.Code` and HTTP status) worth another try."""
    return (code or "") in S3_TEMPORARY_CODES or is_temporary_status(status)


def is_temporary_error(exc: BaseException) -> bool:
    """An exception worth another try: our RetryableError, a timeout, a refused/reset connection,
    a DNS failure, an httpx network or timeout error, botocore throttling or connection trouble.

    A TerminalError is never temporary, whatever else it inherits.
    """
    if isinstance(exc, TerminalError):
        return False
    if isinstance(exc, RetryableError | TimeoutError | ConnectionError | socket.gaierror):
        return True
    httpx = sys.modules.get("httpx")
    if httpx is not None and isinstance(exc, httpx.TimeoutException | httpx.NetworkError
                                        | httpx.RemoteProtocolError):
        return True  # not every TransportError: UnsupportedProtocol (a bad URL) is terminal
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None:
        if isinstance(exc, botocore.ClientError):
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return is_temporary_s3(str(err.get("Code", "")), status if isinstance(status, int) else None)
        temporary = tuple(getattr(botocore, name) for name in _BOTOCORE_TEMPORARY if hasattr(botocore, name))
        if isinstance(exc, temporary):
            return True
    return False


def backoff(
    attempt: int, base: float, cap: float, *, factor: float = 2.0, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry number `attempt` (1 for the first retry).

    Exponential with full jitter (AWS's "Exponential Backoff and Jitter"): uniform over
    [0, min(cap, base * factor**(attempt - 1))], so clients that failed together spread out.
    `rng` makes it reproducible in tests.
    """
    ceiling = min(cap, base * factor ** max(0, attempt - 1))
    return (rng or random).uniform(0, max(0.0, ceiling))


def retry_after(value: str | None, *, cap: float | None = None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date, at least 0, at most `cap`.

    None when absent or unreadable (the caller's backoff applies then). `now` (epoch seconds)
    is for tests; a date in the past means 0.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds):
        return None
    seconds = max(0.0, seconds)
    return seconds if cap is None else min(seconds, cap)


def next_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    server_says: float | None = None,
    factor: float = 2.0,
    rng: random.Random | None = None,
) -> float:
    """The wait before retry `attempt`: the server's Retry-After when it gave one (capped), else backoff."""
    if server_says is not None:
        return min(cap, max(0.0, server_says))
    return backoff(attempt, base, cap, factor=factor, rng=rng)


__all__ = [
    "S3_TEMPORARY_CODES",
    "TEMPORARY_STATUSES",
    "backoff",
    "is_temporary_error",
    "is_temporary_s3",
    "is_temporary_status",
    "next_delay",
    "retry_after",
]
