"""Demo data for SSO: tenants whose scenario users sign in by SSO get the sandbox IdP's metadata,
fetched from the running sandbox (its keys are made when it starts, so the metadata cannot be
written down in advance). When the sandbox is not running yet, nothing is imported: the SSO page
imports it by URL later (``<sandbox>/idp/<tenant>/metadata``)."""

from __future__ import annotations

import html
import logging
import re
from datetime import datetime
from typing import Any

from sqlmodel import Session

from core.errors import CrmBridgeError
from core.settings import get_settings
from core.sso.keys import ensure_sp_keys
from core.sso.metadata import apply_import, fetch_document
from core.tenants.access import Principal

log = logging.getLogger(__name__)


def _form(page: str) -> tuple[str, dict[str, str]]:
    action = html.unescape(re.search(r"<form[^>]*action='([^']*)'", page).group(1))  # type: ignore[union-attr]
    return action, {html.unescape(k): html.unescape(v) for k, v in re.findall(r"name='([^']*)' value='([^']*)'", page)}


def _test_login(session: Session, *, principal: Principal, tenant_id: int, slug: str, email: str) -> bool:
    """A real SP-initiated test login, as an admin would run it from the SSO page: the AuthnRequest goes
    to the sandbox IdP over HTTPS, the demo admin is picked on its login page, and the signed response
    it returns is handed to the ACS logic (which stores the trace and marks the tenant tested)."""
    import httpx

    from core.sso.signin import consume_response
    from core.sso.testlogin import start_test_login

    settings = get_settings()
    start = start_test_login(session=session, principal=principal, tenant_id=tenant_id)
    verify: str | bool = settings.sandbox_verify()
    with httpx.Client(verify=verify, timeout=10) as http:
        page = http.get(start.url) if not start.form else http.post(start.url, data=start.form)
        _, fields = _form(page.text)
        posted = http.post(f"{settings.sandbox_url.rstrip('/')}/idp/{slug}/login",
                           data={"pending": fields.get("pending", ""), "email": email})
        _, answer = _form(posted.text)
    outcome = consume_response(session=session, tenant_slug=slug, saml_response=answer["SAMLResponse"],
                               relay_state=answer.get("RelayState"))
    return bool(getattr(outcome, "ok", False))


def load_demo(
    session: Session, *, scenario: dict[str, Any], principal: Principal, now: datetime, tenants: dict[str, int]
) -> None:
    settings = get_settings()
    if not settings.demo:
        return
    for t in scenario.get("tenants", []):
        slug = t.get("slug")
        if slug not in tenants or not any(u.get("sso") for u in t.get("users", [])):
            continue
        url = f"{settings.sandbox_url.rstrip('/')}/idp/{slug}/metadata"
        try:
            data = fetch_document(url).body
            apply_import(session=session, principal=principal, tenant_id=tenants[slug], data=data, source="url",
                         source_url=url, now=now)
            ensure_sp_keys(session=session, principal=principal, tenant_id=tenants[slug], now=now)
            log.info("demo: imported the sandbox IdP metadata for %s and generated its SP keys", slug)
            admin = next((c["email"] for c in scenario.get("console_accounts", [])
                          if c.get("tenant") == slug and c.get("role") == "tenant_admin"), None)
            if admin:
                import httpx

                try:
                    ok = _test_login(session, principal=principal, tenant_id=tenants[slug], slug=slug, email=admin)
                except (CrmBridgeError, httpx.HTTPError, KeyError, AttributeError) as exc:
                    log.info("demo: SSO test login for %s not run (%s)", slug, type(exc).__name__)
                else:
                    log.info("demo: SSO test login for %s %s", slug, "passed" if ok else "failed")
        except CrmBridgeError as exc:
            log.info("demo: SSO for %s not imported (%s); import %s on the SSO page once the sandbox runs",
                     slug, exc, url)
