"""Every tenants service, for each role, against its own tenant and another tenant."""

from __future__ import annotations

import pytest

from core.connections import service as connections
from core.errors import AccessDenied, Conflict, InvalidInput
from core.tenants import service as svc
from core.tenants.access import Principal
from core.tenants.models import AuditEvent
from tests.conftest import admin_of, make_app_user, make_crm_account


def _audit_actions(session) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.action for e in session.query(AuditEvent).order_by(AuditEvent.id)]


def test_staff_creates_tenant_and_it_is_audited(session, staff):
    t = svc.create_tenant(session=session, principal=staff, data={"name": "Initech", "slug": "initech"})
    session.commit()
    assert t.status == "onboarding"
    assert "tenant.create" in _audit_actions(session)


@pytest.mark.parametrize("who", ["tenant_admin", "leadership"])
def test_only_staff_create_tenants(session, tenant, leadership, who):
    p = admin_of(tenant) if who == "tenant_admin" else leadership
    with pytest.raises(AccessDenied):
        svc.create_tenant(session=session, principal=p, data={"name": "X", "slug": "xco"})


def test_duplicate_slug_is_a_conflict_and_writes_nothing(session, staff, tenant):
    before = session.query(AuditEvent).count()
    with pytest.raises(Conflict, match="taken"):
        svc.create_tenant(session=session, principal=staff, data={"name": "Acme 2", "slug": "acme"})
    session.rollback()
    assert session.query(AuditEvent).count() == before


@pytest.mark.parametrize("bad", [{"name": "", "slug": "ok-slug"}, {"name": "x" * 201, "slug": "ok-slug"},
                                 {"name": "Fine", "slug": "Not A Slug"}, {"name": "Fine", "slug": "a"}])
def test_empty_or_oversized_fields_are_refused_with_the_field_named(session, staff, bad):
    with pytest.raises(InvalidInput) as exc:
        svc.create_tenant(session=session, principal=staff, data=bad)
    assert ("name" in str(exc.value)) or ("slug" in str(exc.value))


def test_get_tenant_scope(session, staff, leadership, tenant, other_tenant):
    assert svc.get_tenant(session=session, principal=staff, tenant_id=other_tenant.id).slug == "globex"
    assert svc.get_tenant(session=session, principal=admin_of(tenant), tenant_id=tenant.id).slug == "acme"
    with pytest.raises(AccessDenied):
        svc.get_tenant(session=session, principal=admin_of(tenant), tenant_id=other_tenant.id)
    with pytest.raises(AccessDenied):
        svc.get_tenant(session=session, principal=leadership, tenant_id=tenant.id)


def test_list_tenants_is_scoped(session, staff, leadership, tenant, other_tenant):
    rows, total = svc.list_tenants(session=session, principal=staff)
    assert {r.slug for r in rows} == {"acme", "globex"} and total == 2
    rows, total = svc.list_tenants(session=session, principal=admin_of(tenant))
    assert [r.slug for r in rows] == ["acme"] and total == 1
    with pytest.raises(AccessDenied):
        svc.list_tenants(session=session, principal=leadership)


def test_list_tenants_filters(session, staff, tenant, other_tenant):
    make_crm_account(session, other_tenant, provider="hubspot", edition="professional")
    rows, _ = svc.list_tenants(session=session, principal=staff, provider="hubspot")
    assert [r.slug for r in rows] == ["globex"]
    rows, _ = svc.list_tenants(session=session, principal=staff, search="ACM")
    assert [r.slug for r in rows] == ["acme"]
    assert rows[0].crm_accounts == 0


def test_set_tenant_status_staff_only(session, staff, tenant):
    svc.set_tenant_status(session=session, principal=staff, tenant_id=tenant.id, status="suspended")
    assert tenant.status == "suspended"
    with pytest.raises(InvalidInput):
        svc.set_tenant_status(session=session, principal=staff, tenant_id=tenant.id, status="gone")
    with pytest.raises(AccessDenied):
        svc.set_tenant_status(session=session, principal=admin_of(tenant), tenant_id=tenant.id, status="live")


@pytest.mark.parametrize("role", ["staff", "own_admin", "other_admin", "leadership"])
def test_crm_account_services_per_role(session, staff, leadership, tenant, other_tenant, role):
    p: Principal = {"staff": staff, "own_admin": admin_of(tenant), "other_admin": admin_of(other_tenant),
                    "leadership": leadership}[role]
    # CRM accounts are created from the catalog (core.providers); the tenants domain lists and re-modes them
    from core.connections.service import add_crm_account_settings

    def add() -> object:
        return add_crm_account_settings(session=session, principal=p, tenant_id=tenant.id, provider="salesforce",
                                        edition="enterprise", label="EMEA", auth_mode="oauth_client_credentials",
                                        values={"instance_url": "https://acme.my.salesforce.com",
                                                "client_id": "acme-integration"})
    if role in ("staff", "own_admin"):
        acc = add()
        assert [a.label for a in svc.list_crm_accounts(session=session, principal=p, tenant_id=tenant.id)] == ["EMEA"]
        connections.set_credential_mode(session=session, principal=p, account_id=acc.id, mode="per_user_oauth")
        assert acc.credential_mode == "per_user_oauth"
        with pytest.raises(Conflict):
            add()
    else:
        with pytest.raises(AccessDenied):
            add()
        acc = make_crm_account(session, tenant)
        with pytest.raises(AccessDenied):
            svc.list_crm_accounts(session=session, principal=p, tenant_id=tenant.id)
        with pytest.raises(AccessDenied):
            svc.get_crm_account(session=session, principal=p, account_id=acc.id)
        with pytest.raises(AccessDenied):
            connections.set_credential_mode(session=session, principal=p, account_id=acc.id, mode="api_user")


def test_unknown_credential_mode_is_refused(session, staff, tenant):
    acc = make_crm_account(session, tenant)
    with pytest.raises(InvalidInput, match="credential mode"):
        connections.set_credential_mode(session=session, principal=staff, account_id=acc.id, mode="shared-password")
    assert acc.credential_mode == "api_user"


@pytest.mark.parametrize("role", ["staff", "own_admin", "other_admin", "leadership"])
def test_app_user_services_per_role(session, staff, leadership, tenant, other_tenant, role):
    p = {"staff": staff, "own_admin": admin_of(tenant), "other_admin": admin_of(other_tenant),
         "leadership": leadership}[role]
    acc = make_crm_account(session, tenant)
    if role in ("staff", "own_admin"):
        u = svc.create_app_user(session=session, principal=p, tenant_id=tenant.id,
                                data={"email": "Ana@Acme.example", "name": "Ana"})
        assert u.email == "ana@acme.example"
        svc.set_crm_identity(session=session, principal=p, app_user_id=u.id, crm_account_id=acc.id,
                             crm_user_id="005A")
        assert svc.crm_user_ids(session=session, principal=p, crm_account_id=acc.id) == {u.id: "005A"}
        assert len(svc.list_app_users(session=session, principal=p, tenant_id=tenant.id)) == 1
    else:
        u = make_app_user(session, tenant)
        with pytest.raises(AccessDenied):
            svc.create_app_user(session=session, principal=p, tenant_id=tenant.id, data={"email": "b@x.y", "name": "B"})
        with pytest.raises(AccessDenied):
            svc.list_app_users(session=session, principal=p, tenant_id=tenant.id)
        with pytest.raises(AccessDenied):
            svc.set_crm_identity(session=session, principal=p, app_user_id=u.id, crm_account_id=acc.id,
                                 crm_user_id="005B")


def test_crm_identity_cannot_cross_tenants(session, staff, tenant, other_tenant):
    u = make_app_user(session, tenant)
    foreign = make_crm_account(session, other_tenant)
    with pytest.raises(InvalidInput):
        svc.set_crm_identity(session=session, principal=staff, app_user_id=u.id, crm_account_id=foreign.id,
                             crm_user_id="005X")


def test_audit_listing_scope(session, staff, leadership, tenant, other_tenant):
    svc.create_app_user(session=session, principal=staff, tenant_id=tenant.id, data={"email": "a@a.a", "name": "A"})
    svc.create_app_user(session=session, principal=staff, tenant_id=other_tenant.id,
                        data={"email": "b@b.b", "name": "B"})
    session.commit()
    rows, total = svc.list_audit(session=session, principal=staff)
    assert total == 2
    rows, total = svc.list_audit(session=session, principal=admin_of(tenant))
    assert total == 1 and rows[0].tenant_id == tenant.id
    with pytest.raises(AccessDenied):
        svc.list_audit(session=session, principal=admin_of(tenant), tenant_id=other_tenant.id)
    with pytest.raises(AccessDenied):
        svc.list_audit(session=session, principal=leadership)


def test_csv_export_neutralises_formulas(session, staff, tenant):
    svc.create_app_user(session=session, principal=staff, tenant_id=tenant.id,
                        data={"email": "x@acme.example", "name": "=HYPERLINK(\"http://evil\")"})
    from core.tenants.audit import record_event

    record_event(session, principal="=cmd|' /C calc'!A0", action="demo.formula", tenant_id=tenant.id,
                 target="+SUM(A1)")
    session.commit()
    text = svc.export_audit_csv(session=session, principal=staff)
    assert "'=cmd" in text and "'+SUM(A1)" in text
    assert "\n=cmd" not in text and ",=cmd" not in text and ",+SUM" not in text


def test_tenant_counts_for_leadership_have_no_user_data(session, leadership, tenant, other_tenant):
    make_crm_account(session, tenant)
    make_app_user(session, tenant)
    counts = svc.tenant_counts(session=session, principal=leadership)
    assert counts.tenants == 2 and counts.by_provider == {"salesforce": 1}
    assert "ana@acme.example" not in repr(counts)
    with pytest.raises(AccessDenied):
        svc.tenant_counts(session=session, principal=admin_of(tenant))
