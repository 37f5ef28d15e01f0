"""`scalecap reconcile` and `scalecap purge`: the queue's repair pass and its retention by hand."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any


def _client(args: argparse.Namespace) -> Any:
    from producer.client import FleetClient
    from scalecap.settings import Settings

    return FleetClient(Settings.from_env(broker_url=args.broker_url))


def add_reconcile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grace", type=float, default=None,
                   help="seconds a chunk may stay noted unpublished before it is republished "
                   "(default: twice SCALECAP_RECONCILE_INTERVAL, at least 5)")
    p.add_argument("--broker-url", default=None, help="Redis URL (env SCALECAP_BROKER_URL)")


def cmd_reconcile(args: argparse.Namespace) -> int:
    print(json.dumps(_client(args).reconcile(args.grace)))
    return 0


def add_purge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("batch_id", metavar="BATCH", nargs="?", default=None, help="the batch to purge")
    p.add_argument("--finished-before", default=None, metavar="DATE",
                   help="purge every batch that finished before DATE (ISO 8601, e.g. 2026-01-31 or "
                   "2026-01-31T12:00:00Z; UTC unless it says otherwise)")
    p.add_argument("--force", action="store_true",
                   help="purge BATCH even if it has not finished: cancel it first (without this, "
                   "an unfinished batch is refused)")
    p.add_argument("--broker-url", default=None, help="Redis URL (env SCALECAP_BROKER_URL)")


def parse_date(text: str) -> float:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"--finished-before: not an ISO 8601 date: {text!r}") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def cmd_purge(args: argparse.Namespace) -> int:
    if bool(args.batch_id) == bool(args.finished_before):
        print("scalecap purge: give a BATCH or --finished-before DATE (one of them)", file=sys.stderr)
        return 2
    client = _client(args)
    if args.batch_id:
        if not client.purge(args.batch_id, force=args.force):
            print(f"scalecap purge: no batch {args.batch_id!r}", file=sys.stderr)
            return 1
        print(json.dumps({"purged": [args.batch_id]}))
        return 0
    print(json.dumps({"purged": client.purge_finished_before(parse_date(args.finished_before))}))
    return 0
