"""Issue 14 (low): 20 concurrent wrong submissions on one connect link got 7 attempts past its limit of
5. Each attempt is now counted in one conditional UPDATE before the CRM sees the password, so however
many arrive together, at most 5 logins reach the CRM and the link ends locked. Runs on a SQLite file
database and on PostgreSQL (CRMBRIDGE_TEST_DATABASE_URL)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import SecretStr
from sqlmodel import Session, select

from core.connections import links as connect
from core.connections.links import CredentialCheck, SubmitResult
from core.errors import AuthenticationFailed, LinkInvalid
from core.tenants.access import Principal
from core.vault.models import VaultConnectLink, VaultCredential
from tests.conftest import make_tenant
from tests.fixtures.vault import make_vault_world

pytestmark = pytest.mark.usefixtures("vault_keys")
STAFF = Principal(role="staff", email="cs@crmbridge.example")
SUBMISSIONS = 20


def _link(engine) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    with Session(engine, expire_on_commit=False) as s:
        tenant = make_tenant(s, "tinyco")
        world = make_vault_world(s, tenant)
        url = connect.create_connect_link(s, principal=STAFF, tenant_id=tenant.id, app_user_id=world.users[0].id,
                                          crm_account_id=world.account.id)
        s.commit()
        return url.rsplit("/", 1)[1], world.account.id  # type: ignore[return-value]


def test_concurrent_wrong_submissions_never_pass_the_limit(file_engine):
    token, _ = _link(file_engine)
    crm_logins: list[str] = []
    lock = threading.Lock()
    gate = threading.Event()

    def wrong_password(check: CredentialCheck) -> str:
        with lock:
            crm_logins.append(check.username)
        gate.wait(2)  # hold each CRM call open so the submissions overlap
        raise AuthenticationFailed("INVALID_LOGIN: Invalid username, password, security token; or user locked out.")

    def submit(i: int) -> SubmitResult | LinkInvalid:
        try:
            return connect.submit_link(token, username="user1@tinyco.example", password=SecretStr(f"guess-{i}"),
                                       engine=file_engine, tester=wrong_password)
        except LinkInvalid as exc:
            return exc

    try:
        with ThreadPoolExecutor(SUBMISSIONS) as pool:
            futures = [pool.submit(submit, i) for i in range(SUBMISSIONS)]
            gate.set()
            outcomes = [f.result(timeout=60) for f in futures]
    finally:
        pass

    assert len(crm_logins) == connect.MAX_ATTEMPTS  # the old code let every one of the 20 reach the CRM
    failed = [o for o in outcomes if isinstance(o, SubmitResult)]
    refused = [o for o in outcomes if isinstance(o, LinkInvalid)]
    assert len(failed) == connect.MAX_ATTEMPTS and not any(o.ok for o in failed)
    assert len(refused) == SUBMISSIONS - connect.MAX_ATTEMPTS
    assert all("closed after 5 failed attempts" in str(e) for e in refused)
    with Session(file_engine) as s:
        link = s.exec(select(VaultConnectLink)).one()
        assert link.failed_attempts == connect.MAX_ATTEMPTS and link.consumed_at is None
    with Session(file_engine) as s:
        assert connect.open_link(s, token, audit=False).state == "locked"


def test_a_right_password_after_wrong_ones_still_connects_and_does_not_count(file_engine):
    token, _ = _link(file_engine)
    answers = iter([None, None, None, None, "005TINY00000001"])  # four wrong, then the right one

    def crm(check: CredentialCheck) -> str:
        who = next(answers)
        if who is None:
            raise AuthenticationFailed("INVALID_LOGIN: Invalid username, password, security token; or user locked out.")
        return who

    try:
        results = [connect.submit_link(token, username="user1@tinyco.example", password=SecretStr(f"pw-{i}"),
                                       engine=file_engine, tester=crm) for i in range(5)]
    finally:
        pass
    assert [r.ok for r in results] == [False, False, False, False, True]
    assert [r.attempts_left for r in results[:4]] == [4, 3, 2, 1]
    with Session(file_engine) as s:
        link = s.exec(select(VaultConnectLink)).one()
        assert link.failed_attempts == 4 and link.consumed_at is not None
        assert s.exec(select(VaultCredential)).one().state == "active"
