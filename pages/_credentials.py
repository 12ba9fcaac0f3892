"""Tenant page component: the tenant's stored credentials (never a secret), revoke, and connect links."""

from __future__ import annotations

from datetime import timedelta

import streamlit as st

from core.clock import utcnow
from core.connections import links as connect
from core.db import session_scope
from core.errors import CrmBridgeError
from core.tenants.models import AppUser, CrmAccount
from core.tenants.service import list_app_users, list_crm_accounts, set_crm_identity
from core.vault import service
from core.vault.policy import LIMITS, set_policy, view_policy
from pages._common import ago, md, principal, show_error


def _ends(c: service.CredentialInfo, now) -> str:  # type: ignore[no-untyped-def]
    if c.ref is None:
        return "—"
    return ago(c.ends_at, now) if c.ends_at else "no TTL"


def render_credentials(tenant_id: int) -> None:
    """Credentials table (owner, state, expires in, last used), revoke, and "create connect link"."""
    p = principal()
    now = utcnow()
    try:
        with session_scope() as s:
            creds = service.list_credentials(s, principal=p, tenant_id=tenant_id, now=now)
            targets = connect.connect_link_targets(s, principal=p, tenant_id=tenant_id)
            policy = view_policy(s, principal=p, tenant_id=tenant_id)
            per_user = [a for a in list_crm_accounts(session=s, principal=p, tenant_id=tenant_id)
                        if a.credential_mode in connect.PER_USER_MODES]
            users = list_app_users(session=s, principal=p, tenant_id=tenant_id) if per_user else []
    except CrmBridgeError as exc:
        show_error(exc)
        return

    if creds:
        st.dataframe(
            [{"Owner": c.owner, "CRM account": c.crm_account, "Purpose": c.purpose, "Kind": c.kind,
              "State": c.state, "Expires in": _ends(c, now),
              "Last used": ago(c.last_used_at, now) if c.ref else "—",
              "Why": c.destroyed_reason or ""} for c in creds],
            hide_index=True, width="stretch",
        )
        waiting = sum(1 for c in creds if c.state == service.RECONNECT_NEEDED)
        if waiting:
            st.warning(f"{waiting} user(s) must reconnect: their stored login self-destructed. Send each a new "
                       "connect link below.")
    else:
        st.info("CRM Bridge holds no credential for this tenant.")

    live = [c for c in creds if c.ref is not None]
    if live:
        with st.expander("Revoke a credential"):
            with st.form(f"vault_revoke_{tenant_id}"):
                idx = st.selectbox("Credential", range(len(live)),
                                   format_func=lambda i: f"{live[i].owner} · {live[i].crm_account} · {live[i].purpose}")
                reason = st.text_input("Reason (goes to the audit log)", max_chars=200)
                if st.form_submit_button("Revoke now", type="primary"):
                    chosen = live[idx]
                    try:
                        with session_scope() as s:
                            service.revoke(s, chosen.ref, principal=p, reason=reason)  # type: ignore[arg-type]
                        st.success(f"Revoked {md(chosen.owner)}'s {md(chosen.purpose)}: it is destroyed.")
                        st.rerun()
                    except CrmBridgeError as exc:
                        show_error(exc)

    if per_user and users:
        _render_map_crm_user(tenant_id, per_user, users)

    if targets:
        with st.expander("Create a connect link"):
            with st.form(f"vault_link_{tenant_id}"):
                idx = st.selectbox("User and CRM account", range(len(targets)),
                                   format_func=lambda i: f"{targets[i].email} · {targets[i].account_label}")
                hours = st.number_input("Valid for (hours)", min_value=1, max_value=168, value=24, step=1)
                if st.form_submit_button("Create connect link"):
                    t = targets[idx]
                    try:
                        with session_scope() as s:
                            url = connect.create_connect_link(
                                s, principal=p, tenant_id=tenant_id, app_user_id=t.app_user_id,
                                crm_account_id=t.crm_account_id, ttl=timedelta(hours=int(hours)))
                        st.success(f"Send this link to {md(t.email)}. It works once, expires in {int(hours)} hours, "
                                   "and is shown only now.")
                        st.code(url, language=None)
                    except CrmBridgeError as exc:
                        show_error(exc)
    elif not creds:
        st.caption("Connect links appear here for accounts that use each user's own credentials.")

    with st.expander(f"Self-destruct policy: passwords {policy.password_ttl_days} d, OAuth tokens "
                     f"{policy.oauth_ttl_days} d, idle {policy.idle_days} d, failures {policy.failure_threshold}"):
        with st.form(f"vault_policy_{tenant_id}"):
            labels = {"password_ttl_days": "Stored passwords live at most (days)",
                      "oauth_ttl_days": "OAuth refresh tokens live at most (days)",
                      "idle_days": "Destroy a user's credential unused for (days)",
                      "failure_threshold": "Destroy a user's credential after this many rejected logins"}
            values = {name: st.number_input(label, min_value=LIMITS[name][0], max_value=LIMITS[name][1],
                                            value=getattr(policy, name), step=1)
                      for name, label in labels.items()}
            if st.form_submit_button("Save policy"):
                changes = {k: int(v) for k, v in values.items() if int(v) != getattr(policy, k)}
                try:
                    if changes:
                        with session_scope() as s:
                            set_policy(s, principal=p, tenant_id=tenant_id, **changes)
                    st.success("Policy saved: TTLs apply to credentials stored from now on; the idle limit and "
                               "the failure threshold apply at once.")
                except CrmBridgeError as exc:
                    show_error(exc)


def _render_map_crm_user(tenant_id: int, accounts: list[CrmAccount], users: list[AppUser]) -> None:
    """A connect link checks that the login is the user's own, so it needs the user's CRM user id."""
    p = principal()
    with st.expander("Map a user to their CRM user id"):
        flash = st.session_state.pop(f"vault_map_flash_{tenant_id}", None)
        if flash:  # inside the expander, so the widgets around it keep their place (and open expanders stay open)
            st.success(flash)
        st.caption("Connect links are offered for users whose CRM user id is known: the login they connect must "
                   "be that CRM user (Salesforce: Setup → Users, the 005… id in the user's address).")
        with st.form(f"vault_map_{tenant_id}", clear_on_submit=True):
            u = st.selectbox("User", range(len(users)), format_func=lambda i: f"{users[i].email} ({users[i].name})")
            a = st.selectbox("CRM account", range(len(accounts)), format_func=lambda i: accounts[i].label)
            crm_user_id = st.text_input("CRM user id", max_chars=100)
            if st.form_submit_button("Save CRM user id"):
                try:
                    with session_scope() as s:
                        set_crm_identity(session=s, principal=p, app_user_id=users[u].id,
                                         crm_account_id=accounts[a].id, crm_user_id=crm_user_id or "")
                    st.session_state[f"vault_map_flash_{tenant_id}"] = (
                        f"{md(users[u].email)} is {md(crm_user_id.strip())} in {md(accounts[a].label)}: a connect "
                        "link can be "
                        "created for them now.")
                    st.rerun()
                except CrmBridgeError as exc:
                    show_error(exc)
