"""``crmbridge providers …`` (``crmbridge sandbox serve`` is in core/sandbox_cli.py).

    crmbridge providers catalog [--json]                                 providers, editions, facts
    crmbridge providers test ACCOUNT_ID [--user APP_USER_ID]             a real connection test
"""

from __future__ import annotations

import argparse
import json
import sys


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def cmd_catalog(args: argparse.Namespace) -> int:
    from core.providers.catalog import get_catalog

    cat = get_catalog()
    if args.json:
        _out(json.dumps({s: cat.provider(s).model_dump(mode="json") for s in cat.slugs()}, indent=2))
        return 0
    for slug in cat.slugs():
        p = cat.provider(slug)
        _out(f"{slug}: {p.name} — {p.protocol}")
        for m in p.auth_modes:
            _out(f"  auth {m.mode} ({m.credential_mode}, {m.status})")
        for ed_slug, ed in p.editions.items():
            alloc = ed.daily_api_allocation.value
            _out(f"  edition {ed_slug}: API {ed.api_access.value}, SAML {ed.saml_sso.value}, "
                 f"integration licenses {ed.integration_user_licenses.value}, "
                 f"daily API {alloc.base:,} + {alloc.per_license:,}/license (as of {ed.api_access.as_of})")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from core.connections.service import test_crm_account
    from core.db import session_scope
    from core.tenants.access import Principal

    with session_scope() as s:
        report = test_crm_account(session=s, principal=Principal.system("cli"), account_id=args.account_id,
                                  app_user_id=args.user)
    for step in report.steps:
        mark = "ok  " if step.ok else "FAIL"
        _out(f"{mark} {step.name}: {step.detail}" + (f"\n     fix: {step.fix}" if step.fix else ""))
    return 0 if report.ok else 1


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    providers = subparsers.add_parser("providers", help="CRM providers").add_subparsers(
        dest="providers_command", required=True)
    cat = providers.add_parser("catalog", help="list providers, auth modes and edition facts")
    cat.add_argument("--json", action="store_true")
    cat.set_defaults(func=cmd_catalog)
    test = providers.add_parser("test", help="run a connection test for a CRM account")
    test.add_argument("account_id", type=int)
    test.add_argument("--user", type=int, default=None, help="app user id (per-user credential modes)")
    test.set_defaults(func=cmd_test)
