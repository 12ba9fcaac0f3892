"""Outbound requests to addresses a tenant gave us (IdP metadata URLs, alert webhooks) without an SSRF
hole: which addresses are public, and how to connect to the one that was checked.

``address_problem`` judges an IP, including IPv4 addresses hidden in IPv6 forms (IPv4-mapped,
IPv4-compatible, NAT64, 6to4, Teredo). ``pinned`` rewrites a URL so the connection goes to the checked
IP while the Host header and the TLS handshake (SNI and certificate check) still name the host, so a
DNS answer that changes between the check and the connect (rebinding) cannot redirect the request.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if int(addr) >> 32 == 0 and int(addr) > 1:  # IPv4-compatible ::a.b.c.d (deprecated)
        return ipaddress.IPv4Address(int(addr))
    return None


def address_problem(ip: str, *, allow_loopback: bool = False) -> str | None:
    """Why ``ip`` may not be connected to, or None when it is a public address."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return "not an IP address"
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [addr]
    if isinstance(addr, ipaddress.IPv6Address):
        inner = _embedded_ipv4(addr)
        if inner is not None:
            candidates = [inner]  # judge the IPv4 address the IPv6 form carries
    for a in candidates:
        if a.is_loopback:
            if allow_loopback:
                continue
            return "a loopback address"
        if a.is_link_local:
            return "a link-local address"
        if a.is_multicast:
            return "a multicast address"
        if a.is_unspecified:
            return "an unspecified address"
        if a.is_private:
            return "a private address"
        if a.is_reserved or not a.is_global:
            return "a reserved or non-public address"
    return None


@dataclass(frozen=True)
class Pinned:
    """A request target that connects to ``ip`` but speaks to the URL's host."""

    url: str  # the URL with the checked IP as its host
    host_header: str
    extensions: dict[str, str]  # httpx request extensions: the SNI hostname for https
    ip: str


def pinned(url: str, ip: str) -> Pinned:
    """``url`` rewritten to connect to ``ip`` (already checked) with the original Host and SNI."""
    parts = urlsplit(url)
    scheme = (parts.scheme or "").lower()
    host = (parts.hostname or "").rstrip(".")
    default_port = 443 if scheme == "https" else 80
    port = parts.port or default_port
    ip_host = f"[{ip}]" if ":" in ip else ip
    netloc = ip_host if port == default_port else f"{ip_host}:{port}"
    named = f"[{host}]" if ":" in host else host  # an IPv6 literal keeps its brackets in Host
    host_header = named if port == default_port else f"{named}:{port}"
    return Pinned(url=parts._replace(scheme=scheme, netloc=netloc).geturl(), host_header=host_header,
                  extensions={"sni_hostname": host} if scheme == "https" else {}, ip=ip)
