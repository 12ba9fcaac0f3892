"""The `crmbridge` command (also `python -m core`): operations for the console's operators.

Each package that has commands exposes ``register(subparsers)`` in its ``cli`` module; the handlers
it registers receive the parsed args and return an exit code.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from core.errors import CrmBridgeError

log = logging.getLogger("crmbridge.cli")

PACKAGE_CLIS = (
    "core.vault.cli",
    "core.connections.cli",
    "core.sso.cli",
    "core.sync.cli",
    "core.posture.cli",
    "core.alerts.cli",
    "core.scheduler.cli",
    "core.sandbox_cli",
)


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from core import migrate

    migrate.upgrade(args.url)
    _out("database schema is up to date")
    return 0


def cmd_demo_load(args: argparse.Namespace) -> int:
    from core.demo import load_demo

    summary = load_demo(reset=args.reset, only_if_empty=args.if_empty)
    _out(summary)
    return 0


def cmd_account_create(args: argparse.Namespace) -> int:
    from sqlmodel import select

    from core.db import session_scope
    from core.tenants.access import Principal
    from core.tenants.auth import create_console_account
    from core.tenants.models import Tenant

    password = os.environ.get("CRMBRIDGE_NEW_PASSWORD") or (
        getpass.getpass("Password (empty: none, invite later): ") if sys.stdin.isatty() else ""
    )
    with session_scope() as s:
        tenant_id = None
        if args.tenant:
            t = s.exec(select(Tenant).where(Tenant.slug == args.tenant)).first()
            if t is None:
                raise CrmBridgeError(f"No tenant {args.tenant!r}: check the slug.")
            tenant_id = t.id
        acc = create_console_account(
            s, principal=Principal.system("cli"), email=args.email, role=args.role, tenant_id=tenant_id,
            password=password or None, name=args.name or "",
        )
        _out(f"created {acc.role} account {acc.email}")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from core.db import session_scope
    from core.tenants.audit import read_checkpoint, seal_legacy, verify_chain, verify_checkpoint

    line = None
    if args.checkpoint:
        source = Path(args.checkpoint)
        text = args.checkpoint
        if not args.checkpoint.lstrip().startswith("crmbridge-audit-checkpoint") and source.is_file():
            text = source.read_text()
        line = read_checkpoint(text)
    with session_scope() as s:
        problems = verify_chain(s)
        if line is not None:
            problems += verify_checkpoint(s, line)
        legacy = [p for p in problems if p.legacy]
        if args.seal_legacy and legacy and len(legacy) == len(problems):
            n = seal_legacy(s)
            _out(f"sealed {n} chain head(s) written before head MACs; from now on truncating or deleting a "
                 "chain is detected")
            problems = []
    if problems:
        for p in problems:
            _out(f"{'UNSEALED' if p.legacy else 'TAMPERED'} {p}")
        _out(f"audit log: {len(problems)} problem(s) found")
        return 1
    _out("audit log intact" + (" (and not rolled back behind the checkpoint)" if line else ""))
    return 0


def cmd_audit_checkpoint(args: argparse.Namespace) -> int:
    from core.db import session_scope
    from core.tenants.audit import make_checkpoint, verify_chain

    with session_scope() as s:
        problems = verify_chain(s)
        if problems:
            for p in problems:
                _out(f"{'UNSEALED' if p.legacy else 'TAMPERED'} {p}")
            sys.stderr.write("error: the audit log does not verify, so no checkpoint was made: investigate "
                             "the problems above (restore the database from a backup if rows were lost).\n")
            return 1
        _out(make_checkpoint(s))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crmbridge", description="CRM Bridge operations")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    up = db.add_parser("upgrade", help="apply migrations")
    up.add_argument("--url", help="database URL (default: CRMBRIDGE_DATABASE_URL)")
    up.set_defaults(func=cmd_db_upgrade)

    demo = sub.add_parser("demo", help="demo data").add_subparsers(dest="demo_command", required=True)
    dl = demo.add_parser("load", help="load the demo scenarios in data/demo/")
    dl.add_argument("--reset", action="store_true", help="delete every row first")
    dl.add_argument("--if-empty", action="store_true", help="only when the database has no tenant")
    dl.set_defaults(func=cmd_demo_load)

    account = sub.add_parser("account", help="console accounts").add_subparsers(dest="account_command",
                                                                                 required=True)
    ac = account.add_parser("create", help="create a console account (password from CRMBRIDGE_NEW_PASSWORD)")
    ac.add_argument("--email", required=True)
    ac.add_argument("--role", required=True, help="staff | tenant_admin | leadership")
    ac.add_argument("--tenant", help="tenant slug (tenant admins only)")
    ac.add_argument("--name")
    ac.set_defaults(func=cmd_account_create)

    audit = sub.add_parser("audit", help="audit log").add_subparsers(dest="audit_command", required=True)
    av = audit.add_parser("verify", help="check the HMAC chains, their sealed heads and the global seal; "
                          "exit 1 and name each problem")
    av.add_argument("--checkpoint", metavar="LINE_OR_FILE",
                    help="also report any rollback behind this checkpoint (the line, or a file holding it)")
    av.add_argument("--seal-legacy", action="store_true",
                    help="seal a log written before head MACs existed, when nothing else is wrong")
    av.set_defaults(func=cmd_audit_verify)
    ac = audit.add_parser("checkpoint", help="print one signed line (every chain's length and a digest) "
                          "to keep outside the database")
    ac.set_defaults(func=cmd_audit_checkpoint)

    for name in PACKAGE_CLIS:
        mod = importlib.import_module(name)
        register: Callable[[argparse._SubParsersAction], None] = mod.register
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from sqlalchemy.exc import DBAPIError

    from core.db import corrupt_database_message

    try:
        return int(args.func(args) or 0)
    except CrmBridgeError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except DBAPIError as exc:
        message = corrupt_database_message(exc, getattr(args, "url", None))
        if message is None:
            raise
        sys.stderr.write(f"error: {message}\n")
        return 1
