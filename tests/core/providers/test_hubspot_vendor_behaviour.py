"""HubSpot behaviours the sandbox plays as HubSpot documents them (issue 13, points 6–8), and the provider
surviving them.

- A batch update/upsert with one invalid input fails whole with HTTP 400 (public issue
  Atlas-Authority/marketing-automation#174): the provider fails only the input the error names and writes the
  others with as few extra calls as it can.
- Batch upsert results do not echo the idProperty and come in no promised order
  (HubSpot-public-api-spec-collection, CRM Deals v3 ``SimplePublicUpsertObject``): results are matched by
  ``objectWriteTraceId``.
- ``GET /oauth/v1/access-tokens/{token}`` is deprecated (changelog "v1 OAuth API Deprecation"); the connection
  test introspects with ``POST /oauth/2026-03/token/introspect`` and keeps v1 only as a fallback.
"""

from __future__ import annotations

from typing import Any

from core.providers.base import OpportunityChange
from tests.core.providers.test_hubspot_sandbox import changes, deals, provider


def _by_key(sandbox: Any) -> dict[str, dict[str, Any]]:
    return {d["properties"].get("crb_idempotency_key"): d for d in deals(sandbox)
            if d["properties"].get("crb_idempotency_key")}


def test_sandbox_fails_a_whole_batch_on_one_invalid_input_as_hubspot_does(sandbox: Any) -> None:
    token = "demo-hubco-service-key"
    inputs = [{"idProperty": "crb_idempotency_key", "id": f"w-{i}",
               "properties": {"dealname": f"W {i}", "dealstage": "bogus" if i == 1 else "qualifiedtobuy"}}
              for i in range(3)]
    r = sandbox.http.post("/hubspot/crm/v3/objects/deals/batch/upsert", json={"inputs": inputs},
                          headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 400
    body = r.json()
    assert {"status", "message", "correlationId", "category", "errors", "context"} <= set(body)
    assert body["category"] == "VALIDATION_ERROR"
    assert body["message"].startswith('Property values were not valid: [{"isValid":false,"message":"bogus was not')
    assert "w-1" not in r.text  # the error names the property and the value, never the input
    assert not any(k.startswith("w-") for k in _by_key(sandbox))  # nothing was written


def test_one_invalid_record_fails_alone_and_the_good_ones_are_written(sandbox: Any) -> None:
    p = provider(sandbox)
    batch = changes(100, "inv")
    batch[37] = OpportunityChange("inv-00037", {"name": "Bad", "stage": "not-a-stage"})
    results = p.push_opportunities(batch)
    failed = [r for r in results if not r.ok]
    assert [r.idempotency_key for r in failed] == ["inv-00037"]
    assert failed[0].error_code == "VALIDATION_ERROR" and "not-a-stage" in (failed[0].error or "")
    assert all(r.ok and r.created and r.crm_id for r in results if r.idempotency_key != "inv-00037")
    written = _by_key(sandbox)
    assert "inv-00037" not in written and len([k for k in written if k.startswith("inv-")]) == 99
    assert p.calls_made == 2 and p.fallback_calls_made == 1  # the refused batch + one retry of the other 99


def test_several_invalid_records_each_keep_their_own_error(sandbox: Any) -> None:
    p = provider(sandbox)
    batch = changes(10, "multi")
    batch[2] = OpportunityChange("multi-00002", {"name": "Bad amount", "amount": "lots"})
    batch[7] = OpportunityChange("multi-00007", {"name": "Bad stage", "stage": "nope"})
    results = p.push_opportunities(batch)
    errors = {r.idempotency_key: r.error for r in results if not r.ok}
    assert set(errors) == {"multi-00002", "multi-00007"}
    assert "lots" in (errors["multi-00002"] or "") and "nope" not in (errors["multi-00002"] or "")
    assert "nope" in (errors["multi-00007"] or "") and "lots" not in (errors["multi-00007"] or "")
    assert len([k for k in _by_key(sandbox) if k.startswith("multi-")]) == 8
    assert p.calls_made == 3 and p.fallback_calls_made == 2


def test_an_error_that_names_no_value_is_found_by_splitting(sandbox: Any) -> None:
    # "Property \"no_such_property\" does not exist" names no value: the inputs carrying that property are the
    # ones it speaks of.
    p = provider(sandbox)
    batch = changes(8, "split")
    batch[5] = OpportunityChange("split-00005", {"name": "Odd", "no_such_property": "x"})
    results = p.push_opportunities(batch)
    assert [r.idempotency_key for r in results if not r.ok] == ["split-00005"]
    assert "does not exist" in (results[5].error or "")
    assert len([k for k in _by_key(sandbox) if k.startswith("split-")]) == 7


def test_upsert_results_are_matched_by_trace_id_without_an_echoed_key(sandbox: Any) -> None:
    p = provider(sandbox)
    first = p.push_opportunities(changes(5, "trace"))
    assert all(r.ok for r in first)
    written = _by_key(sandbox)
    assert [r.crm_id for r in first] == [written[f"trace-{i:05d}"]["id"] for i in range(5)]
    # A mixed batch (two known, one new) comes back in another order; each result still finds its record.
    again = p.push_opportunities([*changes(5, "trace")[3:], OpportunityChange("trace-new", {"name": "New"})])
    assert [(r.ok, r.created) for r in again] == [(True, False), (True, False), (True, True)]
    assert [r.crm_id for r in again[:2]] == [first[3].crm_id, first[4].crm_id]
    assert again[2].crm_id == _by_key(sandbox)["trace-new"]["id"]


def test_connection_test_introspects_with_the_current_oauth_api(sandbox: Any) -> None:
    # After the v1 sunset (2027-02-16) GET /oauth/v1/access-tokens/{token} is gone.
    sandbox.http.post("/_sandbox/hubspot/oauth", json={"v1_access_tokens": False}).raise_for_status()
    report = provider(sandbox).test_connection()
    assert report.ok, report.failed_step
    assert report.identity == "sam@hubco.example" and report.crm_user_id == "101"
    assert "2026-03" in report.steps[1].detail


def test_v1_token_info_is_only_a_fallback(sandbox: Any) -> None:
    sandbox.http.post("/_sandbox/hubspot/oauth", json={"introspect": False}).raise_for_status()
    p = provider(sandbox)
    report = p.test_connection()
    assert report.ok, report.failed_step
    assert report.identity == "sam@hubco.example" and "fallback" in report.steps[1].detail
    assert p.fallback_calls_made == 1


def test_sandbox_introspection_answers_inactive_for_unknown_tokens(sandbox: Any) -> None:
    r = sandbox.http.post("/hubspot/oauth/2026-03/token/introspect",
                          data={"client_id": "crmbridge-hubspot-app", "client_secret": "demo-hubspot-app-secret",
                                "token": "not-a-token", "token_type_hint": "access_token"})
    assert r.status_code == 200 and r.json() == {"active": False}
    bad = sandbox.http.post("/hubspot/oauth/2026-03/token/introspect",
                            data={"client_id": "crmbridge-hubspot-app", "client_secret": "wrong", "token": "x"})
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_client"
