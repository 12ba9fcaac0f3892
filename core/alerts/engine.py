"""Turn observations into notices, and notices into deliveries that reach people.

``evaluate`` keeps one ``alert_state`` per (tenant, rule, subject):

- a condition that starts holding fires one notice;
- while it holds nothing is sent again (a rise in level — the IdP certificate going from 90 to 30
  days — sends one "escalated" notice);
- when it clears (an inactive observation, or the source covered the tenant and no longer reports
  it) one "recovered" notice goes out and the state is clear, ready to fire again.

Each notice is queued once per matching channel of its tenant. ``deliver_due`` sends what is due:
email over SMTP, webhooks signed with HMAC. A failed attempt is retried with backoff (1 min, 5 min,
15 min, 1 h, 4 h; 6 attempts in all), then marked failed; the channel shows "failing" with the last
error until a delivery succeeds. Time comes from the caller (``now``): nothing sleeps. Staff
channels (no tenant) get no per-notice deliveries; they receive the cross-tenant digest
(``queue_staff_digest``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlmodel import Session, col, select

from core.accounts.secrets import SEALED_PREFIX, read_secret, store_secret
from core.alerts.channels import post_webhook
from core.alerts.models import (
    AlertChannel,
    AlertDelivery,
    AlertNotice,
    AlertRuleSetting,
    AlertState,
    ChannelKind,
    DeliveryStatus,
    NoticeKind,
    StateStatus,
)
from core.alerts.rules import RULES, Observation, level_rank, rule_title
from core.errors import CrmBridgeError
from core.mail import SmtpConfig, parse_recipients, send_email
from core.settings import get_settings
from core.tenants.access import Principal
from core.tenants.models import Tenant

log = logging.getLogger("crmbridge.alerts")

BACKOFF = (timedelta(minutes=1), timedelta(minutes=5), timedelta(minutes=15), timedelta(hours=1), timedelta(hours=4))
MAX_ATTEMPTS = len(BACKOFF) + 1
SYSTEM = Principal.system("alerts")


def webhook_purpose(channel_id: int) -> str:
    return f"alert-webhook-{channel_id}"


def webhook_url_purpose(channel_id: int) -> str:
    return f"alert-webhook-url-{channel_id}"


def channel_owner(channel_id: int) -> str:
    return f"alert_channel:{channel_id}"


# --- rule settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleConfig:
    enabled: bool
    params: dict[str, Any]


def rule_configs(session: Session) -> dict[tuple[int, str], RuleConfig]:
    out = {}
    for r in session.exec(select(AlertRuleSetting)):
        try:
            params = json.loads(r.params_json or "{}")
        except ValueError:
            params = {}
        out[(r.tenant_id, r.rule)] = RuleConfig(r.enabled, params if isinstance(params, dict) else {})
    return out


# --- evaluate --------------------------------------------------------------------------------------


def _notice(session: Session, st: AlertState, kind: NoticeKind, title: str, summary: str, now: datetime) -> AlertNotice:
    n = AlertNotice(tenant_id=st.tenant_id, state_id=st.id, rule=st.rule, subject=st.subject, kind=kind.value,
                    level=st.level, title=title[:300], summary=summary[:4000], created_at=now)
    session.add(n)
    return n


def evaluate(
    session: Session, *, observations: Iterable[Observation], now: datetime,
    covered: Iterable[tuple[str, int]] = (),
) -> list[AlertNotice]:
    """Apply observations; ``covered`` lists the (rule, tenant) pairs whose every current condition is
    among ``observations`` (a firing state of such a pair that was not observed active recovers).
    Queues the deliveries of every new notice. Returns the notices."""
    configs = rule_configs(session)
    obs = [o for o in observations if o.rule in RULES]
    covered_set = set(covered)
    rules = {o.rule for o in obs} | {r for r, _ in covered_set}
    states = {(s.tenant_id, s.rule, s.subject): s for s in session.exec(
        select(AlertState).where(col(AlertState.rule).in_(rules)))} if rules else {}
    notices: list[AlertNotice] = []
    active: set[tuple[int, str, str]] = set()

    def enabled(tenant_id: int, rule: str) -> bool:
        c = configs.get((tenant_id, rule))
        return c is None or c.enabled

    for o in obs:
        if not enabled(o.tenant_id, o.rule):
            continue
        st = states.get(o.key)
        if o.active:
            active.add(o.key)
            if st is None or st.status == StateStatus.clear:
                if st is None:
                    st = AlertState(tenant_id=o.tenant_id, rule=o.rule, subject=o.subject[:200],
                                    first_fired_at=now, last_changed_at=now, last_seen_at=now)
                    states[o.key] = st
                st.status, st.level, st.title, st.summary = StateStatus.firing.value, o.level, o.title, o.summary
                st.first_fired_at = st.last_changed_at = st.last_seen_at = now
                st.cleared_at = None
                session.add(st)
                session.flush()
                notices.append(_notice(session, st, NoticeKind.fired, o.title, o.summary, now))
                continue
            st.last_seen_at = now
            rises = level_rank(o.rule, o.level) > level_rank(st.rule, st.level)
            st.level, st.title, st.summary = o.level, o.title[:300], o.summary[:2000]
            session.add(st)
            if rises:
                st.last_changed_at = now
                notices.append(_notice(session, st, NoticeKind.escalated, o.title, o.summary, now))
        elif st is not None and st.status == StateStatus.firing:
            notices.append(_recover(session, st, now, o.title, o.summary))
    for st in list(states.values()):
        if (st.status == StateStatus.firing and (st.rule, st.tenant_id) in covered_set
                and (st.tenant_id, st.rule, st.subject) not in active and enabled(st.tenant_id, st.rule)):
            notices.append(_recover(session, st, now))
    session.flush()
    for n in notices:
        queue_deliveries(session, n, now=now)
    if notices:
        log.info("alerts: %d notice(s): %s", len(notices), ", ".join(f"{n.kind} {n.rule}" for n in notices))
    return notices


def _recover(session: Session, st: AlertState, now: datetime, title: str = "", summary: str = "") -> AlertNotice:
    st.status = StateStatus.clear.value
    st.cleared_at = st.last_changed_at = st.last_seen_at = now
    session.add(st)
    return _notice(session, st, NoticeKind.recovered, f"Resolved: {st.title}",
                   summary or f"{rule_title(st.rule)} no longer holds: {title or st.title}.", now)


def clear_silently(session: Session, *, tenant_id: int, rule: str, now: datetime) -> int:
    """A rule switched off: its firing states become clear without a notice."""
    n = 0
    for st in session.exec(select(AlertState).where(AlertState.tenant_id == tenant_id, AlertState.rule == rule,
                                                    AlertState.status == StateStatus.firing.value)):
        st.status, st.cleared_at, st.last_changed_at = StateStatus.clear.value, now, now
        session.add(st)
        n += 1
    return n


def _matches(channel: AlertChannel, rule: str) -> bool:
    try:
        wanted = json.loads(channel.rules_json or "[]")
    except ValueError:
        wanted = []
    return not wanted or not rule or rule in wanted


def queue_deliveries(session: Session, notice: AlertNotice, *, now: datetime) -> list[AlertDelivery]:
    """One delivery per enabled channel of the notice's tenant that takes its rule."""
    if notice.tenant_id is None:
        return []
    out = []
    for ch in session.exec(select(AlertChannel).where(AlertChannel.tenant_id == notice.tenant_id,
                                                      AlertChannel.enabled == True)):  # noqa: E712
        if notice.kind != NoticeKind.test and _matches(ch, notice.rule):
            out.append(_queue(session, notice, ch, now))
    return out


def _queue(session: Session, notice: AlertNotice, ch: AlertChannel, now: datetime) -> AlertDelivery:
    if notice.id is None:
        session.flush()
    d = AlertDelivery(notice_id=notice.id, channel_id=ch.id, tenant_id=ch.tenant_id,  # type: ignore[arg-type]
                      status=DeliveryStatus.pending.value, next_attempt_at=now, created_at=now)
    session.add(d)
    session.flush()
    return d


# --- staff digest ----------------------------------------------------------------------------------


def queue_staff_digest(session: Session, *, now: datetime) -> AlertNotice | None:
    """Queue one digest of every tenant notice not digested yet to each staff channel. None when
    nothing happened (no empty digests)."""
    pending = list(session.exec(select(AlertNotice).where(
        col(AlertNotice.tenant_id).is_not(None), col(AlertNotice.digested_at).is_(None),
        col(AlertNotice.kind).in_([NoticeKind.fired.value, NoticeKind.escalated.value, NoticeKind.recovered.value]))
        .order_by(col(AlertNotice.tenant_id), col(AlertNotice.id))))
    if not pending:
        return None
    names = {t.id: t.name for t in session.exec(select(Tenant))}
    firing = session.exec(select(AlertState).where(AlertState.status == StateStatus.firing.value)).all()
    by_tenant: dict[int, list[AlertNotice]] = {}
    for n in pending:
        by_tenant.setdefault(n.tenant_id, []).append(n)  # type: ignore[arg-type]
    lines = [f"Alert changes since the last digest, across {len(by_tenant)} tenant(s). "
             f"{len(firing)} alert(s) are firing now.", ""]
    for tid, items in by_tenant.items():
        still = sum(1 for s in firing if s.tenant_id == tid)
        lines.append(f"{names.get(tid, f'tenant {tid}')} — {still} firing now")
        lines += [f"  {n.created_at:%Y-%m-%d %H:%M} UTC  {n.kind.upper():10} {n.title}" for n in items]
        lines.append("")
    lines.append(f"Open the console: {get_settings().public('/alerts')}")
    digest = AlertNotice(tenant_id=None, kind=NoticeKind.digest.value,
                         title=f"Alert digest: {len(pending)} change(s) across {len(by_tenant)} tenant(s)",
                         summary="\n".join(lines), created_at=now)
    session.add(digest)
    session.flush()
    for n in pending:
        n.digested_at = now
        session.add(n)
    for ch in session.exec(select(AlertChannel).where(col(AlertChannel.tenant_id).is_(None),
                                                      AlertChannel.enabled == True)):  # noqa: E712
        _queue(session, digest, ch, now)
    return digest


# --- deliver ---------------------------------------------------------------------------------------


@dataclass
class DeliveryReport:
    sent: int = 0
    retrying: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


def payload(notice: AlertNotice, tenant: Tenant | None, delivery_id: int) -> dict[str, Any]:
    return {
        "id": f"delivery-{delivery_id}",
        "type": f"alert.{notice.kind}",
        "occurred_at": notice.created_at.isoformat(),
        "tenant": {"id": tenant.id, "slug": tenant.slug, "name": tenant.name} if tenant else None,
        "alert": {"rule": notice.rule, "rule_title": rule_title(notice.rule) if notice.rule else "",
                  "subject": notice.subject, "level": notice.level, "title": notice.title,
                  "summary": notice.summary,
                  "state": "clear" if notice.kind == NoticeKind.recovered else
                  ("firing" if notice.kind in (NoticeKind.fired, NoticeKind.escalated) else notice.kind)},
        "console_url": get_settings().public("/alerts"),
    }


_EMAIL_WORD = {"fired": "ALERT", "escalated": "ALERT (worse)", "recovered": "RESOLVED", "test": "TEST",
               "digest": "DIGEST"}


def email_text(notice: AlertNotice, tenant: Tenant | None) -> tuple[str, str]:
    who = f"{tenant.name} — " if tenant else ""
    subject = f"[CRM Bridge] {_EMAIL_WORD.get(notice.kind, notice.kind)}: {who}{notice.title}"
    if notice.kind == NoticeKind.digest:
        return subject, notice.summary + "\n"
    body = (f"{notice.title}\n\n{notice.summary}\n\n"
            + (f"Tenant: {tenant.name} ({tenant.slug})\n" if tenant else "")
            + (f"Rule: {rule_title(notice.rule)}\n" if notice.rule else "")
            + f"When: {notice.created_at:%Y-%m-%d %H:%M} UTC\n\n"
            f"Open the console: {get_settings().public('/alerts')}\n")
    return subject, body


def deliver(
    session: Session, delivery: AlertDelivery, *, now: datetime, smtp: SmtpConfig | None = None,
    http: httpx.Client | None = None, allow_private: bool | None = None,
) -> AlertDelivery:
    """One attempt. Commits before talking to the network (no database lock is held while a slow
    receiver answers) and after recording the outcome."""
    ch = session.get(AlertChannel, delivery.channel_id)
    notice = session.get(AlertNotice, delivery.notice_id)
    tenant = session.get(Tenant, notice.tenant_id) if notice and notice.tenant_id else None
    allow = get_settings().demo if allow_private is None else allow_private
    assert delivery.id is not None
    error: CrmBridgeError | None = None
    status_code: int | None = None
    if ch is None or notice is None or not ch.enabled:
        error = CrmBridgeError("The channel was removed or switched off: nothing was sent.")
        delivery.attempts = MAX_ATTEMPTS - 1
    else:
        try:
            if ch.kind == ChannelKind.email:
                to = parse_recipients(ch.target)
                subject, body = email_text(notice, tenant)
                session.commit()
                send_email(smtp or SmtpConfig.from_settings(), to=to, subject=subject, body=body, now=now)
            else:
                assert ch.id is not None and ch.secret_ref and ch.url_ref
                url = read_secret(session, ch.url_ref, principal=SYSTEM, owner=channel_owner(ch.id),
                                  purpose=webhook_url_purpose(ch.id), reason="send an alert webhook", now=now)
                secret = read_secret(session, ch.secret_ref, principal=SYSTEM, owner=channel_owner(ch.id),
                                     purpose=webhook_purpose(ch.id), reason="sign an alert webhook", now=now)
                if ch.tenant_id is not None and ch.url_ref.startswith(SEALED_PREFIX):
                    # sealed by the migration with the platform key: move it into the tenant's vault, so
                    # the tenant's crypto-shred covers it like every URL stored since
                    ch.url_ref = store_secret(session, principal=SYSTEM, tenant_id=ch.tenant_id,
                                              owner=channel_owner(ch.id), purpose=webhook_url_purpose(ch.id),
                                              secret=url, now=now)
                    session.add(ch)
                body_bytes = json.dumps(payload(notice, tenant, delivery.id), sort_keys=True).encode()
                session.commit()
                status_code = post_webhook(url, body=body_bytes, secret=secret, event=f"alert.{notice.kind}",
                                           delivery_id=f"delivery-{delivery.id}", now=now, client=http,
                                           allow_private=allow)
        except CrmBridgeError as exc:
            error = exc
            if exc.code and exc.code.isdigit():
                status_code = int(exc.code)
    delivery.attempts += 1
    delivery.last_attempt_at = now
    delivery.last_http_status = status_code
    if error is None:
        delivery.status, delivery.sent_at, delivery.next_attempt_at = DeliveryStatus.sent.value, now, None
        delivery.last_error = None
    else:
        delivery.last_error = str(error)[:1000]
        if delivery.attempts >= MAX_ATTEMPTS:
            delivery.status, delivery.next_attempt_at = DeliveryStatus.failed.value, None
        else:
            delivery.status = DeliveryStatus.retrying.value
            delivery.next_attempt_at = now + BACKOFF[delivery.attempts - 1]
        log.warning("alerts: delivery %s to channel %s failed (attempt %d): %s", delivery.id,
                    delivery.channel_id, delivery.attempts, error.message)
    if ch is not None:
        ch.last_status = "ok" if error is None else "failing"
        ch.last_error = None if error is None else str(error)[:1000]
        ch.last_attempt_at = now
        session.add(ch)
    session.add(delivery)
    session.commit()
    return delivery


def deliver_due(
    session: Session, *, now: datetime, smtp: SmtpConfig | None = None, http: httpx.Client | None = None,
    allow_private: bool | None = None, limit: int = 500,
) -> DeliveryReport:
    """Attempt every delivery that is due (pending, or retrying with its backoff passed). Commits."""
    report = DeliveryReport()
    due = session.exec(select(AlertDelivery).where(
        col(AlertDelivery.status).in_([DeliveryStatus.pending.value, DeliveryStatus.retrying.value]),
        col(AlertDelivery.next_attempt_at) <= now).order_by(col(AlertDelivery.id)).limit(limit)).all()
    for d in due:
        deliver(session, d, now=now, smtp=smtp, http=http, allow_private=allow_private)
        if d.status == DeliveryStatus.sent:
            report.sent += 1
        elif d.status == DeliveryStatus.failed:
            report.failed += 1
            report.errors.append(d.last_error or "")
        else:
            report.retrying += 1
            report.errors.append(d.last_error or "")
    return report
