"""One submission: stream a source into a batch inside a session (FleetClient.submit runs this).

Constant memory whatever the source's size: rows are registered (one Lua script per chunk) and
published as they are read, so workers start on the first chunk while the rest is still read.
The submission is a session on its batch (scalecap/fleet/sessions.py): opened before the batch
is created or reopened, kept alive by each chunk, closed at the end, or closed as failed when
the submission stops with an error, so concurrent submits to one batch complete it once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from producer.submit_model import SubmitOptions
from scalecap.config import ImageScaleCaptionGenerateConfig
from scalecap.errors import ConfigError
from scalecap.fleet import failpoints
from scalecap.fleet.outcomes import RegisterCode
from scalecap.fleet.protocol import TASK_CAPTION, check_batch_id, fleet_job_id, gpu_queue, new_batch_id
from scalecap.fleet.redact import redact_url
from scalecap.fleet.sessions import Closed, SessionReply, Sessions
from scalecap.images import bucket_refusal

log = logging.getLogger(__name__)

CHUNK = 512
"""Jobs registered (one Lua script) and published per flush while streaming a source."""
FLUSH_SECONDS = 0.25
"""A partial chunk is flushed after this long, so a slow source still starts work early."""


@dataclass
class SubmitResult:
    batch_id: str
    queue: str
    submitted: int
    """Jobs new to this batch and queued."""
    failed: int
    """Rows that could not become jobs (bad lines): counted failed with an error record."""
    duplicates: int
    """Rows whose image the batch already held (repeated lines, a resubmission)."""
    completed: bool
    """This submission's close finished the batch (e.g. every row was bad)."""
    republished: int = 0
    """Of the duplicates, jobs not final yet whose messages were published again (a resubmission
    after a crash: any that was lost runs; a duplicate message is skipped by the workers)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Unbatched:
    """Stands in for kombu's publish batch on kombu < 5.7: every publish goes out at once."""

    def __enter__(self) -> _Unbatched:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def flush(self) -> None:
        return None


def _publish_batch(producer: Any) -> Any:
    batch = getattr(producer, "batch", None)
    return batch(CHUNK + 1) if batch is not None else _Unbatched()


def resolve_config(config: Any) -> ImageScaleCaptionGenerateConfig:
    """A config object, a dict of fields, a TOML/JSON file path, or None (the defaults)."""
    if config is None:
        return ImageScaleCaptionGenerateConfig()
    if isinstance(config, ImageScaleCaptionGenerateConfig):
        return config
    if isinstance(config, dict):
        return ImageScaleCaptionGenerateConfig.from_dict(config)
    return ImageScaleCaptionGenerateConfig.from_file(config)


def check_options(opts: SubmitOptions) -> None:
    """The option errors that must stop a submit before it writes anything."""
    if opts.webhook and not opts.webhook.startswith(("http://", "https://")):
        raise ConfigError(f"webhook must be an http(s) URL, got {redact_url(opts.webhook)!r}")
    if opts.webhook_jobs and not opts.webhook:
        raise ConfigError("webhook_jobs needs a webhook URL")


def submit(client: Any, source: Iterable[Any] | str, opts: SubmitOptions, *,
           on_progress: Callable[[int], None] | None = None,
           on_wait: Callable[[int], None] | None = None) -> SubmitResult:
    """FleetClient.submit's body (see its docstring); `client` gives settings, store and app."""
    settings = client.settings
    opts = opts.with_defaults(settings.model)
    model = opts.model or settings.model
    cfg = resolve_config(opts.config)
    queue = opts.queue or gpu_queue(model)
    batch_id = check_batch_id(opts.batch_id) if opts.batch_id else new_batch_id()
    session = opts.session or ""
    check_options(opts)
    client.sink(opts.sink)  # unknown sink or missing bucket: fail before anything is queued
    sessions = Sessions(client.store, settings.submit_timeout)
    sessions.open(batch_id, session, opts.scope)  # before the batch (re)opens: see sessions.py
    try:
        result = _stream(client, source, replace(opts, batch_id=batch_id, model=model, queue=queue),
                         cfg, sessions, on_progress, on_wait)
    except BaseException:
        try:
            sessions.close(batch_id, session, Closed.FAILED)
        except Exception as exc:  # Redis gone too: the reconciler closes it after its timeout
            log.warning("batch %s: session %s not closed (%s); the reconciler will", batch_id, session,
                        type(exc).__name__)
        raise
    result.completed = sessions.close(batch_id, session, Closed.OK) == SessionReply.COMPLETED  # event: outbox
    return result


def _stream(client: Any, source: Iterable[Any] | str, opts: SubmitOptions,
            cfg: ImageScaleCaptionGenerateConfig, sessions: Sessions,
            on_progress: Callable[[int], None] | None, on_wait: Callable[[int], None] | None
            ) -> SubmitResult:
    from producer.sources import expand

    store, settings = client.store, client.settings
    batch_id, model, queue = opts.batch_id or "", opts.model or "", opts.queue or ""
    session = opts.session or ""
    k = max(1, int(opts.chunk_size or settings.chunk_size))
    config_hash = cfg.config_hash()
    store.create_batch(
        batch_id, config=cfg.to_public_dict(),  # secrets stay with the workers' settings
        config_hash=config_hash, model=model, queue=queue, sink=opts.sink, webhook=opts.webhook,
        webhook_jobs=opts.webhook_jobs, owner=opts.owner,
    )
    result = SubmitResult(batch_id, queue, 0, 0, 0, False)
    chunk: list[tuple[str, str, dict[str, Any] | None]] = []
    started = time.monotonic()

    with client.app.producer_or_acquire() as producer, _publish_batch(producer) as batch:
        # kombu (>= 5.7) buffers the chunk's publishes in one Redis pipeline until flush().

        def flush() -> None:
            if not chunk:
                return
            client.backpressure(queue, on_wait, lambda: sessions.touch(batch_id, session))
            sessions.touch(batch_id, session)  # SessionGone if the reconciler took us for dead
            codes, todo = store.register_jobs(batch_id, chunk, queue=queue)
            for code in codes:
                if code is RegisterCode.NEW:
                    result.submitted += 1
                elif code is RegisterCode.BAD:
                    result.failed += 1
                else:
                    result.duplicates += 1
                    result.republished += code is RegisterCode.KNOWN
            failpoints.hit("submit_after_register")
            if todo is not None:
                for msg in todo.messages(k):
                    client.app.send_task(TASK_CAPTION, args=[msg.to_json()], queue=queue, producer=producer)
                batch.flush()
                store.published(todo.member)  # on the broker: nothing left to repair
            chunk.clear()
            if on_progress is not None:
                on_progress(result.submitted + result.failed + result.duplicates)

        record_owner = "" if settings.share_records else (opts.owner or "")
        for row in expand(source, image_key=opts.image_key, image_column=opts.image_column,
                          id_column=opts.id_column, s3_client_factory=client._s3_client):
            refused = None if row.error else bucket_refusal(row.ref, settings.allowed_buckets)
            if refused:  # the workers would refuse it too: fail it now, with the reason
                row = replace(row, error={"stage": "submit", "type": "ImageAccessDenied", "message": refused})
            basis = "bad-row:" + row.ref if row.error else row.ref
            chunk.append((fleet_job_id(basis, config_hash, model, record_owner), row.ref, row.error))
            if len(chunk) >= CHUNK or time.monotonic() - started > FLUSH_SECONDS:
                flush()
                started = time.monotonic()
        flush()
    return result


__all__ = ["CHUNK", "FLUSH_SECONDS", "SubmitResult", "check_options", "resolve_config", "submit"]
