"""The vault's behaviour, with an injected clock: store, use, self-destruct, shred, rotate."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import Session, select

from core.errors import (
    AccessDenied,
    AuthenticationFailed,
    CredentialDestroyed,
    CredentialExpired,
    CredentialInvalid,
    InvalidInput,
    SessionExpired,
)
from core.tenants.access import Principal
from core.tenants.audit import record_event, verify_chain
from core.tenants.models import AuditEvent
from core.vault import service
from core.vault.models import CredentialRef, VaultCredential, VaultTenantKey, VaultTombstone
from core.vault.policy import set_policy
from tests.conftest import admin_of, make_tenant
from tests.fixtures.vault import make_vault_world

pytestmark = pytest.mark.usefixtures("vault_keys")
WORKER = Principal.system("sync-worker")


def _put(session, world, clock, *, user=0, secret="s3cret-pw", purpose="crm-login", kind="password", ttl=None):
    tenant_id, account_id, _ = world.ids
    return service.put(session, principal=WORKER, tenant_id=tenant_id, crm_account_id=account_id,
                       app_user_id=world.users[user].id if user is not None else None, purpose=purpose,
                       secret=secret, kind=kind, ttl=ttl, now=clock())


def _read(session, ref, clock, principal=WORKER) -> str:
    with service.use(session, ref, principal=principal, reason="test: read", now=clock()) as secret:
        return secret.get_secret_value()


def _events(session, action):
    return session.exec(select(AuditEvent).where(AuditEvent.action == action)).all()


def test_round_trip_records_use_and_audits_who_and_why(session, tenant, clock):
    world = make_vault_world(session, tenant)
    ref = _put(session, world, clock)
    session.commit()
    clock.advance(hours=1)
    with service.use(session, ref, principal=WORKER, reason="push 3 opportunities", now=clock()) as secret:
        assert secret.get_secret_value() == "s3cret-pw"
        assert "s3cret-pw" not in repr(secret) and "s3cret-pw" not in str(secret)
    row = session.get(VaultCredential, ref.id)
    assert row.last_used_at == clock() and row.use_count == 1
    assert b"s3cret-pw" not in row.ciphertext
    (ev,) = _events(session, "vault.credential.use")
    assert ev.actor == "sync-worker" and json.loads(ev.details)["reason"] == "push 3 opportunities"
    assert verify_chain(session) == []


def test_put_again_replaces_in_place_with_a_new_version(session, tenant, clock):
    world = make_vault_world(session, tenant)
    ref = _put(session, world, clock, secret="first")
    ref2 = _put(session, world, clock, secret="second")
    session.commit()
    assert ref2 == ref
    assert session.get(VaultCredential, ref.id).version == 2
    assert _read(session, ref, clock) == "second"
    assert service.find_credential(session, tenant_id=world.ids[0], crm_account_id=world.ids[1],
                                   app_user_id=world.ids[2], purpose="crm-login") == ref


def test_references_round_trip_through_strings(session, tenant, clock):
    world = make_vault_world(session, tenant)
    ref = _put(session, world, clock)
    session.commit()
    assert str(ref) == f"vault:{ref.id}" and CredentialRef.parse(str(ref)) == ref
    assert _read(session, str(ref), clock) == "s3cret-pw"
    with pytest.raises(InvalidInput):
        CredentialRef.parse("not-a-ref")


def test_ciphertext_swapped_into_another_row_does_not_decrypt(session, tenant, clock):
    world = make_vault_world(session, tenant)
    mine = _put(session, world, clock, user=0, secret="user-one-password")
    theirs = _put(session, world, clock, user=1, secret="user-two-password")
    session.commit()
    blob = session.get(VaultCredential, mine.id).ciphertext
    session.execute(text("UPDATE vault_credential SET ciphertext = :b WHERE id = :i"), {"b": blob, "i": theirs.id})
    session.commit()
    with pytest.raises(CredentialInvalid) as exc:
        _read(session, theirs, clock)
    assert "user-one-password" not in str(exc.value)
    session.expire_all()
    assert session.get(VaultCredential, theirs.id).state == "invalid"
    assert len(_events(session, "vault.credential.tampered")) == 1
    with pytest.raises(CredentialInvalid):  # flagged: never tried again
        _read(session, theirs, clock)
    assert _read(session, mine, clock) == "user-one-password"


def test_ciphertext_moved_to_another_tenant_does_not_decrypt(session, tenant, other_tenant, clock):
    a = make_vault_world(session, tenant)
    b = make_vault_world(session, other_tenant)
    ref_a = _put(session, a, clock, secret="tenant-a-secret")
    ref_b = _put(session, b, clock, secret="tenant-b-secret")
    session.commit()
    blob = session.get(VaultCredential, ref_a.id).ciphertext
    session.execute(text("UPDATE vault_credential SET ciphertext = :b WHERE id = :i"), {"b": blob, "i": ref_b.id})
    session.commit()
    with pytest.raises(CredentialInvalid):
        _read(session, ref_b, clock)


def test_ttl_expiry_destroys_on_use_and_asks_for_reconnect(session, tenant, clock):
    world = make_vault_world(session, tenant)
    ref = _put(session, world, clock, ttl=timedelta(days=2))
    session.commit()
    clock.advance(days=1, hours=23)
    assert _read(session, ref, clock) == "s3cret-pw"
    clock.advance(hours=1)
    with pytest.raises(CredentialExpired, match="reconnect"):
        _read(session, ref, clock)
    assert session.get(VaultCredential, ref.id) is None
    assert session.exec(select(VaultTombstone)).one().reason.startswith("expired")
    with pytest.raises(CredentialDestroyed, match="expired"):
        _read(session, ref, clock)
    states = {c.owner: c.state for c in service.list_credentials(session, principal=WORKER, tenant_id=world.ids[0])}
    assert states[world.users[0].email] == "reconnect needed"


def test_default_ttl_follows_policy_per_kind(session, tenant, clock):
    world = make_vault_world(session, tenant)
    pw = _put(session, world, clock, user=0)
    oauth = _put(session, world, clock, user=1, kind="oauth_refresh")
    api = _put(session, world, clock, user=None, purpose="api-client-secret", kind="client_secret")
    rows = {r.id: r for r in session.exec(select(VaultCredential))}
    assert rows[pw.id].expires_at == clock() + timedelta(days=30)
    assert rows[oauth.id].expires_at == clock() + timedelta(days=90)
    assert rows[api.id].expires_at is None
    set_policy(session, principal=WORKER, tenant_id=world.ids[0], password_ttl_days=7)
    _put(session, world, clock, user=0)
    assert session.get(VaultCredential, pw.id).expires_at == clock() + timedelta(days=7)


def test_failed_login_destroys_a_per_user_credential_at_once(session, tenant, clock):
    world = make_vault_world(session, tenant)
    ref = _put(session, world, clock)
    session.commit()
    with pytest.raises(AuthenticationFailed):
        with service.use(session, ref, principal=WORKER, reason="login", now=clock()):
            raise AuthenticationFailed("INVALID_LOGIN: Invalid username, password, security token")
    session.rollback()  # whatever the caller does next, the destruction stands
    assert session.get(VaultCredential, ref.id) is None
    tomb = session.exec(select(VaultTombstone)).one()
    assert tomb.reason.startswith("authentication failed")
    with pytest.raises(CredentialDestroyed, match="reconnect"):
        _read(session, ref, clock)


def test_expired_session_does_not_destroy(session, tenant, clock):
    world = make_vault_world(session, tenant)
    ref = _put(session, world, clock)
    session.commit()
    with pytest.raises(SessionExpired):
        with service.use(session, ref, principal=WORKER, reason="pull", now=clock()):
            raise SessionExpired("INVALID_SESSION_ID: Session expired or invalid")
    assert _read(session, ref, clock) == "s3cret-pw"
    assert session.get(VaultCredential, ref.id).failures == 0


def test_failure_threshold_counts_before_destroying(session, tenant, clock):
    world = make_vault_world(session, tenant)
    set_policy(session, principal=WORKER, tenant_id=world.ids[0], failure_threshold=2)
    ref = _put(session, world, clock)
    session.commit()
    assert service.report_auth_failure(session, ref, principal=WORKER, now=clock()) == "counted"
    assert _read(session, ref, clock) == "s3cret-pw"
    assert service.report_auth_failure(session, ref, principal=WORKER, now=clock()) == "destroyed"
    assert service.report_auth_failure(session, ref, principal=WORKER, now=clock()) == "gone"


def test_api_user_credential_is_marked_failed_not_destroyed(session, tenant, clock):
    world = make_vault_world(session, tenant, mode="api_user")
    ref = _put(session, world, clock, user=None, purpose="api-login", kind="client_secret")
    session.commit()
    assert service.report_auth_failure(session, ref, principal=WORKER, now=clock()) == "failed"
    with pytest.raises(CredentialInvalid, match="API user"):
        _read(session, ref, clock)
    (info,) = service.list_credentials(session, principal=WORKER, tenant_id=world.ids[0])
    assert info.state == "failed" and info.owner == "API user"
    assert len(_events(session, "vault.credential.failed")) == 1
    _put(session, world, clock, user=None, purpose="api-login", kind="client_secret", secret="rotated")
    session.commit()
    assert _read(session, ref, clock) == "rotated"  # storing a new secret clears the flag


def test_sweep_destroys_idle_and_expired_but_keeps_the_rest(session, tenant, clock):
    world = make_vault_world(session, tenant, users=3)
    idle = _put(session, world, clock, user=0)
    used = _put(session, world, clock, user=1)
    short = _put(session, world, clock, user=2, ttl=timedelta(days=3))
    api = _put(session, world, clock, user=None, purpose="api-client-secret", kind="client_secret")
    session.commit()
    clock.advance(days=10)
    _read(session, used, clock)
    clock.advance(days=4, hours=1)  # idle user 0: 14 days 1 hour; user 1 used 4 days ago
    result = service.sweep(session, now=clock())
    session.commit()
    assert (result.expired, result.idle) == (1, 1)
    left = {r.id for r in session.exec(select(VaultCredential))}
    assert left == {used.id, api.id}
    reasons = {t.credential_id: t.reason for t in session.exec(select(VaultTombstone))}
    assert reasons[idle.id] == "idle for 14 days" and reasons[short.id].startswith("expired")
    assert len(_events(session, "vault.sweep")) == 1


def test_idle_use_is_refused_and_destroyed_before_the_sweep_runs(session, tenant, clock):
    world = make_vault_world(session, tenant)
    set_policy(session, principal=WORKER, tenant_id=world.ids[0], idle_days=3)
    ref = _put(session, world, clock)
    session.commit()
    clock.advance(days=3)
    with pytest.raises(CredentialExpired, match="idle for 3 days"):
        _read(session, ref, clock)
    assert session.get(VaultCredential, ref.id) is None


def test_mode_change_destroys_only_that_accounts_per_user_passwords(session, tenant, clock):
    world = make_vault_world(session, tenant)
    other = make_vault_world(session, tenant, label="Second org", users=1, user_prefix="second")
    p1 = _put(session, world, clock, user=0)
    p2 = _put(session, world, clock, user=1)
    api = _put(session, world, clock, user=None, purpose="api-login", kind="client_secret")
    kept = service.put(session, principal=WORKER, tenant_id=tenant.id, crm_account_id=other.account.id,
                       app_user_id=other.users[0].id, purpose="crm-login", secret="x", now=clock())
    world.account.credential_mode = "api_user"
    session.add(world.account)
    assert service.destroy_for_mode_change(session, principal=WORKER, crm_account_id=world.account.id,
                                           now=clock()) == 2
    session.commit()
    left = {r.id for r in session.exec(select(VaultCredential))}
    assert left == {api.id, kept.id} and not {p1.id, p2.id} & left
    # moving to an API user is not "reconnect needed"
    infos = service.list_credentials(session, principal=WORKER, tenant_id=tenant.id)
    assert all(i.state != "reconnect needed" for i in infos)


def test_revoke_destroys_and_is_audited(session, tenant, clock, staff):
    world = make_vault_world(session, tenant)
    ref = _put(session, world, clock)
    assert service.revoke(session, ref, principal=staff, reason="user left", now=clock()) is True
    assert service.revoke(session, ref, principal=staff, reason="again", now=clock()) is False
    session.commit()
    (ev,) = _events(session, "vault.credential.destroy")
    assert json.loads(ev.details)["reason"] == "revoked: user left" and ev.actor == staff.email
    with pytest.raises(CredentialDestroyed, match="revoked: user left"):
        _read(session, ref, clock)


def test_shred_makes_the_tenant_unreadable_and_leaves_others(file_engine, clock, staff, vault_keys):
    with Session(file_engine, expire_on_commit=False) as s:
        a = make_vault_world(s, make_tenant(s, "acme"))
        b = make_vault_world(s, make_tenant(s, "globex"))
        ref_a = _put(s, a, clock, secret="acme-secret")
        ref_b = _put(s, b, clock, secret="globex-secret")
        s.commit()
        wrapped = s.get(VaultTenantKey, a.tenant.id).wrapped_dek
        blob = s.get(VaultCredential, ref_a.id).ciphertext
        assert service.shred_tenant(s, principal=staff, tenant_id=a.tenant.id, now=clock()) == 1
        assert s.get(VaultTenantKey, a.tenant.id) is None
        assert s.exec(select(VaultCredential).where(VaultCredential.tenant_id == a.tenant.id)).all() == []
        assert s.exec(select(VaultTombstone)).one().reason == "tenant shredded"
        with pytest.raises(CredentialDestroyed):
            _read(s, ref_a, clock, principal=staff)
        assert _read(s, ref_b, clock) == "globex-secret"
        assert verify_chain(s) == []
        if file_engine.dialect.name != "sqlite":
            return
        # read the files while connections are open (closing the last one would checkpoint anyway)
        path = Path(file_engine.url.database)
        data = path.read_bytes()
        wal = Path(f"{path}-wal").read_bytes() if Path(f"{path}-wal").exists() else b""
    assert wrapped not in data and wrapped not in wal  # the wrapped key's bytes are gone, not just unlinked
    assert blob not in data and blob not in wal


def test_shred_and_rotation_are_staff_only(session, tenant, clock):
    admin = admin_of(tenant)
    with pytest.raises(AccessDenied):
        service.shred_tenant(session, principal=admin, tenant_id=tenant.id)
    with pytest.raises(AccessDenied):
        service.rotate_kek(principal=admin)


def test_tenant_scope_and_leadership_never_read_secrets(session, tenant, other_tenant, clock, leadership):
    world = make_vault_world(session, tenant)
    ref = _put(session, world, clock)
    session.commit()
    assert _read(session, ref, clock, principal=admin_of(tenant)) == "s3cret-pw"
    for who in (admin_of(other_tenant), leadership):
        with pytest.raises(AccessDenied):
            _read(session, ref, clock, principal=who)
        with pytest.raises(AccessDenied):
            service.list_credentials(session, principal=who, tenant_id=tenant.id)
        with pytest.raises(AccessDenied):
            service.put(session, principal=who, tenant_id=tenant.id, purpose="x", secret="y")
    assert len(_events(session, "vault.credential.use")) == 1


def test_use_commits_pending_work_and_the_chain_stays_whole(session, tenant, clock):
    world = make_vault_world(session, tenant)
    ref = _put(session, world, clock)
    session.commit()
    record_event(session, principal=WORKER, action="sync.run", tenant_id=tenant.id)  # loads the chain head
    assert _read(session, ref, clock) == "s3cret-pw"
    record_event(session, principal=WORKER, action="sync.run", tenant_id=tenant.id)  # same session, after use
    session.commit()
    assert verify_chain(session) == []
    seqs = [e.seq for e in session.exec(select(AuditEvent).where(AuditEvent.tenant_id == tenant.id))]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))


def test_bad_input_is_refused_without_writing(session, tenant, other_tenant, clock):
    world = make_vault_world(session, tenant)
    foreign = make_vault_world(session, other_tenant)
    tenant_id, account_id, user_id = world.ids
    cases = [
        {"purpose": "Bad Purpose!", "secret": "x"},
        {"purpose": "crm-login", "secret": "   "},
        {"purpose": "crm-login", "secret": "x", "kind": "carrier-pigeon"},
        {"purpose": "crm-login", "secret": "x", "crm_account_id": foreign.account.id},
        {"purpose": "crm-login", "secret": "x", "app_user_id": user_id},  # per-user needs its account
        {"purpose": "crm-login", "secret": "x" * 70_000},
        {"purpose": "crm-login", "secret": "x", "ttl": timedelta(0)},
    ]
    for kw in cases:
        with pytest.raises(InvalidInput):
            service.put(session, principal=WORKER, tenant_id=tenant_id, now=clock(), **kw)
    assert session.exec(select(VaultCredential)).all() == []
    with pytest.raises(InvalidInput, match="reason"):
        service.use(session, 1, principal=WORKER, reason=" ")
    with pytest.raises(CredentialDestroyed, match="never stored"):
        _read(session, 12345, clock)
