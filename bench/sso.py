"""SSO benchmark: the cost of our ACS around python3-saml, and the metadata lint on real material.

acs_ratio      = median time of the ACS route handling a valid signed response, called in-process
                 through the ASGI app (routing, form parsing, the thread-pool hop, safe parse, request-id
                 check and consumption, python3-saml strict validation, clock-skew bound, replay cache,
                 tenant-admin lookup, session row + audit event, commit, cookie) / median time of
                 python3-saml's bare ``OneLogin_Saml2_Auth.process_response`` on the same response with
                 prebuilt settings, in the same run. Target <= 1.3 (issue 18).
lint_median_ms = median over every file in ../shared/samples/idp-metadata of that file's median lint time.
aggregate_ms   = median lint time of the ~940 KB signed SWAMID aggregate (signature verified, one IdP
                 chosen by entity ID). Target < 1,000 ms.

The responses are real: a sandbox IdP (its own RSA key, made at start) signs each one for a fresh
AuthnRequest, as at nine in the morning when a whole company signs in. The three measurements are
interleaved (order alternating) in one process.

Times are taken both as process CPU time and as wall-clock time; ``acs_ratio`` uses CPU time. On a
shared machine, wall-clock time also counts the scheduler's delay each time the ACS hands its work
to the thread pool and back (a design the server needs so that a sign-in does not block the event
loop). That delay is not the cost of our code, and the bare library call never pays it. Both
ratios are printed; on an idle machine they agree.

Run: .venv/bin/python bench/sso.py [--quick]. Fails (exit 1) when ../shared/samples is absent.
The last line is ``RESULT acs_ratio=X lint_median_ms=Y aggregate_ms=Z``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT.parent / "shared" / "samples"
sys.path.insert(0, str(ROOT))
TMP = Path(tempfile.mkdtemp(prefix="crmbridge-bench-sso-"))
atexit.register(shutil.rmtree, TMP, ignore_errors=True)
os.environ["CRMBRIDGE_DATABASE_URL"] = f"sqlite:///{TMP / 'bench.db'}"
os.environ.setdefault("CRMBRIDGE_SECRET_KEY", base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())
os.environ["CRMBRIDGE_VAULT_KEYS"] = json.dumps(
    {"active": "bench-k1", "keys": {"bench-k1": base64.b64encode(secrets.token_bytes(32)).decode()}}
)
os.environ.pop("CRMBRIDGE_DEMO", None)

from onelogin.saml2.auth import OneLogin_Saml2_Auth  # noqa: E402
from sqlmodel import SQLModel, select  # noqa: E402
from starlette.applications import Starlette  # noqa: E402

import core.models  # noqa: E402,F401
from core.db import get_engine, session_scope  # noqa: E402
from core.sso.common import idp_config  # noqa: E402
from core.sso.keys import ensure_sp_keys  # noqa: E402
from core.sso.lint import lint_metadata  # noqa: E402
from core.sso.metadata import apply_import  # noqa: E402
from core.sso.models import SsoConfig  # noqa: E402
from core.sso.routes import binding_cookie_name, binding_value, routes  # noqa: E402
from core.sso.signin import start_login  # noqa: E402
from core.sso.sp import (  # noqa: E402
    build_settings_dict,
    cached_schema,
    make_settings,
    request_data_for,
    sp_endpoints,
)
from core.tenants.access import Principal  # noqa: E402
from core.tenants.models import ConsoleAccount, Tenant  # noqa: E402
from sandbox.idp import SamlIdp  # noqa: E402

STAFF = Principal.system("bench")
AGGREGATE = "swamid-federation-signed-entitiesdescriptor-aggregate.xml"
UMU = "https://idp.umu.se/saml2/idp/metadata.php"


def _ms(seconds: float) -> float:
    return seconds * 1000.0


async def call_asgi(app: Any, path: str, body: bytes, *, request_id: str = "",
                    n: int = 0) -> tuple[int, dict[str, str]]:
    """POST ``body`` to ``path`` through the ASGI app, in-process (what uvicorn hands the app), from the
    browser that started ``request_id`` (its login-CSRF binding cookie), as the ``n``-th of a company's
    employees (each from their own address: the ACS limits posts per address)."""
    headers = [(b"host", b"127.0.0.1:8501"), (b"content-type", b"application/x-www-form-urlencoded"),
               (b"content-length", str(len(body)).encode())]
    if request_id:
        headers.append((b"cookie", f"{binding_cookie_name(request_id)}={binding_value(request_id)}".encode()))
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": headers, "client": (f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}", 50000),
        "server": ("127.0.0.1", 8501),
    }
    sent = False
    status = 0
    headers: dict[str, str] = {}

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            for k, v in message.get("headers", []):
                headers[k.decode().lower()] = v.decode()

    await app(scope, receive, send)
    return status, headers


def setup(idp: SamlIdp) -> tuple[int, Any]:
    engine = get_engine()
    SQLModel.metadata.create_all(engine)
    with session_scope() as s:
        t = Tenant(name="BigCorp", slug="bigcorp", status="live")
        s.add(t)
        s.flush()
        s.add(ConsoleAccount(email="admin@bigcorp.example", role="tenant_admin", tenant_id=t.id, name="Bea"))
        apply_import(session=s, principal=STAFF, tenant_id=t.id, data=idp.metadata_xml("bigcorp"))  # type: ignore[arg-type]
        ensure_sp_keys(session=s, principal=STAFF, tenant_id=t.id)  # type: ignore[arg-type]
        tenant_id = t.id
    with session_scope() as s:
        config = s.exec(select(SsoConfig).where(SsoConfig.tenant_id == tenant_id)).one()
        # The same settings our ACS builds (strict), prebuilt once: python3-saml's best case.
        d = build_settings_dict(sp=sp_endpoints("bigcorp"), idp=idp_config(config))
        d["security"]["authnRequestsSigned"] = False
        settings = make_settings(d)
    return tenant_id, settings  # type: ignore[return-value]


def fresh_response(idp: SamlIdp) -> tuple[str, str]:
    """A new AuthnRequest from the console and the IdP's signed answer to it."""
    with session_scope() as s:
        start = start_login(session=s, tenant_slug="bigcorp", relay_state="/")
    ep = sp_endpoints("bigcorp")
    b64 = idp.issue_response("bigcorp", email="admin@bigcorp.example", acs_url=ep.acs_url, audience=ep.entity_id,
                             in_response_to=start.request_id)
    return start.request_id, b64


Timing = dict[str, list[float]]


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _record(times: Timing, key: str, start: tuple[float, float]) -> None:
    wall, cpu = _clock()
    times.setdefault(f"{key}_wall", []).append(wall - start[0])
    times.setdefault(f"{key}_cpu", []).append(cpu - start[1])


def bench_acs(idp: SamlIdp, n: int, warmup: int) -> dict[str, float]:
    _, settings = setup(idp)
    app = Starlette(routes=routes)
    rd = request_data_for(sp_endpoints("bigcorp").acs_url)
    times: Timing = {}

    def bare(request_id: str, b64: str, *, key: str, cached: bool = False) -> None:
        data = dict(rd)
        data["post_data"] = {"SAMLResponse": b64}
        with cached_schema(cached):
            t0 = _clock()
            auth = OneLogin_Saml2_Auth(data, old_settings=settings)
            auth.process_response(request_id=request_id)
            if key:
                _record(times, key, t0)
        if auth.get_errors() or not auth.is_authenticated():
            raise SystemExit(f"bare python3-saml refused the response: {auth.get_last_error_reason()}")

    async def run() -> None:
        for i in range(warmup + n):
            request_id, b64 = fresh_response(idp)
            body = urlencode({"SAMLResponse": b64, "RelayState": "/"}).encode()
            order = (0, 1, 2) if i % 2 == 0 else (2, 1, 0)  # alternate which goes first
            measured = i >= warmup
            for which in order:
                if which == 0:
                    t0 = _clock()
                    status, headers = await call_asgi(app, "/sso/bigcorp/acs", body, request_id=request_id, n=i)
                    if measured:
                        _record(times, "acs", t0)
                    if status != 303 or "crmbridge_session=" not in headers.get("set-cookie", ""):
                        raise SystemExit(f"the ACS refused a valid response (HTTP {status})")
                elif which == 1:
                    bare(request_id, b64, key="bare" if measured else "")
                else:
                    bare(request_id, b64, key="cached" if measured else "", cached=True)
            # A replay through the ACS must fail: the benchmark measures the real, defended path.
            if i == warmup:
                status, _ = await call_asgi(app, "/sso/bigcorp/acs", body, request_id=request_id, n=i)
                if status != 403:
                    raise SystemExit(f"replay was not refused (HTTP {status})")

    asyncio.run(run())
    return {k: statistics.median(v) for k, v in times.items()}


def bench_lint(repeat: int) -> tuple[float, float, int]:
    md_dir = SAMPLES / "idp-metadata"
    per_file: list[float] = []
    for path in sorted(md_dir.iterdir()):
        data = path.read_bytes()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            lint_metadata(data)
            times.append(time.perf_counter() - t0)
        per_file.append(statistics.median(times))
    agg = (md_dir / AGGREGATE).read_bytes()
    agg_times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        report = lint_metadata(agg, entity_id=UMU)
        agg_times.append(time.perf_counter() - t0)
    if not (report.usable and report.signature["valid"]):
        raise SystemExit("the SWAMID aggregate did not lint as usable with a valid signature")
    return statistics.median(per_file), statistics.median(agg_times), len(per_file)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    args = parser.parse_args()
    if not (SAMPLES / "idp-metadata" / AGGREGATE).is_file():
        print(f"FAIL: the real samples are absent ({SAMPLES}): bench/sso.py needs ../shared/samples", file=sys.stderr)
        return 1
    n, warmup, repeat = (40, 10, 3) if args.quick else (300, 30, 7)
    idp = SamlIdp(base_url="https://127.0.0.1:8502", tenants=("bigcorp",))
    t0 = time.perf_counter()
    m = bench_acs(idp, n, warmup)
    lint_median, aggregate, files = bench_lint(repeat)
    ratio = m["acs_cpu"] / m["bare_cpu"]
    print(f"ACS route (ASGI in-process, {n} sign-ins), median: {_ms(m['acs_cpu']):.2f} ms CPU, "
          f"{_ms(m['acs_wall']):.2f} ms wall")
    print(f"python3-saml process_response (prebuilt settings, same responses), median: {_ms(m['bare_cpu']):.2f} ms "
          f"CPU, {_ms(m['bare_wall']):.2f} ms wall")
    print(f"acs_ratio by CPU time {ratio:.2f}; by wall-clock time {m['acs_wall'] / m['bare_wall']:.2f} (target <= 1.3)")
    print(f"like for like: python3-saml with the ACS's compiled-schema cache: median {_ms(m['cached_cpu']):.2f} ms "
          f"CPU; ACS / that = {m['acs_cpu'] / m['cached_cpu']:.2f} (the ACS validates against python3-saml's own "
          "XSD compiled once per thread; python3-saml as shipped re-compiles it for every response)")
    print(f"lint: {files} sample metadata files, median of per-file medians {_ms(lint_median):.2f} ms")
    print(f"lint: {AGGREGATE} ({(SAMPLES / 'idp-metadata' / AGGREGATE).stat().st_size / 1024:.0f} KB, signature "
          f"verified, --entity-id {UMU}): median {_ms(aggregate):.1f} ms (target < 1000 ms)")
    print(f"total {time.perf_counter() - t0:.1f} s")
    print(f"RESULT acs_ratio={ratio:.2f} lint_median_ms={_ms(lint_median):.2f} aggregate_ms={_ms(aggregate):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
