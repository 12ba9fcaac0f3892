"""Issue 14, Medium 3 and 4: the CRM URL is no SSRF or credential-exfiltration channel, and a CRM's answer
cannot exhaust memory or hold a call open.

Each test performs the attack against the code a user reaches (adding an account, a connection test, a
connect-link credential check, the transports providers use) and shows it does no harm. The hostile
servers are real sockets on 127.0.0.1 that count what they managed to send or receive.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpcore
import pytest

from core.connections import service
from core.errors import ConfigurationError, InvalidInput, MalformedResponse, ProviderError
from core.providers.config import AccountConfig, HttpTransport
from core.providers.salesforce import SalesforceProvider
from core.providers.transport import (
    CallDeadlineExceeded,
    CrmUrlPolicy,
    CrmUrlRefused,
    GuardedTransport,
    ResponseTooLarge,
    guarded_client,
    host_matches,
)
from core.settings import get_settings
from core.tenants.models import CrmAccount
from core.vault import service as vault
from tests.conftest import admin_of, make_app_user


# -- a hostile HTTP server on 127.0.0.1 ------------------------------------------------------------
@dataclass
class Hostile:
    """Answers every request the way ``mode`` says and records what happened."""

    mode: str
    total: int = 64 * 1024 * 1024  # what a "huge" server is willing to send
    drip_every: float = 0.3
    drip_max: int = 40
    port: int = 0
    requests: list[bytes] = field(default_factory=list)
    sent_body: int = 0
    _sock: socket.socket | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Hostile:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()

    def _serve(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(rest) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                rest += chunk
            self.requests.append(head + b"\r\n\r\n" + rest)
            try:
                getattr(self, "_" + self.mode)(conn)
            except OSError:  # the client hung up: exactly what the defence should do
                return

    def _huge(self, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
        block = b"[" + b"0," * 32767 + b"0"
        while self.sent_body < self.total:
            conn.sendall(block)
            self.sent_body += len(block)

    def _declared(self, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400000000\r\n\r\n")
        block = b"0" * 65536
        while self.sent_body < self.total:
            conn.sendall(block)
            self.sent_body += len(block)

    def _bomb(self, conn: socket.socket) -> None:
        body = gzip.compress(b"0" * self.total, 9)  # ~64 KB on the wire, 64 MB once decoded
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        self.sent_body = len(body)

    def _drip(self, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {self.drip_max}\r\n\r\n".encode())
        for _ in range(self.drip_max):
            time.sleep(self.drip_every)
            conn.sendall(b" ")
            self.sent_body += 1

    def _drip_headers(self, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        for _ in range(self.drip_max):
            time.sleep(self.drip_every)
            conn.sendall(b"X")
            self.sent_body += 1
        conn.sendall(b": y\r\nContent-Length: 0\r\n\r\n")

    def _ok(self, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")


@pytest.fixture
def hostile() -> Iterator[Any]:
    made: list[Hostile] = []

    def make(mode: str, **kw: Any) -> Hostile:
        h = Hostile(mode, **kw).start()
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()


def _transport(h: Hostile, **kw: Any) -> HttpTransport:
    """A transport allowed to call the hostile server (named explicitly, as the test sandbox is)."""
    return HttpTransport(url_policy=CrmUrlPolicy.vendors(sandbox_url=h.origin), **kw)


@pytest.fixture
def outside_demo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The product's settings outside demo mode, with no sandbox configured."""
    for name in ("CRMBRIDGE_DEMO", "CRMBRIDGE_SANDBOX_CA_FILE", "CRMBRIDGE_SANDBOX_URL"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


# -- Medium 3: where a CRM URL may point ----------------------------------------------------------
HOSTILE_URLS = [
    "https://127.0.0.1:8502/salesforce/acme",
    "https://127.0.0.1:8443",
    "https://10.1.2.3/",
    "https://169.254.169.254/latest/meta-data/",
    "https://evil.example.com",
    "https://acme.my.salesforce.com.evil.example.com",
    "https://evil.example.com/acme.my.salesforce.com",
    "https://acme.my.salesforce.com:8443",
    "https://user:pw@acme.my.salesforce.com",
    "https://localhost",
    "https://[::ffff:10.0.0.1]/",
]


@pytest.mark.parametrize("url", HOSTILE_URLS)
def test_a_tenant_admin_cannot_add_a_crm_account_outside_the_vendors_hosts(session, tenant, outside_demo, url):
    admin = admin_of(tenant)
    with pytest.raises(InvalidInput) as exc:
        service.add_crm_account_settings(
            session=session, principal=admin, tenant_id=tenant.id, provider="salesforce", edition="enterprise",
            label="Planted", auth_mode="oauth_client_credentials", values={"instance_url": url, "client_id": "x"})
    text = str(exc.value)
    assert "refused" in text and "*.my.salesforce.com" in text, text  # what is wrong and what to enter
    assert session.query(CrmAccount).count() == 0  # nothing was stored


def test_every_url_field_of_an_account_is_held_to_its_vendor(session, tenant, outside_demo):
    admin = admin_of(tenant)
    with pytest.raises(InvalidInput, match="Token authority.*evil.example.com|evil.example.com.*refused"):
        service.add_crm_account_settings(
            session=session, principal=admin, tenant_id=tenant.id, provider="dynamics-365",
            edition="sales-enterprise", label="Dyn", auth_mode="oauth_client_credentials",
            values={"instance_url": "https://contoso.crm4.dynamics.com",
                    "tenant_id": "6f1c2b9e-5d3a-4c1e-9b7a-d1c0de5a2026",
                    "client_id": "0c1b2a39-8d7e-4f60-a5b4-c3d2e1f0a926",
                    "authority_url": "https://evil.example.com"})
    with pytest.raises(InvalidInput, match="refused"):  # the page where HubSpot admins approve the install
        service.add_crm_account_settings(
            session=session, principal=admin, tenant_id=tenant.id, provider="hubspot", edition="professional",
            label="Hub", auth_mode="oauth_authorization_code",
            values={"instance_url": "https://api.hubapi.com", "client_id": "c",
                    "authorize_url": "https://evil.example.com/oauth/authorize"})
    with pytest.raises(InvalidInput, match="refused"):  # another vendor's host is not this vendor's
        service.add_crm_account_settings(
            session=session, principal=admin, tenant_id=tenant.id, provider="salesforce", edition="enterprise",
            label="SF", auth_mode="oauth_client_credentials",
            values={"instance_url": "https://contoso.crm.dynamics.com", "client_id": "c"})
    assert session.query(CrmAccount).count() == 0
    for provider, edition, mode, values in [
        ("salesforce", "enterprise", "oauth_client_credentials",
         {"instance_url": "https://acme--uat.sandbox.my.salesforce.com", "client_id": "c"}),
        ("dynamics-365", "sales-enterprise", "oauth_client_credentials",
         {"instance_url": "https://contoso.api.crm4.dynamics.com", "tenant_id": "6f1c2b9e-5d3a-4c1e-9b7a-d1c0de5a2026",
                    "client_id": "0c1b2a39-8d7e-4f60-a5b4-c3d2e1f0a926"}),
        ("hubspot", "professional", "oauth_authorization_code", {"instance_url": "https://api.hubapi.com",
                                                                  "client_id": "c"}),
    ]:
        service.add_crm_account_settings(session=session, principal=admin, tenant_id=tenant.id, provider=provider,
                                         edition=edition, label=provider, auth_mode=mode, values=values)
    assert session.query(CrmAccount).count() == 3


def test_the_sandbox_is_allowed_in_demo_mode_only_and_only_its_own_origin(session, tenant, monkeypatch):
    monkeypatch.delenv("CRMBRIDGE_SANDBOX_CA_FILE", raising=False)
    monkeypatch.setenv("CRMBRIDGE_SANDBOX_URL", "https://127.0.0.1:8502")
    admin = admin_of(tenant)

    def add(url: str, label: str) -> CrmAccount:
        return service.add_crm_account_settings(
            session=session, principal=admin, tenant_id=tenant.id, provider="salesforce", edition="enterprise",
            label=label, auth_mode="oauth_client_credentials", values={"instance_url": url, "client_id": "x"})

    monkeypatch.delenv("CRMBRIDGE_DEMO", raising=False)
    get_settings.cache_clear()
    try:
        with pytest.raises(InvalidInput, match="refused"):
            add("https://127.0.0.1:8502/salesforce/acme", "Outside demo")
        monkeypatch.setenv("CRMBRIDGE_DEMO", "1")
        get_settings.cache_clear()
        assert add("https://127.0.0.1:8502/salesforce/acme", "Demo").id
        with pytest.raises(InvalidInput, match="refused"):  # another loopback port is not the sandbox
            add("https://127.0.0.1:9999/salesforce/acme", "Other port")
    finally:
        get_settings.cache_clear()


def test_host_patterns_match_whole_labels_only():
    assert host_matches("acme.my.salesforce.com", "*.my.salesforce.com")
    assert host_matches("acme--uat.sandbox.my.salesforce.com", "*.my.salesforce.com")
    assert host_matches("contoso.crm11.dynamics.com", "*.crm*.dynamics.com")
    assert host_matches("contoso.api.crm.dynamics.com", "*.crm*.dynamics.com")
    assert not host_matches("my.salesforce.com", "*.my.salesforce.com")
    assert not host_matches("acme.my.salesforce.com.evil.com", "*.my.salesforce.com")
    assert not host_matches("evilmy.salesforce.com", "*.my.salesforce.com")
    assert not host_matches("contoso.crm.dynamics.com.evil", "*.crm*.dynamics.com")
    assert not host_matches("contoso.crmx.dynamics.com.", "*.crm.dynamics.com")


def test_a_planted_account_url_gets_no_request_and_no_secret(session, tenant, vault_keys, hostile, outside_demo):
    """An account row that already points at an attacker's server (added before this check, or edited in
    the database): the connection test and a connect-link credential check send it nothing."""
    trap = hostile("ok")
    account = CrmAccount(tenant_id=tenant.id, provider="salesforce", edition="enterprise", label="Planted",
                         credential_mode="per_user_password", instance_url=f"{trap.origin}/salesforce/acme",
                         settings_json=json.dumps({"auth_mode": "password"}))
    session.add(account)
    session.commit()
    user = make_app_user(session, tenant)
    vault.put(session, principal=admin_of(tenant), tenant_id=tenant.id, purpose="crm-login",
              secret=json.dumps({"username": "ana@acme.example", "password": "hunter2-stored"}),
              crm_account_id=account.id, app_user_id=user.id, kind="password")
    session.commit()
    report = service.test_crm_account(session=session, principal=admin_of(tenant), account_id=account.id)
    assert not report.ok and "refused" in report.steps[0].detail
    with pytest.raises(ConfigurationError, match="refused"):  # what a connect link runs before storing
        service.check_credential(session=session, principal=admin_of(tenant), account_id=account.id,
                                 fields={"username": "ana@acme.example", "password": "hunter2-typed"})
    assert trap.requests == []  # the trap never heard from us: no scan, no password


def test_a_vendor_name_resolving_inward_is_not_connected_to(session, tenant, vault_keys):
    """DNS for an allowed host name that points at the metadata service or the LAN is refused at connect."""
    for ip, word in (("169.254.169.254", "link-local"), ("10.0.0.7", "private"), ("127.0.0.1", "loopback")):
        transport = HttpTransport(url_policy=CrmUrlPolicy.vendors(), resolver=lambda host, port, ip=ip: [ip])
        with pytest.raises(CrmUrlRefused, match=f"resolves to {ip}, a {word} address"):
            transport.client().get("https://acme.my.salesforce.com/services/data/")
        with pytest.raises(CrmUrlRefused, match=word):  # the zeep / simple-salesforce path too
            transport.session().get("https://acme.my.salesforce.com/services/data/")


@dataclass
class _Recorder(httpcore.NetworkBackend):
    """Stands in for the network: records where we connect and which name the TLS handshake carries."""

    connected: list[tuple[str, int]] = field(default_factory=list)
    tls_names: list[str | None] = field(default_factory=list)

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        self.connected.append((host, port))
        recorder = self

        class _Stream(httpcore.NetworkStream):
            def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                          timeout: float | None = None) -> httpcore.NetworkStream:
                recorder.tls_names.append(server_hostname)
                raise httpcore.ConnectError("recorded; no real network in this test")

            def close(self) -> None:
                pass

        return _Stream()


def test_dns_rebinding_cannot_redirect_the_call_to_an_internal_address():
    answers = iter([["93.184.216.34"], ["127.0.0.1"], ["127.0.0.1"]])  # public at check time, then inward
    asked: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        asked.append(host)
        return next(answers)

    net = _Recorder()
    transport = GuardedTransport(policy=CrmUrlPolicy.vendors(), resolver=rebinding, network_backend=net)
    with guarded_client(transport, user_agent="t") as client, pytest.raises(Exception, match="recorded"):
        client.get("https://acme.my.salesforce.com/services/data/")
    assert asked == ["acme.my.salesforce.com"]  # resolved once
    assert net.connected == [("93.184.216.34", 443)]  # connected to the checked address, never 127.0.0.1
    assert net.tls_names == ["acme.my.salesforce.com"]  # while SNI and the certificate check name the host


def test_a_url_the_crm_hands_back_is_held_to_the_vendors_hosts(hostile):
    """A redirect (or a token response's instance_url) to another host is refused at call time."""
    trap = hostile("ok")
    transport = HttpTransport(url_policy=CrmUrlPolicy.vendors())
    with pytest.raises(CrmUrlRefused, match="127.0.0.1 is an IP address"):
        transport.client().get(f"https://127.0.0.1:{trap.port}/services/oauth2/token")
    with pytest.raises(CrmUrlRefused, match="evil.example.com is not one of the vendor's hosts"):
        transport.session().post("https://evil.example.com/services/oauth2/token", data={"password": "x"})
    assert trap.requests == []


def test_a_provider_refuses_to_be_built_for_a_foreign_url():
    account = AccountConfig(provider="salesforce", edition="enterprise", instance_url="https://10.0.0.5",
                            auth_mode="oauth_client_credentials", settings={"client_id": "c"})
    with pytest.raises(ConfigurationError, match="refused"):
        SalesforceProvider(account=account, credential={"client_secret": "s"}, transport=HttpTransport())


# -- Medium 4: bounded answers ---------------------------------------------------------------------
CAP = 1_000_000


def test_a_huge_answer_is_cut_off_right_after_the_cap_on_both_paths(hostile):
    for path in ("httpx", "requests"):
        server = hostile("huge")  # willing to send 64 MB with no Content-Length
        transport = _transport(server, max_response_bytes=CAP)
        get = transport.client().get if path == "httpx" else transport.session().get
        with pytest.raises(ResponseTooLarge, match="more than 1 MB in one response; CRM Bridge stopped reading"):
            get(f"{server.origin}/api/data/v9.2/opportunities")
        transport.close()
        time.sleep(0.2)  # let the server notice the hang-up (it counts what it got out)
        # The read stopped right after the cap: what left the server is the cap plus socket buffers,
        # not the 64 MB it offered (memory stays bounded the same way).
        assert server.sent_body < CAP + 12_000_000, (path, server.sent_body)


def test_a_declared_oversize_answer_is_refused_before_reading(hostile):
    server = hostile("declared")
    transport = _transport(server, max_response_bytes=CAP)
    with pytest.raises(ResponseTooLarge):
        transport.client().get(f"{server.origin}/x")
    transport.close()


def test_a_compressed_bomb_is_capped_after_decompression(hostile):
    for path in ("httpx", "requests"):
        server = hostile("bomb")  # 64 KB gzip that decodes to 64 MB
        transport = _transport(server, max_response_bytes=CAP)
        get = transport.client().get if path == "httpx" else transport.session().get
        with pytest.raises(ResponseTooLarge):
            get(f"{server.origin}/x")
        transport.close()


def test_a_slow_drip_is_cut_off_at_the_calls_deadline(hostile):
    """One byte every 0.3 s never trips a per-read timeout of 1 s; the whole call still ends at 1 s."""
    for mode in ("drip", "drip_headers"):
        for path in ("httpx", "requests"):
            server = hostile(mode, drip_every=0.3, drip_max=40)  # 12 s of dripping if nobody stops it
            transport = _transport(server, timeout=1.0)
            get = transport.client().get if path == "httpx" else transport.session().get
            with pytest.raises(CallDeadlineExceeded, match="within 1 s"):
                get(f"{server.origin}/x")
            transport.close()
            assert server.sent_body <= 5, (mode, path, server.sent_body)  # ~1 s worth of drips, not 40


def test_a_connection_test_against_a_hostile_server_fails_cleanly(hostile):
    """What the user sees: the connection test's first step fails with the reason, nothing hangs."""
    huge = hostile("huge")
    account = AccountConfig(provider="salesforce", edition="enterprise", instance_url=huge.origin,
                            auth_mode="oauth_client_credentials", settings={"client_id": "c"})
    p = SalesforceProvider(account=account, credential={"client_secret": "s"},
                           transport=_transport(huge, max_response_bytes=CAP))
    report = p.test_connection()
    assert not report.ok and report.steps[0].name == "reach"
    assert "stopped reading" in report.steps[0].detail
    drip = hostile("drip", drip_every=0.3, drip_max=40)
    account = AccountConfig(provider="salesforce", edition="enterprise", instance_url=drip.origin,
                            auth_mode="oauth_client_credentials", settings={"client_id": "c"})
    p = SalesforceProvider(account=account, credential={"client_secret": "s"}, transport=_transport(drip, timeout=1.0))
    report = p.test_connection()
    assert not report.ok and "within 1 s" in report.steps[0].detail


def test_errors_are_provider_errors_the_console_can_show():
    assert issubclass(ResponseTooLarge, MalformedResponse) and issubclass(CallDeadlineExceeded, ProviderError)
    assert issubclass(CrmUrlRefused, ProviderError)


# -- the connect link: the user sees where the password goes, and a planted host gets nothing ---------
def test_a_connect_link_shows_the_crm_host_and_never_sends_a_password_to_a_planted_one(
        app_db, vault_keys, hostile, outside_demo):
    import re

    from sqlmodel import Session
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from core.connections import links as connect
    from core.connections.link_routes import connect_link_routes
    from core.tenants.access import Principal
    from tests.conftest import make_tenant
    from tests.fixtures.vault import make_vault_world

    trap = hostile("ok")  # the attacker's server, waiting for passwords
    with Session(app_db, expire_on_commit=False) as s:
        world = make_vault_world(s, make_tenant(s, "tinyco"))
        world.account.instance_url = f"https://127.0.0.1:{trap.port}/salesforce/tinyco"  # planted in the row
        s.add(world.account)
        url = connect.create_connect_link(s, principal=Principal(role="staff", email="cs@crmbridge.example"),
                                          tenant_id=world.tenant.id, app_user_id=world.users[0].id,
                                          crm_account_id=world.account.id)
        s.commit()
    token = url.rsplit("/", 1)[1]
    try:
        client = TestClient(Starlette(routes=connect_link_routes()))  # the product's CRM test
        page = client.get(f"/connect/{token}")
        assert f"Your login goes to <b>127.0.0.1:{trap.port}</b>" in page.text  # the user can see where
        csrf = re.search(r"name=csrf value='([^']+)'", page.text).group(1)  # type: ignore[union-attr]
        sent = client.post(f"/connect/{token}", data={"csrf": csrf, "action": "store", "username": "user1",
                                                      "password": "hunter2-typed"})
        assert sent.status_code == 503 and "refused" in sent.text
        assert trap.requests == []  # the password never left CRM Bridge
    finally:
        pass


def test_a_connect_link_never_sends_the_user_to_sign_in_at_a_planted_host(app_db, vault_keys, outside_demo):
    """Per-user OAuth: the link's "Sign in with Salesforce" must not redirect to the attacker's page."""
    from sqlmodel import Session
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from core.connections import links as connect
    from core.connections.link_routes import connect_link_routes
    from core.tenants.access import Principal
    from tests.conftest import make_tenant
    from tests.fixtures.vault import make_vault_world

    with Session(app_db, expire_on_commit=False) as s:
        world = make_vault_world(s, make_tenant(s, "tinyco"), mode="per_user_oauth")
        world.account.instance_url = "https://login.evil.example.com"
        world.account.settings_json = json.dumps({"auth_mode": "oauth_authorization_code", "client_id": "c"})
        s.add(world.account)
        url = connect.create_connect_link(s, principal=Principal(role="staff", email="cs@crmbridge.example"),
                                          tenant_id=world.tenant.id, app_user_id=world.users[0].id,
                                          crm_account_id=world.account.id)
        s.commit()
    token = url.rsplit("/", 1)[1]
    try:
        client = TestClient(Starlette(routes=connect_link_routes()))  # the product's OAuth start (begin_authorization)
        assert "<b>login.evil.example.com</b>" in client.get(f"/connect/{token}").text  # shown, not hidden
        start = client.get(f"/connect/{token}/oauth", follow_redirects=False)
        assert start.status_code == 503 and "refused" in start.text
        assert "evil.example.com" not in start.headers.get("location", "")
    finally:
        pass
