"""Canaries: known secrets go through every vault path, the connect link, the CLI and the pages that show
credentials, with logging at DEBUG; then the database file and its -wal, every table row, the captured
logs, the audit rows, the HTTP responses, the error messages and the rendered pages are searched for
them. They must never appear."""

from __future__ import annotations

import argparse
import base64
import logging
import re
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import Session, SQLModel, select
from starlette.applications import Starlette
from starlette.testclient import TestClient
from streamlit.testing.v1 import AppTest

from core.clock import utcnow
from core.connections import links as connect
from core.connections.link_routes import connect_link_routes
from core.connections.links import CredentialCheck, parse_login_secret
from core.errors import AuthenticationFailed, CrmBridgeError, SessionExpired
from core.tenants.access import Principal
from core.tenants.audit import verify_chain
from core.tenants.models import AuditEvent
from core.vault import cli, service
from core.vault.models import VaultConnectLink, VaultCredential
from tests.conftest import admin_of, make_tenant, page_text, run_page
from tests.fixtures.vault import make_vault_world

STAFF = Principal(role="staff", email="cs@crmbridge.example", account_id=1)
WORKER = Principal.system("sync-worker")

CANARIES = {
    "password": "canary-PW-7f3a9c1e5d",
    "security_token": "canary-SECTOKEN-b8d2a1",
    "oauth_refresh": "canary-REFRESH-5e6f7a8b",
    "session_id": "canary-SESSIONID-00Dx4e5f",
    "client_secret": "canary-CLIENTSECRET-91c3",
    "private_key": "-----BEGIN PRIVATE KEY-----canary-PRIVKEY-2d4f6h-----END PRIVATE KEY-----",
    "link_password": "canary-LINKPW-44e1f0",
    "link_wrong_password": "canary-WRONGPW-13ab",
    "link_token": "canary-LINKTOKEN-6c7d",
    "oauth_via_link": "canary-OAUTHLINK-8e9f",
    "rotated": "canary-ROTATED-0a1b",
}


def _forms(secret: str) -> list[bytes]:
    """The canary as bytes, hex and base64 (standard and URL-safe, at every alignment)."""
    raw = secret.encode()
    out = [raw, raw.hex().encode(), secret.encode("utf-16-le")]
    for i in range(3):
        chunk = raw[i:]
        usable = len(chunk) - len(chunk) % 3
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            out.append(enc(chunk[:usable]))
    return out


def find_canaries(blob: bytes | str) -> list[str]:
    data = blob.encode("utf-8", "surrogateescape") if isinstance(blob, str) else blob
    return [name for name, value in CANARIES.items() if any(f in data for f in _forms(value))]


def test_the_scanner_finds_what_it_looks_for():
    assert find_canaries("log line " + CANARIES["password"]) == ["password"]
    assert find_canaries(base64.b64encode(b"x" + CANARIES["session_id"].encode())) == ["session_id"]
    assert find_canaries(CANARIES["oauth_refresh"].encode().hex()) == ["oauth_refresh"]
    assert find_canaries("nothing here") == []


class CanaryCrm:
    def __init__(self, crm_user_id: str) -> None:
        self.crm_user_id = crm_user_id

    def __call__(self, check: CredentialCheck) -> str:
        login = check.login
        logging.getLogger("zeep.transports").debug("HTTP Post to %s: <login/>", check.instance_url)
        if login.password.get_secret_value() != CANARIES["link_password"]:
            raise AuthenticationFailed("INVALID_LOGIN: Invalid username, password, security token; or user locked out.")
        return self.crm_user_id


def _render_credentials(tenant_id: int) -> None:
    from pages._credentials import render_credentials

    render_credentials(tenant_id)


def test_canaries_never_leave_the_vault(app_db, vault_keys, caplog, capsys, tmp_path):
    caplog.set_level(logging.DEBUG)
    for name in ("", "zeep", "zeep.transports", "crmbridge", "sqlalchemy.engine", "httpx", "starlette"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    seen: list[str] = []  # every message a user or operator could read
    now = utcnow()

    with Session(app_db, expire_on_commit=False) as s:
        w = make_vault_world(s, make_tenant(s, "tinyco"), users=3)
        doomed = make_vault_world(s, make_tenant(s, "goneco"), users=1)
        t, acc = w.tenant.id, w.account.id
        u1, u2, u3 = (u.id for u in w.users)
        refs = {
            "password": service.put(s, principal=STAFF, tenant_id=t, crm_account_id=acc, app_user_id=u1,
                                    purpose="crm-login", secret=CANARIES["password"], now=now),
            "oauth_refresh": service.put(s, principal=STAFF, tenant_id=t, crm_account_id=acc, app_user_id=u2,
                                         purpose="crm-oauth", secret=CANARIES["oauth_refresh"], kind="oauth_refresh",
                                         now=now),
            "session_id": service.put(s, principal=STAFF, tenant_id=t, crm_account_id=acc, app_user_id=u3,
                                      purpose="crm-session", secret=CANARIES["session_id"], kind="session_id",
                                      now=now),
            "client_secret": service.put(s, principal=STAFF, tenant_id=t, crm_account_id=acc, purpose="api-login",
                                         secret=CANARIES["client_secret"], kind="client_secret", now=now),
            "private_key": service.put(s, principal=STAFF, tenant_id=t, purpose="sp-signing-key",
                                       secret=CANARIES["private_key"], kind="private_key", now=now),
        }
        service.put(s, principal=STAFF, tenant_id=doomed.tenant.id, crm_account_id=doomed.account.id,
                    app_user_id=doomed.users[0].id, purpose="crm-login", secret=CANARIES["security_token"], now=now)
        s.commit()

        # every successful use hands back exactly the secret, and only inside the block
        for name, ref in refs.items():
            with service.use(s, ref, principal=WORKER, reason=f"canary {name}", now=now) as secret:
                assert secret.get_secret_value() == CANARIES[name]
                seen += [repr(secret), str(secret), f"{secret}", repr(ref), str(ref)]

        def attempt(fn) -> None:  # noqa: ANN001
            try:
                fn()
            except CrmBridgeError as exc:
                seen.append(str(exc))
                seen.append(repr(exc))

        def use_and(ref, exc=None, at=now):  # noqa: ANN001, ANN202
            def run() -> None:
                with service.use(s, ref, principal=WORKER, reason="canary path", now=at):
                    if exc is not None:
                        raise exc
            return run

        attempt(use_and(refs["session_id"], SessionExpired("INVALID_SESSION_ID")))  # survives
        attempt(use_and(refs["session_id"], AuthenticationFailed("INVALID_LOGIN")))  # destroyed
        attempt(use_and(refs["session_id"]))  # CredentialDestroyed
        service.report_auth_failure(s, refs["client_secret"], principal=WORKER, now=now)
        attempt(use_and(refs["client_secret"]))  # held back: failed
        blob = s.get(VaultCredential, refs["password"].id).ciphertext
        s.execute(text("UPDATE vault_credential SET ciphertext = :b WHERE id = :i"),
                  {"b": blob, "i": refs["oauth_refresh"].id})
        s.commit()
        attempt(use_and(refs["oauth_refresh"]))  # tampered
        attempt(use_and(refs["password"], at=now + timedelta(days=31)))  # TTL: destroyed on use
        service.put(s, principal=STAFF, tenant_id=t, crm_account_id=acc, purpose="api-login",
                    secret=CANARIES["rotated"], kind="client_secret", now=now)
        service.rotate_dek(s, principal=STAFF, tenant_id=t, now=now)
        s.commit()
        seen.append(repr(service.list_credentials(s, principal=STAFF, tenant_id=t, now=now)))
        seen.append(repr(service.vault_status(s, principal=STAFF, now=now)))
        service.sweep(s, now=now + timedelta(days=200))
        s.commit()
    service.rotate_kek(principal=STAFF, engine=app_db, batch_size=1, now=now)

    # the connect link, over HTTP
    try:
        with Session(app_db) as s:
            url = connect.create_connect_link(s, principal=STAFF, tenant_id=t, app_user_id=u1, crm_account_id=acc)
            connect.create_connect_link(s, principal=STAFF, tenant_id=t, app_user_id=u2, crm_account_id=acc)
            s.commit()
        client = TestClient(Starlette(routes=connect_link_routes(tester=CanaryCrm("005TINY00000001"))))
        token = url.rsplit("/", 1)[1]
        responses = []

        def post(**form: str):  # noqa: ANN202
            page = client.get(f"/connect/{token}")
            responses.append(page.text)
            csrf = re.search(r"name=csrf value='([^']+)'", page.text).group(1)
            r = client.post(f"/connect/{token}", data={"csrf": csrf, **form})
            responses.append(r.text)
            return r

        assert post(action="store", username="tom@tinyco", password=CANARIES["link_wrong_password"],
                    security_token=CANARIES["link_token"]).status_code == 400
        assert post(action="store", username="tom@tinyco", password=CANARIES["link_password"],
                    security_token=CANARIES["link_token"]).status_code == 200
        assert post(action="store", username="tom@tinyco", password=CANARIES["link_password"]).status_code == 410
        with Session(app_db) as s:
            ref = service.find_credential(s, tenant_id=t, crm_account_id=acc, app_user_id=u1, purpose="crm-login")
            with service.use(s, ref, principal=WORKER, reason="canary link") as secret:
                assert parse_login_secret(secret).password_with_token.get_secret_value() == (
                    CANARIES["link_password"] + CANARIES["link_token"])
        # OAuth through the second link
        with Session(app_db) as s:
            link2 = s.exec(select(VaultConnectLink).where(VaultConnectLink.app_user_id == u2)).one()
            connect.complete_oauth(s, state=connect.oauth_state(link2), secret=CANARIES["oauth_via_link"],
                                   crm_user_id="005TINY00000002")
            s.commit()
        assert post(action="revoke").status_code == 200
    finally:
        pass

    # the pages that show credentials
    at = run_page("vault.py", STAFF)
    assert not at.exception
    pages = [page_text(at), repr(at.session_state.to_dict())]
    comp = AppTest.from_function(_render_credentials, args=(t,), default_timeout=30)
    comp.session_state["principal"] = admin_of(w.tenant)
    comp.run()
    assert not comp.exception
    pages += [page_text(comp), repr(comp.session_state.to_dict())]
    [b for b in comp.button if b.label == "Create connect link"][0].click().run()
    pages += [page_text(comp), repr(comp.session_state.to_dict())]

    # the CLI
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command", required=True))
    for argv in (["vault", "status"], ["vault", "sweep"]):
        args = parser.parse_args(argv)
        args.func(args)
    pages.append(capsys.readouterr().out)

    # crypto-shred the second tenant last
    with Session(app_db) as s:
        service.shred_tenant(s, principal=STAFF, tenant_id=doomed.tenant.id)

    # --- the search ---------------------------------------------------------------------------------
    sqlite = app_db.dialect.name == "sqlite"
    db_path = Path(app_db.url.database or "")
    files = {p.name: p.read_bytes() for p in (db_path, Path(f"{db_path}-wal")) if sqlite and p.exists()}
    assert files or not sqlite
    with Session(app_db) as s:
        rows = []
        for table in SQLModel.metadata.sorted_tables:
            rows += [repr(tuple(r)) for r in s.execute(table.select())]
        audit = [f"{e.actor} {e.action} {e.target} {e.details} {e.via}" for e in s.exec(select(AuditEvent))]
        assert verify_chain(s) == []
    app_db.dispose()
    files |= {f"{p.name} (closed)": p.read_bytes() for p in (db_path, Path(f"{db_path}-wal")) if sqlite and p.exists()}
    logs = caplog.text + "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)

    assert len(audit) > 40 and len(rows) > 40 and len(caplog.records) > 20 and len(responses) == 8
    assert any("vault.credential.use" in a for a in audit) and "zeep.transports" in caplog.text
    leaks = {}
    for where, blob in [*files.items(), ("table rows", "\n".join(rows)), ("audit rows", "\n".join(audit)),
                        ("logs", logs), ("HTTP responses", "\n".join(responses)), ("messages", "\n".join(seen)),
                        ("pages and CLI", "\n".join(pages))]:
        found = find_canaries(blob)
        if found:
            leaks[where] = found
    assert leaks == {}, f"secrets leaked: {leaks}"


@pytest.fixture(autouse=True)
def _quiet_loggers():
    yield
    for name in ("", "zeep", "zeep.transports", "crmbridge", "sqlalchemy.engine", "httpx", "starlette"):
        logging.getLogger(name).setLevel(logging.NOTSET if name else logging.WARNING)
