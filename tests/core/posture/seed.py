"""Rows for the posture tests that read the database: vault metadata and SSO configuration rows as
the vault and SSO packages store them (the ciphertext is filler: posture never reads it)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from sqlmodel import Session, select

from core.demo import load_scenario, read_scenario
from core.sso.models import SsoConfig
from core.tenants.models import AppUser, CrmAccount, Tenant
from core.vault.models import VaultCredential


def store_cred(session: Session, account: CrmAccount, *, user: AppUser | None = None, kind: str = "password",
               expires_at: datetime | None = None, state: str = "active") -> VaultCredential:
    c = VaultCredential(tenant_id=account.tenant_id, crm_account_id=account.id, app_user_id=user.id if user else None,
                        purpose="crm_login", kind=kind, ciphertext=b"\x00" * 32, state=state, expires_at=expires_at)
    session.add(c)
    session.flush()
    return c


def sso_config(session: Session, tenant_id: int, *, now: datetime, tested: bool = True, ok: bool | None = True,
               cert_days: tuple[int, ...] = (400,)) -> SsoConfig:
    certs = [{"use": "signing", "subject": f"CN=idp-{i}", "sha256": f"{i:064x}",
              "not_before": (now - timedelta(days=30)).isoformat(),
              "not_after": (now + timedelta(days=d)).isoformat()} for i, d in enumerate(cert_days)]
    cfg = SsoConfig(tenant_id=tenant_id, idp_entity_id="https://idp.example/entity", sso_url="https://idp.example/sso",
                    sso_binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST", certs_json=json.dumps(certs),
                    metadata_xml="<EntityDescriptor/>", metadata_sha256="0" * 64,
                    tested_at=now - timedelta(days=2) if tested else None, last_test_ok=ok if tested else None)
    session.add(cfg)
    session.flush()
    return cfg


def _tenant(session: Session, slug: str) -> Tenant:
    t = session.exec(select(Tenant).where(Tenant.slug == slug)).one()
    return t


def _accounts(session: Session, tenant: Tenant) -> list[CrmAccount]:
    return list(session.exec(select(CrmAccount).where(CrmAccount.tenant_id == tenant.id)
                             .order_by(CrmAccount.label)).all())


def _users(session: Session, tenant: Tenant) -> list[AppUser]:
    return list(session.exec(select(AppUser).where(AppUser.tenant_id == tenant.id).order_by(AppUser.email)).all())


def demo_world(session: Session, *, now: datetime) -> dict[str, int]:
    """The demo tenants plus what the vault, SSO and providers demos would add: tinyco's stored
    passwords and full licenses, profco refused by the CRM, bigcorp's API users with SSO tested and one
    org attributed, dynco's application user, hubco's OAuth install. newco stays half-onboarded."""
    slugs = load_scenario(session, read_scenario())
    tiny = _tenant(session, "tinyco")
    (tiny_acc,) = _accounts(session, tiny)
    tiny_acc.last_test_ok, tiny_acc.last_test_at = True, now - timedelta(days=1)
    tiny_acc.last_test_summary = json.dumps({"licenses": {"total": 10, "used": 10, "integration_total": 5,
                                                          "integration_used": 0}})
    for i, u in enumerate(_users(session, tiny)):
        store_cred(session, tiny_acc, user=u, expires_at=now + timedelta(days=12, hours=i))
    prof = _tenant(session, "profco")
    (prof_acc,) = _accounts(session, prof)
    prof_acc.last_test_ok, prof_acc.last_test_at = False, now - timedelta(hours=3)
    prof_acc.last_test_summary = "api_access: API_DISABLED_FOR_ORG: API is not enabled for this Organization"
    for u in _users(session, prof):
        store_cred(session, prof_acc, user=u)
    big = _tenant(session, "bigcorp")
    for acc in _accounts(session, big):
        store_cred(session, acc, kind="client_secret")
        if acc.label == "EMEA sales":
            acc.settings_json = json.dumps({**json.loads(acc.settings_json), "attribution_field": "CrmBridge_Actor__c"})
    sso_config(session, big.id, now=now, cert_days=(25,))  # type: ignore[arg-type]
    for slug in ("dynco", "hubco"):
        for acc in _accounts(session, _tenant(session, slug)):
            store_cred(session, acc, kind="client_secret" if slug == "dynco" else "oauth_refresh")
    session.commit()
    return slugs
