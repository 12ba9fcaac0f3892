"""SSO: import the tenant's IdP metadata (upload or URL), read the lint report, compare before
replacing, hand the IdP our SP metadata, run a test login and read its trace, check a captured
SAMLResponse, and watch the certificates' dates."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import streamlit as st

from core.clock import utcnow
from core.db import session_scope
from core.errors import CrmBridgeError
from core.sso.keys import complete_sp_rollover, ensure_sp_keys, sp_metadata, start_sp_rollover
from core.sso.metadata import apply_import, fetch_document, get_status, preview_import, set_idp_initiated
from core.sso.testlogin import check_pasted_response, list_traces
from core.sso.watch import certificate_timeline, watch_certificates
from core.tenants.service import get_tenant
from pages._common import ago, md, md_code, principal, same_tab_link, selected_tenant_id, show_error

IMPORT_KEY = "sso_import"
SEVERITY_ICON = {"error": "🛑", "warning": "⚠️", "info": "ℹ️"}


def _date(dt: datetime | None) -> str:
    return dt.strftime("%Y-%m-%d") if dt else "—"


def _lint_report(report: Any) -> None:
    data = report.to_json()
    if data["usable"]:
        st.success(f"Usable: IdP **{md(data['entity_id'])}**.")
    else:
        st.error("Not usable: fix the errors below, then import again.")
    if len(data["entities"]) > 1:
        st.caption(f"{len(data['entities'])} IdP entities in this document.")
    if data["sso"]:
        st.dataframe([{"Binding": e["binding"].rsplit(":", 1)[-1], "SSO URL": e["url"]} for e in data["sso"]],
                     hide_index=True, width="stretch")
    if data["certs"]:
        st.dataframe(
            [{"Use": c["use"], "Subject": c["subject"], "Valid from": c["not_before"][:10],
              "Valid until": c["not_after"][:10], "Days left": c["days_left"],
              "Key": f"{c['key_type']}-{c['key_bits']}", "SHA-256": c["sha256"][:16] + "…"} for c in data["certs"]],
            hide_index=True, width="stretch",
        )
    sig = data["signature"]
    if sig["present"]:
        st.caption(f"Metadata signature: valid against its own certificate: **{sig['valid']}**; "
                   f"trusted (pinned certificate): **{sig['trusted']}**.")
    if data["valid_until"]:
        st.caption(f"validUntil: {md(data['valid_until'])}")
    if data["findings"]:
        st.dataframe(
            [{"": SEVERITY_ICON.get(f["severity"], ""), "Severity": f["severity"], "Finding": f["message"],
              "Fix": f["fix"], "Code": f["code"]} for f in data["findings"]],
            hide_index=True, width="stretch",
        )


def _diff(diff: Any) -> None:
    if diff is None:
        return
    if diff.empty:
        st.info("Same entity ID, endpoints and certificates as the configuration in force.")
        return
    st.markdown("**What replacing the configuration changes**")
    if diff.entity_id:
        st.markdown(f"- Entity ID: {md_code(diff.entity_id[0])} → {md_code(diff.entity_id[1])}")
    for b, u in diff.endpoints_added:
        st.markdown(f"- ➕ SSO endpoint {md(b.rsplit(':', 1)[-1])} {md_code(u)}")
    for b, u in diff.endpoints_removed:
        st.markdown(f"- ➖ SSO endpoint {md(b.rsplit(':', 1)[-1])} {md_code(u)}")
    for c in diff.certs_added:
        st.markdown(f"- ➕ certificate {md(c.label())}")
    for c in diff.certs_removed:
        st.markdown(f"- ➖ certificate {md(c.label())}")


def _import_section(p: Any, tenant_id: int, configured: bool, source_url: str | None) -> None:
    st.subheader("Import IdP metadata")
    up_tab, url_tab = st.tabs(["Upload a file", "From a URL"])
    with up_tab:
        uploaded = st.file_uploader("IdP metadata XML", type=["xml"], key="sso_upload")
        if uploaded is not None:
            st.session_state[IMPORT_KEY] = {"data": uploaded.getvalue(), "source": "upload", "url": None,
                                            "name": uploaded.name}
    with url_tab:
        url = st.text_input("Metadata URL (https)", key="sso_url", value=source_url or "",
                            placeholder="https://idp.example.com/metadata",
                            help="Fetched with a 5 s, 5 MB and 3-redirect limit, from public addresses only.")
        if st.button("Fetch", key="sso_fetch", disabled=not url):
            with st.status("Fetching the IdP metadata…", expanded=True) as progress:
                st.write(f"Downloading {url} (public addresses only, 5 s, 5 MB, 3 redirects)…")
                try:
                    res = fetch_document(url)
                except CrmBridgeError as exc:
                    progress.update(label="The metadata could not be fetched", state="error")
                    show_error(exc)
                else:
                    st.write(f"Received {len(res.body):,} bytes from {res.final_url}; checking it below.")
                    st.session_state[IMPORT_KEY] = {"data": res.body, "source": "url", "url": res.final_url,
                                                    "name": res.final_url}
                    progress.update(label="IdP metadata fetched", state="complete", expanded=False)
    pending = st.session_state.get(IMPORT_KEY)
    if not pending:
        return
    st.caption(f"Document: {md(pending['name'])} ({len(pending['data']):,} bytes)")
    entity = st.text_input("IdP entity ID (only for an aggregate with several IdPs)", key="sso_entity_id") or None
    try:
        with session_scope() as s:
            preview = preview_import(session=s, principal=p, tenant_id=tenant_id, data=pending["data"],
                                     entity_id=entity)
    except CrmBridgeError as exc:
        show_error(exc)
        return
    _lint_report(preview.report)
    if preview.report.entities and len(preview.report.entities) > 1 and not preview.report.usable:
        st.selectbox("IdP entities in the document", preview.report.entities, key="sso_entities_list")
    _diff(preview.diff)
    label = "Replace the configuration" if configured else "Import this configuration"
    if st.button(label, key="sso_apply", type="primary", disabled=not preview.report.usable):
        try:
            with session_scope() as s:
                apply_import(session=s, principal=p, tenant_id=tenant_id, data=pending["data"],
                             entity_id=entity, source=pending["source"], source_url=pending["url"])
                # The IdP needs our SP metadata (and its certificate) next: generate the keys now.
                keys = ensure_sp_keys(session=s, principal=p, tenant_id=tenant_id)
            st.session_state.pop(IMPORT_KEY, None)
            st.session_state["sso_flash"] = ("IdP configuration saved" + ("; SP keys ready" if keys else "")
                                             + ". Give the IdP our SP metadata, then run a test login.")
            st.rerun()
        except CrmBridgeError as exc:
            show_error(exc)
    if st.button("Discard this document", key="sso_discard"):
        st.session_state.pop(IMPORT_KEY, None)
        st.rerun()


def _sp_section(p: Any, tenant_id: int, slug: str, status: Any) -> None:
    st.subheader("Our service provider (give these to the IdP)")
    sp = status.sp
    st.markdown(f"- **Entity ID / Audience:** `{sp.entity_id}`\n- **ACS (reply) URL:** `{sp.acs_url}`\n"
                f"- **Metadata URL:** `{sp.metadata_url}`\n- **Sign-in link for tenant admins:** `{sp.login_url}`")
    if sp.certs:
        st.dataframe([{"SP key": c["state"], "SHA-256": c["sha256"][:16] + "…", "Valid until": _date(c["not_after"])}
                      for c in sp.certs], hide_index=True, width="stretch")
    if not sp.certs:
        st.info("CRM Bridge has no SP keys for this tenant yet. Generate them before giving the IdP our SP "
                "metadata: the IdP trusts their certificate for signed requests and encrypts assertions to it.")
        if st.button("Generate SP keys", key="sso_sp_keys", type="primary"):
            try:
                with st.spinner("Generating the SP key and certificate…"), session_scope() as s:
                    ensure_sp_keys(session=s, principal=p, tenant_id=tenant_id)
                st.rerun()
            except CrmBridgeError as exc:
                show_error(exc)
        return
    col1, col2, col3 = st.columns(3)
    with col1:
        if st.button("Prepare SP metadata", key="sso_sp_md"):
            try:
                with session_scope() as s:
                    st.session_state["sso_sp_xml"] = sp_metadata(session=s, tenant_slug=slug)
            except CrmBridgeError as exc:
                show_error(exc)
        if st.session_state.get("sso_sp_xml"):
            st.download_button("Download SP metadata", st.session_state["sso_sp_xml"],
                               file_name=f"crmbridge-sp-{slug}.xml", mime="application/samlmetadata+xml")
    states = {c["state"] for c in sp.certs}
    with col2:
        if "next" not in states and st.button("Start SP key rollover", key="sso_roll_start",
                                              help="Publishes a new SP certificate beside the current one."):
            try:
                with st.spinner("Generating the new SP key and certificate…"), session_scope() as s:
                    start_sp_rollover(session=s, principal=p, tenant_id=tenant_id)
                st.rerun()
            except CrmBridgeError as exc:
                show_error(exc)
    with col3:
        if "next" in states and st.button("Finish SP key rollover", key="sso_roll_done",
                                          help="Signs with the new key and stops publishing the old one."):
            try:
                with st.spinner("Switching signing to the new SP key…"), session_scope() as s:
                    complete_sp_rollover(session=s, principal=p, tenant_id=tenant_id)
                st.rerun()
            except CrmBridgeError as exc:
                show_error(exc)


def _traces(p: Any, tenant_id: int) -> None:
    try:
        with session_scope() as s:
            traces = list_traces(session=s, principal=p, tenant_id=tenant_id, limit=10)
    except CrmBridgeError as exc:
        show_error(exc)
        return
    if not traces:
        st.caption("No test login or response check yet.")
        return
    wanted = st.query_params.get("trace")

    def title(t: Any) -> str:
        verdict = "✅ passed" if t.ok else "❌ failed"
        return (f"{'Test login' if t.source == 'test' else 'Pasted response'} #{t.id} — {verdict} — "
                f"{md(t.name_id or 'no identity')} — {ago(t.created_at)}")

    # the trace the address names (back from a test login), else the newest, in full; the others one
    # click away. The raw SAML XML stays behind a collapsed expander: the checks say what matters.
    shown = next((t for t in traces if str(t.id) == wanted), traces[0])
    if len(traces) > 1:
        by_id = {t.id: t for t in traces}
        picked = st.selectbox("Trace", list(by_id), index=list(by_id).index(shown.id),
                              format_func=lambda i: title(by_id[i]), key=f"sso_trace_pick_{shown.id}")
        shown = by_id[picked]
    t = shown
    with st.container(border=True):
        st.markdown(f"**{title(t)}**")
        if t.error:
            st.error(md(t.error))
        if t.skew_seconds is not None:
            st.caption(f"Measured clock skew (our clock − IssueInstant): {t.skew_seconds:+.1f} s")
        st.dataframe([{"Check": c["name"], "Result": {True: "pass", False: "FAIL", None: "—"}[c["ok"]],
                       "Detail": c.get("detail", "")} for c in t.checks], hide_index=True, width="stretch",
                     column_config={"Detail": st.column_config.TextColumn(width="large")})
        if t.decoded_xml:
            with st.expander("Raw SAML response (XML)", expanded=False):
                st.code(t.decoded_xml, language="xml", wrap_lines=True)


def _timeline(p: Any, tenant_id: int) -> None:
    st.subheader("Certificate timeline")
    try:
        with session_scope() as s:
            entries = certificate_timeline(session=s, principal=p, tenant_id=tenant_id)
            findings = watch_certificates(session=s, principal=p, tenant_id=tenant_id, record=False)
    except CrmBridgeError as exc:
        show_error(exc)
        return
    for f in findings:
        (st.error if f.severity == "error" else st.warning if f.severity == "warning" else st.info)(
            md(f"{f.message} {f.fix}"))
    if not entries:
        st.caption("No certificate yet.")
        return
    st.dataframe([{"Owner": e.owner, "Use": e.use, "Subject": e.subject, "Valid from": _date(e.not_before),
                   "Valid until": _date(e.not_after), "Days left": e.days_left, "State": e.state}
                  for e in entries], hide_index=True, width="stretch")
    try:
        import plotly.express as px

        fig = px.timeline(
            [{"Certificate": f"{e.owner} {e.use} {e.sha256[:8]}", "Start": e.not_before, "End": e.not_after,
              "State": e.state} for e in entries],
            x_start="Start", x_end="End", y="Certificate", color="State",
        )
        fig.add_vline(x=utcnow(), line_dash="dash")
        fig.update_layout(height=120 + 30 * len(entries), margin={"l": 0, "r": 0, "t": 10, "b": 0})
        st.plotly_chart(fig, width="stretch")
    except Exception:  # the table above carries the same dates
        pass


p = principal()
if not (p.is_staff or p.is_tenant_admin):
    st.error("SSO settings are for CRM Bridge staff and tenant admins.")
    st.stop()
# the tenant in focus comes from the address (?tenant=): back from a test login it is the trace's tenant
tenant_id = selected_tenant_id(p)
if tenant_id is None:
    st.stop()
try:
    with session_scope() as s:
        tenant = get_tenant(session=s, principal=p, tenant_id=tenant_id)
        status = get_status(session=s, principal=p, tenant_id=tenant_id)
except CrmBridgeError as exc:
    show_error(exc)
    st.stop()

st.title(f"Single sign-on — {md(tenant.name)}")
flash = st.session_state.pop("sso_flash", None)
if flash:
    st.success(flash)
m1, m2, m3 = st.columns(3)
m1.metric("IdP configured", "yes" if status.configured else "no")
m2.metric("Tested", "yes" if status.tested else ("failed" if status.last_test_ok is False else "not yet"))
m3.metric("Sign-in binding", md((status.sso_binding or "—").rsplit(":", 1)[-1]))
if status.configured:
    st.caption(f"IdP {md_code(status.idp_entity_id)} · SSO {md_code(status.sso_url)} · imported "
               f"{ago(status.imported_at)} by {md(status.imported_by)} from {md(status.source)}"
               + (f" ({md_code(status.source_url)})" if status.source_url else ""))
    if status.tested_at:
        st.caption(f"Last valid test login: {ago(status.tested_at)}")

_sp_section(p, tenant_id, tenant.slug, status)
_import_section(p, tenant_id, status.configured, status.source_url)

st.subheader("Test login")
if status.configured:
    st.markdown("Runs a real sign-in at the IdP. CRM Bridge validates the answer and keeps a trace; a test never "
                "signs anyone in to the console.")
    same_tab_link("Start a test login", status.sp.test_url, primary=True)  # comes back here, same tenant
else:
    st.info("Import the IdP metadata first.")
_traces(p, tenant_id)

def _check_pasted(p: Any, tenant_id: int) -> None:
    """Runs before the rerun, so the pasted response can be cleared from the widget (and the session)."""
    pasted = st.session_state.get("sso_paste") or ""
    st.session_state["sso_paste"] = ""
    try:
        with session_scope() as s:
            trace = check_pasted_response(session=s, principal=p, tenant_id=tenant_id, saml_response=pasted)
        st.session_state["sso_paste_result"] = (trace.ok, "The response is valid for this configuration." if trace.ok
                                                else (trace.error or "Invalid."))
    except CrmBridgeError as exc:
        st.session_state["sso_paste_result"] = (False, str(exc))


with st.expander("Check a captured SAMLResponse"):
    st.caption("The pasted value is cleared once checked; the trace keeps the decoded XML without its signature "
               "values, so it cannot be replayed.")
    pasted = st.text_area("SAMLResponse (base64, as posted to the ACS)", key="sso_paste", height=120)
    st.button("Check against this tenant's configuration", key="sso_paste_check", disabled=not pasted,
              on_click=_check_pasted, args=(p, tenant_id))
    outcome = st.session_state.pop("sso_paste_result", None)
    if outcome is not None:
        (st.success if outcome[0] else st.error)(md(outcome[1]))

if p.is_staff and status.configured:
    allowed = st.toggle("Allow IdP-initiated sign-in (no request from CRM Bridge; replay cache only)",
                        value=status.allow_idp_initiated, key="sso_idp_init")
    if allowed != status.allow_idp_initiated:
        try:
            with session_scope() as s:
                set_idp_initiated(session=s, principal=p, tenant_id=tenant_id, allowed=allowed)
            st.rerun()
        except CrmBridgeError as exc:
            show_error(exc)

_timeline(p, tenant_id)
