"""`scalecap keys create|list|revoke`: API keys of the HTTP API, managed next to Redis.

`create` prints the key once (`key: sk_...`) and its webhook secret (`webhook_secret: whsec_...`),
one per line, so scripts can read them; only a hash of the key is stored. A key reads only
http(s) and data: images unless it is given a data scope: `--allowed-roots`, `--allowed-buckets`,
or `--all-data` (the fleet-wide scope); SCALECAP_ALLOWED_ROOTS/BUCKETS bound every key.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_cli_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    c = sub.add_parser("create", help="create a key; prints it once, with its webhook secret")
    c.add_argument("--name", required=True, help="who the key is for, e.g. team-a")
    c.add_argument("--scopes", default="submit,read",
                   help="comma separated: submit, read, admin (admin: every batch) (default: submit,read)")
    c.add_argument("--max-queued", type=int, default=None,
                   help="most images this key may have queued or running at once "
                        "(default: SCALECAP_DEFAULT_MAX_QUEUED, 100000)")
    c.add_argument("--allowed-roots", default="", metavar="DIR[,DIR]",
                   help="local directories the key may read (within SCALECAP_ALLOWED_ROOTS)")
    c.add_argument("--allowed-buckets", default="", metavar="BUCKET[/PREFIX][,...]",
                   help="S3 buckets, or prefixes of them, the key may read (within SCALECAP_ALLOWED_BUCKETS)")
    c.add_argument("--all-data", action="store_true",
                   help="the fleet-wide scope: every root and bucket the fleet's allow-lists allow "
                        "(default: only http(s) and data: images)")
    sub.add_parser("list", help="list keys (id, name, scopes, quota, revoked), never the keys themselves")
    r = sub.add_parser("revoke", help="revoke a key for good")
    r.add_argument("key_id", metavar="KEY_ID")
    for q in sub.choices.values():
        q.add_argument("--broker-url", default=None, help="Redis URL (env SCALECAP_BROKER_URL)")


def _store(args: argparse.Namespace) -> Any:
    from scalecap.fleet.keys import KeyStore
    from scalecap.fleet.redis import redis_client
    from scalecap.settings import Settings

    settings = Settings.from_env(broker_url=args.broker_url)
    return KeyStore(redis_client(settings.broker_url, settings))


def main(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.keys_command == "create":
        raw, key, secret = store.create(args.name, scopes=args.scopes, max_queued=args.max_queued,
                                        roots=args.allowed_roots, buckets=args.allowed_buckets,
                                        all_data=args.all_data)
        print(f"key_id: {key.key_id}")
        print(f"key: {raw}")
        print(f"webhook_secret: {secret}")
        print(f"scopes: {','.join(sorted(key.scopes))}")
        data = ("all (fleet-wide)" if key.fleet_wide else
                "; ".join(filter(None, [", ".join(key.roots), ", ".join(f"s3://{b}" for b in key.buckets)]))
                or "http(s) and data: only")
        print(f"data: {data}")
        print("# Store the key now: it is not shown again (only its hash is kept).")
        return 0
    if args.keys_command == "list":
        for key in store.list():
            print(json.dumps(key.to_dict()))
        return 0
    if args.keys_command == "revoke":
        if not store.revoke(args.key_id):
            print(f"scalecap keys: no key {args.key_id!r}")
            return 1
        print(f"revoked {args.key_id}")
        return 0
    return 2
