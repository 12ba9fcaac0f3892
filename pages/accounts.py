"""Console accounts: who can sign in, their two-factor status, invitations, resets and disabling.
Tenant admins manage their own tenant's admins; staff manage every account. Passwords, reset links
and TOTP secrets never pass through this page: they live on the plain HTML pages under /auth/."""

from __future__ import annotations

import streamlit as st

from core import labels
from core.accounts.service import (
    invite_account,
    list_accounts,
    list_pending_invitations,
    my_mfa_status,
    reset_account_mfa,
    revoke_invitation,
    send_password_reset,
    set_disabled,
    unlock_account,
)
from core.db import session_scope
from core.errors import CrmBridgeError
from core.tenants.service import list_tenants
from pages._common import ago, md, principal, show_error
from pages._invites import show_invite_result

p = principal()
st.title("Console accounts")
FLASH = "accounts_flash"
if FLASH in st.session_state:
    st.success(md(st.session_state.pop(FLASH)))  # messages quote emails

# --- your own sign-in ------------------------------------------------------------------------------
if p.account_id is not None:
    try:
        with session_scope() as s:
            mine = my_mfa_status(session=s, principal=p)
        if mine.enrolled:
            st.success(f"Two-factor authentication is on for your account "
                       f"({mine.recovery_codes_left} recovery code(s) left).")
            st.link_button("Manage two-factor authentication", "/auth/mfa/enrol")
        else:
            st.warning("Two-factor authentication is off for your account"
                       + (" — it is required for staff." if mine.required else "."))
            st.link_button("Set up two-factor authentication", "/auth/mfa/enrol", type="primary")
    except CrmBridgeError as exc:
        show_error(exc)

# --- scope -----------------------------------------------------------------------------------------
tenants: dict[int, str] = {}
filter_tenant: int | None = None
try:
    with session_scope() as s:
        if p.is_staff:
            rows, _ = list_tenants(session=s, principal=p, limit=5000)
            tenants = {r.id: r.name for r in rows}
        if p.is_staff and tenants:
            choice = st.selectbox("Accounts of", [0, *tenants], format_func=lambda i: "All accounts" if i == 0 else
                                  tenants[i], key="accounts_tenant")
            filter_tenant = choice or None
        accounts = list_accounts(session=s, principal=p, tenant_id=filter_tenant)
        invites = list_pending_invitations(session=s, principal=p, tenant_id=filter_tenant)
except CrmBridgeError as exc:
    show_error(exc)
    st.stop()


def _status(a) -> str:  # type: ignore[no-untyped-def]
    return "disabled" if a.disabled else ("locked" if a.locked else "active")


st.subheader(f"{len(accounts)} account(s)")
if accounts:
    st.dataframe(
        [{"Email": a.email, "Name": a.name, "Role": labels.role(a.role), "Tenant": a.tenant,
          "Status": _status(a), "Two-factor": a.mfa, "Last sign-in": ago(a.last_sign_in_at)} for a in accounts],
        hide_index=True, width="stretch",
    )
    by_id = {a.id: a for a in accounts}
    c1, c2 = st.columns([2, 3])
    chosen = c1.selectbox("Account", list(by_id), format_func=lambda i: by_id[i].email, key="accounts_pick")
    a = by_id[chosen]
    b1, b2, b3, b4 = c2.columns(4)
    action = None
    if a.disabled:
        if b1.button("Enable", key="acc_enable"):
            action = "enable"
    elif b1.button("Disable", key="acc_disable", disabled=a.id == p.account_id,
                   help="Ends every session of the account at once."):
        action = "disable"
    if b2.button("Send reset link", key="acc_reset", disabled=a.disabled,
                 help="Emails a single-use link (1 hour) to the account's own address."):
        action = "reset"
    if b3.button("Reset two-factor", key="acc_mfa", disabled=a.mfa != "on" or a.id == p.account_id,
                 help="For a lost device: removes the factor and recovery codes; the next sign-in enrols again."):
        action = "mfa"
    if b4.button("Unlock", key="acc_unlock", disabled=not a.locked):
        action = "unlock"
    if action:
        try:
            with session_scope() as s:
                if action in ("enable", "disable"):
                    set_disabled(session=s, principal=p, account_id=a.id, disabled=action == "disable")
                    msg = f"{a.email} is {'disabled: every session ended' if action == 'disable' else 'enabled'}."
                elif action == "reset":
                    sent_to = send_password_reset(session=s, principal=p, account_id=a.id)
                    msg = f"A password reset link was emailed to {sent_to}."
                elif action == "mfa":
                    reset_account_mfa(session=s, principal=p, account_id=a.id)
                    msg = f"Two-factor authentication of {a.email} was reset; their sessions ended."
                else:
                    unlock_account(session=s, principal=p, account_id=a.id)
                    msg = f"{a.email} is unlocked."
            st.session_state[FLASH] = msg  # shown after the rerun, with the table updated
            st.rerun()
        except CrmBridgeError as exc:
            show_error(exc)

# --- invitations -----------------------------------------------------------------------------------
st.subheader("Invite")
with st.form("invite", clear_on_submit=True):
    email = st.text_input("Email", max_chars=254, key="invite_email")
    name = st.text_input("Name (optional)", max_chars=200, key="invite_name")
    if p.is_staff:
        role = st.selectbox("Role", ["tenant_admin", "staff", "leadership"],
                            format_func=labels.role, key="invite_role")
        tenant_choice = st.selectbox("Tenant (tenant admins only)", [0, *tenants],
                                     format_func=lambda i: "—" if i == 0 else tenants[i], key="invite_tenant")
        tenant_id = tenant_choice or None
    else:
        role, tenant_id = "tenant_admin", p.tenant_id
        st.caption("You can invite other admins of your own tenant.")
    if st.form_submit_button("Send invitation", type="primary"):
        try:
            with session_scope() as s:
                result = invite_account(session=s, principal=p, email=email, role=role, tenant_id=tenant_id,
                                        name=name)
            show_invite_result(result)
        except CrmBridgeError as exc:
            show_error(exc)

if invites:
    st.caption(f"{len(invites)} pending invitation(s)")
    st.dataframe([{"Email": i.email, "Role": labels.role(i.role), "Tenant": tenants.get(i.tenant_id or 0, ""),
                   "Invited by": i.invited_by, "Expires": ago(i.expires_at)} for i in invites],
                 hide_index=True, width="stretch")
    inv_by_id = {i.id: i for i in invites}
    c1, c2 = st.columns([2, 1])
    pick = c1.selectbox("Invitation", list(inv_by_id), format_func=lambda i: inv_by_id[i].email, key="inv_pick")
    if c2.button("Revoke invitation", key="inv_revoke"):
        try:
            with session_scope() as s:
                revoke_invitation(session=s, principal=p, invitation_id=pick)  # type: ignore[arg-type]
            st.session_state[FLASH] = f"The invitation for {inv_by_id[pick].email} no longer works."
            st.rerun()
        except CrmBridgeError as exc:
            show_error(exc)
