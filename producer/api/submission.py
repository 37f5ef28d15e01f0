"""Submission in the background: FleetClient.submit runs in a thread, fed rows as they come.

The request returns as soon as the batch exists (FleetClient.submit creates it, then pulls its
first row: that pull is the signal), so a caller gets its batch id before a single image runs
while the thread goes on publishing jobs. A streamed JSONL upload is fed to the same thread one
body chunk at a time, pulled from the event loop on demand: memory stays constant whatever
the upload's size (one chunk, one line at most `MAX_LINE_BYTES`, one publish chunk).
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from producer.client import SubmitResult
from producer.sources import SourceRow
from producer.submit_model import SubmitOptions

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 1024 * 1024
"""A manifest line longer than this becomes an error row (its bytes are skipped, not kept)."""


class UploadTooLarge(Exception):
    """The upload went over the size limit while being read."""


class UploadAborted(Exception):
    """The client went away mid-upload."""


def _started(rows: Iterable[SourceRow], on_start: Callable[[], None]) -> Iterator[SourceRow]:
    """`rows`, calling `on_start` at the first pull (FleetClient.submit has created the batch)."""
    on_start()
    yield from rows


class Submitter:
    """Runs submissions in a thread pool; `close()` waits for those still publishing."""

    def __init__(self, client: Any, max_threads: int = 8) -> None:
        self.client = client
        self.pool = concurrent.futures.ThreadPoolExecutor(max_threads, thread_name_prefix="submit")
        self.in_flight = 0
        self._lock = threading.Lock()

    async def start(self, rows: Iterable[SourceRow], options: SubmitOptions, *, wait_all: bool
                    ) -> SubmitResult | None:
        """Submit; return when the batch exists (None) or, with `wait_all`, when all rows are in.

        Errors raised before the batch exists (bad sink, bad config, Redis down) propagate."""
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()

        def on_start() -> None:
            loop.call_soon_threadsafe(lambda: started.done() or started.set_result(None))

        def run() -> SubmitResult:
            with self._lock:
                self.in_flight += 1
            try:
                return self.client.submit(_started(rows, on_start), options)
            except Exception:
                if started.done():  # after the 202: nobody else will hear of it
                    log.exception("submission of batch %s failed after it was accepted",
                                  options.batch_id)
                raise
            finally:
                with self._lock:
                    self.in_flight -= 1

        fut = asyncio.wrap_future(self.pool.submit(run))
        if wait_all:
            return await fut
        await asyncio.wait({fut, started}, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            return fut.result()  # raises the error that stopped it before the batch existed
        if not fut.done():
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved; logged above
            return None
        return None if fut.exception() else fut.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def body_lines(stream: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop, limit: int,
               abort: threading.Event) -> Iterator[str]:
    """Lines of a streamed request body, read from the thread that consumes them.

    Each chunk is pulled from the event loop when the previous one is used up, so at most one
    chunk and one partial line are held. Over `limit` bytes raises UploadTooLarge. A line over
    MAX_LINE_BYTES yields a marker the manifest parser reports as a malformed line."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    it = stream.__aiter__()
    total = 0
    buf = ""
    skipping = False

    async def next_chunk() -> bytes | None:
        try:
            return await it.__anext__()
        except StopAsyncIteration:
            return None

    while True:
        if abort.is_set():
            raise UploadAborted("upload aborted")
        try:
            chunk = asyncio.run_coroutine_threadsafe(next_chunk(), loop).result()
        except Exception as exc:  # ClientDisconnect and friends
            raise UploadAborted(f"upload stopped: {type(exc).__name__}") from exc
        if chunk is None:
            break
        total += len(chunk)
        if total > limit:
            raise UploadTooLarge(f"upload is over the limit of {limit} bytes")
        buf += decoder.decode(chunk)
        if "\n" in buf:
            *lines, buf = buf.split("\n")
            for line in lines:
                if skipping:
                    skipping = False
                    continue
                yield line
        if len(buf) > MAX_LINE_BYTES:
            if not skipping:
                yield "\x00line too long"  # not JSON: becomes a MalformedLine error row
            skipping = True
            buf = ""
    buf += decoder.decode(b"", final=True)
    if buf and not skipping:
        yield buf


__all__ = ["MAX_LINE_BYTES", "Submitter", "UploadAborted", "UploadTooLarge", "body_lines"]
