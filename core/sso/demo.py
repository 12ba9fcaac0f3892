"""Demo data for SSO: tenants whose scenario users sign in by SSO get the sandbox IdP's metadata,
fetched from the running sandbox (its keys are made when it starts, so the metadata cannot be
written down in advance). When the sandbox is not running yet, nothing is imported: the SSO page
imports it by URL later (``<sandbox>/idp/<tenant>/metadata``)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlmodel import Session

from core.errors import CrmBridgeError
from core.settings import get_settings
from core.sso.service import apply_import, fetch_document
from core.tenants.access import Principal

log = logging.getLogger(__name__)


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
            log.info("demo: imported the sandbox IdP metadata for %s", slug)
        except CrmBridgeError as exc:
            log.info("demo: SSO for %s not imported (%s); import %s on the SSO page once the sandbox runs",
                     slug, exc, url)
