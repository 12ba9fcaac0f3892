"""Every CRM call leaves through here: the vendor's own hosts only, checked addresses, bounded answers.

A CRM account's URLs are typed in by a tenant admin, and a connect link sends a user's CRM password to
them, so a URL pointing anywhere else is an SSRF and credential-exfiltration channel. Three defences:

- **Vendor hosts** (``CrmUrlPolicy``): a CRM URL must be https on port 443 on one of the hosts its
  provider declares in the catalog (``hosts:`` in core/providers/catalog.yaml: ``*.my.salesforce.com``,
  ``*.crm*.dynamics.com``, ``api.hubapi.com`` …). Checked when an account is added, when a provider is
  built for it (``HttpTransport.check_account``), and on every request — redirects and URLs a CRM hands
  back (Salesforce's ``instance_url``) included. The sandbox is allowed only as an explicit origin: in
  demo mode the configured ``CRMBRIDGE_SANDBOX_URL`` (``CrmUrlPolicy.from_settings``), in tests the
  sandbox fixture's own policy (``CrmUrlPolicy.vendors(sandbox_url=...)``).
- **Checked addresses** (``_GuardedBackend``): the host is resolved once per new connection, every
  address must be public (``core.netguard.address_problem``: no private, loopback, link-local … nor
  such an address hidden in IPv6 forms), and the socket connects to the address that was checked — the
  URL, the Host header and the TLS handshake (SNI, certificate check) still name the host, so a DNS
  answer that changes between check and connect (rebinding) cannot send the request inward. No proxy
  from the environment is used (it would make the check meaningless).
- **Bounded answers** (``GuardedTransport``): one deadline per call covers connect, sending, the
  headers and the whole body (each socket read waits at most until the deadline, so a server dripping
  a byte every few seconds is cut off at it), and the body is counted while it streams, after
  decompression, and reading stops as soon as it passes ``max_bytes`` — nothing bigger is ever held.

httpx providers (Dynamics, HubSpot) get an ``httpx.Client`` over ``GuardedTransport``; zeep and
simple-salesforce get a ``requests.Session`` whose adapter (``HttpxAdapter``) sends through that same
client, so both paths share one guard, one deadline and one cap.
"""

from __future__ import annotations

import contextvars
import ipaddress
import re
import socket
import ssl
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from core.errors import ConfigurationError, MalformedResponse, ProviderRejected, ProviderUnavailable
from core.netguard import address_problem

Resolver = Callable[[str, int], list[str]]
Clock = Callable[[], float]

DEFAULT_DEADLINE_S = 30.0
DEFAULT_MAX_BYTES = 20_000_000
ACCEPT_ENCODING = "gzip, deflate"  # the encodings we decode ourselves, under the cap


class CrmUrlRefused(ProviderRejected):
    """A request to a host the account's CRM does not own, or to a non-public address (at call time)."""


class ResponseTooLarge(MalformedResponse):
    """The CRM's answer passed the size cap; reading stopped there."""


class CallDeadlineExceeded(ProviderUnavailable):
    """The CRM did not finish answering within the call's total deadline."""


# -- which hosts ------------------------------------------------------------------------------------
def _pattern_re(pattern: str) -> re.Pattern[str]:
    wildcard_labels = pattern.startswith("*.")
    rest = pattern[2:] if wildcard_labels else pattern
    body = r"\.".join(re.escape(label).replace(r"\*", "[a-z0-9-]*") for label in rest.split("."))
    return re.compile((r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+" if wildcard_labels else "") + body)


def host_matches(host: str, pattern: str) -> bool:
    """``host`` (a DNS name) is covered by ``pattern`` (see ``VendorHosts`` in the catalog)."""
    return _pattern_re(pattern.lower()).fullmatch(host.lower().rstrip(".")) is not None


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url.strip())
    scheme = (parts.scheme or "").lower()
    host = (parts.hostname or "").lower().rstrip(".")
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, host, port


@lru_cache(maxsize=1)
def _catalog_hosts() -> dict[str, tuple[str, ...]]:
    from core.providers.catalog import get_catalog

    cat = get_catalog()
    return {slug: tuple(cat.provider(slug).hosts.patterns) for slug in cat.slugs()}


@dataclass(frozen=True)
class CrmUrlPolicy:
    """Where CRM calls may go: each provider's vendor hosts (https, port 443), plus explicit sandbox
    origins (scheme, host, port) that may sit on a loopback address (demo mode; the test sandbox)."""

    vendor_hosts: Mapping[str, tuple[str, ...]]
    sandbox_origins: frozenset[tuple[str, str, int]] = frozenset()

    @classmethod
    def vendors(cls, *, sandbox_url: str | None = None) -> CrmUrlPolicy:
        """The catalog's vendor hosts; with ``sandbox_url``, that one origin too."""
        origins = frozenset({_origin(sandbox_url)}) if sandbox_url else frozenset()
        return cls(vendor_hosts=_catalog_hosts(), sandbox_origins=origins)

    @classmethod
    def from_settings(cls, settings: Any = None) -> CrmUrlPolicy:
        """The product's policy: vendor hosts; plus the configured ``CRMBRIDGE_SANDBOX_URL`` origin in demo
        mode, or where the operator made the sandbox's CA trusted (``CRMBRIDGE_SANDBOX_CA_FILE``, as the
        test suite does) — never merely because the URL setting has its default."""
        if settings is None:
            from core.settings import get_settings

            settings = get_settings()
        sandbox = settings.demo or settings.sandbox_ca_file is not None
        return cls.vendors(sandbox_url=settings.sandbox_url if sandbox else None)

    def hosts_for(self, provider: str | None) -> tuple[str, ...]:
        if provider is None:
            return tuple(p for patterns in self.vendor_hosts.values() for p in patterns)
        return self.vendor_hosts.get(provider, ())

    def is_sandbox(self, scheme: str, host: str, port: int) -> bool:
        return (scheme, host, port) in self.sandbox_origins

    def problem(self, url: str, provider: str | None = None) -> str | None:
        """Why ``url`` may not be used for ``provider`` (any provider when None), or None."""
        try:
            parts = urlsplit((url or "").strip())
            scheme, host, port = _origin(url)
        except ValueError:
            return "it is not a valid URL"
        if scheme not in ("https", "http") or not host:
            return "it is not an https:// address"
        if parts.username or parts.password:
            return "it contains a user name or password"
        if self.is_sandbox(scheme, host, port):
            return None
        if scheme != "https":
            return "it is not https"
        patterns = self.hosts_for(provider)
        try:
            ipaddress.ip_address(host.strip("[]"))
            return f"{host} is an IP address, not the vendor's host name"
        except ValueError:
            pass
        if not any(host_matches(host, p) for p in patterns):
            return f"{host} is not one of the vendor's hosts ({', '.join(patterns) or 'none declared'})"
        if port != 443:
            return f"port {port} is not the vendor's (https on 443)"
        return None

    def refusal(self, url: str, provider: str | None, *, what: str = "The CRM URL") -> str | None:
        """A sentence for a person: what is wrong with ``url`` and what to enter instead."""
        problem = self.problem(url, provider)
        if problem is None:
            return None
        return (f"{what} {url!r} is refused: {problem}. CRM Bridge only connects to the vendor's own "
                "servers, so a mistyped or planted address cannot receive credentials or reach internal hosts.")


def url_fields(settings: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The account settings that are URLs CRM Bridge calls or sends users to (``*_url``)."""
    return [(k, v) for k, v in settings.items() if k.endswith("_url") and isinstance(v, str) and v.strip()]


def check_account_urls(policy: CrmUrlPolicy, provider: str, instance_url: str, settings: Mapping[str, Any],
                       *, titles: Mapping[str, str] | None = None) -> None:
    """Every URL of an account against ``provider``'s vendor hosts.

    Raises:
        ConfigurationError (code ``url_refused``): one is elsewhere; the message names it and the fix.
    """
    titles = titles or {}
    for name, url in [("instance_url", instance_url), *url_fields(settings)]:
        if name == "instance_url" and not url:
            continue
        text = policy.refusal(url, provider, what=titles.get(name, "The CRM URL" if name == "instance_url"
                                                            else name.replace("_", " ").capitalize()))
        if text:
            hosts = ", ".join(policy.hosts_for(provider))
            raise ConfigurationError(text, fix=f"Enter the vendor's https address (one of: {hosts}).",
                                     code="url_refused")


# -- resolving and connecting -----------------------------------------------------------------------
def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (A and AAAA), in the resolver's order."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ProviderUnavailable(f"The CRM host {host} does not resolve ({exc.strerror}).",
                                  fix="Check the instance URL on the account for typos.",
                                  code="url_unresolvable") from None
    return list(dict.fromkeys(str(i[4][0]).split("%", 1)[0] for i in infos))


# The deadline of the call running in this context; set by GuardedTransport only around the calls
# into httpcore it makes (sending, and each read of the body), never left set between them.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("crm_call_deadline", default=None)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket whose every wait ends at the running call's deadline at the latest."""

    def __init__(self, inner: httpcore.NetworkStream, clock: Clock) -> None:
        self._inner = inner
        self._clock = clock

    def _wait(self, timeout: float | None, exc: type[Exception]) -> float | None:
        deadline = _DEADLINE.get()
        if deadline is None:
            return timeout
        left = deadline - self._clock()
        if left <= 0:
            raise exc("the call's deadline passed")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._wait(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._wait(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        wrapped = self._inner.start_tls(ssl_context, server_hostname, self._wait(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(wrapped, self._clock)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _GuardedBackend(httpcore.NetworkBackend):
    """Resolve once, check every address, connect to the checked one (the caller's host stays in the
    request and the TLS handshake)."""

    def __init__(self, policy: CrmUrlPolicy, resolver: Resolver, inner: httpcore.NetworkBackend,
                 clock: Clock) -> None:
        self._policy = policy
        self._resolve = resolver
        self._inner = inner
        self._clock = clock

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        name = host.strip("[]").lower().rstrip(".")
        sandbox = any(h == name and p == port for _, h, p in self._policy.sandbox_origins)
        try:
            addresses = [str(ipaddress.ip_address(name))]
        except ValueError:
            addresses = self._resolve(name, port)
        if not addresses:
            raise ProviderUnavailable(f"The CRM host {name} does not resolve.", fix="Check the instance URL.",
                                      code="url_unresolvable")
        for ip in addresses:
            problem = address_problem(ip, allow_loopback=sandbox)
            if problem:
                raise CrmUrlRefused(
                    f"The CRM host {name} resolves to {ip}, {problem}: CRM Bridge only connects to public "
                    "addresses.", fix="Check the instance URL and the DNS of this host.", code="url_address")
        deadline = _DEADLINE.get()
        if deadline is not None:
            left = deadline - self._clock()
            if left <= 0:
                raise httpcore.ConnectTimeout("the call's deadline passed")
            timeout = left if timeout is None else min(timeout, left)
        stream = self._inner.connect_tcp(addresses[0], port, timeout=timeout, local_address=local_address,
                                         socket_options=socket_options)
        return _DeadlineStream(stream, self._clock)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        raise CrmUrlRefused("CRM calls never go to a local socket.")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


# -- bounded answers --------------------------------------------------------------------------------
class _Decoder:
    """gzip/deflate decoding whose output per step is bounded (a small bomb cannot expand in memory)."""

    def __init__(self, encoding: str) -> None:
        self._deflate = encoding == "deflate"
        self._obj = zlib.decompressobj(15 if self._deflate else 47)
        self._started = False

    def decode(self, data: bytes, room: int) -> Iterator[bytes]:
        """Decoded pieces of ``data``; stops after more than ``room`` bytes came out (the caller refuses)."""
        try:
            out = self._obj.decompress(data, room + 1)
        except zlib.error:
            if not (self._deflate and not self._started):
                raise
            self._obj = zlib.decompressobj(-15)  # raw deflate without the zlib header, as some servers send
            out = self._obj.decompress(data, room + 1)
        self._started = True
        yield out
        while self._obj.unconsumed_tail and len(out) <= room:
            room -= len(out)
            out = self._obj.decompress(self._obj.unconsumed_tail, room + 1)
            yield out

    def flush(self) -> bytes:
        return self._obj.flush()


class _BoundedBody(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, *, host: str, deadline: float, deadline_s: float,
                 max_bytes: int, decoder: _Decoder | None, clock: Clock) -> None:
        self._inner = inner
        self._host = host
        self._deadline = deadline
        self._deadline_s = deadline_s
        self._max = max_bytes
        self._decoder = decoder
        self._clock = clock
        self.received = 0  # bytes handed on (after decoding)

    def _count(self, piece: bytes) -> bytes:
        self.received += len(piece)
        if self.received > self._max:
            raise too_large(self._host, self._max)
        return piece

    def __iter__(self) -> Iterator[bytes]:
        chunks = iter(self._inner)
        while True:
            token = _DEADLINE.set(self._deadline)
            try:
                raw = next(chunks)
            except StopIteration:
                break
            except httpx.TimeoutException as exc:
                raise too_slow(self._host, self._deadline_s) from exc
            except zlib.error as exc:
                raise MalformedResponse(f"The CRM at {self._host} sent a body that does not decompress.") from exc
            finally:
                _DEADLINE.reset(token)
            if self._decoder is None:
                yield self._count(raw)
            else:
                try:
                    for piece in self._decoder.decode(raw, self._max - self.received):
                        yield self._count(piece)
                except zlib.error as exc:
                    raise MalformedResponse(f"The CRM at {self._host} sent a body that does not decompress.") from exc
            if self._clock() > self._deadline:
                raise too_slow(self._host, self._deadline_s)
        if self._decoder is not None:
            yield self._count(self._decoder.flush())

    def close(self) -> None:
        self._inner.close()


def _size(n: int) -> str:
    return f"{n / 1_000_000:g} MB" if n >= 1_000_000 else f"{n:,} bytes"


def too_large(host: str, max_bytes: int) -> ResponseTooLarge:
    return ResponseTooLarge(
        f"The CRM at {host} sent more than {_size(max_bytes)} in one response; CRM Bridge stopped "
        "reading there.", fix="Lower the page or batch size on the account (query_batch_size); if it persists, "
        "check the instance URL.", code="response_too_large")


def too_slow(host: str, deadline_s: float) -> CallDeadlineExceeded:
    return CallDeadlineExceeded(
        f"The call to the CRM at {host} timed out: no complete answer within {deadline_s:g} s (the limit for one "
        "call), so CRM Bridge gave up on it.",
        fix="Try again later; if it persists, check the CRM's status page and the instance URL.", code="deadline")


@dataclass
class GuardedTransport(httpx.BaseTransport):
    """An httpx transport for CRM calls: the policy's hosts, checked and pinned addresses, one total
    deadline and a streamed size cap per call (see the module docstring)."""

    policy: CrmUrlPolicy
    verify: ssl.SSLContext | str | bool = True
    deadline_s: float = DEFAULT_DEADLINE_S
    max_bytes: int = DEFAULT_MAX_BYTES
    resolver: Resolver | None = None
    network_backend: httpcore.NetworkBackend | None = None
    clock: Clock = time.monotonic
    _http: httpx.HTTPTransport = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.verify, ssl.SSLContext):
            ctx = self.verify
        elif isinstance(self.verify, str):
            ctx = ssl.create_default_context(cafile=self.verify)
        elif self.verify:
            ctx = ssl.create_default_context()
        else:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        backend = _GuardedBackend(self.policy, self.resolver or system_resolver,
                                  self.network_backend or httpcore.SyncBackend(), self.clock)
        self._http = httpx.HTTPTransport(verify=ctx, trust_env=False)
        # httpx builds its pool without a way to pass a network backend: give it ours (same settings).
        assert isinstance(getattr(self._http, "_pool", None), httpcore.ConnectionPool)
        self._http._pool.close()
        self._http._pool = httpcore.ConnectionPool(
            ssl_context=ctx, max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0,
            network_backend=backend)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        host = request.url.host
        problem = self.policy.problem(url)
        if problem:
            raise CrmUrlRefused(f"CRM Bridge refused to call {host}: {problem}.",
                                fix="Check the instance URL on the account (it must be the vendor's own address).",
                                code="url_refused")
        deadline = self.clock() + self.deadline_s
        request.headers["Accept-Encoding"] = ACCEPT_ENCODING
        asked = request.extensions.get("timeout") or {}
        request.extensions = {**request.extensions, "timeout": {  # no single wait longer than the whole call
            k: min(float(asked.get(k) or self.deadline_s), self.deadline_s)
            for k in ("connect", "read", "write", "pool")}}
        token = _DEADLINE.set(deadline)
        try:
            response = self._http.handle_request(request)
        except httpx.TimeoutException as exc:
            raise too_slow(host, self.deadline_s) from exc
        finally:
            _DEADLINE.reset(token)
        declared = response.headers.get("content-length", "")
        encoding = response.headers.get("content-encoding", "").strip().lower()
        try:
            if declared.isdigit() and int(declared) > self.max_bytes and encoding in ("", "identity"):
                raise too_large(host, self.max_bytes)
            if encoding not in ("", "identity", "gzip", "x-gzip", "deflate"):
                raise MalformedResponse(f"The CRM at {host} answered in an encoding we did not ask for ({encoding}).",
                                        code="bad_encoding")
        except Exception:
            response.close()
            raise
        headers = response.headers.copy()
        decoder = None
        if encoding not in ("", "identity"):
            decoder = _Decoder("deflate" if encoding == "deflate" else "gzip")
            del headers["content-encoding"]  # decoded here, under the cap; httpx must not decode it again
            headers.pop("content-length", None)
        assert isinstance(response.stream, httpx.SyncByteStream)
        body = _BoundedBody(response.stream, host=host, deadline=deadline, deadline_s=self.deadline_s,
                            max_bytes=self.max_bytes, decoder=decoder, clock=self.clock)
        return httpx.Response(status_code=response.status_code, headers=headers, stream=body,
                              extensions=response.extensions, request=request)

    def close(self) -> None:
        self._http.close()


def guarded_client(transport: GuardedTransport, *, user_agent: str) -> httpx.Client:
    """An httpx.Client over ``transport``: no proxy from the environment, redirects not followed."""
    return httpx.Client(transport=transport, timeout=transport.deadline_s, trust_env=False,
                        follow_redirects=False, headers={"User-Agent": user_agent})


# -- the same client under requests (zeep, simple-salesforce) --------------------------------------
def httpx_adapter(client: Callable[[], httpx.Client]) -> Any:
    """A requests adapter that sends every request through ``client()`` (a guarded httpx.Client), so
    zeep and simple-salesforce get the same host check, pinning, deadline and cap. Redirects are
    followed by requests, hop by hop, each through here again."""
    import io

    import requests
    from requests.adapters import BaseAdapter
    from requests.structures import CaseInsensitiveDict
    from requests.utils import get_encoding_from_headers

    class HttpxAdapter(BaseAdapter):
        def send(self, request: requests.PreparedRequest, stream: bool = False, timeout: Any = None,
                 verify: Any = True, cert: Any = None, proxies: Any = None) -> requests.Response:
            body: Any = request.body
            if isinstance(body, str):
                body = body.encode("utf-8")
            elif body is not None and not isinstance(body, bytes):
                body = body.read() if hasattr(body, "read") else b"".join(
                    c.encode("utf-8") if isinstance(c, str) else c for c in body)
            headers = {k: v for k, v in request.headers.items()
                       if k.lower() not in ("content-length", "transfer-encoding", "connection", "host")}
            try:
                r = client().request(request.method or "GET", request.url or "", headers=headers, content=body)
            except httpx.ConnectTimeout as exc:
                raise requests.exceptions.ConnectTimeout(str(exc), request=request) from exc
            except httpx.TimeoutException as exc:
                raise requests.exceptions.ReadTimeout(str(exc), request=request) from exc
            except httpx.ConnectError as exc:
                text = str(exc).upper()
                if "SSL" in text or "CERTIFICATE" in text:
                    raise requests.exceptions.SSLError(str(exc), request=request) from exc
                raise requests.exceptions.ConnectionError(str(exc), request=request) from exc
            except httpx.HTTPError as exc:
                raise requests.exceptions.ConnectionError(f"{type(exc).__name__}: {exc}", request=request) from exc
            resp = requests.Response()
            resp.status_code = r.status_code
            resp.headers = CaseInsensitiveDict(r.headers.items())
            resp._content = r.content
            resp._content_consumed = True  # type: ignore[attr-defined]
            resp.raw = io.BytesIO(r.content)
            resp.encoding = get_encoding_from_headers(resp.headers)
            resp.reason = r.reason_phrase
            resp.url = request.url or ""
            resp.request = request
            resp.connection = self  # type: ignore[assignment]
            return resp

        def close(self) -> None:
            pass  # the httpx client belongs to the HttpTransport, which closes it

    return HttpxAdapter()
