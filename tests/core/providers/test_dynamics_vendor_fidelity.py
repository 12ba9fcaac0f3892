"""Issue 13, Dynamics 365 points 1-5: the sandbox answers as Microsoft documents (see the citations in
sandbox/dynamics.py) and the provider survives it.

Each test here failed against the provider as it was before issue 13 (noted per test).
"""

from __future__ import annotations

from typing import Any

from core.providers.base import OpportunityChange
from tests.core.providers.test_dynamics_sandbox import (
    APP_USER,
    BEN,
    ENV,
    OLGA,
    changes,
    opportunities,
    provider,
    raw_token,
)

CAROL = "5d0c1e6a-0000-4000-8000-000000000003"
BULK = f"/dynamics/{ENV}/api/data/v9.2/opportunities/Microsoft.Dynamics.CRM.UpsertMultiple"


def behaviour(sandbox: Any, **body: Any) -> dict[str, Any]:
    r = sandbox.http.post(f"/_sandbox/dynamics/{ENV}/behaviour", json=body)
    r.raise_for_status()
    return dict(r.json())


def by_key(sandbox: Any) -> dict[str, dict[str, Any]]:
    return {o["crb_idempotencykey"]: o for o in opportunities(sandbox) if o.get("crb_idempotencykey")}


# --------------------------------------------------------------------------- 1. UpsertMultiple: 204, no body
def test_upsertmultiple_204_without_body_is_success(sandbox: Any) -> None:
    """Old code: MalformedResponse ("answered no results") after the records were written."""
    token = raw_token(sandbox)
    r = sandbox.http.post(BULK, headers={"Authorization": f"Bearer {token}"}, json={"Targets": [
        {"@odata.type": "Microsoft.Dynamics.CRM.opportunity", "name": "raw",
         "@odata.id": "opportunities(crb_idempotencykey='raw-1')"}]})
    assert (r.status_code, r.content) == (204, b"")

    p = provider(sandbox)
    # an update by record id (no alternate key involved): old code raised MalformedResponse here
    seeded = opportunities(sandbox)[0]["opportunityid"]
    upd = p.push_opportunities([OpportunityChange("upd-1", {"stage": "Propose"}, crm_id=seeded)])
    assert upd[0].ok and upd[0].crm_id == seeded and p.calls_made == 1
    assert next(o for o in opportunities(sandbox) if o["opportunityid"] == seeded)["salesstage"] == 2
    p = provider(sandbox)
    results = p.push_opportunities(changes(1200, "nobody"))
    assert all(r.ok for r in results) and p.calls_made == 2
    assert all(r.write_path == "UpsertMultiple" for r in results)
    rows = by_key(sandbox)
    assert rows["nobody-01199"]["name"] == "Deal nobody 1199"
    # the ids the 204 does not carry come with the pull (which reads the alternate key column): no extra call
    pulled = {o.external_key: o.crm_id for o in p.pull_opportunities(None)}
    assert pulled["nobody-00000"] == rows["nobody-00000"]["opportunityid"]
    assert p.calls_made == 3


# --------------------------------------------------------------------------- 2. no alternate key in the body
def test_sandbox_refuses_the_alternate_key_in_the_body_on_create(sandbox: Any) -> None:
    token = raw_token(sandbox)
    target = {"@odata.type": "Microsoft.Dynamics.CRM.opportunity", "name": "dup",
              "crb_idempotencykey": "dup-1", "@odata.id": "opportunities(crb_idempotencykey='dup-1')"}
    r = sandbox.http.post(BULK, headers={"Authorization": f"Bearer {token}"}, json={"Targets": [target]})
    assert r.status_code == 400
    assert r.json() == {"error": {"code": "0x80040216", "message": "An unexpected error occurred."}}
    assert "dup-1" not in by_key(sandbox)


def test_provider_keeps_the_alternate_key_out_of_the_body(sandbox: Any) -> None:
    """Old code: every record failed (the bulk message was refused, then each $batch PATCH too)."""
    p = provider(sandbox)
    results = p.push_opportunities(changes(5, "key"))
    assert [r.ok for r in results] == [True] * 5, results[0].error
    assert p.calls_made == 1
    assert by_key(sandbox)["key-00004"]["crb_idempotencykey"] == "key-00004"  # set from @odata.id
    # and an update through the same key keeps working (the update path)
    again = p.push_opportunities([OpportunityChange("key-00004", {"stage": "Close"})])
    assert again[0].ok and by_key(sandbox)["key-00004"]["salesstage"] == 3


# --------------------------------------------------------------------------- 3. a table without UpsertMultiple
def test_table_without_upsertmultiple_falls_back_to_a_batch_of_single_upserts(sandbox: Any) -> None:
    """Old code: every record failed (and each chunk spent a refused UpsertMultiple first)."""
    behaviour(sandbox, unsupported_messages=["UpsertMultiple"])
    token = raw_token(sandbox)
    r = sandbox.http.post(BULK, headers={"Authorization": f"Bearer {token}"}, json={"Targets": [
        {"@odata.type": "Microsoft.Dynamics.CRM.opportunity", "name": "x",
         "@odata.id": "opportunities(crb_idempotencykey='x-1')"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "0x80040800"
    assert "does not support entities of type 'opportunity'" in r.json()["error"]["message"]

    p = provider(sandbox)
    results = p.push_opportunities(changes(2500, "nobulk"))
    assert all(r.ok and r.crm_id for r in results), results[0].error
    assert all(r.created for r in results)
    assert {r.write_path for r in results} == {"$batch (UpsertMultiple unsupported)"}
    # one refused UpsertMultiple, then one $batch per 1,000; the refusal is remembered
    assert p.calls_made == 4
    assert p.fallback_calls == {"upsertmultiple_unsupported": 1}
    again = p.push_opportunities(changes(2500, "nobulk"))
    assert p.calls_made == 7 and all(r.ok and not r.created for r in again)
    assert [r.crm_id for r in again] == [r.crm_id for r in results]
    assert len([k for k in by_key(sandbox) if k.startswith("nobulk")]) == 2500


# --------------------------------------------------------------------------- 4. ignored per-part impersonation
def test_ignored_batch_impersonation_is_detected_and_each_actor_gets_its_own_request(sandbox: Any) -> None:
    """Old code: records silently attributed to the application user."""
    behaviour(sandbox, batch_part_impersonation="ignored")
    p = provider(sandbox)
    # updates of existing records by id, three actors in one chunk
    ids = [o["opportunityid"] for o in opportunities(sandbox)[:8]]
    actors = [OLGA] * 3 + [BEN] * 3 + [CAROL] * 2
    mixed = [OpportunityChange(f"u-{i}", {"stage": "Close"}, crm_id=oid, act_as_crm_user_id=actor)
             for i, (oid, actor) in enumerate(zip(ids, actors, strict=True))]
    results = p.push_opportunities(mixed)
    assert all(r.ok for r in results)
    rows = {o["opportunityid"]: o for o in opportunities(sandbox)}
    for oid, actor in zip(ids, actors, strict=True):
        assert (rows[oid]["_modifiedby_value"], rows[oid]["_modifiedonbehalfby_value"]) == (actor, APP_USER)
    # which path wrote each record is on its result (the sync engine puts it in the audit entry)
    assert {r.write_path for r in results} == {"per-actor requests ($batch impersonation ignored)"}
    # lookup + the $batch whose answer showed no createdonbehalfby + one request per actor
    assert p.calls_made == 1 + 1 + 3
    assert p.fallback_calls == {"batch_impersonation_ignored": 3}
    # remembered: the next mixed chunk goes straight to one request per actor, so creators are right
    more = p.push_opportunities(changes(2, "olga2", actor=OLGA) + changes(2, "ben2", actor=BEN))
    assert all(r.ok for r in more) and p.calls_made == 5 + 2
    rows = by_key(sandbox)
    assert (rows["ben2-00001"]["_createdby_value"], rows["ben2-00001"]["_createdonbehalfby_value"]) == (
        BEN, APP_USER)


def test_honoured_batch_impersonation_stays_one_batch(sandbox: Any) -> None:
    p = provider(sandbox)
    results = p.push_opportunities(changes(2, "olga", actor=OLGA) + changes(2, "ben", actor=BEN))
    assert all(r.ok and r.write_path == "$batch (per-part impersonation)" for r in results)
    assert p.calls_made == 2 and p.fallback_calls == {}


# --------------------------------------------------------------------------- 5. LF line ends in $batch
def test_sandbox_reads_a_batch_written_with_bare_lf(sandbox: Any) -> None:
    """Old sandbox: a part with LF line ends had "no HTTP request line" (400)."""
    token = raw_token(sandbox)
    body = ("--batch_lf\nContent-Type: application/http\nContent-Transfer-Encoding: binary\n\n"
            "GET /api/data/v9.2/WhoAmI HTTP/1.1\nAccept: application/json\n\n\n"
            "--batch_lf\nContent-Type: application/http\nContent-Transfer-Encoding: binary\n\n"
            "PATCH /api/data/v9.2/opportunities(crb_idempotencykey='lf-1') HTTP/1.1\n"
            "Content-Type: application/json\n\n{\"name\": \"written with LF\"}\n--batch_lf--\n")
    r = sandbox.http.post(f"/dynamics/{ENV}/api/data/v9.2/$batch", content=body.encode(),
                          headers={"Authorization": f"Bearer {token}",
                                   "Content-Type": "multipart/mixed; boundary=batch_lf"})
    assert r.status_code == 200
    assert r.text.count("HTTP/1.1 200 OK") == 1 and r.text.count("HTTP/1.1 204 No Content") == 1
    assert by_key(sandbox)["lf-1"]["name"] == "written with LF"


def test_both_fallbacks_together_keep_attribution(sandbox: Any) -> None:
    """No UpsertMultiple and ignored per-part impersonation: each actor's records go as a $batch with the
    caller header on the $batch request itself, which Dataverse applies to every part."""
    behaviour(sandbox, unsupported_messages=["UpsertMultiple"], batch_part_impersonation="ignored")
    p = provider(sandbox)
    results = p.push_opportunities(changes(2, "olga", actor=OLGA) + changes(2, "ben", actor=BEN))
    assert all(r.ok for r in results), results[0].error
    rows = by_key(sandbox)
    assert (rows["ben-00001"]["_modifiedby_value"], rows["ben-00001"]["_modifiedonbehalfby_value"]) == (
        BEN, APP_USER)
    # lookup + mixed $batch + (refused UpsertMultiple + $batch) for Olga + $batch for Ben
    assert p.calls_made == 5
    assert p.fallback_calls == {"batch_impersonation_ignored": 2, "upsertmultiple_unsupported": 1}
    later = p.push_opportunities(changes(1, "olga3", actor=OLGA) + changes(1, "ben3", actor=BEN))
    assert all(r.ok for r in later) and p.calls_made == 7
    assert by_key(sandbox)["ben3-00000"]["_createdby_value"] == BEN
