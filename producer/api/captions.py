"""POST /v1/captions: one image for small callers, answered with its record when it is ready.

It is a one-image batch like any other (same quota, same ownership, same results routes): the
call waits up to `wait` seconds (at most SCALECAP_API_CAPTION_TIMEOUT) and then answers 202 with
the batch and job to poll.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from producer.api.admission import admit, release
from producer.api.auth import require
from producer.api.batches import shard_limits
from producer.api.limits import read_json
from producer.api.models import CaptionRequest, CaptionResult
from producer.api.params import no_unknown_query
from producer.api.problems import ApiProblem, bad_request, responses
from producer.api.refs import RefError, check_ref, ref_problem, verify_shard
from producer.sources import SourceRow
from producer.submit_model import SubmitOptions
from scalecap.errors import ConfigError
from scalecap.fleet.keys import ApiKey

router = APIRouter(prefix="/v1", tags=["captions"], dependencies=[Depends(no_unknown_query)])


def _result(request: Request, batch_id: str, client: Any) -> CaptionResult:
    jobs = client.jobs(batch_id, offset=0, limit=1)
    job = jobs[0] if jobs else None
    st = client.status(batch_id)
    base = str(request.base_url).rstrip("/")
    jid = job["job_id"] if job else None
    record = client.record(batch_id, jid) if jid and st.get("finished_at") is not None else None
    return CaptionResult(
        batch_id=batch_id, job_id=jid, state=(job or {}).get("state") or st["state"], record=record,
        status_url=f"{base}/v1/batches/{batch_id}",
        result_url=f"{base}/v1/batches/{batch_id}/results/{jid}" if jid else None,
    )


@router.post(
    "/captions",
    response_model=CaptionResult,
    summary="Caption one image, waiting for it up to a timeout",
    responses={202: {"model": CaptionResult, "description": "Not finished in time: poll result_url"},
               **responses(400, 401, 403, 409, 413, 422, 429)},
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/CaptionRequest"}}}}},
)
async def caption(
    request: Request,
    response: Response,
    key: ApiKey = Depends(require("submit")),
    wait: float | None = Query(default=None, ge=0, le=3600,
                               description="Seconds to wait (default and cap: the server's caption timeout)"),
    idempotency_key: str | None = Header(default=None, max_length=200),
) -> Any:
    st = request.app.state
    settings, client = st.settings, st.client
    raw = await read_json(request, settings.api_max_body_bytes)  # by hand: the size limit holds
    try:
        body = CaptionRequest.model_validate(raw)
    except ValidationError as exc:
        e = exc.errors()[0]
        raise ApiProblem(400, "invalid-request", f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}") from exc
    try:
        ref = check_ref(body.image, list(settings.allowed_roots), scope=key.scope,
                        buckets=list(settings.allowed_buckets))
        await run_in_threadpool(verify_shard, ref, shard_limits(request))
    except RefError as exc:
        raise ref_problem(exc, "image") from exc
    adm = await admit(request, key, SubmitOptions(config=body.config, model=body.model),
                      idempotency_key=idempotency_key,
                      conflict="this Idempotency-Key cannot be used; choose another",
                      replay=lambda existing: True, wanted=1)
    bid = adm.options.batch_id or ""
    if not adm.replayed:
        try:
            await st.submitter.start([SourceRow(ref)], adm.options, wait_all=True)
        except (ConfigError, ValueError) as exc:
            await release(request, key, bid)
            raise bad_request(str(exc)) from exc
        except BaseException:
            await release(request, key, bid)
            raise
    limit = float(settings.api_caption_timeout)
    deadline = time.monotonic() + (limit if wait is None else min(wait, limit))
    delay = 0.05
    while True:
        status = await run_in_threadpool(client.status, bid)
        if status.get("finished_at") is not None or time.monotonic() >= deadline:
            break
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 0.5)
    result = await run_in_threadpool(_result, request, bid, client)
    if result.record is None:
        response.status_code = 202
        if result.result_url:
            response.headers["Location"] = result.result_url
    return result


__all__ = ["router"]
