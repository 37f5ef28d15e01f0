"""API keys of the HTTP API: who may submit, read and cancel, and who signs whose webhooks.

A key is `sk_<key_id>_<secret>`. Only the SHA-256 of the whole key is stored (a 256-bit random
secret needs no slow hash); the key id inside it finds the record in one lookup and the hashes
are compared in constant time. The raw key is shown once, by `create`. Each key also gets its
own Standard Webhooks secret, so one tenant's receiver cannot be sent events forged with
another tenant's secret. Needs only a Redis client (no Celery, no FastAPI).

Redis keys (prefix `scalecap:`):
  apikey:{key_id}   hash: name, scopes (comma separated), max_queued ('' = none), created_at,
                    revoked ("1"), hash (hex SHA-256 of the raw key), webhook_secret,
                    roots and buckets (JSON lists: the key's data scope), all_data ("1")
  apikeys           sorted set of key ids by creation time
  apikey:{key_id}:active  set of the key's batches that may still hold queued images (quota)
  apikey:{key_id}:reserved  hash: batch id -> "images admitted:unix time" (quota, one script)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from scalecap.errors import ConfigError
from scalecap.fleet.layout import PREFIX
from scalecap.fleet.scope import Scope

SCOPES = frozenset({"submit", "read", "admin"})
KEY_PREFIX = "sk_"
_PREFIX = PREFIX
_KEYS_INDEX = _PREFIX + "apikeys"
_RAW_KEY = re.compile(r"^sk_([0-9a-f]{16})_([A-Za-z0-9_-]{20,128})$")
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")
_DUMMY_HASH = hashlib.sha256(b"scalecap-no-such-key").hexdigest()


def _record_key(key_id: str) -> str:
    return f"{_PREFIX}apikey:{key_id}"


def active_batches_key(key_id: str) -> str:
    """The key's batches that may still hold queued images (the quota counts these)."""
    return f"{_PREFIX}apikey:{key_id}:active"


def reservations_key(key_id: str) -> str:
    """The key's quota reservations: batch id -> images admitted but maybe not yet registered."""
    return f"{_PREFIX}apikey:{key_id}:reserved"


def _hash(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def parse_scopes(scopes: Any) -> frozenset[str]:
    """`"submit,read"` or an iterable of names; unknown names are an error."""
    items = scopes.split(",") if isinstance(scopes, str) else list(scopes)
    out = frozenset(s.strip() for s in items if s and s.strip())
    unknown = out - SCOPES
    if unknown:
        raise ConfigError(f"unknown scope(s) {sorted(unknown)}; use {sorted(SCOPES)}")
    if not out:
        raise ConfigError("a key needs at least one scope")
    return out


def parse_roots(roots: Any) -> tuple[str, ...]:
    """`"/a,/b"` or an iterable: absolute, normalised directories (the key's local scope)."""
    items = roots.split(",") if isinstance(roots, str) else list(roots or ())
    out = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        if not os.path.isabs(item) or "\x00" in item:
            raise ConfigError(f"allowed root {item[:200]!r} must be an absolute directory")
        out.append(os.path.normpath(item))
    return tuple(out)


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,62}$")


def parse_buckets(buckets: Any) -> tuple[str, ...]:
    """`"bucket,bucket/prefix"` or an iterable: S3 buckets, each whole or only under a prefix."""
    items = buckets.split(",") if isinstance(buckets, str) else list(buckets or ())
    out = []
    for item in (str(i).strip() for i in items):
        item = item.removeprefix("s3://").strip("/")
        if not item:
            continue
        bucket = item.split("/", 1)[0]
        if not _BUCKET.match(bucket) or ".." in item.split("/") or "\x00" in item:
            raise ConfigError(f"allowed bucket {item[:200]!r} must be BUCKET or BUCKET/PREFIX")
        out.append(item)
    return tuple(out)


@dataclass(frozen=True)
class ApiKey:
    """One key's record, never its secret: safe to log and to return over the API."""

    key_id: str
    name: str
    scopes: frozenset[str]
    max_queued: int | None
    created_at: float
    revoked: bool
    roots: tuple[str, ...] = ()
    """Local directories this key may read (inside SCALECAP_ALLOWED_ROOTS)."""
    buckets: tuple[str, ...] = ()
    """S3 `bucket` or `bucket/prefix` entries this key may read (inside SCALECAP_ALLOWED_BUCKETS)."""
    all_data: bool = False
    """The fleet-wide data scope (`--all-data`); admin keys hold it too."""

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    @property
    def fleet_wide(self) -> bool:
        """Whether the key reads whatever the fleet's allow-lists allow."""
        return self.all_data or self.is_admin

    @property
    def scope(self) -> Scope | None:
        """The data scope its batches carry: None for fleet-wide, else its roots and buckets
        (both empty: http(s) and data: only)."""
        return None if self.fleet_wide else Scope.of(self.roots, self.buckets)

    def can(self, scope: str) -> bool:
        """Admin implies every scope."""
        return self.is_admin or scope in self.scopes

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "name": self.name,
            "scopes": sorted(self.scopes),
            "max_queued": self.max_queued,
            "created_at": self.created_at,
            "revoked": self.revoked,
            "allowed_roots": list(self.roots),
            "allowed_buckets": list(self.buckets),
            "all_data": self.fleet_wide,
        }


class KeyStore:
    """API keys in Redis."""

    def __init__(self, redis_client: Any) -> None:
        self.r = redis_client

    def create(
        self, name: str, *, scopes: Any = ("submit", "read"), max_queued: int | None = None,
        roots: Any = (), buckets: Any = (), all_data: bool = False,
    ) -> tuple[str, ApiKey, str]:
        """A new key: (raw key, shown once and never stored; its record; its webhook secret).

        `roots`/`buckets` are what it may read; without them (and without `all_data`) it reads
        only http(s) and data: URIs."""
        from scalecap.fleet.signatures import generate_secret

        name = name.strip()
        if not name or len(name) > 200:
            raise ConfigError("a key needs a name of 1-200 characters")
        scope_set = parse_scopes(scopes)
        if max_queued is not None and int(max_queued) < 0:
            raise ConfigError("max_queued must be >= 0")
        root_list, bucket_list = parse_roots(roots), parse_buckets(buckets)
        if all_data and (root_list or bucket_list):
            raise ConfigError("--all-data already allows every root and bucket: give one or the other")
        key_id = secrets.token_hex(8)
        raw = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        webhook_secret = generate_secret()
        created = time.time()
        self.r.hset(_record_key(key_id), mapping={
            "name": name,
            "scopes": ",".join(sorted(scope_set)),
            "max_queued": "" if max_queued is None else str(int(max_queued)),
            "created_at": repr(created),
            "revoked": "",
            "hash": _hash(raw),
            "webhook_secret": webhook_secret,
            "roots": json.dumps(list(root_list)),
            "buckets": json.dumps(list(bucket_list)),
            "all_data": "1" if all_data else "",
        })
        self.r.zadd(_KEYS_INDEX, {key_id: created})
        key = ApiKey(key_id, name, scope_set, None if max_queued is None else int(max_queued), created, False,
                     root_list, bucket_list, bool(all_data))
        return raw, key, webhook_secret

    def _load(self, key_id: str) -> tuple[ApiKey, str] | None:
        raw = self.r.hgetall(_record_key(key_id))
        if not raw:
            return None
        h = {_s(k): _s(v) for k, v in raw.items()}
        mq = h.get("max_queued") or ""
        key = ApiKey(
            key_id=key_id,
            name=h.get("name", ""),
            scopes=frozenset(s for s in h.get("scopes", "").split(",") if s),
            max_queued=int(mq) if mq else None,
            created_at=float(h.get("created_at") or 0),
            revoked=h.get("revoked") == "1",
            roots=tuple(json.loads(h.get("roots") or "[]")),
            buckets=tuple(json.loads(h.get("buckets") or "[]")),
            all_data=h.get("all_data") == "1",
        )
        return key, h.get("hash", "")

    def verify(self, raw_key: str | None) -> ApiKey | None:
        """The key's record when `raw_key` is a live key; None for a wrong, unknown or revoked one."""
        m = _RAW_KEY.match(raw_key or "")
        loaded = self._load(m.group(1)) if m else None
        stored = loaded[1] if loaded else _DUMMY_HASH
        # Same work whether or not the id exists: hash and compare in constant time.
        ok = hmac.compare_digest(_hash(raw_key or ""), stored)
        if not ok or loaded is None or loaded[0].revoked:
            return None
        return loaded[0]

    def get(self, key_id: str) -> ApiKey | None:
        if not _KEY_ID.match(key_id or ""):
            return None
        loaded = self._load(key_id)
        return loaded[0] if loaded else None

    def list(self) -> list[ApiKey]:
        """Every key (revoked ones too), oldest first."""
        out = []
        for kid in self.r.zrange(_KEYS_INDEX, 0, -1):
            key = self.get(_s(kid))
            if key is not None:
                out.append(key)
        return out

    def revoke(self, key_id: str) -> bool:
        """Revoke a key for good; False when there is no such key."""
        if self.get(key_id) is None:
            return False
        self.r.hset(_record_key(key_id), "revoked", "1")
        return True

    def webhook_secret(self, key_id: str | None) -> str | None:
        """The secret that signs webhooks of `key_id`'s batches (None: not an API key's batch)."""
        if not key_id or not _KEY_ID.match(key_id):
            return None
        v = self.r.hget(_record_key(key_id), "webhook_secret")
        return _s(v) if v else None


__all__ = ["SCOPES", "ApiKey", "KeyStore", "active_batches_key", "parse_buckets", "parse_roots",
           "parse_scopes", "reservations_key"]
