"""SSO fixtures: an in-process sandbox IdP (real keys, real signatures), the console's SSO routes as an
ASGI app, and a tenant with an imported IdP configuration."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from html import unescape
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.applications import Starlette
from starlette.testclient import TestClient

from core.db import session_scope
from core.settings import get_settings
from core.sso.authn import _settings_cache
from core.sso.keys import _metadata_cache, ensure_sp_keys
from core.sso.metadata import apply_import
from core.sso.signin import _noise
from core.tenants.access import Principal
from core.tenants.models import ConsoleAccount, Tenant
from sandbox.idp import SamlIdp

SANDBOX = "https://sandbox.test"
CONSOLE = "http://127.0.0.1:8501"  # CRMBRIDGE_PUBLIC_URL's default


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    from core.sso.routes import ACS_LIMIT, START_LIMIT

    _settings_cache.clear()
    _metadata_cache.clear()
    for per_process in (ACS_LIMIT, START_LIMIT, _noise):  # every test is a fresh source
        per_process.clear()
    yield
    _settings_cache.clear()
    _metadata_cache.clear()


@pytest.fixture(scope="session")
def saml_idp() -> SamlIdp:
    """One sandbox IdP for the session (RSA key generation is the slow part)."""
    return SamlIdp(base_url=SANDBOX, tenants=("bigcorp", "newco", "acme"),
                   users={"bigcorp": ["admin@bigcorp.example"]})


@pytest.fixture
def idp(saml_idp: SamlIdp) -> SamlIdp:
    saml_idp.sps.clear()
    saml_idp.pending.clear()
    saml_idp.offset_timestamps = False
    return saml_idp


def staff_principal() -> Principal:
    return Principal(role="staff", email="cs@crmbridge.example")


def form_fields(html: str) -> tuple[str, dict[str, str]]:
    """(action, hidden fields) of the first form of an HTML page."""
    action = unescape(re.search(r"<form[^>]*action='([^']*)'", html).group(1))  # type: ignore[union-attr]
    fields = {unescape(k): unescape(v) for k, v in re.findall(r"name='([^']*)' value='([^']*)'", html)}
    return action, fields


@dataclass
class SsoWorld:
    """Tenants bigcorp (SSO through the sandbox IdP) and acme (its own IdP tenant), console accounts,
    and two HTTP clients: the console's SSO routes and the sandbox IdP."""

    engine: Engine
    idp: SamlIdp
    console: TestClient
    sandbox: TestClient
    bigcorp: Tenant
    acme: Tenant
    ids: dict[str, int]

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def import_idp(self, slug: str, idp_tenant: str | None = None, **kw: Any) -> None:
        tenant_id = self.bigcorp.id if slug == "bigcorp" else self.acme.id
        with session_scope(self.engine) as s:
            apply_import(session=s, principal=staff_principal(), tenant_id=tenant_id,  # type: ignore[arg-type]
                         data=self.idp.metadata_xml(idp_tenant or slug), **kw)
            ensure_sp_keys(session=s, principal=staff_principal(), tenant_id=tenant_id, now=kw.get("now"))  # type: ignore[arg-type]

    def token_for(self, email: str) -> str:
        from core.tenants.auth import start_session

        with session_scope(self.engine) as s:
            acc = s.get(ConsoleAccount, self.ids[email])
            method = "password+totp" if acc is not None and acc.role == "staff" else "password"
            return start_session(s, account_id=self.ids[email], method=method)

    def idp_login(self, location: str, email: str) -> tuple[str, dict[str, str]]:
        """Follow an AuthnRequest redirect to the sandbox IdP, pick ``email``; return the ACS form."""
        parts = urlsplit(location)
        assert f"{parts.scheme}://{parts.netloc}" == SANDBOX, location
        page = self.sandbox.get(parts.path + "?" + parts.query)
        assert page.status_code == 200, page.text
        _, fields = form_fields(page.text)
        posted = self.sandbox.post(f"/idp/{parts.path.split('/')[2]}/login",
                                   data={"pending": fields["pending"], "email": email})
        assert posted.status_code == 200, posted.text
        return form_fields(posted.text)

    def post_acs(self, action: str, fields: dict[str, str]) -> Any:
        parts = urlsplit(action)
        return self.console.post(parts.path, data=fields, follow_redirects=False)


@pytest.fixture
def sso_world(app_db: Engine, vault_keys: Any, idp: SamlIdp) -> Iterator[SsoWorld]:
    from core.sso.routes import routes as sso_routes
    from sandbox.idp import routes as idp_routes

    assert get_settings().public_url == CONSOLE
    ids: dict[str, int] = {}
    with session_scope(app_db) as s:
        bigcorp = Tenant(name="BigCorp", slug="bigcorp", status="live")
        acme = Tenant(name="Acme", slug="acme", status="live")
        s.add(bigcorp)
        s.add(acme)
        s.flush()
        for email, role, tid in (
            ("admin@bigcorp.example", "tenant_admin", bigcorp.id),
            ("admin@acme.example", "tenant_admin", acme.id),
            ("cs@crmbridge.example", "staff", None),
            ("vp@crmbridge.example", "leadership", None),
        ):
            acc = ConsoleAccount(email=email, role=role, tenant_id=tid, name=email)
            s.add(acc)
            s.flush()
            ids[email] = acc.id  # type: ignore[assignment]
    console = TestClient(Starlette(routes=sso_routes), base_url=CONSOLE)
    sandbox = TestClient(Starlette(routes=idp_routes(idp)), base_url=SANDBOX)
    with console, sandbox:
        yield SsoWorld(app_db, idp, console, sandbox, bigcorp, acme, ids)
