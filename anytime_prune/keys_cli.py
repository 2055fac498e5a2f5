"""``anytime-prune keys``: create, list or revoke API keys, straight in Redis."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from anytime_prune.client_cli import EXIT_SERVICE_ERROR, print_json

if TYPE_CHECKING:
    from app_common.store import JobStore


def _keys_store(args: argparse.Namespace) -> JobStore:
    """The job store holding the API keys: --redis-url, else REDIS_URL, else the Redis of the
    running ``serve`` (from its credentials file)."""
    from anytime_prune.client import read_credentials
    from app_common.settings import Settings
    from app_common.store import JobStore, make_redis

    saved = read_credentials() or {}
    url = args.redis_url or os.environ.get("REDIS_URL") or saved.get("redis_url")
    if not url:
        raise SystemExit("error: no Redis: pass --redis-url, set REDIS_URL, or start `anytime-prune serve`")
    # serve's prefix goes with serve's Redis; otherwise the setting (APP_REDIS_PREFIX or its default).
    same_as_serve = url == saved.get("redis_url") and not os.environ.get("APP_REDIS_PREFIX")
    prefix = args.prefix or (saved.get("redis_prefix") if same_as_serve else None) or Settings().redis_prefix
    return JobStore(make_redis(url, timeout_s=5.0), prefix=prefix)


def cmd_keys(args: argparse.Namespace) -> int:
    import redis

    # The store logs key creation for the server's audit trail; here the secret is the output, and
    # a log line beside it only gets copied along with it.
    if not getattr(args, "verbose", False):
        logging.getLogger("app_common").setLevel(logging.WARNING)
    try:
        store = _keys_store(args)
        if args.keys_command == "create":
            key_id, secret = store.create_key(args.name)
            print(f"key id: {key_id}\nsecret: {secret}")
            print("the secret is shown only once; send it as `Authorization: Bearer <secret>`", file=sys.stderr)
        elif args.keys_command == "revoke":
            if not store.revoke_key(args.key_id):
                print(f"error: no key {args.key_id}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}")
        else:
            keys = store.list_keys()
            if args.json:
                print_json(keys)
            else:
                for k in keys:
                    print(f"{k['key_id']:<22} {k['created_at']:<26} {k['name']}")
    except redis.exceptions.RedisError as exc:
        print(f"error: Redis: {exc}", file=sys.stderr)
        return EXIT_SERVICE_ERROR
    return 0


def add_keys_command(sub: Any) -> None:
    """Add ``keys`` and its actions to the ``anytime-prune`` parser's subparsers."""
    k = sub.add_parser("keys", help="create, list or revoke API keys (in Redis)")
    k.add_argument("--redis-url", help="default: $REDIS_URL, else the Redis of the running serve")
    k.add_argument("--prefix", help="Redis key prefix (default: $APP_REDIS_PREFIX or 'app')")
    ksub = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kc = ksub.add_parser("create", help="a new key; prints its secret once")
    kc.add_argument("name", help="what the key is for, e.g. 'ci pipeline'")
    kr = ksub.add_parser("revoke", help="revoke a key by its id")
    kr.add_argument("key_id")
    kl = ksub.add_parser("list", help="the keys (ids and names, never secrets)")
    kl.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_keys)

