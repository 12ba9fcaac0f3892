"""Onboarding wizard: a view of the onboarding state machine stored in the database, so anyone allowed
can resume where the last person stopped."""

from __future__ import annotations

import streamlit as st

from core import labels
from core import onboarding as ob
from core.connections.service import set_credential_mode
from core.db import session_scope
from core.errors import CrmBridgeError
from core.tenants.models import CredentialMode
from core.tenants.service import get_tenant, list_crm_accounts, list_tenants
from pages._common import md, page_link, principal, selected_tenant_id, show_error
from pages._crm_accounts import render_add_crm_account, render_connection_test
from pages._invites import render_invite_admin
from pages._sandbox_org import render_sandbox_org
from pages._sso_status import render_sso_status
from pages._users import render_add_user

ICONS = {
    "done": ":material/check_circle:",
    "deferred": ":material/schedule:",
    "pending": ":material/radio_button_unchecked:",
}


p = principal()
flash = st.session_state.pop("onboarding_flash", None)

# The wizard works on the tenant in focus (the address's ?tenant=, the sidebar's picker): it never moves
# to another tenant by itself, not even after go-live. The step is in the address too (?step=).
if not (p.is_staff or p.is_tenant_admin):
    st.error("The onboarding wizard is for CRM Bridge staff.")
    st.stop()
tenant_id = selected_tenant_id(p)
if tenant_id is None:
    st.stop()
try:
    with session_scope() as s:
        rows, _ = list_tenants(session=s, principal=p, status="onboarding", limit=500)
except CrmBridgeError as exc:
    show_error(exc)
    st.stop()
others = [r for r in rows if r.id != tenant_id]
if others:
    with st.expander(f"Other tenants onboarding ({len(others)})"):
        for r in others[:50]:
            page_link("pages/onboarding.py", f"{md(r.name)} ({md(r.slug)}) — next: {labels.step(r.onboarding_step)}",
                      tenant=r.slug)

try:
    with session_scope() as s:
        tenant = get_tenant(session=s, principal=p, tenant_id=tenant_id)
        view = ob.get_onboarding(session=s, principal=p, tenant_id=tenant_id)
        accounts = list_crm_accounts(session=s, principal=p, tenant_id=tenant_id)
except CrmBridgeError as exc:
    show_error(exc)
    st.stop()

st.title(f"Onboarding — {md(tenant.name)}")
if flash:
    st.success(md(flash))
    st.balloons()
info = st.session_state.pop("onboarding_flash_info", None)
if info:
    st.success(info)
render_sandbox_org(tenant_id)

st.progress(view.progress, text=f"{sum(1 for x in view.steps if x.settled)} of {len(view.steps)} steps settled")
cols = st.columns(len(view.steps))
for col, step in zip(cols, view.steps, strict=True):
    col.markdown(f"{ICONS[step.status]} **{step.title}**  \n{labels.step_status(step.status)}")
for d in view.deferred:
    st.warning(f"{md(d.title)} deferred by {md(d.by)}: {md(d.reason)}")

keys = [x.key for x in view.steps if x.key != "tenant"]
asked = st.query_params.get("step")
default_key = asked if asked in keys else (view.current.key if view.current else "go_live")
step_key = f"ob_step_{tenant_id}"
chosen = st.radio("Step", keys, index=keys.index(default_key), horizontal=True,
                  format_func={x.key: x.title for x in view.steps}.__getitem__, key=step_key,
                  on_change=lambda: st.query_params.update(step=st.session_state[step_key]))
if st.query_params.get("step") != chosen:
    st.query_params["step"] = chosen  # a reload comes back to this step
step = next(x for x in view.steps if x.key == chosen)
st.subheader(step.title)
if step.check:
    st.caption(f"Check: {md(step.check)}")


def _done_button() -> None:
    c1, c2 = st.columns([1, 3])
    if c1.button("Mark step done", type="primary", key=f"done_{chosen}"):
        try:
            with session_scope() as s:
                ob.complete_step(session=s, principal=p, tenant_id=tenant_id, step=chosen)
            st.rerun()
        except CrmBridgeError as exc:
            show_error(exc)
    if chosen in ob.DEFERRABLE:
        with c2.popover("Defer with a reason"):
            reason = st.text_input("Why can this not be done now?", key=f"reason_{chosen}", max_chars=500)
            if st.button("Defer", key=f"defer_{chosen}"):
                try:
                    with session_scope() as s:
                        ob.defer_step(session=s, principal=p, tenant_id=tenant_id, step=chosen, reason=reason)
                    st.rerun()
                except CrmBridgeError as exc:
                    show_error(exc)
    if step.settled and st.button("Reopen this step", key=f"reopen_{chosen}"):
        with session_scope() as s:
            ob.reopen_step(session=s, principal=p, tenant_id=tenant_id, step=chosen)
        st.rerun()


if chosen == "crm_accounts":
    for a in accounts:
        st.markdown(f"- **{md(a.label)}** — {md(labels.provider(a.provider))} {md(a.edition)}")
    render_add_crm_account(tenant_id)
    _done_button()
elif chosen == "credential_mode":
    st.markdown(
        "How our service acts in each CRM account: a dedicated **API user** (simplest; attribution through "
        "impersonation or an attribution field), each user's own **OAuth** consent, or each user's stored "
        "**password** (retiring with Salesforce SOAP login in Summer '27; held encrypted with a hair-trigger "
        "self-destruct). Moving an account away from stored passwords destroys them."
    )
    modes = [m.value for m in CredentialMode]
    for a in accounts:
        new = st.selectbox(md(a.label), modes, index=modes.index(a.credential_mode), key=f"mode_{a.id}",
                           format_func=labels.credential_mode)
        if new != a.credential_mode and st.button(f"Save mode for {md(a.label)}", key=f"save_mode_{a.id}"):
            try:
                with session_scope() as s:
                    # leaving per-user passwords shreds the stored ones (in core)
                    set_credential_mode(session=s, principal=p, account_id=a.id, mode=new)
                st.rerun()
            except CrmBridgeError as exc:
                show_error(exc)
    _done_button()
elif chosen == "connection_test":
    for a in accounts:
        st.markdown(f"**{md(a.label)}** — last test: "
                    f"{'passed' if a.last_test_ok else 'failed' if a.last_test_at else 'never run'}")
        render_connection_test(a.id)
    _done_button()
elif chosen == "sso":
    st.markdown("Import the tenant's IdP metadata, fix what the lint reports, and run a test login on the SSO page.")
    render_sso_status(tenant_id)
    _done_button()
elif chosen == "users":
    render_add_user(p, tenant_id, key="ob_add_user")
    st.markdown("**Hand the credential and SSO steps to the tenant** — invite its admin:")
    render_invite_admin(tenant_id)
    _done_button()
elif chosen == "go_live":
    missing = [x.title for x in view.steps if x.key != "go_live" and not x.settled]
    st.markdown("**Go-live checklist**")
    for x in view.steps:
        if x.key != "go_live":
            st.markdown(f"{ICONS[x.status]} {x.title}: {labels.step_status(x.status).lower()}"
                        + (f" — *{md(x.reason)}*" if x.reason else ""))
    if tenant.status == "live":
        st.success(f"{md(tenant.name)} is live.")
    elif st.button("Go live", type="primary", disabled=bool(missing) or not p.is_staff):
        try:
            with session_scope() as s:
                ob.go_live(session=s, principal=p, tenant_id=tenant_id)
            st.session_state["onboarding_flash"] = f"Go-live recorded for {tenant.name}."
            st.rerun()
        except CrmBridgeError as exc:
            show_error(exc)
