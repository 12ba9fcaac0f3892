"""Provider API-efficiency benchmark: calls used to push and pull N opportunities, against the sandbox
process over HTTPS, beside a naive client measured in the same run.

For each CRM our provider pushes N new opportunities (creates sent as upserts on the idempotency key) and
pulls them back (changes since the push began). The minimum the vendor's caps allow is
``ceil(N / largest write) + ceil(N / largest page)``:

    Salesforce   200 records per create/upsert call, 2,000 per query batch      N = 10,000
    Dynamics     1,000 records per bulk message or $batch, 5,000 per page       N =  5,000 (fits one
                 5-minute service-protection window of 6,000 requests, naive client included)
    HubSpot      100 inputs per batch call, 200 results per search page         N = 10,000

``ratio = calls used / that minimum`` (target 1.00). Logins and token fetches are not API calls of the
push/pull and are printed separately; so are the directory reads a provider does once (none here).

The naive client is the same provider with one record per write call and the vendor's default read page
(Salesforce 500, Dynamics 5,000, HubSpot 10), honouring the same rate limits. It pushes 100 records at a
time and stops once ``--naive-budget`` seconds are spent (HubSpot OAuth apps may make 100 calls per 10 s,
so its 11,000 calls for N would take ~18 minutes); a stopped run is a sample: its calls are checked
against ``records + ceil(records / default page)``, the calls for N are that formula (exact), and its
records/s is the sample's.

Run: .venv/bin/python bench/providers.py [--quick] [--naive-budget S]. Finishes within 20 minutes (at most
about 3 x the budget plus a minute). The last line is
``RESULT salesforce_call_ratio=X dynamics_call_ratio=Y hubspot_call_ratio=Z``.

Fallbacks are measured apart (``FALLBACK …`` lines, before the result): calls a provider spends beyond one
per batch when the vendor refuses part of the work the documented way — a HubSpot batch of 100 with one
invalid record (HubSpot fails the whole batch with HTTP 400), and a HubSpot connection test where the
2026-03 token introspection endpoint is missing (the deprecated v1 token info is the fallback).
"""

from __future__ import annotations

import argparse
import math
import ssl
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import ClassVar

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.providers.base import OpportunityChange, Provider  # noqa: E402
from core.providers.config import AccountConfig, HttpTransport  # noqa: E402
from core.providers.dynamics import Dynamics365Provider  # noqa: E402
from core.providers.hubspot import HubSpotProvider  # noqa: E402
from core.providers.transport import CrmUrlPolicy  # noqa: E402
from sandbox.launch import Launched, launch  # noqa: E402

QUIET_SECONDS = 11


class SandboxHandle:
    """What the benchmark needs of a running sandbox (started by ``sandbox.launch``, as in the tests)."""

    def __init__(self, launched: Launched) -> None:
        self.launched, self.base_url = launched, launched.base_url
        self.http = httpx.Client(base_url=self.base_url, timeout=30,
                                 verify=ssl.create_default_context(cafile=str(launched.ca_file)))
        self.http.get("/_sandbox/health").raise_for_status()

    def url(self, path: str = "/") -> str:
        return self.base_url + "/" + path.lstrip("/")

    def transport(self) -> HttpTransport:
        return HttpTransport(verify=str(self.launched.ca_file),
                             url_policy=CrmUrlPolicy.vendors(sandbox_url=self.base_url))


@dataclass
class Vendor:
    key: str
    title: str
    n: int
    write_cap: int
    page_cap: int
    default_page: int
    make: Callable[[SandboxHandle, bool], Provider]
    stage: str

    def minimum(self, n: int) -> int:
        return math.ceil(n / self.write_cap) + math.ceil(n / self.page_cap)


@dataclass
class Run:
    calls: int
    push_calls: int
    pull_calls: int
    auth_calls: int
    pulled: int
    seconds: float
    waits: float


# ------------------------------------------------------------------------------------- providers
def salesforce(sandbox: SandboxHandle, naive: bool) -> Provider:
    from pydantic import SecretStr

    from core.providers.salesforce import SalesforceProvider

    class NaiveSalesforce(SalesforceProvider):
        max_write_batch: ClassVar[int] = 1
        max_page_size: ClassVar[int] = 500  # the SOAP query default without QueryOptions

    cls = NaiveSalesforce if naive else SalesforceProvider
    account = AccountConfig(provider="salesforce", edition="enterprise", instance_url=sandbox.base_url,
                            auth_mode="oauth_client_credentials", label="bigcorp-emea",
                            settings={"client_id": "bigcorp-emea-integration"})
    return cls(account=account, credential={"client_secret": SecretStr("demo-bigcorp-emea-secret")},
               transport=sandbox.transport())


class NaiveDynamics(Dynamics365Provider):
    max_write_batch: ClassVar[int] = 1
    max_page_size: ClassVar[int] = 5000  # no Prefer header: Dataverse's default page is 5,000 too


def dynamics(sandbox: SandboxHandle, naive: bool) -> Provider:
    cls = NaiveDynamics if naive else Dynamics365Provider
    account = AccountConfig(
        provider="dynamics-365", edition="sales-enterprise", instance_url=sandbox.url("/dynamics/dynco"),
        auth_mode="oauth_client_credentials", label="dynco",
        settings={"tenant_id": "6f1c2b9e-5d3a-4c1e-9b7a-d1c0de5a2026", "client_id":
                  "0c1b2a39-8d7e-4f60-a5b4-c3d2e1f0a926", "authority_url": sandbox.url("/entra"),
                  "graph_url": sandbox.url("/graph"), "impersonation": "true"})
    return cls(account=account, credential={"client_secret": "demo-dynco-app-secret"}, transport=sandbox.transport(),
               max_retry_wait=600)


class NaiveHubSpot(HubSpotProvider):
    max_write_batch: ClassVar[int] = 1
    max_page_size: ClassVar[int] = 10  # the search API's default limit


def hubspot(sandbox: SandboxHandle, naive: bool) -> Provider:
    cls = NaiveHubSpot if naive else HubSpotProvider
    account = AccountConfig(provider="hubspot", edition="professional", instance_url=sandbox.url("/hubspot"),
                            auth_mode="oauth_authorization_code", label="hubco",
                            settings={"client_id": "crmbridge-hubspot-app"})
    return cls(account=account, credential={"client_secret": "demo-hubspot-app-secret",
                                            "refresh_token": "demo-hubco-refresh-token"},
               transport=sandbox.transport())


VENDORS = [
    Vendor("salesforce", "Salesforce (SOAP Partner API, zeep)", 10_000, 200, 2000, 500, salesforce, "Prospecting"),
    Vendor("dynamics", "Dynamics 365 (Web API, UpsertMultiple/$batch)", 5_000, 1000, 5000, 5000, dynamics, "Qualify"),
    Vendor("hubspot", "HubSpot (CRM v3 batch + search, OAuth app)", 10_000, 100, 200, 10, hubspot,
           "appointmentscheduled"),
]


# ------------------------------------------------------------------------------------- measuring
def changes(n: int, prefix: str, stage: str) -> list[OpportunityChange]:
    return [OpportunityChange(idempotency_key=f"{prefix}-{i:06d}",
                              fields={"name": f"Bench {prefix} {i}", "stage": stage, "amount": 1000 + i,
                                      "close_date": date(2027, 3, 31)}) for i in range(n)]


def measure(provider: Provider, n: int, prefix: str, stage: str, *, budget: float | None = None,
            chunk: int = 100) -> Run:
    """Push ``n`` new records then pull everything changed since the push began.

    With ``budget`` (the naive client), records are pushed ``chunk`` at a time and pushing stops once the
    budget is spent; the run then covers the records pushed so far (a sample)."""
    # Start with an empty rate-limit window (HubSpot counts 10 s per app, and both clients are the same
    # app), on a whole second, so a pull "since" it never sees the previous run's records (Salesforce
    # filters LastModifiedDate to the second).
    boundary = math.ceil(time.time()) + QUIET_SECONDS
    time.sleep(max(0.0, boundary - time.time()))
    since = datetime.fromtimestamp(boundary, UTC)
    waits_before = sum(getattr(provider, "throttled_waits", []) or [])
    all_changes = changes(n, prefix, stage)
    t0 = time.perf_counter()
    pushed = 0
    step = n if budget is None else chunk
    while pushed < n:
        results = provider.push_opportunities(all_changes[pushed:pushed + step])
        failed = [r for r in results if not r.ok]
        if failed:
            raise SystemExit(f"{type(provider).__name__}: {len(failed)} records failed, first: {failed[0].error}")
        pushed += len(results)
        if budget is not None and time.perf_counter() - t0 > budget:
            break
    push_calls = provider.calls_made
    mine = sum(1 for o in provider.pull_opportunities(since) if (o.external_key or "").startswith(prefix))
    seconds = time.perf_counter() - t0
    if mine != pushed:
        raise SystemExit(f"{type(provider).__name__}: pulled {mine} of the {pushed} records pushed")
    calls = provider.calls_made
    waits = sum(getattr(provider, "throttled_waits", []) or []) - waits_before
    return Run(calls, push_calls, calls - push_calls, provider.auth_calls_made, mine, seconds, waits)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N / 10 for every vendor (a smoke run)")
    ap.add_argument("--naive-budget", type=float, default=150.0,
                    help="seconds of pushing the naive client may spend per CRM before it stops and the run "
                    "is treated as a sample (default 150)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-providers-") as tmp:
        sandbox = SandboxHandle(launch(tls_dir=Path(tmp) / "tls", seed=1234, log_file=Path(tmp) / "sandbox.log"))
        try:
            ratios = run_all(sandbox, quick=args.quick, budget=args.naive_budget)
            hubspot_fallbacks(sandbox)
        finally:
            sandbox.http.close()
            sandbox.launched.stop()
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    print("RESULT " + " ".join(f"{k}_call_ratio={v:.2f}" for k, v in ratios.items()))
    return 0


def run_all(sandbox: SandboxHandle, *, quick: bool, budget: float) -> dict[str, float]:
    ratios: dict[str, float] = {}
    tag = uuid.uuid4().hex[:6]
    print("Push + pull N opportunities per CRM against the sandbox (HTTPS, 127.0.0.1).")
    print("minimum = ceil(N / write cap) + ceil(N / page cap); logins and token fetches are counted apart.\n")
    for v in VENDORS:
        n = v.n // 10 if quick else v.n
        minimum = v.minimum(n)
        ours = measure(v.make(sandbox, False), n, f"{v.key}-{tag}-ours", v.stage)
        ratio = ours.calls / minimum
        ratios[v.key] = ratio
        naive = measure(v.make(sandbox, True), n, f"{v.key}-{tag}-naive", v.stage, budget=budget)
        naive_n = naive.pulled
        naive_calls_n = n + math.ceil(n / v.default_page)
        expected = naive_n + math.ceil(naive_n / v.default_page)
        if naive.calls != expected:
            raise SystemExit(f"{v.key}: naive client used {naive.calls} calls for {naive_n} records, "
                             f"expected {expected}")
        print(f"== {v.title}: N = {n:,}")
        print(f"   caps: {v.write_cap:,} per write call, {v.page_cap:,} per page -> minimum {minimum} calls")
        print(f"   ours : {ours.calls} calls ({ours.push_calls} push + {ours.pull_calls} pull), "
              f"{2 * n / ours.seconds:,.0f} records/s ({ours.seconds:.1f} s, of which {ours.waits:.1f} s "
              f"waiting on rate limits); logins/token fetches: {ours.auth_calls} (not counted)")
        sample = "" if naive_n == n else (f" [stopped at the time budget after {naive_n:,} records: "
                                          f"{naive.calls} calls in {naive.seconds:.1f} s; calls for N are "
                                          f"exact, N would take ~{naive.seconds * n / naive_n / 60:.0f} min]")
        print(f"   naive: {naive_calls_n:,} calls for N ({n:,} one-record writes + "
              f"{math.ceil(n / v.default_page):,} reads of {v.default_page}), "
              f"{2 * naive_n / naive.seconds:,.0f} records/s; logins/token fetches: {naive.auth_calls}{sample}")
        print(f"   ratio: ours / minimum = {ratio:.2f}; naive / ours = {naive_calls_n / ours.calls:,.1f}x\n")
        if v.key == "dynamics":
            dynamics_fallbacks(sandbox, v, n, tag)
    return ratios


def _behaviour(sandbox: SandboxHandle, **body: object) -> None:
    sandbox.http.post("/_sandbox/dynamics/dynco/behaviour", json=body).raise_for_status()


def dynamics_fallbacks(sandbox: SandboxHandle, v: Vendor, n: int, tag: str) -> None:
    """The calls Dynamics fallbacks cost, apart from the ratio (which is counted on the bulk path):

    - a table without UpsertMultiple (0x80040800): one refused UpsertMultiple, then a $batch of single
      upserts per 1,000 (the same cap), so push + pull stays at the minimum plus that one refusal;
    - $batch per-part impersonation ignored: a chunk mixing actors is one $batch whose answer shows no
      createdonbehalfby, then one request per actor; later mixed chunks go per actor directly.
    """
    print("   fallbacks (each on the sandbox's matching mode, counted apart from the ratio):")
    _behaviour(sandbox, unsupported_messages=["UpsertMultiple"])
    try:
        p = dynamics(sandbox, False)
        run = measure(p, n, f"{v.key}-{tag}-nobulk", v.stage)
        spent = getattr(p, "fallback_calls", {})
        print(f"   - table without UpsertMultiple: {run.calls} calls for N = {n:,} ({run.push_calls} push + "
              f"{run.pull_calls} pull; minimum {v.minimum(n)}); calls spent in the fallback: "
              f"{sum(spent.values())} {spent}")
    finally:
        _behaviour(sandbox, unsupported_messages=[])
    actors = ["5d0c1e6a-0000-4000-8000-000000000001", "5d0c1e6a-0000-4000-8000-000000000002",
              "5d0c1e6a-0000-4000-8000-000000000003"]
    per_actor = 300  # three actors' remainders under 1,000 share one mixed chunk
    mixed = [OpportunityChange(idempotency_key=f"{v.key}-{tag}-imp-{a[-1]}-{i:04d}",
                               fields={"name": f"Bench impersonation {i}", "stage": v.stage},
                               act_as_crm_user_id=a) for a in actors for i in range(per_actor)]
    for mode in ("honoured", "ignored"):
        _behaviour(sandbox, batch_part_impersonation=mode)
        try:
            p = dynamics(sandbox, False)
            keys = [f"{c.idempotency_key}-{mode}" for c in mixed]
            results = p.push_opportunities([OpportunityChange(k, c.fields, act_as_crm_user_id=c.act_as_crm_user_id)
                                            for k, c in zip(keys, mixed, strict=True)])
            if not all(r.ok for r in results):
                raise SystemExit(f"dynamics impersonation ({mode}): {sum(not r.ok for r in results)} records failed")
            spent = getattr(p, "fallback_calls", {})
            paths = sorted({r.write_path or "" for r in results})
            print(f"   - {len(mixed)} records of {len(actors)} actors in one chunk, per-part impersonation {mode}: "
                  f"{p.calls_made} calls (1 user lookup + writes); calls spent in the fallback: "
                  f"{sum(spent.values())} {spent}; written via {', '.join(paths)}")
        finally:
            _behaviour(sandbox, batch_part_impersonation="honoured")
    print()


def hubspot_fallbacks(sandbox: SandboxHandle) -> None:
    """Calls spent in HubSpot's fallbacks, counted apart from the ratios."""
    tag = uuid.uuid4().hex[:6]
    provider = hubspot(sandbox, False)
    assert isinstance(provider, HubSpotProvider)
    batch = changes(100, f"hubspot-{tag}-fallback", "appointmentscheduled")
    batch[41] = OpportunityChange(batch[41].idempotency_key, {**batch[41].fields, "stage": "no-such-stage"})
    results = provider.push_opportunities(batch)
    failed = [r.idempotency_key for r in results if not r.ok]
    if failed != [batch[41].idempotency_key]:
        raise SystemExit(f"hubspot fallback: expected only the invalid record to fail, got {failed[:3]}")
    print("== Fallbacks (not in the ratios)")
    print(f"   HubSpot batch of 100 with 1 invalid record: {provider.calls_made} calls "
          f"(1 refused with HTTP 400 + {provider.fallback_calls_made} retry of the 99 valid), 99 written, "
          "1 failed with its own error")
    print(f"FALLBACK hubspot_invalid_record_batch_calls={provider.calls_made} "
          f"hubspot_invalid_record_fallback_calls={provider.fallback_calls_made}")
    sandbox.http.post("/_sandbox/hubspot/oauth", json={"introspect": False}).raise_for_status()
    try:
        probe = hubspot(sandbox, False)
        assert isinstance(probe, HubSpotProvider)
        report = probe.test_connection()
        if not report.ok:
            raise SystemExit(f"hubspot fallback: connection test failed at {report.failed_step}")
        print(f"   HubSpot connection test without the 2026-03 introspection endpoint: "
              f"{probe.fallback_calls_made} fallback call (v1 token info)")
        print(f"FALLBACK hubspot_introspection_fallback_calls={probe.fallback_calls_made}")
    finally:
        sandbox.http.post("/_sandbox/hubspot/oauth", json={"introspect": True}).raise_for_status()


if __name__ == "__main__":
    sys.exit(main())
