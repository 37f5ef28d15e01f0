"""Admission: the one sequence every submitting route runs before a batch takes rows.

Config (admin-only fields refused), model and queue, the batch id (the client's, or one derived
from the key and its Idempotency-Key), ownership of an existing batch, the key's quota, and the
batch tracked for that quota. `POST /v1/batches` and `POST /v1/captions` both call `admit`.
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
from producer.api.problems import ApiProblem, bad_request
from producer.client import BatchNotFound
from producer.submit_model import SubmitOptions
from scalecap.config import ImageScaleCaptionGenerateConfig
from scalecap.errors import ConfigError
from scalecap.fleet.keys import ApiKey
from scalecap.fleet.protocol import gpu_queue, new_batch_id

ADMIN_ONLY_CONFIG = frozenset({"llm_base_url", "llm_model", "llm_api_key"})
"""Config fields that point workers at another server (with the fleet's LLM key): admin only."""


def chain_config(raw: Any, key: ApiKey) -> ImageScaleCaptionGenerateConfig:
    if raw is None:
        return ImageScaleCaptionGenerateConfig()
    if not isinstance(raw, dict):
        raise bad_request("config must be an object of ScaleCap config fields", "bad-config")
    if not key.is_admin and ADMIN_ONLY_CONFIG & set(raw):
        raise bad_request(f"config fields {sorted(ADMIN_ONLY_CONFIG & set(raw))} need an admin key",
                          "bad-config")
    try:
        return ImageScaleCaptionGenerateConfig.from_dict(raw)
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
    """Images the key may still add (None: no quota); meaningless when replayed."""


async def admit(request: Request, key: ApiKey, options: SubmitOptions, *, idempotency_key: str | None,
                conflict: str, replay: Callable[[dict[str, Any]], bool]) -> Admission:
    """Check a submission and reserve its batch id for the key's quota, or raise its problem.

    `replay(existing_status)` says whether an existing batch of this key answers the request
    as it is (an Idempotency-Key retry); `conflict` is the 409 detail for another key's batch."""
    st = request.app.state
    cfg = chain_config(options.config, key)
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
    room = await run_in_threadpool(st.quota.room, key)
    if room is not None and room <= 0:
        raise quota_exceeded(request, key, f"key {key.key_id} has {key.max_queued} images queued or "
                                           "running (its quota); retry later")
    options = dataclasses.replace(options, batch_id=bid or new_batch_id())
    await run_in_threadpool(st.quota.track, key, options.batch_id)
    return Admission(options, existing, False, room)


__all__ = ["ADMIN_ONLY_CONFIG", "Admission", "admit", "batch_id_for", "chain_config", "queue_for",
           "quota_exceeded", "status_or_none"]
