"""Vault (staff): key ids, credentials by state, expiring soon, last sweep, key rotation."""

from __future__ import annotations

import streamlit as st

from core.clock import utcnow
from core.db import session_scope
from core.errors import CrmBridgeError
from core.vault import service
from pages._common import ago, principal, show_error

p = principal()
st.title("Vault")
if not p.is_staff:
    st.error("The Vault page is for CRM Bridge staff: ask customer success.")
    st.stop()

now = utcnow()
try:
    with session_scope() as s:
        status = service.vault_status(s, principal=p, now=now)
except CrmBridgeError as exc:
    show_error(exc)
    st.stop()

c1, c2, c3, c4 = st.columns(4)
c1.metric("Active key", status.active_kek)
c2.metric("Tenant keys", status.tenants_with_keys)
c3.metric("Credentials held", sum(status.by_state.values()))
c4.metric("Users to reconnect", status.reconnect_needed)
st.caption(f"Key-encryption keys come from {status.key_source}.")

st.subheader("Key-encryption keys")
st.dataframe(
    [{"Key id": k.kek_id, "State": k.state, "In key ring": "yes" if k.in_ring else "no",
      "Tenant keys wrapped": k.tenant_keys, "Added": ago(k.created_at, now) if k.created_at else "—",
      "Retired": ago(k.retired_at, now) if k.retired_at else ""} for k in status.keks],
    hide_index=True, width="stretch",
)
if status.rotation_pending:
    st.warning(f"{status.rotation_pending} tenant key(s) are still wrapped by an older key: a rotation was "
               "interrupted. Run the rotation below to finish it.")

st.subheader("Credentials by state")
if status.by_state:
    st.dataframe([{"State": k, "Credentials": v} for k, v in sorted(status.by_state.items())], hide_index=True)
else:
    st.info("The vault holds no credential.")

st.subheader("Self-destructing within 7 days")
if status.expiring:
    st.dataframe(
        [{"Tenant": e.tenant, "Owner": e.owner, "Purpose": e.purpose, "Ends": ago(e.ends_at, now), "Why": e.cause}
         for e in status.expiring],
        hide_index=True, width="stretch",
    )
else:
    st.caption("Nothing ends within 7 days.")

st.subheader("Sweep")
if status.last_sweep_at:
    st.write(f"Last sweep {ago(status.last_sweep_at, now)}: destroyed {status.last_sweep.get('expired', 0)} "
             f"expired and {status.last_sweep.get('idle', 0)} idle credential(s).")
else:
    st.write("No sweep has run yet (it runs at console start and from `crmbridge vault sweep`).")
if st.button("Sweep now"):
    try:
        with st.spinner("Sweeping the vault: destroying expired and idle credentials…"), session_scope() as s:
            result = service.sweep(s, now=utcnow(), principal=p)
        st.success(f"Destroyed {result.expired} expired and {result.idle} idle credential(s).")
    except CrmBridgeError as exc:
        show_error(exc)

st.subheader("Rotate the key-encryption key")
st.write("Makes a new key active and re-wraps every tenant's data key under it, in batches; the old key is "
         "retired when nothing uses it. Credentials are not re-encrypted, so this takes seconds even with many "
         "credentials. An interrupted rotation is finished by running it again.")
confirm = st.checkbox("I want to rotate the key-encryption key now")
if st.button("Rotate key", type="primary", disabled=not confirm):
    bar = st.progress(0.0, text="Re-wrapping tenant keys…")

    def progress(done: int, total: int) -> None:
        bar.progress(min(done / total, 1.0) if total else 1.0, text=f"Re-wrapped {done} of {total} tenant key(s)")

    try:
        rotation = service.rotate_kek(principal=p, progress=progress)
        bar.progress(1.0, text="Done")
        st.success(f"Active key is now {rotation.active}; re-wrapped {rotation.rewrapped} tenant key(s); retired "
                   f"{', '.join(rotation.retired) or 'none'}.")
    except CrmBridgeError as exc:
        show_error(exc)
