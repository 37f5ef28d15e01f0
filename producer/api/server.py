"""`scalecap api`: serve the HTTP API with uvicorn."""

from __future__ import annotations

import argparse


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--broker-url", default=None, help="Redis URL (env SCALECAP_BROKER_URL)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default: info)")


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from producer.api.app import create_app
    from scalecap.settings import Settings

    app = create_app(Settings.from_env(broker_url=args.broker_url))
    # Plain formatters: the CLI's log redaction hands every record over already formatted (and
    # uvicorn's own access formatter wants the raw arguments). Access lines show the client,
    # method, path and status: never a header, so never a key.
    fmt = {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    log_config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": fmt},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain",
                                "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": args.log_level.upper()},
        "loggers": {name: {"handlers": [], "propagate": True}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, log_config=log_config,
                proxy_headers=False)
    return 0
