"""Every Redis connection the fleet makes: one place for passwords, ACL users and TLS.

`redis://[user:password@]host:port/db` for a password (`requirepass`) or an ACL user, and
`rediss://` for TLS, verified against the system's CAs, `SCALECAP_REDIS_CA_CERT`, or the URL's own
`ssl_ca_certs` query parameter (client certificates: `ssl_certfile`/`ssl_keyfile` in the query).
The producer, the workers' clients and Celery's broker connection all take their options from
here, so a TLS setting cannot apply to one and be missed by another.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qsl, urlsplit

_SSL_KEYS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def is_tls(url: str) -> bool:
    return urlsplit(url).scheme.lower() == "rediss"


def _query(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query))


def ssl_options(url: str, settings: Any = None) -> dict[str, Any]:
    """redis-py/kombu SSL options for a rediss:// URL ({} for redis://); certificates required."""
    if not is_tls(url):
        return {}
    query = _query(url)
    opts: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    reqs = query.get("ssl_cert_reqs", "").lower()
    if reqs:
        if reqs not in _CERT_REQS and reqs.upper() not in ("CERT_REQUIRED", "CERT_OPTIONAL", "CERT_NONE"):
            from scalecap.errors import ConfigError

            raise ConfigError(f"ssl_cert_reqs must be required, optional or none, not {reqs!r}")
        opts["ssl_cert_reqs"] = _CERT_REQS[reqs] if reqs in _CERT_REQS else getattr(ssl, reqs.upper())
    ca = query.get("ssl_ca_certs") or (getattr(settings, "redis_ca_cert", None) if settings else None)
    if ca:
        opts["ssl_ca_certs"] = ca
    for key in ("ssl_certfile", "ssl_keyfile"):
        if query.get(key):
            opts[key] = query[key]
    return opts


def redis_client(url: str, settings: Any = None, **kwargs: Any) -> Any:
    """`redis.Redis.from_url(url)` with the TLS options above (query parameters still apply)."""
    import redis

    opts = ssl_options(url, settings)
    query = _query(url)
    # from_url parses ssl_* query parameters itself; pass only what the query does not say.
    opts = {k: v for k, v in opts.items() if k not in query}
    return redis.Redis.from_url(url, **{**opts, **kwargs})


def broker_use_ssl(url: str, settings: Any = None) -> dict[str, Any] | None:
    """Celery's `broker_use_ssl` for this broker URL (None for redis://): kombu ignores the
    URL's ssl_* query parameters and, without this, would not verify the server."""
    opts = ssl_options(url, settings)
    return opts or None


def celery_broker_url(url: str) -> str:
    """The URL Celery gets: ssl_* query parameters move to `broker_use_ssl`, so they are dropped."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    rest = [(k, v) for k, v in parse_qsl(parts.query) if k not in _SSL_KEYS]
    from urllib.parse import urlencode

    return parts._replace(query=urlencode(rest)).geturl()
