"""``crmbridge vault status | sweep | rotate-kek``."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta

from core.clock import utcnow
from core.db import session_scope
from core.tenants.access import Principal
from core.vault import service

CLI = Principal.system("cli")


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def cmd_status(args: argparse.Namespace) -> int:
    now = utcnow()
    with session_scope() as s:
        service.check_keys(s, now=now)
        st = service.vault_status(s, principal=CLI, now=now, soon=timedelta(days=args.soon_days))
    _out(f"keys: {st.key_source}; active {st.active_kek}")
    for k in st.keks:
        where = "in ring" if k.in_ring else "NOT in ring"
        _out(f"  {k.kek_id:<28} {k.state:<9} {where:<11} wraps {k.tenant_keys} tenant key(s)")
    if st.rotation_pending:
        _out(f"rotation pending: {st.rotation_pending} tenant key(s) not yet under {st.active_kek} "
             "(run `crmbridge vault rotate-kek` to finish)")
    states = ", ".join(f"{n} {state}" for state, n in sorted(st.by_state.items())) or "none"
    _out(f"credentials: {states}; {st.reconnect_needed} user(s) need to reconnect")
    _out(f"expiring within {args.soon_days} days: {len(st.expiring)}")
    for e in st.expiring:
        _out(f"  {e.ends_at:%Y-%m-%d %H:%M} UTC  {e.tenant:<20} {e.owner:<30} {e.purpose} ({e.cause})")
    if st.last_sweep_at:
        _out(f"last sweep: {st.last_sweep_at:%Y-%m-%d %H:%M} UTC, destroyed {st.last_sweep.get('expired', 0)} "
             f"expired and {st.last_sweep.get('idle', 0)} idle")
    else:
        _out("last sweep: never")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    now = utcnow()
    service.require_keys_at_start(process="crmbridge vault sweep", now=now)
    with session_scope() as s:
        result = service.sweep(s, now=now, principal=CLI)
    _out(f"vault sweep: destroyed {result.expired} expired and {result.idle} idle credential(s)")
    return 0


def cmd_rotate_kek(args: argparse.Namespace) -> int:
    def progress(done: int, total: int) -> None:
        _out(f"  re-wrapped {done} of {total} tenant key(s)")

    service.require_keys_at_start(process="crmbridge vault rotate-kek")
    result = service.rotate_kek(principal=CLI, new_key=not args.no_new_key, batch_size=args.batch_size,
                                progress=progress)
    made = "made new key " if result.new_key else "active key "
    retired = ", ".join(result.retired) or "none"
    _out(f"vault: {made}{result.active}; re-wrapped {result.rewrapped} tenant key(s); retired: {retired}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    vault = subparsers.add_parser("vault", help="credential vault: keys, self-destruct sweep, key rotation")
    sub = vault.add_subparsers(dest="vault_command", required=True)
    st = sub.add_parser("status", help="key ids, credentials by state, expiring soon, last sweep")
    st.add_argument("--soon-days", type=int, default=7, help="what counts as expiring soon (days)")
    st.set_defaults(func=cmd_status)
    sw = sub.add_parser("sweep", help="destroy expired and idle credentials (run it from cron)")
    sw.set_defaults(func=cmd_sweep)
    rk = sub.add_parser("rotate-kek", help="make a new key-encryption key active and re-wrap every tenant key; "
                                            "resumes an interrupted rotation")
    rk.add_argument("--batch-size", type=int, default=200, help="tenant keys per transaction")
    rk.add_argument("--no-new-key", action="store_true",
                    help="do not make a new key: only re-wrap to the ring's active key and retire the old ones")
    rk.set_defaults(func=cmd_rotate_kek)
