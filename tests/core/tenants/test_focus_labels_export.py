"""The tenant in focus is resolved in core within the principal's scope (issue 16.1); one label map
(16.8) and one CSV export that neutralises spreadsheet formulas (16.9)."""

from __future__ import annotations

import csv
import io

import pytest

from core import labels
from core.errors import AccessDenied, NotFound
from core.export import to_csv
from core.tenants.access import Principal
from core.tenants.service import create_tenant, export_audit_csv, resolve_focus, tenant_choices, tenant_names

STAFF = Principal(role="staff", email="cs@crmbridge.example")
LEAD = Principal(role="leadership", email="vp@crmbridge.example")


@pytest.fixture
def two(session):  # type: ignore[no-untyped-def]
    a = create_tenant(session=session, principal=STAFF, data={"name": "Acme Corp", "slug": "acme"})
    b = create_tenant(session=session, principal=STAFF, data={"name": "Globex", "slug": "globex"})
    session.commit()
    return a, b


def test_staff_focus_is_the_tenant_the_address_names(session, two):
    a, b = two
    assert resolve_focus(session=session, principal=STAFF, slug="globex").id == b.id
    assert resolve_focus(session=session, principal=STAFF, slug=None) is None
    with pytest.raises(NotFound, match="check the address"):
        resolve_focus(session=session, principal=STAFF, slug="initech")


def test_tenant_admin_is_always_their_own_tenant_and_another_slug_is_refused(session, two):
    a, b = two
    admin = Principal(role="tenant_admin", email="admin@acme.example", tenant_id=a.id)
    assert resolve_focus(session=session, principal=admin, slug=None).id == a.id
    assert resolve_focus(session=session, principal=admin, slug="acme").id == a.id
    with pytest.raises(AccessDenied) as exc:  # refused, never swapped for their own in silence
        resolve_focus(session=session, principal=admin, slug="globex")
    assert "not yours" in str(exc.value) and "Acme Corp" in str(exc.value) and "Globex" not in str(exc.value)
    assert [c.slug for c in tenant_choices(session=session, principal=admin)] == ["acme"]


def test_leadership_has_no_tenant_in_focus(session, two):
    assert resolve_focus(session=session, principal=LEAD, slug=None) is None
    with pytest.raises(AccessDenied):
        resolve_focus(session=session, principal=LEAD, slug="acme")
    assert tenant_choices(session=session, principal=LEAD) == []


def test_audit_names_tenants_within_scope(session, two):
    a, b = two
    admin = Principal(role="tenant_admin", email="admin@acme.example", tenant_id=a.id)
    assert tenant_names(session=session, principal=STAFF, ids={a.id, b.id}) == {a.id: "Acme Corp", b.id: "Globex"}
    assert tenant_names(session=session, principal=admin, ids={a.id, b.id}) == {a.id: "Acme Corp"}
    rows = list(csv.DictReader(io.StringIO(export_audit_csv(session=session, principal=STAFF))))
    assert {r["tenant"] for r in rows} >= {"Acme Corp", "Globex"}
    assert "tenant_id" not in rows[0]


def test_labels_are_human():
    assert labels.credential_mode("api_user") == "API user"
    assert labels.credential_mode("per_user_oauth") == "Each user's OAuth consent"
    assert labels.step("go_live") == "Go live"
    assert labels.role("tenant_admin") == "Tenant admin"
    assert labels.humanize("some_new_value") == "Some new value"  # never snake_case on a page


def test_sources_never_show_internal_paths():
    title = "CRM Bridge team notes — ../shared/CRM-FACTS.md (secondary; gathered 2026-11)"
    assert labels.source_title(title) == "CRM Bridge team notes (secondary; gathered 2026-11)"
    assert "../" not in labels.source_title("Guide — Errors (Partner WSDL v58 in ../shared/samples)")
    assert labels.source_url("file://../shared/CRM-FACTS.md") is None
    assert labels.source_url("https://developer.salesforce.com/x") == "https://developer.salesforce.com/x"


def test_csv_export_neutralises_spreadsheet_formulas():
    text = to_csv([{"Name": "=HYPERLINK(\"http://evil\")", "Email": "@SUM(1)", "Count": 3, "Note": None}])
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["Name", "Email", "Count", "Note"]
    assert rows[1] == ["'=HYPERLINK(\"http://evil\")", "'@SUM(1)", "3", ""]
