"""Alerts fire once per condition, stay quiet while it holds, send a recovery; email reaches a local
SMTP server; webhooks are signed (verified by a receiver on 127.0.0.1), retried with backoff when the
receiver fails, and shown as failing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlmodel import select

from core.alerts import engine, service
from core.alerts.models import AlertDelivery, AlertNotice
from core.alerts.rules import Observation
from core.clock import FrozenClock, utcnow
from core.errors import AccessDenied, InvalidInput, NotFound
from core.tenants.access import Principal
from tests.conftest import admin_of

SYSTEM = Principal.system("test")


def _obs(tenant, active=True, subject="sync_job:1", level="", rule="sync_failing", title="Sync failing: ana"):
    return Observation(rule=rule, tenant_id=tenant.id, subject=subject, active=active, level=level, title=title,
                       summary="3 failed runs in a row")


def _email_channel(session, tenant, smtp_sink, recipients="ops@acme.example, cto@acme.example", rules=None):
    ch = service.add_email_channel(session=session, principal=admin_of(tenant), tenant_id=tenant.id, name="Ops",
                                   recipients=recipients, rules=rules)
    session.commit()
    return ch


def test_fires_once_repeats_nothing_while_it_holds_then_recovers(session, tenant, clock, smtp_sink):
    _email_channel(session, tenant, smtp_sink)
    fired = engine.evaluate(session, observations=[_obs(tenant)], now=clock())
    assert [n.kind for n in fired] == ["fired"]
    engine.deliver_due(session, now=clock(), smtp=smtp_sink.config)
    assert len(smtp_sink.messages) == 1
    rcpts, msg = smtp_sink.messages[0]
    assert sorted(rcpts) == ["cto@acme.example", "ops@acme.example"]
    assert msg["Subject"].startswith("[CRM Bridge] ALERT: Acme — Sync failing: ana")

    for _ in range(5):  # the condition holds: nothing new
        clock.advance(minutes=10)
        assert engine.evaluate(session, observations=[_obs(tenant)], now=clock()) == []
        engine.deliver_due(session, now=clock(), smtp=smtp_sink.config)
    assert len(smtp_sink.messages) == 1

    recovered = engine.evaluate(session, observations=[_obs(tenant, active=False)], now=clock.advance(minutes=5))
    assert [n.kind for n in recovered] == ["recovered"]
    engine.deliver_due(session, now=clock(), smtp=smtp_sink.config)
    assert len(smtp_sink.messages) == 2 and "RESOLVED" in smtp_sink.messages[1][1]["Subject"]
    assert engine.evaluate(session, observations=[_obs(tenant, active=False)], now=clock()) == []

    again = engine.evaluate(session, observations=[_obs(tenant)], now=clock.advance(hours=1))
    assert [n.kind for n in again] == ["fired"]  # a new occurrence alerts again


def test_a_covered_condition_no_longer_reported_recovers(session, tenant, other_tenant, clock):
    engine.evaluate(session, observations=[_obs(tenant), _obs(other_tenant)], now=clock())
    notices = engine.evaluate(session, observations=[], covered=[("sync_failing", tenant.id)],
                              now=clock.advance(minutes=1))
    assert [(n.kind, n.tenant_id) for n in notices] == [("recovered", tenant.id)]  # the other tenant was not covered


def test_idp_certificate_levels_escalate_once_each(session, tenant, clock):
    cert = {"rule": "idp_cert_expiring", "subject": "idp_cert:abc", "title": "IdP certificate expiring"}
    assert [n.kind for n in engine.evaluate(session, observations=[_obs(tenant, level="90", **cert)],
                                            now=clock())] == ["fired"]
    assert engine.evaluate(session, observations=[_obs(tenant, level="90", **cert)], now=clock()) == []
    assert [n.kind for n in engine.evaluate(session, observations=[_obs(tenant, level="30", **cert)],
                                            now=clock())] == ["escalated"]
    assert engine.evaluate(session, observations=[_obs(tenant, level="30", **cert)], now=clock()) == []
    assert [n.kind for n in engine.evaluate(session, observations=[_obs(tenant, level="7", **cert)],
                                            now=clock())] == ["escalated"]
    replaced = engine.evaluate(session, observations=[], covered=[("idp_cert_expiring", tenant.id)], now=clock())
    assert [n.kind for n in replaced] == ["recovered"]


def test_a_disabled_rule_is_silent_and_channel_rule_filter_applies(session, tenant, clock, smtp_sink):
    _email_channel(session, tenant, smtp_sink, rules=["crm_quota"])
    engine.evaluate(session, observations=[_obs(tenant)], now=clock())
    assert session.exec(select(AlertDelivery)).all() == []  # the channel takes crm_quota only
    service.set_rule(session=session, principal=admin_of(tenant), tenant_id=tenant.id, rule="sync_failing",
                     enabled=False)
    assert engine.evaluate(session, observations=[_obs(tenant, subject="sync_job:2")], now=clock()) == []
    assert service.list_active(session=session, principal=admin_of(tenant), tenant_id=tenant.id) == []


def test_smtp_refusal_is_retried_and_shown(session, tenant, clock, smtp_sink):
    _email_channel(session, tenant, smtp_sink)
    engine.evaluate(session, observations=[_obs(tenant)], now=clock())
    smtp_sink.refuse = True
    rep = engine.deliver_due(session, now=clock(), smtp=smtp_sink.config)
    assert rep.retrying == 1 and "451" in rep.errors[0]
    ch = service.list_channels(session=session, principal=admin_of(tenant), tenant_id=tenant.id)[0]
    assert ch.status == "failing"
    smtp_sink.refuse = False
    assert engine.deliver_due(session, now=clock.advance(seconds=59), smtp=smtp_sink.config).sent == 0  # backoff
    assert engine.deliver_due(session, now=clock.advance(seconds=1), smtp=smtp_sink.config).sent == 1
    assert service.list_channels(session=session, principal=admin_of(tenant), tenant_id=tenant.id)[0].status == "ok"


# --- webhooks ------------------------------------------------------------------------------------


def _webhook(session, tenant, receiver, monkeypatch):
    monkeypatch.setenv("CRMBRIDGE_DEMO", "1")  # http to 127.0.0.1 is allowed in demo mode only
    from core.settings import get_settings

    get_settings.cache_clear()
    try:
        ch = service.add_webhook_channel(session=session, principal=admin_of(tenant), tenant_id=tenant.id,
                                         name="Pager", url=receiver.url)
    finally:
        monkeypatch.delenv("CRMBRIDGE_DEMO")
        get_settings.cache_clear()
    receiver.secret = service.reveal_webhook_secret(session=session, principal=admin_of(tenant), channel_id=ch.id)
    session.commit()
    return ch


def test_webhook_is_signed_and_verified_by_the_receiver(session, tenant, vault_keys, webhook_receiver, monkeypatch):
    clock = FrozenClock(utcnow())  # the receiver checks freshness against its own clock
    ch = _webhook(session, tenant, webhook_receiver, monkeypatch)
    assert ch.secret_to_reveal
    with pytest.raises(InvalidInput, match="already shown"):
        service.reveal_webhook_secret(session=session, principal=admin_of(tenant), channel_id=ch.id)

    d = service.send_test(session=session, principal=admin_of(tenant), channel_id=ch.id, now=clock(),
                          allow_private=True)
    assert d.status == "sent" and d.last_http_status == 200
    engine.evaluate(session, observations=[_obs(tenant)], now=clock())
    engine.deliver_due(session, now=clock(), allow_private=True)
    assert len(webhook_receiver.verified) == 2 == len(webhook_receiver.received)
    fired = webhook_receiver.received[1]
    assert fired["headers"]["X-CrmBridge-Event"] == "alert.fired"
    assert fired["body"]["alert"]["title"] == "Sync failing: ana" and fired["body"]["tenant"]["slug"] == "acme"
    assert fired["body"]["console_url"].startswith("http://127.0.0.1:8501/")

    # a receiver holding another secret refuses: the signature really depends on the secret
    webhook_receiver.secret = "whsec_not-the-right-one"
    service.send_test(session=session, principal=admin_of(tenant), channel_id=ch.id, now=clock(), allow_private=True)
    assert webhook_receiver.received[-1]["verified"] is False


def test_failing_receiver_is_retried_with_backoff_and_shown_failing(session, tenant, vault_keys, webhook_receiver,
                                                                    monkeypatch):
    clock = FrozenClock(utcnow())
    ch = _webhook(session, tenant, webhook_receiver, monkeypatch)
    webhook_receiver.status = 503
    engine.evaluate(session, observations=[_obs(tenant)], now=clock())
    engine.deliver_due(session, now=clock(), allow_private=True)
    gaps = []
    for _ in range(10):  # walk the backoff: each retry happens only once its wait is over
        d = session.exec(select(AlertDelivery)).one()
        if d.next_attempt_at is None:
            break
        gaps.append(d.next_attempt_at - clock())
        clock.now = d.next_attempt_at - timedelta(seconds=1)
        assert engine.deliver_due(session, now=clock(), allow_private=True).retrying == 0
        clock.advance(seconds=1)
        engine.deliver_due(session, now=clock(), allow_private=True)
    d = session.exec(select(AlertDelivery)).one()
    assert d.status == "failed" and d.attempts == engine.MAX_ATTEMPTS == len(webhook_receiver.received)
    assert gaps == list(engine.BACKOFF)
    assert d.last_http_status == 503 and "HTTP 503" in (d.last_error or "")
    log = service.list_deliveries(session=session, principal=admin_of(tenant), tenant_id=tenant.id)
    assert log[0].status == "failed" and "503" in (log[0].last_error or "")
    row = service.get_channel(session=session, principal=admin_of(tenant), channel_id=ch.id)
    assert row.status == "failing" and "503" in (row.last_error or "")

    webhook_receiver.status = 200
    clock.now = utcnow()  # (the receiver refuses signatures more than 5 minutes off its own clock)
    assert service.send_test(session=session, principal=admin_of(tenant), channel_id=ch.id, now=clock(),
                             allow_private=True).status == "sent"
    assert service.get_channel(session=session, principal=admin_of(tenant), channel_id=ch.id).status == "ok"


def test_webhook_url_is_kept_in_the_vault_and_shown_masked(session, tenant, staff, vault_keys):
    """Slack-style URLs carry their token in the path: no row holds the URL in clear, pages show the host."""
    from sqlmodel import SQLModel

    from core.tenants.models import AuditEvent

    hooks = {tenant.id: "https://hooks.slack.example/services/T000/B000/canary-tenant-31337",
             # as long as the form allows: sealed, it must still fit its column (PostgreSQL enforces it)
             None: "https://ops.example:8443/hook?token=canary-staff-31337&pad=" + "x" * 1900}
    rows = {tid: service.add_webhook_channel(session=session, principal=admin_of(tenant) if tid else staff,
                                             tenant_id=tid, name="Hook", url=url) for tid, url in hooks.items()}
    session.commit()
    assert rows[tenant.id].target == "https://hooks.slack.example/…"
    assert rows[None].target == "https://ops.example:8443/…"
    everything = " ".join(str(v) for table in SQLModel.metadata.sorted_tables
                          for row in session.connection().execute(table.select()) for v in row)
    assert "canary-" not in everything and "hooks.slack.example" in everything
    assert session.exec(select(AuditEvent).where(AuditEvent.action == "alerts.channel.create")).all()

    service.remove_channel(session=session, principal=admin_of(tenant), channel_id=rows[tenant.id].id)
    session.commit()
    from core.alerts.models import AlertChannel

    assert session.get(AlertChannel, rows[tenant.id].id).url_ref is None  # its vault entry is destroyed


def test_webhook_urls_must_be_public_https_outside_demo(session, tenant):
    for url in ("http://example.com/hook", "https://127.0.0.1/hook", "https://10.1.2.3/x", "ftp://x/y",
                "https://user:pw@example.com/"):
        with pytest.raises(InvalidInput):
            service.add_webhook_channel(session=session, principal=admin_of(tenant), tenant_id=tenant.id, name="x",
                                        url=url)


def test_a_private_target_is_refused_at_send_time(session, tenant, vault_keys, webhook_receiver, monkeypatch):
    clock = FrozenClock(utcnow())
    ch = _webhook(session, tenant, webhook_receiver, monkeypatch)
    d = service.send_test(session=session, principal=admin_of(tenant), channel_id=ch.id, now=clock(),
                          allow_private=False)
    assert d.status == "retrying" and webhook_receiver.received == []


# --- scope and digest ----------------------------------------------------------------------------


def test_tenant_admins_choose_their_own_recipients_only(session, tenant, other_tenant, staff, leadership, smtp_sink):
    _email_channel(session, tenant, smtp_sink)
    admin = admin_of(other_tenant)
    with pytest.raises(AccessDenied):
        service.list_channels(session=session, principal=admin, tenant_id=tenant.id)
    with pytest.raises(AccessDenied):
        service.add_email_channel(session=session, principal=admin, tenant_id=None, name="x", recipients="a@b.co")
    with pytest.raises(AccessDenied):
        service.list_rules(session=session, principal=leadership, tenant_id=tenant.id)
    ch = service.list_channels(session=session, principal=staff, tenant_id=tenant.id)[0]
    with pytest.raises(NotFound):
        service.send_test(session=session, principal=admin, channel_id=ch.id)
    with pytest.raises(InvalidInput, match="not an email address"):
        service.add_email_channel(session=session, principal=admin, tenant_id=other_tenant.id, name="x",
                                  recipients="ops@globex.example, nope")


def test_staff_get_a_cross_tenant_digest(session, tenant, other_tenant, staff, clock, smtp_sink):
    service.add_email_channel(session=session, principal=staff, tenant_id=None, name="CS",
                              recipients="cs@crmbridge.example")
    session.commit()
    engine.evaluate(session, observations=[_obs(tenant), _obs(other_tenant, title="Sync failing: bob")], now=clock())
    engine.evaluate(session, observations=[_obs(tenant, active=False)], now=clock.advance(minutes=5))
    digest = service.send_staff_digest(session=session, principal=staff, now=clock(), smtp=smtp_sink.config)
    assert digest is not None and "3 change(s) across 2 tenant(s)" in digest.title
    body = smtp_sink.bodies_to("cs@crmbridge.example")[0]
    assert "Acme" in body and "Globex" in body and "Sync failing: bob" in body and "RECOVERED" in body
    assert service.send_staff_digest(session=session, principal=staff, now=clock(), smtp=smtp_sink.config) is None
    kinds = [n.kind for n in session.exec(select(AlertNotice))]
    assert kinds.count("digest") == 1
    with pytest.raises(AccessDenied):
        service.send_staff_digest(session=session, principal=admin_of(tenant), now=clock())


def test_webhook_connects_to_the_address_it_checked_not_a_second_dns_answer():
    """DNS rebinding: the host is resolved once, checked, and the connection goes to that address with
    the host's name kept for Host and TLS (SNI); a host with any private address is refused."""
    import httpx

    from core.alerts.channels import post_webhook
    from core.errors import DeliveryFailed

    seen: list[httpx.Request] = []
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])  # a rebinding resolver: public first, then inward

    def transport(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    with httpx.Client(transport=httpx.MockTransport(transport)) as http:
        status = post_webhook("https://hooks.example.com/services/T0/x", body=b"{}", secret="whsec_x", event="test",
                              delivery_id="d-1", client=http, resolver=lambda host, port: next(answers))
        assert status == 204 and len(seen) == 1
        sent = seen[0]
        assert sent.url.host == "93.184.216.34" and sent.url.path == "/services/T0/x"
        assert sent.headers["Host"] == "hooks.example.com"
        assert sent.extensions["sni_hostname"] == "hooks.example.com"
        with pytest.raises(DeliveryFailed, match="private address|loopback"):
            post_webhook("https://hooks.example.com/x", body=b"{}", secret="whsec_x", event="test", delivery_id="d-2",
                         client=http, resolver=lambda host, port: ["93.184.216.34", "::ffff:10.0.0.1"])
    assert len(seen) == 1


def test_a_tenant_webhook_url_sealed_by_the_migration_moves_into_the_tenant_vault(session, tenant, vault_keys,
                                                                                  webhook_receiver, monkeypatch):
    """So the tenant's crypto-shred covers it, like every URL stored since."""
    from core.accounts.secrets import SEALED_PREFIX, seal_platform
    from core.alerts.models import AlertChannel

    ch = _webhook(session, tenant, webhook_receiver, monkeypatch)
    row = session.get(AlertChannel, ch.id)
    row.url_ref = seal_platform(webhook_receiver.url, owner=engine.channel_owner(ch.id),
                                purpose=engine.webhook_url_purpose(ch.id))  # what the migration wrote
    session.add(row)
    session.commit()
    d = service.send_test(session=session, principal=admin_of(tenant), channel_id=ch.id, allow_private=True)
    assert d.status == "sent" and len(webhook_receiver.received) == 1
    session.refresh(row)
    assert not row.url_ref.startswith(SEALED_PREFIX)
    assert service.send_test(session=session, principal=admin_of(tenant), channel_id=ch.id,
                             allow_private=True).status == "sent"  # read back from the vault
