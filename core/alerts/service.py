"""Alerts for pages, the CLI and other packages: rules per tenant, channels (tenant admins choose their
recipients; staff channels get the cross-tenant digest), test sends, the delivery log, and the run
that evaluates every source and delivers what is due. Each function checks the principal first and
audits every change."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlmodel import Session, col, select

from core.accounts.secrets import forget_secret, read_secret, store_secret
from core.alerts import engine, sources
from core.alerts.channels import check_webhook_url, masked_webhook_url
from core.alerts.models import (
    AlertChannel,
    AlertDelivery,
    AlertNotice,
    AlertRuleSetting,
    AlertState,
    ChannelKind,
    NoticeKind,
    StateStatus,
)
from core.alerts.rules import RULES, Observation, params_for
from core.clock import utcnow
from core.errors import AccessDenied, InvalidInput, NotFound
from core.mail import SmtpConfig, parse_recipients
from core.settings import get_settings
from core.tenants.access import Principal, require_staff, require_tenant
from core.tenants.audit import record_event
from core.tenants.service import tenant_names


def _now(now: datetime | None) -> datetime:
    return now or utcnow()


def _scope(principal: Principal, tenant_id: int | None) -> None:
    """A tenant's alerts: staff or that tenant's admin. Staff channels (no tenant): staff only."""
    if tenant_id is None:
        require_staff(principal)
    else:
        require_tenant(principal, tenant_id)


# --- rules -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleRow:
    rule: str
    title: str
    description: str
    severity: str
    enabled: bool
    params: dict[str, Any]
    firing: int


def list_rules(*, session: Session, principal: Principal, tenant_id: int) -> list[RuleRow]:
    _scope(principal, tenant_id)
    configs = engine.rule_configs(session)
    firing: dict[str, int] = {}
    for st in session.exec(select(AlertState).where(AlertState.tenant_id == tenant_id,
                                                    AlertState.status == StateStatus.firing.value)):
        firing[st.rule] = firing.get(st.rule, 0) + 1
    out = []
    for key, spec in RULES.items():
        c = configs.get((tenant_id, key))
        out.append(RuleRow(key, spec.title, spec.description, spec.severity, c.enabled if c else True,
                           params_for(key, c.params if c else None), firing.get(key, 0)))
    return out


def set_rule(
    *, session: Session, principal: Principal, tenant_id: int, rule: str, enabled: bool,
    params: dict[str, Any] | None = None, now: datetime | None = None,
) -> RuleRow:
    """Switch a rule on or off for a tenant and/or change its thresholds (whole positive numbers)."""
    _scope(principal, tenant_id)
    now = _now(now)
    if rule not in RULES:
        raise InvalidInput(f"Unknown alert rule {rule!r}: use one of {', '.join(RULES)}.")
    clean: dict[str, Any] = {}
    for k, v in (params or {}).items():
        if k not in RULES[rule].defaults:
            raise InvalidInput(f"Rule {rule} has no setting {k!r}: its settings are "
                               f"{', '.join(RULES[rule].defaults) or 'none'}.")
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 10_000:
            raise InvalidInput(f"{k} must be a whole number from 1 to 10,000 (got {v!r}).")
        clean[k] = v
    row = session.exec(select(AlertRuleSetting).where(AlertRuleSetting.tenant_id == tenant_id,
                                                      AlertRuleSetting.rule == rule)).first()
    row = row or AlertRuleSetting(tenant_id=tenant_id, rule=rule)
    was = row.enabled if row.id else True
    row.enabled = enabled
    if params is not None:
        row.params_json = json.dumps(clean, sort_keys=True)
    row.updated_at, row.updated_by = now, principal.email[:254]
    session.add(row)
    if was and not enabled:
        engine.clear_silently(session, tenant_id=tenant_id, rule=rule, now=now)
    record_event(session, principal=principal, action="alerts.rule.update", tenant_id=tenant_id,
                 target=f"alert_rule:{rule}", details={"enabled": enabled, "params": clean}, at=now)
    session.flush()
    return next(r for r in list_rules(session=session, principal=principal, tenant_id=tenant_id) if r.rule == rule)


# --- channels --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelRow:
    id: int
    tenant_id: int | None
    kind: str
    name: str
    target: str
    rules: list[str]
    enabled: bool
    status: str  # "ok", "failing", "never used"
    last_error: str | None
    last_attempt_at: datetime | None
    secret_to_reveal: bool


def _row(ch: AlertChannel) -> ChannelRow:
    assert ch.id is not None
    return ChannelRow(ch.id, ch.tenant_id, ch.kind, ch.name, ch.target, json.loads(ch.rules_json or "[]"),
                      ch.enabled, ch.last_status or "never used", ch.last_error, ch.last_attempt_at,
                      ch.kind == ChannelKind.webhook and ch.secret_revealed_at is None)


def list_channels(*, session: Session, principal: Principal, tenant_id: int | None) -> list[ChannelRow]:
    """A tenant's channels, or (``tenant_id`` None, staff only) the staff digest channels."""
    _scope(principal, tenant_id)
    q = select(AlertChannel).where(col(AlertChannel.tenant_id).is_(None) if tenant_id is None
                                   else AlertChannel.tenant_id == tenant_id)
    return [_row(c) for c in session.exec(q.order_by(col(AlertChannel.id)))]


def _rules(rules: Iterable[str] | None) -> str:
    chosen = sorted(set(rules or []))
    unknown = [r for r in chosen if r not in RULES]
    if unknown:
        raise InvalidInput(f"Unknown alert rule(s) {', '.join(unknown)}: use {', '.join(RULES)}.")
    return json.dumps(chosen)


def _name(name: str) -> str:
    name = (name or "").strip()
    if not name or len(name) > 120:
        raise InvalidInput("Give the channel a name of 1 to 120 characters (e.g. 'Ops team').")
    return name


def add_email_channel(
    *, session: Session, principal: Principal, tenant_id: int | None, name: str, recipients: str,
    rules: Iterable[str] | None = None, now: datetime | None = None,
) -> ChannelRow:
    """Email recipients for a tenant's alerts (``tenant_id`` None: staff digest recipients)."""
    _scope(principal, tenant_id)
    now = _now(now)
    addresses = parse_recipients(recipients)
    ch = AlertChannel(tenant_id=tenant_id, kind=ChannelKind.email.value, name=_name(name),
                      target=", ".join(addresses), rules_json=_rules(rules), created_at=now,
                      created_by=principal.email[:254])
    session.add(ch)
    session.flush()
    record_event(session, principal=principal, action="alerts.channel.create", tenant_id=tenant_id,
                 target=f"alert_channel:{ch.id}", details={"kind": "email", "recipients": len(addresses)}, at=now)
    return _row(ch)


def add_webhook_channel(
    *, session: Session, principal: Principal, tenant_id: int | None, name: str, url: str,
    rules: Iterable[str] | None = None, now: datetime | None = None,
) -> ChannelRow:
    """A webhook; its signing secret is generated here, kept in the vault, and revealed once on the
    plain HTML page /alerts/webhooks/{id}/secret."""
    _scope(principal, tenant_id)
    now = _now(now)
    url = check_webhook_url(url, allow_private=get_settings().demo)
    ch = AlertChannel(tenant_id=tenant_id, kind=ChannelKind.webhook.value, name=_name(name),
                      target=masked_webhook_url(url), rules_json=_rules(rules), created_at=now,
                      created_by=principal.email[:254])
    session.add(ch)
    session.flush()
    assert ch.id is not None
    # The URL itself is a secret for many receivers (Slack, Teams, Zapier put a token in it).
    ch.url_ref = store_secret(session, principal=principal, tenant_id=tenant_id, owner=engine.channel_owner(ch.id),
                              purpose=engine.webhook_url_purpose(ch.id), secret=url, now=now)
    _new_secret(session, principal, ch, now)
    record_event(session, principal=principal, action="alerts.channel.create", tenant_id=tenant_id,
                 # the host only: some receivers put a token in the URL's path
                 target=f"alert_channel:{ch.id}", details={"kind": "webhook", "host": urlsplit(url).hostname},
                 at=now)
    return _row(ch)


def _new_secret(session: Session, principal: Principal, ch: AlertChannel, now: datetime) -> None:
    assert ch.id is not None
    ch.secret_ref = store_secret(session, principal=principal, tenant_id=ch.tenant_id,
                                 owner=engine.channel_owner(ch.id), purpose=engine.webhook_purpose(ch.id),
                                 secret="whsec_" + secrets.token_urlsafe(32), now=now)
    ch.secret_revealed_at = None
    session.add(ch)


def _channel(session: Session, principal: Principal, channel_id: int) -> AlertChannel:
    ch = session.get(AlertChannel, channel_id)
    if ch is None:
        raise NotFound(f"No alert channel {channel_id}: pick one from the Alerts page.")
    try:
        _scope(principal, ch.tenant_id)
    except AccessDenied:
        raise NotFound(f"No alert channel {channel_id} in your scope: pick one from the Alerts page.") from None
    return ch


def get_channel(*, session: Session, principal: Principal, channel_id: int) -> ChannelRow:
    return _row(_channel(session, principal, channel_id))


def reveal_webhook_secret(
    *, session: Session, principal: Principal, channel_id: int, now: datetime | None = None,
) -> str:
    """The signing secret, once (for the receiver's configuration). Rotate to see a new one."""
    now = _now(now)
    ch = _channel(session, principal, channel_id)
    if ch.kind != ChannelKind.webhook or not ch.secret_ref:
        raise InvalidInput("Only webhook channels have a signing secret.")
    if ch.secret_revealed_at is not None:
        raise InvalidInput(f"The signing secret was already shown on {ch.secret_revealed_at:%Y-%m-%d %H:%M} UTC: "
                           "rotate it to get a new one (then update the receiver).")
    assert ch.id is not None
    secret = read_secret(session, ch.secret_ref, principal=principal, owner=engine.channel_owner(ch.id),
                         purpose=engine.webhook_purpose(ch.id), reason="reveal a webhook signing secret", now=now)
    ch = _channel(session, principal, channel_id)
    ch.secret_revealed_at = now
    session.add(ch)
    record_event(session, principal=principal, action="alerts.channel.secret_revealed", tenant_id=ch.tenant_id,
                 target=f"alert_channel:{ch.id}", at=now)
    return secret


def rotate_webhook_secret(*, session: Session, principal: Principal, channel_id: int,
                          now: datetime | None = None) -> ChannelRow:
    now = _now(now)
    ch = _channel(session, principal, channel_id)
    if ch.kind != ChannelKind.webhook:
        raise InvalidInput("Only webhook channels have a signing secret.")
    _new_secret(session, principal, ch, now)
    record_event(session, principal=principal, action="alerts.channel.secret_rotated", tenant_id=ch.tenant_id,
                 target=f"alert_channel:{ch.id}", at=now)
    return _row(ch)


def set_channel_enabled(*, session: Session, principal: Principal, channel_id: int, enabled: bool,
                        now: datetime | None = None) -> ChannelRow:
    ch = _channel(session, principal, channel_id)
    ch.enabled = enabled
    session.add(ch)
    record_event(session, principal=principal, action="alerts.channel.enable" if enabled else "alerts.channel.disable",
                 tenant_id=ch.tenant_id, target=f"alert_channel:{ch.id}", at=_now(now))
    return _row(ch)


def remove_channel(*, session: Session, principal: Principal, channel_id: int, now: datetime | None = None) -> None:
    """Remove a channel: its signing secret is destroyed; its log entries stay (marked removed)."""
    now = _now(now)
    ch = _channel(session, principal, channel_id)
    for field in ("secret_ref", "url_ref"):
        ref = getattr(ch, field)
        if ref:
            forget_secret(session, ref, principal=principal, reason="alert channel removed", now=now)
            setattr(ch, field, None)
    ch.enabled = False
    ch.name = ch.name[:110] + " (removed)" if not ch.name.endswith("(removed)") else ch.name
    session.add(ch)
    record_event(session, principal=principal, action="alerts.channel.remove", tenant_id=ch.tenant_id,
                 target=f"alert_channel:{ch.id}", at=now)


def send_test(
    *, session: Session, principal: Principal, channel_id: int, now: datetime | None = None,
    smtp: SmtpConfig | None = None, http: httpx.Client | None = None, allow_private: bool | None = None,
) -> AlertDelivery:
    """Send a test notice to one channel now (a failure is retried like any delivery). Commits."""
    now = _now(now)
    ch = _channel(session, principal, channel_id)
    if not ch.enabled:
        raise InvalidInput("This channel is switched off: switch it on to test it.")
    notice = AlertNotice(tenant_id=ch.tenant_id, kind=NoticeKind.test.value, title="Test alert from CRM Bridge",
                         summary=f"{principal.email} sent this test to check the channel '{ch.name}'. "
                                 "Nothing is wrong.", created_at=now)
    session.add(notice)
    session.flush()
    d = engine._queue(session, notice, ch, now)
    record_event(session, principal=principal, action="alerts.channel.test", tenant_id=ch.tenant_id,
                 target=f"alert_channel:{ch.id}", at=now)
    session.commit()
    return engine.deliver(session, d, now=now, smtp=smtp, http=http, allow_private=allow_private)


# --- reading ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    created_at: datetime
    tenant: str
    channel: str
    kind: str
    title: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    last_http_status: int | None


def list_deliveries(
    *, session: Session, principal: Principal, tenant_id: int | None, limit: int = 200,
) -> list[DeliveryRow]:
    """The delivery log of a tenant (or, for staff with ``tenant_id`` None, of every tenant and the
    staff digest), newest first."""
    if tenant_id is not None:
        require_tenant(principal, tenant_id)
    else:
        require_staff(principal)
    q = select(AlertDelivery, AlertNotice, AlertChannel).join(
        AlertNotice, col(AlertNotice.id) == col(AlertDelivery.notice_id)).join(
        AlertChannel, col(AlertChannel.id) == col(AlertDelivery.channel_id))
    if tenant_id is not None:
        q = q.where(AlertDelivery.tenant_id == tenant_id)
    rows = session.exec(q.order_by(col(AlertDelivery.id).desc()).limit(max(1, min(limit, 2000)))).all()
    names = tenant_names(session=session, principal=principal, ids={d.tenant_id for d, _, _ in rows if d.tenant_id})
    return [DeliveryRow(d.id, d.created_at, names.get(d.tenant_id, "staff digest") if d.tenant_id else "staff digest",  # type: ignore[arg-type]
                        f"{c.name} ({c.kind})", n.kind, n.title, d.status, d.attempts, d.next_attempt_at,
                        d.last_error, d.last_http_status) for d, n, c in rows]


@dataclass(frozen=True)
class ActiveAlert:
    tenant_id: int
    tenant: str
    rule: str
    title: str
    summary: str
    level: str
    since: datetime


def list_active(*, session: Session, principal: Principal, tenant_id: int | None) -> list[ActiveAlert]:
    """Firing alerts of a tenant, or of every tenant (staff, ``tenant_id`` None)."""
    if tenant_id is not None:
        require_tenant(principal, tenant_id)
    else:
        require_staff(principal)
    q = select(AlertState).where(AlertState.status == StateStatus.firing.value)
    if tenant_id is not None:
        q = q.where(AlertState.tenant_id == tenant_id)
    states = session.exec(q.order_by(col(AlertState.tenant_id), col(AlertState.first_fired_at))).all()
    names = tenant_names(session=session, principal=principal, ids={s.tenant_id for s in states})
    return [ActiveAlert(s.tenant_id, names.get(s.tenant_id, ""), s.rule, s.title, s.summary, s.level,
                        s.first_fired_at) for s in states]


# --- running ---------------------------------------------------------------------------------------


def report(*, session: Session, principal: Principal, observations: Iterable[Observation],
           now: datetime | None = None) -> list[AlertNotice]:
    """Push observations from elsewhere (a check the sources do not read). Staff/system only."""
    require_staff(principal)
    return engine.evaluate(session, observations=observations, now=_now(now))


@dataclass
class RunSummary:
    observations: int
    notices: list[AlertNotice]
    report: engine.DeliveryReport
    skipped: list[str]


def run_alerts(
    *, session: Session, principal: Principal, now: datetime | None = None, deliver: bool = True,
    smtp: SmtpConfig | None = None, http: httpx.Client | None = None, allow_private: bool | None = None,
) -> RunSummary:
    """One pass (cron, `crmbridge alerts run`): read every source, fire/recover, deliver what is due.
    Staff/system only. Commits."""
    require_staff(principal)
    now = _now(now)
    configs = engine.rule_configs(session)

    def params(tenant_id: int, rule: str) -> dict[str, Any]:
        c = configs.get((tenant_id, rule))
        return params_for(rule, c.params if c else None)

    got = sources.collect(session, now=now, params=params)
    notices = engine.evaluate(session, observations=got.observations, covered=got.covered, now=now)
    session.commit()
    rep = engine.deliver_due(session, now=now, smtp=smtp, http=http, allow_private=allow_private) if deliver \
        else engine.DeliveryReport()
    return RunSummary(len(got.observations), notices, rep, got.skipped)


def send_staff_digest(
    *, session: Session, principal: Principal, now: datetime | None = None, smtp: SmtpConfig | None = None,
    http: httpx.Client | None = None, allow_private: bool | None = None,
) -> AlertNotice | None:
    """Queue and deliver the cross-tenant digest to the staff channels (None: nothing new). Commits."""
    require_staff(principal)
    now = _now(now)
    digest = engine.queue_staff_digest(session, now=now)
    session.commit()
    if digest is not None:
        engine.deliver_due(session, now=now, smtp=smtp, http=http, allow_private=allow_private)
    return digest
