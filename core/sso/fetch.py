"""Fetch IdP metadata from a tenant-given URL without opening an SSRF hole.

- https only; plain http only for a loopback address in demo mode (the sandbox IdP);
- 5 s for the whole fetch, 5 MB (after decompression), at most 3 redirects, each hop re-checked;
- outside demo mode the host is resolved ONCE, every address it resolves to is checked (no private,
  loopback, link-local, shared, reserved or multicast address, nor such an address hidden in an
  IPv6 form: IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible, NAT64, 6to4, Teredo), and the
  connection is made to the checked address — the TLS handshake still names and verifies the host
  (SNI) — so a DNS answer that changes between check and connect (rebinding) cannot redirect it;
- no proxies from the environment (a proxy would make the address check meaningless).

The resolver and the httpx transport are injectable so tests never touch the network.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpx

from core.errors import MetadataInvalid
from core.netguard import address_problem, pinned

Resolver = Callable[[str, int], list[str]]

TIMEOUT_S = 5.0
MAX_BYTES = 5 * 1024 * 1024
MAX_REDIRECTS = 3
_REDIRECTS = {301, 302, 303, 307, 308}


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (A and AAAA)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise MetadataInvalid(
            f"The metadata host {host!r} does not resolve ({exc.strerror}).",
            fix="Check the metadata URL for typos.",
            code="url_unresolvable",
        ) from exc
    out: list[str] = []
    for info in infos:
        ip = str(info[4][0]).split("%", 1)[0]
        if ip not in out:
            out.append(ip)
    return out


@dataclass
class FetchResult:
    url: str
    final_url: str
    body: bytes
    content_type: str
    hops: list[str] = field(default_factory=list)
    connected_to: list[str] = field(default_factory=list)


def _refuse(message: str, fix: str, code: str) -> MetadataInvalid:
    return MetadataInvalid(message, fix=fix, code=code)


def fetch_metadata(
    url: str,
    *,
    demo: bool,
    resolver: Resolver | None = None,
    transport: httpx.BaseTransport | None = None,
    verify: ssl.SSLContext | str | bool = True,
    timeout: float = TIMEOUT_S,
    max_bytes: int = MAX_BYTES,
    max_redirects: int = MAX_REDIRECTS,
    clock: Callable[[], float] = time.monotonic,
) -> FetchResult:
    """Fetch ``url`` under the limits above and return the body.

    Raises:
        MetadataInvalid: the URL, an address, a redirect, the size or the time is refused, or the
            server could not be reached or answered an error; ``code`` says which.
    """
    resolve = resolver or system_resolver
    deadline = clock() + timeout
    result = FetchResult(url=url, final_url=url, body=b"", content_type="")
    current = url.strip()
    with httpx.Client(
        transport=transport,
        verify=verify,
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        trust_env=False,
    ) as client:
        for hop in range(max_redirects + 1):
            result.hops.append(current)
            target, headers, ext, connected = _checked_target(current, demo=demo, resolve=resolve)
            result.connected_to.append(connected)
            remaining = deadline - clock()
            if remaining <= 0:
                raise _timeout(timeout)
            try:
                with client.stream(
                    "GET",
                    target,
                    headers=headers,
                    extensions={**ext, "timeout": httpx.Timeout(remaining).as_dict()},
                ) as resp:
                    if resp.status_code in _REDIRECTS:
                        location = resp.headers.get("location")
                        if not location:
                            raise _refuse(
                                f"The server answered HTTP {resp.status_code} without a Location.",
                                "Use the final metadata URL.",
                                "url_http_status",
                            )
                        if hop >= max_redirects:
                            raise _refuse(
                                f"The metadata URL redirects more than {max_redirects} times.",
                                "Use the final metadata URL (open it in a browser and copy the address).",
                                "url_too_many_redirects",
                            )
                        current = urljoin(current, location)
                        continue
                    if resp.status_code != 200:
                        raise _refuse(
                            f"The metadata URL answered HTTP {resp.status_code}.",
                            "Check the URL in the IdP's admin console; some IdPs need the application "
                            "to be assigned or published before its metadata is served.",
                            "url_http_status",
                        )
                    declared = resp.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > max_bytes:
                        raise _too_large(max_bytes)
                    chunks: list[bytes] = []
                    size = 0
                    for chunk in resp.iter_bytes():
                        size += len(chunk)
                        if size > max_bytes:
                            raise _too_large(max_bytes)
                        if clock() > deadline:
                            raise _timeout(timeout)
                        chunks.append(chunk)
                    result.body = b"".join(chunks)
                    result.content_type = resp.headers.get("content-type", "")
                    result.final_url = current
                    return result
            except httpx.TimeoutException as exc:
                raise _timeout(timeout) from exc
            except httpx.TransportError as exc:
                raise _refuse(
                    f"Could not fetch the metadata URL: {type(exc).__name__}: {exc}.",
                    "Check that the URL is reachable from CRM Bridge and serves a valid TLS certificate; "
                    "otherwise download the file and upload it.",
                    "url_unreachable",
                ) from exc
    raise AssertionError("unreachable")  # pragma: no cover


def _timeout(timeout: float) -> MetadataInvalid:
    return _refuse(
        f"The metadata URL did not answer within {timeout:g} s.",
        "Try again later, or download the file and upload it.",
        "url_timeout",
    )


def _too_large(max_bytes: int) -> MetadataInvalid:
    return _refuse(
        f"The metadata is larger than {max_bytes // (1024 * 1024)} MB.",
        "Use your IdP's own metadata URL, not a whole federation aggregate.",
        "url_too_large",
    )


def _checked_target(
    url: str, *, demo: bool, resolve: Resolver
) -> tuple[str, dict[str, str], dict[str, str], str]:
    """Validate one hop; return (URL with the checked IP as host, headers, extensions, IP)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _refuse(f"{url!r} is not a valid URL.", "Paste the full https:// metadata URL.", "url_invalid") from exc
    scheme = (parts.scheme or "").lower()
    host = (parts.hostname or "").rstrip(".")
    if scheme not in ("https", "http") or not host:
        raise _refuse(
            f"{url!r} is not an https:// URL.", "Paste the full https:// metadata URL.", "url_scheme"
        )
    if parts.username or parts.password:
        raise _refuse(
            "The metadata URL contains a user name or password.",
            "Use a URL without credentials; metadata is public.",
            "url_invalid",
        )
    port = port or (443 if scheme == "https" else 80)
    try:
        literal = ipaddress.ip_address(host)
        addresses = [str(literal)]
    except ValueError:
        addresses = resolve(host, port)
    if not addresses:
        raise _refuse(f"The metadata host {host!r} does not resolve.", "Check the URL.", "url_unresolvable")
    for ip in addresses:
        problem = address_problem(ip, allow_loopback=demo)
        if problem:
            raise _refuse(
                f"The metadata URL's host {host!r} resolves to {ip}, {problem}: CRM Bridge only fetches "
                "metadata from public addresses.",
                "Use the IdP's public metadata URL, or download the file and upload it.",
                "url_address",
            )
    if scheme == "http":
        loopback_only = all(ipaddress.ip_address(ip).is_loopback for ip in addresses)
        if not (demo and loopback_only):
            raise _refuse(
                f"{url!r} uses plain http://: metadata must come over https so it cannot be altered "
                "in transit.",
                "Use the https:// metadata URL.",
                "url_scheme",
            )
    pin = pinned(url, addresses[0])
    headers = {"Host": pin.host_header, "Accept": "application/samlmetadata+xml, application/xml, text/xml, */*"}
    return pin.url, headers, pin.extensions, pin.ip
