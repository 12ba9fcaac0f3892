"""Dynamics 365 fidelity: real Dataverse Web API answers (tests/fidelity/dynamics, sources in SOURCES.md) go
through the provider's own parsers, and the sandbox's answers to the same requests have the same shape
(status, key headers, field names, nesting)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.errors import RecordError
from core.providers.base import OpportunityChange
from core.providers.config import AccountConfig, HttpTransport
from core.providers.dynamics import Dynamics365Provider, error_for_response, parse_batch_response, parse_whoami
from tests.core.providers.test_dynamics_sandbox import ENV, raw_token

HERE = Path(__file__).parent / "dynamics"
ORG = "https://yourorg.crm.dynamics.com"


def http_file(name: str) -> tuple[int, dict[str, str], bytes]:
    """(status, headers lower-cased, body) of a captured ``HTTP/1.1 …`` answer."""
    raw = (HERE / name).read_bytes()
    head, _, body = raw.partition(b"\n\n")
    lines = head.decode().splitlines()
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body.strip()


def mock_provider(handler: Any) -> Dynamics365Provider:
    """The real provider over an httpx mock transport that serves the captured answers."""

    def route(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/oauth2/v2.0/token"):
            return httpx.Response(200, json={"token_type": "Bearer", "expires_in": 3599, "access_token": "t"})
        return handler(request)  # type: ignore[no-any-return]

    acct = AccountConfig(provider="dynamics-365", edition="sales-enterprise", instance_url=ORG,
                         auth_mode="oauth_client_credentials", label="fidelity",
                         settings={"tenant_id": "00000000-0000-0000-0000-00000000000a", "client_id": "c"})
    client = httpx.Client(transport=httpx.MockTransport(route))
    return Dynamics365Provider(account=acct, credential={"client_secret": "s"},
                               transport=HttpTransport(httpx_client=client))


def multipart_shape(body: bytes, boundary: str) -> list[Any]:
    """A vendor-neutral outline of a multipart/mixed batch answer, read independently of our parsers:
    per part its header names, and either the nested change set's outline or (status, header names, JSON keys)."""
    out: list[Any] = []
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, rest = re.split(rb"\r?\n\r?\n", chunk.lstrip(b"\r\n"), maxsplit=1)
        headers = {ln.split(":", 1)[0].strip().lower(): ln.split(":", 1)[1].strip()
                   for ln in head.decode().splitlines() if ":" in ln}
        m = re.search(r"boundary=([^;\s]+)", headers.get("content-type", ""))
        if m:
            out.append(("changeset", m.group(1).split("_")[0], multipart_shape(rest, m.group(1))))
            continue
        status_line, _, after = rest.partition(b"\n")
        parts = re.split(rb"\r?\n\r?\n", after, maxsplit=1)
        inner_head, inner_body = (parts[0], parts[1]) if len(parts) == 2 else (parts[0], b"")
        inner = sorted(ln.split(":", 1)[0].strip().lower() for ln in inner_head.decode().splitlines() if ":" in ln)
        text = inner_body.strip()
        keys = sorted(json.loads(text)) if text else None
        out.append((sorted(k for k in headers if k != "content-id"), "content-id" in headers,
                    int(status_line.split()[1]), inner, keys))
    return out


# --------------------------------------------------------------------------- real bodies through our parsers
def test_real_whoami_answer_through_the_provider() -> None:
    status, headers, body = http_file("whoami_response.http")
    p = mock_provider(lambda req: httpx.Response(status, headers=headers, content=body))
    ids = p.whoami()
    assert ids == {"UserId": "24e34f5e-7f1a-43fe-88da-7e4b862d51ad",
                   "BusinessUnitId": "1647bf36-e90a-4c4d-9b61-969d57ce7a66",
                   "OrganizationId": "648e8efd-db86-466e-a5bc-a4d5eb9c52d4"}
    usage = p.api_usage()
    assert usage is not None and (usage.remaining, usage.used, usage.limit) == (5999, 1, 6000)
    assert parse_whoami(json.loads(body)) == ids


@pytest.mark.parametrize(("name", "boundary", "statuses"), [
    ("batch_response_changeset_and_get.txt", "batchresponse_c1bd45c1-dd81-470d-b897-e965846aad2f", [204, 204, 200]),
    ("batch_response_changeset_no_location.txt", "batchresponse_2cb48f48-39a8-41ea-aa52-132fa8ab3c2d", [204, 204]),
])
def test_real_lf_batch_answers_through_the_batch_parser(name: str, boundary: str, statuses: list[int]) -> None:
    """Microsoft's published batch answers use bare LF line ends (issue 13 point 5)."""
    raw = (HERE / name).read_bytes()
    assert b"\r\n" not in raw
    answers = parse_batch_response(httpx.Response(
        200, headers={"Content-Type": f"multipart/mixed; boundary={boundary}"}, content=raw))
    assert [a[0] for a in answers] == statuses
    assert answers[0][1]["odata-version"] == "4.0"
    if statuses[-1] == 200:
        assert answers[0][1]["odata-entityid"].endswith("tasks(a59c24f3-fafc-e411-80dd-00155d2a68cb)")
        assert answers[0][2] == b""
        rows = json.loads(answers[2][2])["value"]
        assert [r["subject"] for r in rows][:2] == ["Task Created with Test Account", "Task 1"]
    else:
        assert answers[1][1] == {"odata-version": "4.0"} and answers[1][2] == b""


def test_real_page_answer_shape_is_what_the_pager_reads() -> None:
    status, headers, body = http_file("query_page_response.http")
    data = json.loads(body)
    assert status == 200 and headers["preference-applied"] == "odata.maxpagesize=2"
    assert set(data) == {"@odata.context", "value", "@odata.nextLink"}
    assert "$skiptoken=" in data["@odata.nextLink"]


def test_real_key_in_body_error_maps_to_a_record_error() -> None:
    status, _, body = http_file("upsertmultiple_create_path_key_in_body_error.http")
    err = error_for_response(httpx.Response(status, content=body), record_key="k-1")
    assert isinstance(err, RecordError) and err.code == "0x80040216" and err.record_key == "k-1"


def test_real_upsertmultiple_204_is_success_for_every_record() -> None:
    status, _, body = http_file("upsertmultiple_response.http")
    assert (status, body) == (204, b"")
    seen: list[dict[str, Any]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(json.loads(req.content))
        return httpx.Response(status, content=body)

    p = mock_provider(handler)
    results = p.push_opportunities([OpportunityChange(f"k-{i}", {"name": f"n{i}"}) for i in range(3)])
    assert all(r.ok for r in results) and p.calls_made == 1
    target = seen[0]["Targets"][0]
    assert target["@odata.id"] == "opportunities(crb_idempotencykey='k-0')"
    assert "crb_idempotencykey" not in target  # the key travels in @odata.id only


# --------------------------------------------------------------------------- the sandbox answers alike
def _auth(sandbox: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {raw_token(sandbox)}", "Accept": "application/json",
            "OData-MaxVersion": "4.0", "OData-Version": "4.0"}


def test_sandbox_whoami_has_the_real_shape(sandbox: Any) -> None:
    status, headers, body = http_file("whoami_response.http")
    r = sandbox.http.get(f"/dynamics/{ENV}/api/data/v9.2/WhoAmI", headers=_auth(sandbox))
    assert r.status_code == status
    assert r.headers["content-type"] == headers["content-type"]
    for h in ("odata-version", "x-ms-ratelimit-burst-remaining-xrm-requests",
              "x-ms-ratelimit-time-remaining-xrm-requests"):
        assert h in r.headers, h
    real = json.loads(body)
    assert set(r.json()) == set(real)
    assert r.json()["@odata.context"].endswith("/api/data/v9.2/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse")


def test_sandbox_batch_answer_has_the_real_shape(sandbox: Any) -> None:
    """The request of Microsoft's example (a change set of two creates, then a GET), sent with LF line ends."""
    real = multipart_shape((HERE / "batch_response_changeset_and_get.txt").read_bytes(),
                           "batchresponse_c1bd45c1-dd81-470d-b897-e965846aad2f")
    cs = "changeset_dd81ccab"
    req = (f"--batch_AAA123\nContent-Type: multipart/mixed; boundary={cs}\n\n"
           f"--{cs}\nContent-Type: application/http\nContent-Transfer-Encoding: binary\nContent-ID: 1\n\n"
           "POST /api/data/v9.2/opportunities HTTP/1.1\nContent-Type: application/json\n\n{\"name\": \"Task 1\"}\n"
           f"--{cs}\nContent-Type: application/http\nContent-Transfer-Encoding: binary\nContent-ID: 2\n\n"
           "POST /api/data/v9.2/opportunities HTTP/1.1\nContent-Type: application/json\n\n{\"name\": \"Task 2\"}\n"
           f"--{cs}--\n"
           "--batch_AAA123\nContent-Type: application/http\nContent-Transfer-Encoding: binary\n\n"
           "GET /api/data/v9.2/opportunities?$select=name&$top=2 HTTP/1.1\nAccept: application/json\n\n"
           "--batch_AAA123--\n")
    r = sandbox.http.post(f"/dynamics/{ENV}/api/data/v9.2/$batch", content=req.encode(),
                          headers={**_auth(sandbox), "Content-Type": "multipart/mixed; boundary=batch_AAA123"})
    assert r.status_code == 200
    m = re.match(r"multipart/mixed; boundary=(batchresponse_[0-9a-f-]+)$", r.headers["content-type"])
    assert m, r.headers["content-type"]
    ours = multipart_shape(r.content, m.group(1))
    assert ours == real


def test_sandbox_page_answer_has_the_real_shape(sandbox: Any) -> None:
    status, headers, body = http_file("query_page_response.http")
    real = json.loads(body)
    r = sandbox.http.get(f"/dynamics/{ENV}/api/data/v9.2/opportunities?$select=name",
                         headers={**_auth(sandbox), "Prefer": "odata.maxpagesize=2"})
    assert r.status_code == status
    assert r.headers["preference-applied"] == headers["preference-applied"]
    assert set(r.json()) == set(real)
    assert set(r.json()["value"][0]) == {"@odata.etag", "name", "opportunityid"}  # etag, selected, key
    assert set(real["value"][0]) == {"@odata.etag", "fullname", "contactid"}
    assert "$skiptoken=" in r.json()["@odata.nextLink"] and "pagenumber" in r.json()["@odata.nextLink"]


def test_sandbox_upsertmultiple_answers_as_the_real_service(sandbox: Any) -> None:
    url = f"/dynamics/{ENV}/api/data/v9.2/opportunities/Microsoft.Dynamics.CRM.UpsertMultiple"
    t = {"@odata.type": "Microsoft.Dynamics.CRM.opportunity", "name": "fid",
         "@odata.id": "opportunities(crb_idempotencykey='fid-1')"}
    ok_status, _, ok_body = http_file("upsertmultiple_response.http")
    r = sandbox.http.post(url, json={"Targets": [t]}, headers=_auth(sandbox))
    assert (r.status_code, r.content) == (ok_status, ok_body)
    err_status, _, err_body = http_file("upsertmultiple_create_path_key_in_body_error.http")
    r = sandbox.http.post(url, json={"Targets": [{**t, "@odata.id": "opportunities(crb_idempotencykey='fid-2')",
                                                   "crb_idempotencykey": "fid-2"}]}, headers=_auth(sandbox))
    assert r.status_code == err_status and r.json() == json.loads(err_body)
