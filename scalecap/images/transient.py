"""Transient read failures and the loop that retries them before they count, shared by the
http(s) and S3 readers. What is temporary (HTTP 408/425/429/5xx, timeouts, resets, S3 throttling),
the backoff and Retry-After are scalecap.retry's, the one policy."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from scalecap.errors import ImageFetchError
from scalecap.images.limits import ImageLimits
from scalecap.retry import next_delay

__all__ = ["Transient", "with_retries"]

log = logging.getLogger(__name__)


class Transient(Exception):
    """A fetch failure worth another try (scalecap.retry says which), with the server's Retry-After."""

    def __init__(self, text: str, retry_after: float | None = None) -> None:
        super().__init__(text)
        self.retry_after = retry_after


def with_retries(fetch: Callable[[], Any], limits: ImageLimits, desc: str) -> Any:
    """Run `fetch`, retrying transient failures with scalecap.retry's backoff.

    At most `fetch_retries` retries, each wait at most `fetch_backoff_max` seconds (a server's
    Retry-After is honoured up to that cap); then ImageFetchError names what kept failing.
    """
    tries = int(limits.fetch_retries) + 1
    for attempt in range(1, tries + 1):
        try:
            return fetch()
        except Transient as exc:
            if attempt >= tries:
                raise ImageFetchError(f"{exc} (gave up after {attempt} attempt(s))") from exc
            delay = next_delay(attempt, base=limits.fetch_backoff, cap=limits.fetch_backoff_max,
                               server_says=exc.retry_after)
            log.info("%s; retry %d of %d in %.2f s", exc, attempt, tries - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
