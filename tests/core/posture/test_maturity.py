"""Each level boundary, the total order, and the single next step."""

from __future__ import annotations

from datetime import timedelta

from core.posture.maturity import GATING_RULES, assess, level_of
from core.posture.snapshot import Attribution, Licenses, SsoState, SyncAbility
from tests.core.posture.factories import NOW, TESTED_SSO, account, attributed, catalog_edition, tenant, user_cred

UNTESTED = SsoState(configured=True)


def test_level_0_when_no_account_can_sync():
    assert level_of(tenant()) == 0
    blocked = account(edition="professional", mode="per_user_password")  # API add-on not confirmed
    no_cred = account(credentials=())
    assert level_of(tenant(blocked, no_cred, sso=TESTED_SSO)) == 0
    m = assess(tenant(blocked))
    assert m.level == 0 and m.name == "Blocked"
    assert m.next_step is not None and m.next_step.rule == "api_not_available" and m.next_step.who == "sales"


def test_one_syncing_account_is_enough_to_leave_level_0():
    blocked = attributed(label="Blocked", credentials=())
    fine = attributed(label="Fine")
    assert level_of(tenant(blocked, fine, sso=TESTED_SSO)) == 4
    # a blocked account still counts for the other gates: unattributed, it holds the tenant at 3
    assert level_of(tenant(account(label="Blocked", credentials=()), fine, sso=TESTED_SSO)) == 3


def test_level_0_next_step_leads_to_the_level_the_tenant_would_have():
    # Professional with stored passwords: once the add-on is bought it is on stored passwords (level 1)
    m = assess(tenant(account(edition="professional", mode="per_user_password")))
    assert m.next_step is not None and m.next_step.to_level == 1
    # an unattributed API user without its credential, SSO tested: unblocking it lands on level 3
    m = assess(tenant(account(credentials=()), sso=TESTED_SSO))
    assert m.next_step is not None and m.next_step.to_level == 3 and m.next_step.rule == "account_cannot_sync"
    assert assess(tenant()).next_step.rule == "no_crm_account"  # type: ignore[union-attr]


def test_level_1_some_account_relies_on_stored_passwords():
    passwords = account(mode="per_user_password")
    assert level_of(tenant(passwords, attributed(), sso=TESTED_SSO)) == 1
    # a stored password left behind on an OAuth account still counts
    leftover = account(mode="per_user_oauth", credentials=(user_cred(kind="oauth_refresh"), user_cred()))
    assert level_of(tenant(leftover, sso=TESTED_SSO)) == 1
    m = assess(tenant(passwords, sso=TESTED_SSO))
    assert m.next_step is not None and m.next_step.rule == "per_user_passwords" and m.next_step.to_level == 2


def test_level_1_next_step_is_world_aware():
    free = catalog_edition("salesforce", "enterprise").integration_user_licenses.value
    tiny = account(mode="per_user_password", licenses=Licenses(total=10, used=10, integration_total=free,
                                                                integration_used=0))
    m = assess(tenant(tiny))
    assert m.next_step is not None
    assert "free Salesforce Integration user license" in m.next_step.action
    assert "today's world" in m.next_step.action


def test_level_2_no_stored_passwords_but_sso_not_tested():
    for sso in (SsoState(), UNTESTED, SsoState(configured=True, tested_at=NOW - timedelta(days=5),
                                                last_test_ok=False)):
        t = tenant(attributed(), sso=sso)
        assert level_of(t) == 2
        step = assess(t).next_step
        assert step is not None and step.rule in GATING_RULES[2] and step.to_level == 3


def test_level_3_sso_tested_but_an_api_user_writes_unattributed():
    t = tenant(attributed(label="EMEA"), account(label="Americas"), sso=TESTED_SSO)
    m = assess(t)
    assert m.level == 3
    assert m.next_step is not None and m.next_step.rule == "api_user_without_attribution"
    assert m.next_step.title.startswith("Americas:")
    assert m.one_step_away


def test_level_4_every_write_attributed():
    for accounts in ((attributed(),), (account(mode="per_user_oauth"),),
                     (account(mode="per_user_oauth"), attributed(label="Second"))):
        m = assess(tenant(*accounts, sso=TESTED_SSO))
        assert m.level == 4 and m.next_step is None and m.gating == ()


def test_levels_form_one_total_order_as_each_gate_is_cleared():
    """Walk one tenant up the ladder: clearing the gating finding raises the level by exactly one."""
    path = [
        tenant(account(mode="per_user_password", credentials=())),  # 0: nobody connected
        tenant(account(mode="per_user_password")),  # 1: stored passwords
        tenant(account()),  # 2: API user, SSO not set up
        tenant(account(), sso=TESTED_SSO),  # 3: SSO tested, writes unattributed
        tenant(account(attribution=Attribution(field="Actor__c")), sso=TESTED_SSO),  # 4
    ]
    levels = [level_of(t) for t in path]
    assert levels == [0, 1, 2, 3, 4]
    for t, expected_next in zip(path[:-1], levels[1:], strict=True):
        step = assess(t).next_step
        assert step is not None and step.to_level == expected_next


def test_steps_left_counts_every_gating_finding():
    two = tenant(account(label="A", mode="per_user_password"), account(label="B", mode="per_user_password"))
    m = assess(two)
    assert m.level == 1 and m.next_step is not None and m.next_step.steps_left == 2
    assert not m.one_step_away and "(1 more like it)" in m.next_step.title
    assert len(m.gating) == 2


def test_sync_health_can_drop_a_tenant_to_level_0():
    sick = attributed(sync=SyncAbility(can_sync=False, reason="paused by an admin"))
    assert level_of(tenant(sick, sso=TESTED_SSO)) == 0
    assert level_of(tenant(attributed(sync=SyncAbility(can_sync=None)), sso=TESTED_SSO)) == 4


def test_one_step_away_means_one_action_not_every_tenant():
    """Issue 16: "one step from the next level" always equalled the tenant count. SSO that is not set
    up is two actions (import the IdP metadata, then a valid test login); an untested one is one."""
    missing = assess(tenant(attributed(), sso=SsoState()))
    untested = assess(tenant(attributed(), sso=UNTESTED))
    assert missing.next_step is not None and missing.next_step.steps_left == 2 and not missing.one_step_away
    assert untested.next_step is not None and untested.next_step.steps_left == 1 and untested.one_step_away


def test_level_0_counts_the_blockers_of_the_account_closest_to_syncing():
    # no API credential and no passing test on an add-on edition: buy the add-on AND store a credential
    blocked = tenant(account(edition="professional", credentials=()))
    m = assess(blocked)
    assert m.level == 0 and m.next_step is not None
    assert m.next_step.steps_left >= 2 and not m.one_step_away
