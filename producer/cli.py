"""The producer's commands of `scalecap`: submit, status, results, cancel, reconcile, purge, api, keys,
and the argument parsing and error handling every `scalecap` command shares (build_parser, main).

The `scalecap` entry point itself is scalecap_command/, which adds the commands of other packages
(`caption`, `worker`); this module never names them, so producer/ never reaches workers/ or the
backends. Each command's implementation is imported when that command runs, so `scalecap --help`
and the producer commands never load torch or vLLM (a producer machine need not have them).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

Handlers = dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[..., int]]]

COMMANDS: dict[str, str] = {
    "submit": "submit images to the fleet as one batch",
    "status": "print a batch's status as JSON",
    "results": "write a batch's records as JSONL, Parquet or WebDataset shards",
    "cancel": "cancel a batch (queued jobs are not run)",
    "reconcile": "repair the queue once: republish lost messages, requeue expired leases, drain the outbox",
    "purge": "delete a batch's state (or every batch finished before a date) from Redis",
    "api": "serve the HTTP API (FastAPI; keys, quotas, metrics)",
    "keys": "create, list or revoke API keys of the HTTP API",
}


# --- producer commands ----------------------------------------------------------------------


def _add_broker(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker-url", default=None, help="Redis URL (env SCALECAP_BROKER_URL)")


def _client(args: argparse.Namespace) -> Any:
    from producer.client import FleetClient
    from scalecap.settings import Settings

    return FleetClient(Settings.from_env(broker_url=args.broker_url))


def add_submit_args(p: argparse.ArgumentParser) -> None:
    from producer.submit_model import add_submit_options
    from scalecap.cli.options import add_config_args

    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="JSONL manifest, directory, s3://bucket/prefix, WebDataset .tar shard (brace "
                        "patterns like shards/{00000..00127}.tar), .parquet file, or image path/URL")
    add_submit_options(p)  # one flag per SubmitOptions field: the client and the API share them
    p.add_argument("--wait", action="store_true", help="show progress and wait until the batch ends")
    _add_broker(p)
    add_config_args(p)


def cmd_submit(args: argparse.Namespace) -> int:
    from scalecap.cli.options import config_from_args
    from scalecap.fleet.protocol import BatchMismatch

    client = _client(args)
    config = config_from_args(args)
    _warn_unserved(client, args, config)
    bar = None
    if args.wait:
        from tqdm import tqdm

        bar = tqdm(desc="submitted", unit="img", file=sys.stderr)

    def on_wait(queued: int) -> None:  # SCALECAP_MAX_QUEUED backpressure
        if bar is not None:
            bar.set_postfix_str(f"waiting: {queued} images queued > SCALECAP_MAX_QUEUED")
        else:
            print(f"scalecap submit: waiting, {queued} images queued > SCALECAP_MAX_QUEUED",
                  file=sys.stderr)

    try:
        result = _submit(client, args, config, bar, on_wait)
    except BatchMismatch as exc:  # nothing was written
        print(f"scalecap submit: error: {exc}", file=sys.stderr)
        return 2
    if bar is not None:
        bar.close()
    print(json.dumps(result.to_dict()), flush=True)
    if not args.wait:
        return 0
    return _wait(client, result)


def _warn_unserved(client: Any, args: argparse.Namespace, config: Any) -> None:
    """Warn when no live worker on the batch's queue can compute its rating rule."""
    from scalecap.fleet.presence import unserved_warning
    from scalecap.fleet.protocol import gpu_queue

    queue = args.queue or gpu_queue(args.model or client.settings.model)
    try:
        line = unserved_warning(client.redis, queue, config.rule_name)
    except Exception:  # Redis away: submit itself will say so
        return
    if line:
        print(f"scalecap submit: warning: {line}", file=sys.stderr)


def _submit(client: Any, args: argparse.Namespace, config: Any, bar: Any, on_wait: Any) -> Any:
    from producer.submit_model import SubmitOptions

    return client.submit(args.sources, SubmitOptions.from_args(args, config),
                         on_progress=(lambda n: bar.update(n - bar.n)) if bar is not None else None,
                         on_wait=on_wait)


def _wait(client: Any, result: Any) -> int:
    from tqdm import tqdm

    with tqdm(desc="captioned", unit="img", file=sys.stderr) as bar:

        def progress(st: dict[str, Any]) -> None:
            bar.total = st["total"]
            bar.set_postfix(done=st["done"], failed=st["failed"], running=st["running"])
            bar.update(st["done"] + st["failed"] + st["cancelled"] - bar.n)

        status = client.wait(result.batch_id, progress)
    print(json.dumps(status), flush=True)
    return 0


def add_status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("batch_id", metavar="BATCH")
    _add_broker(p)


def cmd_status(args: argparse.Namespace) -> int:
    print(json.dumps(_client(args).status(args.batch_id), indent=2))
    return 0


def add_results_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("batch_id", metavar="BATCH")
    p.add_argument("-o", "--output", default="-",
                   help="file (JSONL: default stdout), or a folder for --format webdataset")
    p.add_argument("--format", default="jsonl", choices=("jsonl", "parquet", "webdataset"),
                   help="jsonl (one record per line), parquet (flat columns, docs/data.md) or "
                        "webdataset (tar shards of {job_id}.json)")
    p.add_argument("--with-images", action="store_true",
                   help="webdataset: copy each original image next to its JSON")
    p.add_argument("--export", action="store_true",
                   help="S3 sinks: also write records.jsonl next to the records and print its URL")
    _add_broker(p)


def cmd_results(args: argparse.Namespace) -> int:
    from producer.export import export

    client = _client(args)
    n = export(client, args.batch_id, args.format, args.output, with_images=args.with_images)
    print(f"{n} rows", file=sys.stderr)
    if args.export:
        print(client.export(args.batch_id))
    return 0


def add_cancel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("batch_id", metavar="BATCH")
    _add_broker(p)


def cmd_cancel(args: argparse.Namespace) -> int:
    print(json.dumps(_client(args).cancel(args.batch_id), indent=2))
    return 0


# --- dispatch: a command's module loads only when it runs -----------------------------------


def lazy(module: str, attr: str) -> Callable[..., Any]:
    """A function that imports `module` and calls its `attr` when called (not before)."""

    def call(*args: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), attr)(*args)

    return call


HANDLERS: Handlers = {
    "submit": (add_submit_args, cmd_submit),
    "status": (add_status_args, cmd_status),
    "results": (add_results_args, cmd_results),
    "cancel": (add_cancel_args, cmd_cancel),
    "reconcile": (lazy("producer.cli_fleet", "add_reconcile_args"),
                  lazy("producer.cli_fleet", "cmd_reconcile")),
    "purge": (lazy("producer.cli_fleet", "add_purge_args"), lazy("producer.cli_fleet", "cmd_purge")),
    "api": (lazy("producer.api.server", "add_cli_args"), lazy("producer.api.server", "main")),
    "keys": (lazy("producer.cli_keys", "add_cli_args"), lazy("producer.cli_keys", "main")),
}


def build_parser(command: str | None = None, *, commands: dict[str, str] = COMMANDS,
                 handlers: Handlers = HANDLERS) -> argparse.ArgumentParser:
    """The parser; only `command`'s arguments are built (others appear by name and help)."""
    parser = argparse.ArgumentParser(
        prog="scalecap",
        description="ScaleCap dense image captions: in process, or on a Celery/Redis GPU fleet.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            handlers[name][0](p)
        else:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None, *, commands: dict[str, str] = COMMANDS,
         handlers: Handlers = HANDLERS) -> int:
    """Run one command: a user error is one line on stderr and exit status 1, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in commands else None, commands=commands, handlers=handlers)
    args = parser.parse_args(argv)
    from scalecap.errors import ScaleCapError
    from scalecap.fleet.redact import protect_process, redact_text

    secrets = protect_process(None, getattr(args, "broker_url", None))  # no password in any output
    try:
        return int(handlers[args.command][1](args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ScaleCapError, ValueError, OSError, *_broker_errors()) as exc:
        print(f"scalecap {args.command}: error: {redact_text(str(exc), secrets)}", file=sys.stderr)
        return 1


def _broker_errors() -> tuple[type[BaseException], ...]:
    """Redis and kombu connection errors (wrong password, TLS refused): a message, no traceback."""
    try:
        from kombu.exceptions import OperationalError
        from redis import RedisError
    except ImportError:
        return ()
    return (RedisError, OperationalError)


if __name__ == "__main__":
    sys.exit(main())
