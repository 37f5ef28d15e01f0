"""Keep secrets out of what the fleet prints: errors, log lines, `status`.

Broker URLs carry passwords (`redis://user:pass@host`), webhook URLs often carry tokens in their
query string, and settings hold keys. Anything that prints a URL goes through `redact_url`; the
CLIs print errors through `redact_text`, and `install_log_redaction` scrubs every log record of a
process (its message, arguments and traceback) before any handler sees it.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s/]+)@")
_QUERY = re.compile(r"(?P<base>\bhttps?://[^\s?#'\"]+)\?[^\s#'\"]*")
_PATH_QUERY = re.compile(r"(?P<base>(?:^|[\s\"'(])/[^\s?#'\"]*)\?[^\s#'\"]*")
"""A request path's query string (`"POST /v1/batches?webhook=...&config=..."` in an access line):
parameters may hold webhook tokens, config secrets or a misplaced `?api_key=`."""
_SECRET_FIELD = re.compile(
    r"(?P<name>[\"']?\b[A-Za-z_]*(?:api_key|apikey|secret|token|password|passwd)[\"']?\s*[:=]\s*)"
    r"(?P<value>\"[^\"]*\"|'[^']*'|[^\s,&;}\]]+)", re.I)
"""`llm_api_key: "..."`, `token=...`: a named secret field in JSON, a form or a message."""


def redact_url(url: str | None) -> str | None:
    """`url` without its password (user kept, password masked), query string or fragment."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:{MASK}@{hostport}" if ":" in userinfo else f"{user}@{hostport}"
        query = "?…" if parts.query else ""
        return f"{parts.scheme}://{netloc}{parts.path}{query}" if parts.scheme else url.split("?", 1)[0]
    except ValueError:
        return redact_text(url)


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with URL passwords, query strings (of http(s) URLs and of request paths), values of
    secret-named fields (`llm_api_key`, `token`, ...) and each of `secrets` masked."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    text = _QUERY.sub(lambda m: f"{m['base']}?…", text)
    text = _PATH_QUERY.sub(lambda m: f"{m['base']}?…", text)
    text = _SECRET_FIELD.sub(lambda m: f"{m['name']}{MASK}", text)
    for secret in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def url_password(url: str | None) -> str | None:
    """The password in a URL's userinfo, decoded, or None."""
    if not url:
        return None
    try:
        pw = urlsplit(url).password
    except ValueError:
        return None
    return unquote(pw) if pw else None


def settings_secrets(settings: Any) -> list[str]:
    """Every secret a Settings object holds: URL passwords, keys, webhook and S3 secrets."""
    out: list[str] = []
    for name in ("broker_url", "results_url", "openai_base_url", "s3_endpoint_url"):
        pw = url_password(getattr(settings, name, None))
        if pw:
            out += [pw, _quote_all(pw)]
    for name in ("webhook_secret", "s3_secret_access_key", "openai_api_key", "llm_api_key"):
        value = getattr(settings, name, None)
        if value:
            out.append(str(value))
    out += [str(k) for k in getattr(settings, "api_keys", None) or [] if k]
    return out


def _quote_all(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


_lock = threading.Lock()
_secrets: set[str] = set()
_installed: list[Any] = []


def install_log_redaction(secrets: Iterable[str] = ()) -> None:
    """Scrub every log record made in this process from now on (idempotent; secrets accumulate).

    A record factory rather than a handler filter, so it also covers handlers that libraries
    (Celery, kombu) add later; messages are formatted once here, then masked.
    """
    with _lock:
        _secrets.update(s for s in secrets if s)
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            try:
                message = record.getMessage()
            except Exception:  # a bad format string: leave it to the handler to report
                return record
            record.msg, record.args = redact_text(message, _secrets), None
            if record.exc_info and not record.exc_text:
                record.exc_text = redact_text(_FORMATTER.formatException(record.exc_info), _secrets)
            return record

        logging.setLogRecordFactory(factory)
        _installed.append(factory)


_FORMATTER = logging.Formatter()


def protect_process(settings: Any = None, *extra: str | None) -> list[str]:
    """Redact logs and uncaught tracebacks of this process; returns the secrets it masks.

    `settings` (a Settings, or None for the environment's) and `extra` (a --broker-url flag,
    say) name the secrets; URL passwords and http(s) query strings are masked regardless.
    """
    import sys

    if settings is None:
        from scalecap.settings import Settings

        try:
            settings = Settings.from_env()
        except Exception:  # a bad setting is reported by whoever reads it next
            settings = None
    secrets = settings_secrets(settings) if settings is not None else []
    for value in extra:
        pw = url_password(value)
        if pw:
            secrets += [pw, _quote_all(pw)]
    install_log_redaction(secrets)
    previous = sys.excepthook

    def excepthook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        import traceback

        text = "".join(traceback.format_exception(kind, exc, tb))
        sys.stderr.write(redact_text(text, _secrets))

    with _lock:
        if not _hook:
            _hook.append(previous)
            sys.excepthook = excepthook
    return secrets


_hook: list[Any] = []
