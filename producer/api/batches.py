"""/v1/batches: submit (JSON or a streamed JSONL upload), list, status, results, cancel, failures.

A key sees only its own batches (an admin key sees all); any other batch is answered exactly as
one that does not exist (404). Reads go through FleetClient only.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from producer.api.admission import admit, release, status_or_none
from producer.api.auth import owns, require
from producer.api.limits import is_ndjson, read_json, too_large
from producer.api.models import (
    BatchAccepted,
    BatchList,
    BatchRequest,
    BatchStatus,
    Failures,
    JobPage,
    SubmitCounts,
)
from producer.api.params import no_unknown_query, upload_query
from producer.api.problems import ApiProblem, bad_request, not_found, responses
from producer.api.quota import capped
from producer.api.refs import RefError, check_ref, checked_rows, ref_problem, verify_shard
from producer.api.submission import UploadAborted, UploadTooLarge, body_lines
from producer.client import BatchNotFound
from producer.sources import SourceRow, expand, manifest_rows
from producer.submit_model import BATCH_ID_PATTERN, SubmitOptions, api_fields
from scalecap.errors import ConfigError
from scalecap.fleet.access import ScopeRefused, check_listing
from scalecap.fleet.keys import ApiKey

router = APIRouter(prefix="/v1", tags=["batches"], dependencies=[Depends(no_unknown_query)])

_BATCH_ID = re.compile(BATCH_ID_PATTERN)
_JOB_ID = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")
MAX_SUBMISSION_REF_CHARS = 256 * 1024 * 1024
"""Characters of references one submission may bring in all (what Redis keeps of them)."""

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/BatchRequest"}},
            "application/x-ndjson": {
                "schema": {"type": "string", "format": "binary"},
                "description": "A JSONL manifest, streamed: one {\"image\": ...} object or string per "
                               "line. Options then come as query parameters.",
            },
        },
    }
}


# --- shared helpers -------------------------------------------------------------------------


def owned_status(request: Request, key: ApiKey, batch_id: str) -> dict[str, Any]:
    """The batch's status if `key` may see it; 404 otherwise (whether or not it exists)."""
    if not _BATCH_ID.match(batch_id):
        raise not_found()
    st = status_or_none(request.app.state.client, batch_id)
    if st is None or not owns(key, st):
        raise not_found()
    return st


def accepted(request: Request, batch_id: str, *, replayed: bool = False,
             counts: SubmitCounts | None = None) -> BatchAccepted:
    base = str(request.base_url).rstrip("/")
    return BatchAccepted(batch_id=batch_id, status_url=f"{base}/v1/batches/{batch_id}",
                         results_url=f"{base}/v1/batches/{batch_id}/results", replayed=replayed,
                         submission=counts)


# --- POST /v1/batches -----------------------------------------------------------------------


def _source_rows(client: Any, url: str, image_key: str, image_column: str | None = None,
                 id_column: str | None = None) -> Iterator[SourceRow]:
    """Rows of an s3:// prefix, object or brace pattern: images, JSONL manifests, WebDataset shards
    and Parquet files, expanded exactly as `scalecap submit` does (damaged shards give error rows);
    a listing that fails becomes one error row."""
    try:
        yield from expand(url, image_key=image_key, image_column=image_column, id_column=id_column,
                          s3_client_factory=client._s3_client)
    except Exception as exc:
        message = f"reading {url}: {type(exc).__name__}: {exc}"[:500]
        yield SourceRow(ref=url[:1000], error={"stage": "submit", "type": "SourceError", "message": message})


def _check_source(request: Request, key: ApiKey, url: str) -> str:
    """The s3:// source to list: inside the key's scope (403 naming it, whether or not the bucket
    exists), then listable (400)."""
    settings = request.app.state.settings
    if not url.startswith("s3://"):
        raise bad_request("source must be an s3://bucket/prefix (or s3:// manifest)", "bad-reference")
    try:
        url = check_listing(url, key.scope, settings.allowed_buckets)
    except ScopeRefused as exc:
        raise ApiProblem(403, "outside-scope", f"source: {exc}") from None
    bucket, _, prefix = url[5:].partition("/")
    prefix = prefix.split("{", 1)[0]  # a brace pattern: list what comes before its first group
    try:
        s3 = request.app.state.client._s3_client()
        s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except Exception as exc:
        raise bad_request(f"source {url[:120]}: cannot list it", "bad-reference") from exc
    return url


def _checked_images(request: Request, key: ApiKey, images: list[Any]) -> list[str]:
    """Every reference of a JSON request, or the first one's problem: 400 malformed, 403 outside
    the key's scope; a client's shard reference must match the shard's own headers or footer."""
    settings = request.app.state.settings
    limits = shard_limits(request)
    refs = []
    for i, ref in enumerate(images):
        try:
            ref = check_ref(ref, settings.allowed_roots, scope=key.scope, buckets=settings.allowed_buckets)
            verify_shard(ref, limits)
        except RefError as exc:
            raise ref_problem(exc, f"images[{i}]") from exc
        refs.append(ref)
    return refs


def shard_limits(request: Request) -> Any:
    """The image limits the API reads a client's shard headers with (the workers' own)."""
    from scalecap.images import ImageLimits

    st = request.app.state
    return ImageLimits.from_settings(st.settings, s3_client_factory=st.client._s3_client)


@router.post(
    "/batches",
    status_code=202,
    response_model=BatchAccepted,
    summary="Create a batch (JSON, or a streamed JSONL manifest upload)",
    responses={200: {"model": BatchAccepted, "description": "Idempotency-Key replay of an earlier batch"},
               **responses(400, 401, 403, 409, 413, 415, 422, 429)},
    openapi_extra=_UPLOAD_BODY,
)
async def create_batch(
    request: Request,
    response: Response,
    key: ApiKey = Depends(require("submit")),
    idempotency_key: str | None = Header(default=None, max_length=200,
                                         description="Retries with the same key return the same batch"),
    query: dict[str, Any] = Depends(upload_query),
) -> Any:
    settings = request.app.state.settings
    ctype = request.headers.get("content-type")
    upload = is_ndjson(ctype)
    if upload:
        req = BatchRequest.model_construct(images=None, source=None, **query)
    elif (ctype or "").split(";")[0].strip().lower() in ("application/json", ""):
        body = await read_json(request, settings.api_max_body_bytes)
        try:
            req = BatchRequest.model_validate(body)
        except ValidationError as exc:
            errs = [{"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
                    for e in exc.errors()[:20]]
            first = errs[0] if errs else {"loc": [], "msg": "invalid"}
            raise ApiProblem(400, "invalid-request", f"{'.'.join(first['loc'])}: {first['msg']}",
                             errors=errs) from exc
        if (req.images is None) == (req.source is None):
            raise bad_request("give exactly one of images (a list) or source (an s3:// prefix)")
    else:
        raise ApiProblem(415, "unsupported-media-type",
                         "send application/json or a JSONL manifest as application/x-ndjson")

    options = SubmitOptions(**{f.name: getattr(req, f.name) for f in api_fields()})
    adm = await admit(request, key, options, idempotency_key=idempotency_key,
                      conflict="this batch_id is not available; choose another",
                      replay=lambda existing: bool(idempotency_key) and _settled(existing),
                      wanted=len(req.images) if not upload and req.images is not None else None)
    options, room = adm.options, adm.room
    if adm.replayed:
        response.status_code = 200
        return accepted(request, options.batch_id or "", replayed=True)
    bid = options.batch_id or ""
    try:
        result = await _submit(request, key, req, options, room, upload)
    except BaseException:
        await release(request, key, bid)  # a batch never created keeps no quota
        raise
    counts = None
    if result is not None and upload:
        counts = SubmitCounts(submitted=result.submitted, failed=result.failed, duplicates=result.duplicates)
    response.headers["Location"] = f"/v1/batches/{bid}"
    return accepted(request, bid, counts=counts)


async def _submit(request: Request, key: ApiKey, req: BatchRequest, options: SubmitOptions,
                  room: int | None, upload: bool) -> Any:
    """Rows checked against the key's scope, then handed to the submitter."""
    st = request.app.state
    settings, client = st.settings, st.client
    roots, buckets, scope = list(settings.allowed_roots), list(settings.allowed_buckets), key.scope
    rows: Any
    if upload:
        loop = asyncio.get_running_loop()
        abort = threading.Event()
        lines = body_lines(request.stream(), loop, settings.api_max_upload_bytes, abort)
        rows = capped(checked_rows(manifest_rows(lines, "upload", image_key=options.image_key), roots,
                                   scope=scope, buckets=buckets, shard_limits=shard_limits(request),
                                   max_total_chars=MAX_SUBMISSION_REF_CHARS), room)
    elif req.images is not None:
        refs = await run_in_threadpool(_checked_images, request, key, req.images)
        if sum(len(r) for r in refs) > MAX_SUBMISSION_REF_CHARS:
            raise too_large(MAX_SUBMISSION_REF_CHARS)
        rows = capped((SourceRow(r) for r in refs), room)
    else:
        source = await run_in_threadpool(_check_source, request, key, req.source)
        # Rows the fleet indexes itself (listing, manifests, shard headers): scope-checked, trusted.
        rows = capped(checked_rows(_source_rows(client, source, options.image_key, options.image_column,
                                                options.id_column), roots, scope=scope, buckets=buckets,
                                   max_total_chars=MAX_SUBMISSION_REF_CHARS), room)
    bid = options.batch_id or ""
    try:
        return await st.submitter.start(rows, options, wait_all=upload)
    except UploadTooLarge as exc:
        await run_in_threadpool(_cancel_quietly, client, bid)
        raise too_large(settings.api_max_upload_bytes) from exc
    except UploadAborted as exc:
        raise bad_request(f"the upload did not complete ({exc}); retry with the same "
                          "Idempotency-Key or batch_id to finish it") from exc
    except (ConfigError, ValueError) as exc:
        raise bad_request(str(exc)) from exc
    except Exception as exc:
        from scalecap.fleet.sinks import SinkError

        if isinstance(exc, SinkError):
            raise bad_request(str(exc), "bad-sink") from exc
        raise


def _settled(status: dict[str, Any]) -> bool:
    """An earlier request's batch that answers a retry: not still submitting, and not an upload
    that failed before registering anything (cancelled empty: the retry submits again)."""
    return status["state"] != "submitting" and not (status["state"] == "cancelled" and not status["total"])


def _cancel_quietly(client: Any, batch_id: str) -> None:
    try:
        client.cancel(batch_id)
    except BatchNotFound:
        pass


# --- reads ------------------------------------------------------------------------------------


@router.get("/batches", response_model=BatchList, summary="The caller's batches, newest first",
            responses=responses(400, 401, 403))
def list_batches(
    request: Request,
    key: ApiKey = Depends(require("read")),
    offset: int = Query(default=0, ge=0, le=10_000_000),
    limit: int = Query(default=50, ge=1, le=500),
) -> Any:
    client = request.app.state.client
    owner = None if key.is_admin else key.key_id
    items = client.list_batches(owner, offset=offset, limit=limit)
    total = client.store.count_batches(owner)
    nxt = offset + limit if offset + limit < total else None
    return BatchList(items=[BatchStatus.model_validate(i) for i in items], total=total, offset=offset,
                     limit=limit, next_offset=nxt)


@router.get("/batches/{batch_id}", response_model=BatchStatus,
            summary="Counts, state, timestamps and webhook attempts of one batch",
            responses=responses(400, 401, 403, 404))
def get_batch(request: Request, batch_id: str, key: ApiKey = Depends(require("read"))) -> Any:
    return owned_status(request, key, batch_id)


@router.get(
    "/batches/{batch_id}/results",
    summary="Every record of the batch as JSONL, each image once",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {"schema": {"type": "string"}}},
                     "description": "One JSON object per line: {image, scalecap_record}"},
               **responses(400, 401, 403, 404)},
)
def get_results(request: Request, batch_id: str, key: ApiKey = Depends(require("read"))) -> Any:
    owned_status(request, key, batch_id)
    client = request.app.state.client

    def lines() -> Iterator[bytes]:
        for row in client.results(batch_id):
            yield (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.get("/batches/{batch_id}/results/{job_id}", summary="One image's record",
            response_model=dict[str, Any], responses=responses(400, 401, 403, 404, 409))
def get_record(request: Request, batch_id: str, job_id: str, key: ApiKey = Depends(require("read"))) -> Any:
    owned_status(request, key, batch_id)
    if not _JOB_ID.match(job_id):
        raise not_found("no such job in this batch")
    client = request.app.state.client
    rec = client.record(batch_id, job_id)
    if rec is not None:
        return rec
    job = client.store.job(batch_id, job_id)
    if job is None:
        raise not_found("no such job in this batch")
    raise ApiProblem(409, "not-finished", f"job {job_id} has no record yet (state: {job.get('state')})")


@router.get("/batches/{batch_id}/jobs", response_model=JobPage,
            summary="One page of the batch's jobs: id, image, state, error",
            responses=responses(400, 401, 403, 404))
def get_jobs(request: Request, batch_id: str, key: ApiKey = Depends(require("read")),
             offset: int = Query(default=0, ge=0, le=100_000_000),
             limit: int = Query(default=100, ge=1, le=1000)) -> Any:
    st = owned_status(request, key, batch_id)
    items = request.app.state.client.jobs(batch_id, offset=offset, limit=limit)
    nxt = offset + limit if offset + limit < int(st.get("total") or 0) else None
    return JobPage(items=items, offset=offset, limit=limit, next_offset=nxt)


@router.get("/batches/{batch_id}/failures", response_model=Failures,
            summary="Error records and dead letters of the batch", responses=responses(400, 401, 403, 404))
def get_failures(request: Request, batch_id: str, key: ApiKey = Depends(require("read")),
                 limit: int = Query(default=1000, ge=1, le=10_000)) -> Any:
    owned_status(request, key, batch_id)
    return request.app.state.client.failures(batch_id, limit=limit)


@router.post("/batches/{batch_id}/cancel", response_model=BatchStatus,
             summary="Cancel: queued jobs are not run, running ones finish",
             responses=responses(400, 401, 403, 404))
def cancel_batch(request: Request, batch_id: str, key: ApiKey = Depends(require("submit"))) -> Any:
    owned_status(request, key, batch_id)
    return request.app.state.client.cancel(batch_id)


__all__ = ["owned_status", "router"]
