"""``distill-admin``: operator commands against the service's database (``DISTILL_DATABASE_URL``).

    distill-admin keys create --tenant NAME [--json]   a new key; printed once, never stored
    distill-admin keys list [--tenant NAME] [--json]   id, tenant, created, revoked (never the key)
    distill-admin keys revoke ID                       the next request with it is a 401

A tenant exists once it has a key; its files, jobs and models are those its keys created.
Rows from before keys existed belong to the tenant ``default``.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime

from .db import session_scope
from .services import api_keys

__all__ = ["main", "create_api_key"]


def create_api_key(tenant: str) -> tuple[str, str]:
    """(key id, plain key) of a new key for ``tenant``: what ``keys create`` does, for scripts and tests."""
    with session_scope() as session:
        row, plain = api_keys.create_key(session, tenant)
        return row.id, plain


def _when(moment: datetime | None) -> str | None:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment is not None else None


def _create(args: argparse.Namespace) -> int:
    key_id, plain = create_api_key(args.tenant)
    if args.json:
        print(json.dumps({"id": key_id, "tenant": args.tenant, "key": plain}))
    else:
        print(f"id      {key_id}\ntenant  {args.tenant}\nkey     {plain}")
        print("the key is shown only this once; store it now (the service keeps only its hash)", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    with session_scope() as session:
        rows = [{"id": r.id, "tenant": r.tenant_id, "created_at": _when(r.created_at),
                 "revoked_at": _when(r.revoked_at)} for r in api_keys.list_keys(session, args.tenant)]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'ID':<29} {'TENANT':<24} {'CREATED':<20} REVOKED")
    for row in rows:
        print(f"{row['id']:<29} {row['tenant']:<24} {row['created_at']:<20} {row['revoked_at'] or '-'}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    with session_scope() as session:
        row, revoked_now = api_keys.revoke_key(session, args.id)
        if row is None:
            print(f"no key with id {args.id!r}", file=sys.stderr)
            return 1
        print(f"{'revoked' if revoked_now else 'already revoked'} {row.id} (tenant {row.tenant_id}) "
              f"at {_when(row.revoked_at)}")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="distill-admin", description=__doc__.splitlines()[0])
    groups = root.add_subparsers(dest="group", required=True)
    keys = groups.add_parser("keys", help="API keys").add_subparsers(dest="command", required=True)
    create = keys.add_parser("create", help="create a key for a tenant and print it (once)")
    create.add_argument("--tenant", required=True, help="the tenant's name: letters, digits, '_', '.', '-'")
    create.add_argument("--json", action="store_true", help="print {id, tenant, key} as JSON")
    create.set_defaults(run=_create)
    listing = keys.add_parser("list", help="list keys: id, tenant, created, revoked (never the key)")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_list)
    revoke = keys.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("id")
    revoke.set_defaults(run=_revoke)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as exc:  # a bad tenant name
        print(f"distill-admin: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
