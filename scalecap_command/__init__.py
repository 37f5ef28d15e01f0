"""The `scalecap` entry point: routes each command to the package that owns it.

    caption  -> scalecap.cli.caption (the chain in process)
    worker   -> workers.cli (a GPU-pinned Celery worker)
    others   -> producer.cli (submit, status, results, cancel, reconcile, purge, api, keys)

Why a module of its own: one command line serves three layers that must not import each other
upwards (the chain knows no fleet, the producer never reaches workers/ or the backends). Routing
`worker` from producer/cli.py would make the producer depend on the workers, hidden behind a
string import; discovering it through an installed entry point would tie the command to package
metadata that a source checkout (PYTHONPATH, `python -m`) does not refresh. So the one module
allowed to name all three sits above them, holds nothing but the routes, and borrows the parsing
and error handling from producer.cli. Each command's module still loads only when it runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from producer import cli as producer_cli

COMMANDS: dict[str, str] = {
    "caption": "caption a JSONL manifest in process (no queue)",
    "worker": "run a GPU-pinned Celery worker holding one engine (or an --io worker)",
    **producer_cli.COMMANDS,
}

HANDLERS: producer_cli.Handlers = {
    "caption": (producer_cli.lazy("scalecap.cli.caption", "add_cli_args"),
                producer_cli.lazy("scalecap.cli.caption", "main")),
    "worker": (producer_cli.lazy("workers.cli", "add_cli_args"), producer_cli.lazy("workers.cli", "main")),
    **producer_cli.HANDLERS,
}


def main(argv: Sequence[str] | None = None) -> int:
    """`scalecap COMMAND ...`: the exit status of the command."""
    return producer_cli.main(argv, commands=COMMANDS, handlers=HANDLERS)


__all__ = ["COMMANDS", "HANDLERS", "main"]
