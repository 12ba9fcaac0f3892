"""``crmbridge sso ...``: lint IdP metadata from a file or URL, and run the certificate watch.

    crmbridge sso lint PATH_OR_URL [--entity-id ID] [--json]   exit 0 usable, 1 not usable, 2 usage error
    crmbridge sso watch                                         certificate findings, SP key rollover, purge (cron)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from core.errors import MetadataInvalid
from core.sso.lint import LintReport

EXIT_USABLE, EXIT_UNUSABLE, EXIT_USAGE = 0, 1, 2


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _read(source: str) -> tuple[bytes | None, LintReport | None, int | None]:
    """(document, report of a refused fetch, usage-error exit code)."""
    from core.sso.lint import LintReport

    if source.lower().startswith(("http://", "https://")):
        from core.sso.metadata import fetch_document

        try:
            return fetch_document(source).body, None, None
        except MetadataInvalid as exc:
            report = LintReport()
            report.add("error", exc.code or "fetch_failed", exc.message, exc.fix or "")
            return None, report, None
    path = Path(source)
    if not path.is_file():
        _err(f"error: {source!r} is neither a readable file nor an http(s) URL")
        return None, None, EXIT_USAGE
    try:
        return path.read_bytes(), None, None
    except OSError as exc:
        _err(f"error: cannot read {source!r}: {exc.strerror}")
        return None, None, EXIT_USAGE


def _human(report: LintReport) -> str:
    lines = [f"{'USABLE' if report.usable else 'NOT USABLE'}: {report.entity_id or '(no IdP entity chosen)'}"]
    if len(report.entities) > 1:
        lines.append(f"  IdP entities in the document: {len(report.entities)}")
    for e in report.sso:
        lines.append(f"  SSO {e.binding.rsplit(':', 1)[-1]}: {e.url}")
    for c in report.certs:
        lines.append(f"  cert [{c.use}] {c.subject} {c.key_type}-{c.key_bits} until {c.not_after.date()} "
                     f"({c.days_left} days) sha256 {c.sha256[:16]}…")
    sig = report.signature
    if sig["present"]:
        lines.append(f"  signature: valid={sig['valid']} trusted={sig['trusted']}")
    if report.valid_until:
        lines.append(f"  validUntil: {report.valid_until.isoformat()}")
    for f in report.findings:
        lines.append(f"  {f.severity.upper():7} {f.code}: {f.message}")
        if f.fix and f.severity != "info":
            lines.append(f"          fix: {f.fix}")
    return "\n".join(lines)


def cmd_lint(args: argparse.Namespace) -> int:
    from core.sso.lint import lint_metadata

    data, refused, usage = _read(args.source)
    if usage is not None:
        return usage
    report = refused if refused is not None else lint_metadata(data or b"", entity_id=args.entity_id)
    assert report is not None
    if args.json:
        _out(json.dumps(report.to_json(), ensure_ascii=False))
    else:
        _out(_human(report))
    return EXIT_USABLE if report.usable else EXIT_UNUSABLE


def cmd_watch(args: argparse.Namespace) -> int:
    from core.db import session_scope
    from core.sso.watch import purge_expired, watch_certificates
    from core.tenants.access import Principal

    with session_scope() as s:
        findings = watch_certificates(session=s, principal=Principal.system("cli"))
        purged = purge_expired(session=s)
    for f in findings:
        _out(f"{f.severity.upper():7} tenant {f.tenant_id} {f.code}: {f.message}{' (new)' if f.new else ''}")
    _out(f"sso watch: {len(findings)} finding(s), {sum(f.new for f in findings)} new; "
         f"{purged} expired replay-cache/request row(s) purged")
    return 1 if any(f.severity == "error" for f in findings) else 0


def register(subparsers: Any) -> None:
    sso = subparsers.add_parser("sso", help="SAML single sign-on").add_subparsers(dest="sso_command", required=True)
    lint = sso.add_parser(
        "lint", help="lint IdP metadata: exit 0 usable, 1 not usable, 2 usage error",
        description="Lint SAML IdP metadata from a file or an https URL (fetched with the console's SSRF limits).",
    )
    lint.add_argument("source", metavar="PATH_OR_URL")
    lint.add_argument("--entity-id", help="the IdP entity to use in an aggregate (EntitiesDescriptor)")
    lint.add_argument("--json", action="store_true", help="print one JSON object")
    lint.set_defaults(func=cmd_lint)
    watch = sso.add_parser("watch", help="IdP certificate and SP key watch (findings, audit events, rollover); "
                                         "purges expired replay-cache rows (run daily from cron)")
    watch.set_defaults(func=cmd_watch)
