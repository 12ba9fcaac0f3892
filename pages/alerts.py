"""Alerts: what is firing, the rules, where alerts go (email recipients, signed webhooks), a test
send, and the delivery log with failures. Staff also set the recipients of the cross-tenant digest."""

from __future__ import annotations

import streamlit as st

from core.alerts.rules import RULES
from core.alerts.service import (
    add_email_channel,
    add_webhook_channel,
    list_active,
    list_channels,
    list_deliveries,
    list_rules,
    remove_channel,
    rotate_webhook_secret,
    send_staff_digest,
    send_test,
    set_channel_enabled,
    set_rule,
)
from core.db import session_scope
from core.errors import CrmBridgeError
from pages._common import ago, md, principal, selected_tenant_id, show_error

p = principal()
st.title("Alerts")
FLASH = "alerts_flash"


def _done(message: str) -> None:
    """Show ``message`` after a rerun, so the tables below already include the change."""
    st.session_state[FLASH] = message
    st.rerun()


if FLASH in st.session_state:
    st.success(md(st.session_state.pop(FLASH)))  # messages quote channel names
if not (p.is_staff or p.is_tenant_admin):
    st.error("Alerts are set up by CRM Bridge staff and tenant admins.")
    st.stop()

tenant_id = selected_tenant_id(p)
if tenant_id is None:
    st.info("No tenant to show: create one on the Tenants page.")
    st.stop()

try:
    with session_scope() as s:
        active = list_active(session=s, principal=p, tenant_id=tenant_id)
        everywhere = list_active(session=s, principal=p, tenant_id=None) if p.is_staff else []
        rules = list_rules(session=s, principal=p, tenant_id=tenant_id)
        channels = list_channels(session=s, principal=p, tenant_id=tenant_id)
        log = list_deliveries(session=s, principal=p, tenant_id=tenant_id, limit=200)
except CrmBridgeError as exc:
    show_error(exc)
    st.stop()

failing = [d for d in log if d.status in ("retrying", "failed")]
m1, m2, m3 = st.columns(3)
m1.metric("Firing", len(active))
m2.metric("Channels", len([c for c in channels if c.enabled]))
m3.metric("Failing deliveries", len(failing))

tab_names = ["Firing", "Rules", "Channels", "Delivery log"] + (["Staff digest"] if p.is_staff else [])
tabs = st.tabs(tab_names)

with tabs[0]:
    if active:
        st.dataframe([{"Since": ago(a.since), "Alert": a.title, "Rule": RULES[a.rule].title, "Level": a.level,
                       "Detail": a.summary} for a in active], hide_index=True, width="stretch")
    else:
        st.success("Nothing is firing for this tenant.")
    if p.is_staff:
        st.caption(f"Across every tenant: {len(everywhere)} firing.")
        if everywhere:
            st.dataframe([{"Tenant": a.tenant, "Alert": a.title, "Since": ago(a.since)} for a in everywhere],
                         hide_index=True, width="stretch")

with tabs[1]:
    st.caption("Each alert is sent once when its condition starts, never again while it holds, and a recovery "
               "notice when it clears.")
    with st.form("rules"):
        wanted = {}
        for r in rules:
            st.markdown(f"**{r.title}** — {r.description}" + (f" *(firing: {md(r.firing)})*" if r.firing else ""))
            enabled = st.checkbox("On", value=r.enabled, key=f"rule_{r.rule}")
            params = {k: int(st.number_input(k.replace("_", " "), min_value=1, max_value=10_000, value=int(v),
                                             key=f"rule_{r.rule}_{k}"))
                      for k, v in r.params.items()}
            wanted[r.rule] = (enabled, params, r)
        if st.form_submit_button("Save rules", type="primary"):
            try:
                changed = 0
                with session_scope() as s:
                    for rule, (enabled, params, r) in wanted.items():
                        if enabled != r.enabled or params != r.params:
                            set_rule(session=s, principal=p, tenant_id=tenant_id, rule=rule, enabled=enabled,
                                     params=params or None)
                            changed += 1
                _done(f"Saved ({changed} rule(s) changed).")
            except CrmBridgeError as exc:
                show_error(exc)


def _channel_table(rows) -> None:  # type: ignore[no-untyped-def]
    st.dataframe([{"Name": c.name, "Kind": c.kind, "Sends to": c.target,
                   "Rules": ", ".join(RULES[r].title for r in c.rules) or "all",
                   "On": c.enabled, "Status": c.status, "Last error": c.last_error or "",
                   "Last attempt": ago(c.last_attempt_at)} for c in rows], hide_index=True, width="stretch")


def _channel_actions(rows, key: str) -> None:  # type: ignore[no-untyped-def]
    by_id = {c.id: c for c in rows}
    c1, c2 = st.columns([2, 3])
    pick = c1.selectbox("Channel", list(by_id), format_func=lambda i: by_id[i].name, key=f"{key}_pick")
    ch = by_id[pick]
    b1, b2, b3, b4 = c2.columns(4)
    try:
        if b1.button("Send a test", key=f"{key}_test", disabled=not ch.enabled):
            with session_scope() as s:
                d = send_test(session=s, principal=p, channel_id=ch.id)
            if d.status == "sent":
                st.success(f"Test delivered to {md(ch.name)}.")
            else:
                st.warning(f"The test to {md(ch.name)} failed ({md(d.last_error)}); it is retried with backoff — "
                           "see the delivery log.")
        if b2.button("Switch off" if ch.enabled else "Switch on", key=f"{key}_toggle"):
            with session_scope() as s:
                set_channel_enabled(session=s, principal=p, channel_id=ch.id, enabled=not ch.enabled)
            _done(f"{ch.name} is switched {'off' if ch.enabled else 'on'}.")
        if ch.kind == "webhook":
            if ch.secret_to_reveal:
                b3.link_button("Show signing secret", f"/alerts/webhooks/{ch.id}/secret")
            elif b3.button("Rotate secret", key=f"{key}_rotate"):
                with session_scope() as s:
                    rotate_webhook_secret(session=s, principal=p, channel_id=ch.id)
                _done("A new signing secret was made: open 'Show signing secret' and update the receiver.")
        if b4.button("Remove", key=f"{key}_remove"):
            with session_scope() as s:
                remove_channel(session=s, principal=p, channel_id=ch.id)
            _done(f"{ch.name} was removed.")
    except CrmBridgeError as exc:
        show_error(exc)


with tabs[2]:
    if channels:
        _channel_table(channels)
        _channel_actions(channels, "ch")
    else:
        st.info("No channel yet: alerts for this tenant reach nobody. Add recipients below.")
    rule_keys = list(RULES)
    with st.form("add_email", clear_on_submit=True):
        st.markdown("**Email recipients**")
        name = st.text_input("Name", value="Admins", max_chars=120, key="email_name")
        recipients = st.text_area("Addresses (comma-separated)", key="email_recipients")
        chosen = st.multiselect("Only these rules (empty: all)", rule_keys, format_func=lambda r: RULES[r].title)
        if st.form_submit_button("Add email channel"):
            try:
                with session_scope() as s:
                    add_email_channel(session=s, principal=p, tenant_id=tenant_id, name=name, recipients=recipients,
                                      rules=chosen)
                _done(f"Added {name}.")
            except CrmBridgeError as exc:
                show_error(exc)
    with st.form("add_webhook", clear_on_submit=True):
        st.markdown("**Webhook** — JSON, signed with an HMAC header, retried with backoff")
        wname = st.text_input("Name", value="Webhook", max_chars=120, key="webhook_name")
        url = st.text_input("URL (https)", max_chars=2000, key="webhook_url")
        wchosen = st.multiselect("Only these rules (empty: all)", rule_keys, format_func=lambda r: RULES[r].title,
                                 key="wh_rules")
        if st.form_submit_button("Add webhook"):
            try:
                with session_scope() as s:
                    row = add_webhook_channel(session=s, principal=p, tenant_id=tenant_id, name=wname, url=url,
                                              rules=wchosen)
                st.success(f"Added {md(wname)}. Its signing secret is shown once, on its own page:")
                st.link_button("Show signing secret", f"/alerts/webhooks/{row.id}/secret")
            except CrmBridgeError as exc:
                show_error(exc)

with tabs[3]:
    if failing:
        st.error(f"{len(failing)} delivery(ies) failing: see the last error of each below.")
    if log:
        st.dataframe([{"When": ago(d.created_at), "Channel": d.channel, "Kind": d.kind, "Alert": d.title,
                       "Status": d.status, "Attempts": d.attempts,
                       "Next try": ago(d.next_attempt_at) if d.next_attempt_at else "",
                       "HTTP": d.last_http_status or "", "Last error": d.last_error or ""} for d in log],
                     hide_index=True, width="stretch")
    else:
        st.info("Nothing was sent yet.")

if p.is_staff:
    with tabs[4]:
        st.caption("Staff recipients get one digest of every tenant's alert changes (`crmbridge alerts digest`).")
        try:
            with session_scope() as s:
                staff_channels = list_channels(session=s, principal=p, tenant_id=None)
        except CrmBridgeError as exc:
            show_error(exc)
            staff_channels = []
        if staff_channels:
            _channel_table(staff_channels)
            _channel_actions(staff_channels, "staff")
        with st.form("add_staff", clear_on_submit=True):
            sname = st.text_input("Name", value="Customer success", max_chars=120, key="staff_name")
            srecipients = st.text_area("Addresses (comma-separated)", key="staff_recipients")
            if st.form_submit_button("Add digest recipients"):
                try:
                    with session_scope() as s:
                        add_email_channel(session=s, principal=p, tenant_id=None, name=sname, recipients=srecipients)
                    _done(f"Added {sname}.")
                except CrmBridgeError as exc:
                    show_error(exc)
        if st.button("Send the digest now", key="digest_now"):
            try:
                with session_scope() as s:
                    digest = send_staff_digest(session=s, principal=p)
                st.success(md(digest.title) if digest else "Nothing new since the last digest.")
            except CrmBridgeError as exc:
                show_error(exc)
