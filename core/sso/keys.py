"""The tenant's SP keys: the key pairs CRM Bridge signs AuthnRequests and its SP metadata with and that
IdPs encrypt assertions to. Private keys live in the vault; the rows hold the public certificate.

Key generation is an explicit step, ``ensure_sp_keys``: the SSO page calls it after an import and from
its Generate SP keys button (the onboarding wizard's SSO step points there), a test login and the demo
call it before they need keys; the certificate watch rolls the keys of tenants that have them.
Importing IdP metadata and the public SP metadata GET generate nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from core.clock import aware
from core.errors import NotFound
from core.settings import get_settings
from core.sso.common import ACS_PRINCIPAL, get_tenant, now_or, tenant_by_slug
from core.sso.models import SsoSpKey
from core.sso.sp import make_sp_key, sp_endpoints, sp_metadata_xml
from core.tenants.access import Principal, require_tenant
from core.tenants.audit import record_event
from core.tenants.models import Tenant

SP_ROLLOVER_DAYS = 30  # start publishing the next SP key this long before the active one expires
SP_ACTIVATE_AFTER = timedelta(days=7)  # IdPs refresh metadata daily: switch a week after publishing
VAULT_PURPOSE = "saml-sp-key-{id}"

_metadata_cache: dict[tuple[Any, ...], tuple[str, datetime]] = {}


def published_keys(session: Session, tenant_id: int) -> list[SsoSpKey]:
    rows = session.exec(
        select(SsoSpKey).where(SsoSpKey.tenant_id == tenant_id, col(SsoSpKey.state).in_(("active", "next")))
        .order_by(col(SsoSpKey.id))
    ).all()
    return list(rows)


def active_key(keys: list[SsoSpKey]) -> SsoSpKey | None:
    active = [k for k in keys if k.state == "active"]
    return active[-1] if active else None


def _new_key(session: Session, *, principal: Principal, tenant: Tenant, state: str, now: datetime) -> SsoSpKey:
    from core.vault import service as vault
    from core.vault.models import CredentialKind

    material = make_sp_key(f"CRM Bridge SP {tenant.slug}", now=now)
    row = SsoSpKey(
        tenant_id=tenant.id,  # type: ignore[arg-type]
        state=state, cert_pem=material.cert_pem, cert_sha256=material.cert_sha256, vault_ref="",
        not_before=material.not_before, not_after=material.not_after, created_at=now,
        activated_at=now if state == "active" else None,
    )
    session.add(row)
    session.flush()
    ref = vault.put(
        session, principal=principal, tenant_id=tenant.id,  # type: ignore[arg-type]
        purpose=VAULT_PURPOSE.format(id=row.id), secret=material.key_pem,
        kind=CredentialKind.private_key.value, ttl=(material.not_after - now) + timedelta(days=30), now=now,
    )
    row.vault_ref = str(ref)
    session.add(row)
    record_event(session, principal=principal, action="sso.sp_key.create", tenant_id=tenant.id,
                 target=f"sso_sp_key:{row.id}", details={"state": state, "sha256": row.cert_sha256,
                                                          "not_after": row.not_after}, at=now)
    return row


def ensure_sp_keys(
    *, session: Session, principal: Principal, tenant_id: int, now: datetime | None = None
) -> list[SsoSpKey]:
    """The tenant's published SP keys, creating and rolling them as their dates require:

    no key → an active one; the active key within 30 days of expiry → a next key, published beside it;
    a next key published for 7 days (or the active one about to expire) → it becomes active and the
    old one is retired (no longer published; its vault credential expires on its own)."""
    require_tenant(principal, tenant_id)
    now = now_or(now)
    tenant = get_tenant(session, tenant_id)
    keys = published_keys(session, tenant_id)
    active = active_key(keys)
    nxt = next((k for k in keys if k.state == "next"), None)
    if active is None:
        if nxt is not None:
            return complete_sp_rollover(session=session, principal=principal, tenant_id=tenant_id, now=now)
        _new_key(session, principal=principal, tenant=tenant, state="active", now=now)
        return published_keys(session, tenant_id)
    expires = aware(active.not_after)
    assert expires is not None
    if nxt is None and expires - now <= timedelta(days=SP_ROLLOVER_DAYS):
        _new_key(session, principal=principal, tenant=tenant, state="next", now=now)
        return published_keys(session, tenant_id)
    if nxt is not None:
        published = aware(nxt.created_at)
        assert published is not None
        if now - published >= SP_ACTIVATE_AFTER or expires - now <= timedelta(days=1):
            return complete_sp_rollover(session=session, principal=principal, tenant_id=tenant_id, now=now)
    return keys


def start_sp_rollover(
    *, session: Session, principal: Principal, tenant_id: int, now: datetime | None = None
) -> list[SsoSpKey]:
    """Publish a next SP key beside the active one (both appear in the SP metadata)."""
    require_tenant(principal, tenant_id)
    now = now_or(now)
    keys = published_keys(session, tenant_id)
    if any(k.state == "next" for k in keys):
        return keys
    if active_key(keys) is None:
        return ensure_sp_keys(session=session, principal=principal, tenant_id=tenant_id, now=now)
    _new_key(session, principal=principal, tenant=get_tenant(session, tenant_id), state="next", now=now)
    return published_keys(session, tenant_id)


def complete_sp_rollover(
    *, session: Session, principal: Principal, tenant_id: int, now: datetime | None = None
) -> list[SsoSpKey]:
    """Make the next SP key active and retire the old one."""
    require_tenant(principal, tenant_id)
    now = now_or(now)
    keys = published_keys(session, tenant_id)
    nxt = next((k for k in keys if k.state == "next"), None)
    if nxt is None:
        return keys
    for k in keys:
        if k.state == "active":
            k.state, k.retired_at = "retired", now
            session.add(k)
    nxt.state, nxt.activated_at = "active", now
    session.add(nxt)
    session.flush()
    record_event(session, principal=principal, action="sso.sp_key.rollover", tenant_id=tenant_id,
                 target=f"sso_sp_key:{nxt.id}", details={"active_sha256": nxt.cert_sha256}, at=now)
    return published_keys(session, tenant_id)


@contextmanager
def private_keys(
    session: Session, keys: list[SsoSpKey], *, principal: Principal, reason: str, now: datetime | None = None
) -> Iterator[list[str]]:
    """The PEM private keys of ``keys`` from the vault, for the duration of the block only.

    Note: ``vault.use`` commits the caller's open transaction before it releases a secret."""
    from core.vault import service as vault

    with ExitStack() as stack:
        pems = [
            stack.enter_context(
                vault.use(session, k.vault_ref, principal=principal, reason=reason, now=now)
            ).get_secret_value()
            for k in keys
        ]
        yield pems


def sp_metadata(*, session: Session, tenant_slug: str, now: datetime | None = None) -> str:
    """The tenant's signed SP metadata (public). Cached for a day per key set; no secret is cached.

    Raises:
        NotFound: unknown tenant, or no SP keys generated yet (code ``sp_keys_missing``).
    """
    now = now_or(now)
    tenant = tenant_by_slug(session, tenant_slug)
    keys = published_keys(session, tenant.id)  # type: ignore[arg-type]
    active = active_key(keys)
    if active is None:  # a public GET never generates keys: a tenant admin does, on the SSO page
        raise NotFound(f"{tenant.name} has no SP keys yet, so there is no SP metadata to publish.",
                       fix="A tenant admin generates them on the Single sign-on page (Generate SP keys).",
                       code="sp_keys_missing")
    nxt = next((k for k in keys if k.state == "next"), None)
    cache_key = (tenant.id, tenant.slug, active.cert_sha256, nxt.cert_sha256 if nxt else None,
                 get_settings().public_url)
    cached = _metadata_cache.get(cache_key)
    if cached is not None and now - cached[1] < timedelta(hours=24) and cached[1] <= now:
        return cached[0]
    with private_keys(session, [active], principal=ACS_PRINCIPAL, reason="sign SAML SP metadata",
                       now=now) as (key_pem,):
        xml = sp_metadata_xml(sp=sp_endpoints(tenant.slug), cert_pem_active=active.cert_pem,
                              cert_pem_next=nxt.cert_pem if nxt else None, key_pem=key_pem, now=now)
    _metadata_cache[cache_key] = (xml, now)
    return xml

