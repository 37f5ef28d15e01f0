"""Transient read failures (HTTP 5xx/408/429, timeouts, resets, S3 throttling) and the loop that
retries them with backoff before they count, shared by the http(s) and S3 readers."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

from scalecap.errors import ImageFetchError
from scalecap.images.limits import ImageLimits

__all__ = ["Transient", "with_retries"]

log = logging.getLogger(__name__)


class Transient(Exception):
    """A fetch failure worth another try (5xx, 408/429, timeout, reset, S3 throttling)."""

    def __init__(self, text: str, retry_after: float | None = None) -> None:
        super().__init__(text)
        self.retry_after = retry_after


def with_retries(fetch: Callable[[], Any], limits: ImageLimits, desc: str) -> Any:
    """Run `fetch`, retrying transient failures with full-jitter exponential backoff.

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
            cap = min(limits.fetch_backoff_max, limits.fetch_backoff * 2 ** (attempt - 1))
            delay = random.uniform(0, cap)
            if exc.retry_after is not None:
                delay = min(limits.fetch_backoff_max, exc.retry_after)
            log.info("%s; retry %d of %d in %.2f s", exc, attempt, tries - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
