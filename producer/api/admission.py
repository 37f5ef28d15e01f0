"""Admission: the one sequence every submitting route runs before a batch takes rows.

Config (admin-only fields refused, cost within the operator's limits: 422 naming the field),
model and queue, the batch id (the client's, or one derived from the key and its
Idempotency-Key), ownership of an existing batch, and the key's quota: the images are reserved
for the batch in one Redis script (producer/api/quota.py), so concurrent submits cannot pass it
together. `POST /v1/batches` and `POST /v1/captions` both call `admit`; a request that fails after
it calls `release`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from producer.api.auth import owns
from producer.api.problems import ApiProblem, bad_request, config_field_problem
from producer.api.quota import QuotaExceeded
from producer.client import BatchNotFound
from producer.submit_model import SubmitOptions
from scalecap.config import ConfigFieldError, CostLimits, ImageScaleCaptionGenerateConfig, check_cost_limits
from scalecap.errors import ConfigError
from scalecap.fleet.keys import ApiKey
from scalecap.fleet.protocol import gpu_queue, new_batch_id

ADMIN_ONLY_CONFIG = frozenset({"llm_base_url", "llm_model", "llm_api_key"})
"""Config fields that point workers at another server (with the fleet's LLM key): admin only."""


def chain_config(raw: Any, key: ApiKey, settings: Any = None) -> ImageScaleCaptionGenerateConfig:
    """The batch config; 400 for unknown fields or admin-only ones, 422 naming a field that is
    invalid or (with `settings`) over the operator's cost limits."""
    if raw is None:
        return ImageScaleCaptionGenerateConfig()
    if not isinstance(raw, dict):
        raise bad_request("config must be an object of ScaleCap config fields", "bad-config")
    if not key.is_admin and ADMIN_ONLY_CONFIG & set(raw):
        raise bad_request(f"config fields {sorted(ADMIN_ONLY_CONFIG & set(raw))} need an admin key",
                          "bad-config")
    try:
        cfg = ImageScaleCaptionGenerateConfig.from_dict(raw)
        if settings is not None:
            check_cost_limits(cfg, CostLimits.from_settings(settings))
        return cfg
    except ConfigFieldError as exc:
        raise config_field_problem(exc) from exc
    except (ConfigError, ValueError, TypeError) as exc:
        raise bad_request(f"config: {exc}", "bad-config") from exc


def queue_for(model: str) -> str:
    try:
        return gpu_queue(model)
    except ConfigError as exc:
        raise bad_request(str(exc), "bad-model") from exc


def batch_id_for(key: ApiKey, batch_id: str | None, idempotency_key: str | None) -> str | None:
    """The client's batch id, or one derived from (key, Idempotency-Key): a retry lands on it."""
    if batch_id:
        return batch_id
    if idempotency_key:
        digest = hashlib.sha256(f"{key.key_id}\0{idempotency_key}".encode()).hexdigest()[:32]
        return f"idem-{digest}"
    return None


def status_or_none(client: Any, batch_id: str) -> dict[str, Any] | None:
    try:
        return client.status(batch_id)
    except BatchNotFound:
        return None


def quota_exceeded(request: Request, key: ApiKey, detail: str) -> ApiProblem:
    retry = str(int(request.app.state.settings.api_retry_after))
    return ApiProblem(429, "quota-exceeded", detail, headers={"Retry-After": retry})


@dataclass
class Admission:
    options: SubmitOptions
    """Config resolved, model, batch id, owner and scope filled in."""
    existing: dict[str, Any] | None
    """The batch's status when the request lands on one that exists."""
    replayed: bool
    """True when `existing` answers the request and nothing is to be submitted."""
    room: int | None
    """Images reserved for this request (None: no quota); meaningless when replayed."""


async def admit(request: Request, key: ApiKey, options: SubmitOptions, *, idempotency_key: str | None,
                conflict: str, replay: Callable[[dict[str, Any]], bool],
                wanted: int | None = None) -> Admission:
    """Check a submission and reserve its images in the key's quota, or raise its problem.

    `wanted`: the images the request brings (None: a stream of unknown length, which takes the
    room left). `replay(existing_status)` says whether an existing batch of this key answers the
    request as it is (an Idempotency-Key retry); `conflict` is the 409 detail for another key's
    batch."""
    st = request.app.state
    cfg = chain_config(options.config, key, st.settings)
    model = options.model or st.settings.model
    queue_for(model)
    bid = batch_id_for(key, options.batch_id, idempotency_key)
    existing = await run_in_threadpool(status_or_none, st.client, bid) if bid else None
    if existing is not None and not owns(key, existing):
        raise ApiProblem(409, "conflict", conflict)
    options = dataclasses.replace(options, config=cfg, model=model, batch_id=bid, owner=key.key_id,
                                  scope=getattr(key, "scope", None))  # a key without a scope: fleet-wide
    if existing is not None and replay(existing):
        return Admission(options, existing, True, None)
    options = dataclasses.replace(options, batch_id=bid or new_batch_id())
    try:
        room = await run_in_threadpool(st.quota.admit, key, options.batch_id, wanted)
    except QuotaExceeded as exc:
        more = f"; {wanted} more would exceed it" if wanted is not None else ""
        raise quota_exceeded(request, key, f"key {key.key_id} has {exc.in_use} images queued or running "
                                           f"(its quota is {exc.limit}){more}; retry later") from None
    return Admission(options, existing, False, room)


async def release(request: Request, key: ApiKey, batch_id: str | None) -> None:
    """Give back the quota a failed request reserved (a batch that was never created)."""
    if batch_id:
        await run_in_threadpool(request.app.state.quota.release, key, batch_id)


__all__ = ["ADMIN_ONLY_CONFIG", "Admission", "admit", "batch_id_for", "chain_config", "queue_for",
           "quota_exceeded", "release", "status_or_none"]
