"""Audit log: who changed what — the real actor, even when an API user made the CRM change."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import streamlit as st

from core import labels
from core.db import session_scope
from core.errors import CrmBridgeError
from core.tenants.service import export_audit_csv, list_audit, tenant_names
from pages._common import principal, selected_tenant_id, show_error

p = principal()
st.title("Audit log")
st.caption("Append-only and tamper-evident: each entry is chained to the one before it by an HMAC.")

tenant_id = selected_tenant_id(p) if p.is_tenant_admin else None
if p.is_staff:
    only_picked = st.toggle("Only the tenant in focus", value=False)
    if only_picked:
        tenant_id = selected_tenant_id(p)

c1, c2, c3, c4 = st.columns(4)
actor = c1.text_input("Actor contains")
action = c2.text_input("Action starts with", placeholder="e.g. crm_account.")
today = datetime.now(UTC).date()
since_d = c3.date_input("From", today - timedelta(days=30))
until_d = c4.date_input("To", today)
filters = {
    "tenant_id": tenant_id,
    "actor": actor or None,
    "action": action or None,
    "since": datetime.combine(since_d, time.min, tzinfo=UTC),
    "until": datetime.combine(until_d, time.min, tzinfo=UTC) + timedelta(days=1),
}
try:
    with session_scope() as s:
        rows, total = list_audit(session=s, principal=p, limit=500, **filters)
        csv_text = export_audit_csv(session=s, principal=p, **filters) if rows else ""
        names = tenant_names(session=s, principal=p, ids={r.tenant_id for r in rows if r.tenant_id})
except CrmBridgeError as exc:
    show_error(exc)
    st.stop()

st.caption(f"{total} event(s){' — showing the newest 500' if total > 500 else ''}")
if rows:
    st.dataframe(
        [{"Time (UTC)": r.occurred_at.strftime("%Y-%m-%d %H:%M:%S"),
          "Tenant": names.get(r.tenant_id, "") if r.tenant_id else "—", "Actor": r.actor,
          "Role": labels.role(r.actor_role), "Action": r.action, "Target": r.target, "Via": r.via or "",
          "Details": r.details}
         for r in rows],
        hide_index=True, width="stretch",
        column_config={"Details": st.column_config.TextColumn(width="large")},
    )
    st.download_button("Export CSV", csv_text, file_name="crmbridge-audit.csv", mime="text/csv")
else:
    st.info("No events match these filters.")
