"""Shared page pieces for CRM accounts (the tenant page calls them):

- ``render_add_crm_account(tenant_id)`` — a form generated from the provider catalog with the
  **non-secret** fields only (label, edition, sign-in method, instance URL, client id, …). Secrets
  (client secret, private key, token…) are never entered in a Streamlit widget: once the account
  exists, a link button opens the secure HTML form (``/crm-accounts/{id}/credentials``, served beside
  the console), which puts them straight into the vault. Accounts whose credentials are missing are
  listed with the same link;
- ``render_connection_test(account_id)`` — the credential status (with the secure form's link), the
  last stored test and a "Test connection" button, each step with its result and the fix;
- ``render_quota(account_id)`` — the API-quota gauge and the forecast of when the allocation runs out.
"""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from core.clock import utcnow
from core.connections import service
from core.db import session_scope
from core.errors import CrmBridgeError
from core.labels import humanize
from core.providers.catalog import FieldSpec, get_catalog
from pages._common import ago, md, principal, show_error

STATUS_COLOURS = {"ok": "#16a34a", "warning": "#d97706", "critical": "#dc2626", "exhausted": "#7f1d1d",
                  "unknown": "#94a3b8"}
ENTER_CREDENTIALS = "Enter credentials (secure form)"
REPLACE_CREDENTIALS = "Replace credentials (secure form)"


def _field_widget(f: FieldSpec, key: str) -> str | None:
    """A widget for one NON-secret catalog field (secret fields never get a Streamlit widget)."""
    assert not f.secret, "secret fields are entered in the secure HTML form, never in Streamlit"
    label = f.title + ("" if f.required else " (optional)")
    helptext = f.help or None
    if f.type == "select" and f.options:
        return st.selectbox(label, f.options, help=helptext, key=key)
    if f.type == "text":
        return st.text_area(label, help=helptext, key=key, placeholder=f.example or "")
    return st.text_input(label, help=helptext, key=key, placeholder=f.example or f.default or "")


def _titles(fields: tuple[FieldSpec, ...] | list[FieldSpec]) -> str:
    return ", ".join(f.title.lower() for f in fields)


def _credentials_button(creds: service.AccountCredentials, *, key: str, replace: bool = False) -> None:
    st.link_button(REPLACE_CREDENTIALS if replace else ENTER_CREDENTIALS, creds.url, key=key,
                   type="secondary" if replace else "primary", icon=":material/lock:")


def _render_missing_credentials(tenant_id: int, *, skip: int | None = None) -> None:
    """Every account of the tenant that cannot connect because its credentials are missing."""
    try:
        with session_scope() as s:
            rows = service.list_account_credentials(session=s, principal=principal(), tenant_id=tenant_id)
    except CrmBridgeError as exc:
        show_error(exc)
        return
    for creds in rows:
        if not creds.missing or creds.account_id == skip:
            continue
        st.warning(f"**{md(creds.label)}** has no credentials yet ({md(_titles(creds.fields))}): it cannot connect "
                   "until they are entered in the secure form.")
        _credentials_button(creds, key=f"crm_creds_missing_{tenant_id}_{creds.account_id}")


def render_add_crm_account(tenant_id: int) -> None:
    p = principal()
    cat = get_catalog()
    st.markdown("**Add a CRM account**")
    c1, c2, c3 = st.columns(3)
    slug = c1.selectbox("CRM", cat.slugs(), format_func=lambda s: cat.provider(s).name,
                        key=f"crm_add_provider_{tenant_id}")
    entry = cat.provider(slug)
    edition = c2.selectbox("Edition", list(entry.editions), format_func=lambda e: entry.editions[e].name,
                           key=f"crm_add_edition_{tenant_id}_{slug}")
    modes = {m.mode: m for m in entry.auth_modes}
    mode_id = c3.selectbox("How CRM Bridge signs in", list(modes), format_func=lambda m: modes[m].title,
                           key=f"crm_add_mode_{tenant_id}_{slug}")
    mode = modes[mode_id]
    facts = entry.edition(edition)
    if facts.api_access.value == "none":
        st.warning(f"{entry.name} {facts.name} has no API access: CRM Bridge cannot sync it. "
                   "Upgrade the edition first.")
    elif facts.api_access.value == "add_on":
        st.info(f"{entry.name} {facts.name} needs the API add-on; without it every call fails.")
    if mode.status == "retiring" and mode.retirement is not None:
        st.warning(f"Retiring: {mode.retirement.what} ends in {mode.retirement.when}. {mode.help}")
    elif mode.help:
        st.caption(mode.help)

    prefix = f"crm_add_{tenant_id}_{slug}_{mode_id}"
    with st.form(prefix, clear_on_submit=True):
        label = st.text_input("Label", max_chars=120, placeholder="e.g. EMEA sales", key=f"{prefix}_label")
        values: dict[str, str | None] = {}
        for f in cat.form_fields(slug, mode_id):
            if not f.secret:
                values[f.name] = _field_widget(f, f"{prefix}_{f.name}")
        if mode.secret_fields:
            st.caption("The " + _titles(mode.secret_fields) + " " + ("is" if len(mode.secret_fields) == 1 else "are")
                       + " entered after the account is added, in a secure form outside the console "
                       "(straight into the vault), never here.")
        if mode.user_fields:
            st.caption("Each user enters " + _titles(mode.user_fields)
                       + " through their own connect link, never here.")
        submitted = st.form_submit_button("Add CRM account")
    flash_key = f"crm_added_{tenant_id}"
    added: int | None = None
    if submitted:
        try:
            with session_scope() as s:
                acc = service.add_crm_account_settings(
                    session=s, principal=p, tenant_id=tenant_id, provider=slug, edition=edition,
                    label=label or "", auth_mode=mode_id, values=values)
                assert acc.id is not None
                added = acc.id
                creds = service.account_credentials(session=s, principal=p, account_id=acc.id)
        except CrmBridgeError as exc:
            show_error(exc)
        else:
            # rerun the whole page: its account list, "no CRM account yet" and the steps' checks change
            st.session_state[flash_key] = added
            st.rerun()
    added = st.session_state.pop(flash_key, None)
    if added is not None:
        try:
            with session_scope() as s:
                creds = service.account_credentials(session=s, principal=p, account_id=added)
        except CrmBridgeError as exc:
            show_error(exc)
        else:
            if creds.needs_secret:
                st.success(f"Added {md(creds.label)}. Next: enter its {md(_titles(creds.fields))} in the secure form, "
                           "then test the connection.")
                _credentials_button(creds, key=f"crm_creds_new_{creds.account_id}")
            else:
                st.success(f"Added {md(creds.label)}. Next: send each user a connect link (Users & sync) so they "
                           "connect their own login, then test the connection.")
    _render_missing_credentials(tenant_id, skip=added)


def _show_steps(steps: list, *, ok: bool | None) -> None:
    for step in steps:
        name = humanize(step.name)
        timing = f" ({step.latency_ms:.0f} ms)" if step.latency_ms is not None else ""
        if step.ok:
            st.success(f"**{md(name)}**{timing}: {md(step.detail)}")
        else:
            st.error(f"**{md(name)}**: {md(step.detail)}" + (f"\n\n**Fix:** {md(step.fix)}" if step.fix else ""))


def render_connection_test(account_id: int) -> None:
    p = principal()
    try:
        with session_scope() as s:
            creds = service.account_credentials(session=s, principal=p, account_id=account_id)
    except CrmBridgeError as exc:
        show_error(exc)
        return
    if st.button("Test connection", key=f"crm_test_{account_id}"):
        if creds.missing:
            st.warning(f"No credentials are stored for {md(creds.label)}: enter the credentials first "
                       f"({md(_titles(creds.fields))}) in the secure form, then test the connection.")
        else:
            with st.status(f"Testing the connection to {md(creds.label)}…", expanded=True) as progress:
                st.write("Reading the stored credentials from the vault…")
                st.write(f"Signing in to {creds.provider_name} and reading the organisation, edition and limits…")
                try:
                    with session_scope() as s:
                        report = service.test_crm_account(session=s, principal=p, account_id=account_id)
                except CrmBridgeError as exc:
                    progress.update(label=f"Connection test for {md(creds.label)} could not run", state="error")
                    show_error(exc)
                else:
                    ok = report.ok
                    st.write("Storing the result.")
                    progress.update(label=f"Connection test for {md(creds.label)} {'passed' if ok else 'failed'}",
                                    state="complete" if ok else "error", expanded=False)
    if creds.missing:
        st.warning(f"**Credentials missing** — {md(creds.label)} cannot connect until its {md(_titles(creds.fields))} "
                   "are entered in the secure form.")
        _credentials_button(creds, key=f"crm_creds_{account_id}")
    elif creds.needs_secret:
        if creds.stored_at is not None:
            who = f" by {md(creds.stored_by)}" if creds.stored_by else ""
            st.caption(f"Credentials: stored {ago(creds.stored_at)}{who}"
                       + (" — **the CRM rejected them**: replace them." if creds.state == "failed" else "."))
        else:
            st.caption("Credentials: none stored (optional for this sign-in method).")
        _credentials_button(creds, key=f"crm_creds_{account_id}", replace=creds.stored)
    if creds.installs_app:
        st.caption(f"{md(creds.label)} signs in by an app install: after the app's secret, an admin of the "
                   f"{md(creds.provider_name)} account installs the app from the same secure page.")
    try:
        with session_scope() as s:
            last = service.last_connection_test(session=s, principal=p, account_id=account_id)
    except CrmBridgeError as exc:
        show_error(exc)
        return
    if last.at is None:
        st.caption("Not tested yet.")
        return
    verdict = "passed" if last.ok else "failed"
    extra = f" as {md(last.identity)}" if last.identity else ""
    edition = f" · detected edition **{md(last.detected_edition)}**" if last.detected_edition else ""
    st.markdown(f"Last connection test **{verdict}** {ago(last.at)}{extra}{edition}")
    _show_steps(last.steps, ok=last.ok)


def render_quota(account_id: int) -> None:
    p = principal()
    now = utcnow()
    try:
        with session_scope() as s:
            gauge = service.quota_gauge(session=s, principal=p, account_id=account_id, now=now)
    except CrmBridgeError as exc:
        show_error(exc)
        return
    if gauge.used is None or not gauge.limit:
        st.caption("API quota: " + md(gauge.forecast_text(now)))
        return
    colour = STATUS_COLOURS.get(gauge.status, "#94a3b8")
    fig = go.Figure(go.Indicator(
        mode="gauge+number",
        value=gauge.used,
        number={"valueformat": ",d", "suffix": f" / {gauge.limit:,}"},
        title={"text": f"API requests ({gauge.window})"},
        gauge={
            "axis": {"range": [0, gauge.limit]},
            "bar": {"color": colour},
            "steps": [{"range": [0, gauge.limit * 0.75], "color": "#f1f5f9"},
                      {"range": [gauge.limit * 0.75, gauge.limit * 0.9], "color": "#fef3c7"},
                      {"range": [gauge.limit * 0.9, gauge.limit], "color": "#fee2e2"}],
            "threshold": {"line": {"color": "#7f1d1d", "width": 3}, "value": gauge.limit},
        },
    ))
    fig.update_layout(height=240, margin={"l": 20, "r": 20, "t": 50, "b": 10})
    st.plotly_chart(fig, key=f"quota_{account_id}", width="stretch")
    text = md(gauge.forecast_text(now))
    if gauge.status in {"critical", "exhausted"}:
        st.error(text)
    elif gauge.status == "warning":
        st.warning(text)
    else:
        st.caption(text)
    st.caption(f"Read from the CRM {ago(gauge.observed_at, now)}.")


MODE_LABELS = {"api_user": "A dedicated API user", "per_user_oauth": "Each user's own OAuth consent",
               "per_user_password": "Each user's stored password (retiring)"}


def render_edit_crm_account(account_id: int) -> None:
    """Edit an existing account's non-secret settings: the same catalog fields as the add form, filled
    with the current values (secrets stay in the secure form). Each widget's key is
    ``crm_edit_{id}_{field}`` so a posture finding can link to it."""
    from core.posture.rules import crm_edit_key

    p = principal()
    try:
        with session_scope() as s:
            form = service.account_settings_form(session=s, principal=p, account_id=account_id)
    except CrmBridgeError as exc:
        show_error(exc)
        return
    editions = list(form.editions)
    with st.form(f"crm_edit_{account_id}"):
        st.markdown(f"**Settings of {md(form.label)}**")
        label = st.text_input("Label", value=form.label, max_chars=120, key=crm_edit_key(account_id, "label"))
        edition = st.selectbox("Edition", editions, index=editions.index(form.edition) if form.edition in editions
                               else 0, format_func=form.editions.__getitem__, key=crm_edit_key(account_id, "edition"))
        values: dict[str, str | None] = {}
        for f in form.fields:
            key = crm_edit_key(account_id, f.name)
            current = form.values.get(f.name, "")
            label_text = f.title + ("" if f.required else " (optional)")
            if f.type == "select" and f.options:
                opts = list(f.options)
                values[f.name] = st.selectbox(label_text, opts, index=opts.index(current) if current in opts
                                              else (opts.index(f.default) if f.default in opts else 0),
                                              help=f.help or None, key=key)
            elif f.type == "text":
                values[f.name] = st.text_area(label_text, value=current, help=f.help or None, key=key)
            else:
                values[f.name] = st.text_input(label_text, value=current, help=f.help or None, key=key,
                                               placeholder=f.example or f.default or "")
        st.caption("Secrets are not edited here: use the secure credentials form.")
        saved = st.form_submit_button("Save settings")
    if saved:
        try:
            with session_scope() as s:
                service.update_crm_account_settings(session=s, principal=p, account_id=account_id, values=values,
                                                    label=label, edition=edition)
        except CrmBridgeError as exc:
            show_error(exc)
        else:
            st.session_state["crm_flash"] = f"Saved the settings of {md(label or form.label)}."
            st.rerun()



def render_credential_mode(account_id: int, current: str) -> None:
    """How CRM Bridge signs in to the CRM (API user / each user's OAuth / stored passwords). Moving away
    from stored passwords destroys them (the vault's mode-change rule), in the same transaction."""
    from core.connections.service import set_credential_mode
    from core.posture.rules import crm_mode_key

    p = principal()
    modes = list(MODE_LABELS)
    new = st.selectbox("How CRM Bridge signs in", modes, index=modes.index(current) if current in modes else 0,
                       format_func=MODE_LABELS.__getitem__, key=crm_mode_key(account_id))
    if new != current:
        if current == "per_user_password":
            st.warning("Switching destroys every stored password of this account.")
        if st.button("Change sign-in method", key=f"crm_mode_save_{account_id}"):
            try:
                with session_scope() as s:
                    # leaving per-user passwords shreds the stored ones (in core)
                    set_credential_mode(session=s, principal=p, account_id=account_id, mode=new)
            except CrmBridgeError as exc:
                show_error(exc)
            else:
                st.session_state["crm_flash"] = f"Now signing in with: {MODE_LABELS[new].lower()}."
                st.rerun()
