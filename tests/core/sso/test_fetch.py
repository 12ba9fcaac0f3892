"""Metadata URL fetches: SSRF attempts refused, rebinding impossible, limits enforced. The resolver
and the transport are injected: nothing here leaves the process."""

from __future__ import annotations

import gzip
from collections.abc import Callable

import httpx
import pytest

from core.errors import MetadataInvalid
from core.sso.fetch import address_problem, fetch_metadata

PUBLIC_IP = "93.184.216.34"
OTHER_PUBLIC_IP = "151.101.1.69"
METADATA = b'<md:EntityDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata" entityID="x"/>'


class RecordingTransport(httpx.BaseTransport):
    """Answers like a server would and records where each connection was made and for which host."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response] | None = None) -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        self.answer = answer or (lambda req: httpx.Response(200, content=METADATA))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.url.host, request.headers["host"], request.extensions.get("sni_hostname")))
        return self.answer(request)


def resolver_of(table: dict[str, list[str]]) -> Callable[[str, int], list[str]]:
    calls: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return table[host]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


def test_public_host_is_fetched_from_the_checked_address_with_sni() -> None:
    t = RecordingTransport()
    res = fetch_metadata("https://idp.example.com/metadata", demo=False,
                         resolver=resolver_of({"idp.example.com": [PUBLIC_IP]}), transport=t)
    assert res.body == METADATA
    assert t.seen == [(PUBLIC_IP, "idp.example.com", "idp.example.com")]


@pytest.mark.parametrize("ip", ["10.0.0.5", "172.16.3.4", "192.168.1.1", "127.0.0.1", "169.254.169.254", "::1",
                                "fe80::1", "fd00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
                                "100.64.0.1", "0.0.0.0", "224.0.0.1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::"])
def test_private_loopback_link_local_and_mapped_addresses_are_refused(ip: str) -> None:
    t = RecordingTransport()
    with pytest.raises(MetadataInvalid) as exc:
        fetch_metadata("https://idp.example.com/md", demo=False, resolver=resolver_of({"idp.example.com": [ip]}),
                       transport=t)
    assert exc.value.code == "url_address"
    assert t.seen == []  # nothing was contacted


def test_literal_private_address_and_a_name_with_any_private_answer_are_refused() -> None:
    t = RecordingTransport()
    for url in ("https://127.0.0.1/md", "https://[::ffff:7f00:1]/md", "https://169.254.169.254/latest/meta-data"):
        with pytest.raises(MetadataInvalid):
            fetch_metadata(url, demo=False, resolver=resolver_of({}), transport=t)
    # One public and one private answer: every address is checked, so the name is refused.
    with pytest.raises(MetadataInvalid):
        fetch_metadata("https://mixed.example.com/md", demo=False,
                       resolver=resolver_of({"mixed.example.com": [PUBLIC_IP, "10.1.2.3"]}), transport=t)
    assert t.seen == []


def test_dns_rebinding_name_cannot_move_the_connection() -> None:
    """A name that answers a public address for the check and loopback right after: the host is
    resolved once and the connection goes to the checked address."""
    answers = iter([[PUBLIC_IP], ["127.0.0.1"], ["127.0.0.1"]])
    calls: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    t = RecordingTransport()
    fetch_metadata("https://rebind.example.com/md", demo=False, resolver=rebinding, transport=t)
    assert calls == ["rebind.example.com"]
    assert [s[0] for s in t.seen] == [PUBLIC_IP]


def test_redirects_are_rechecked_and_limited() -> None:
    def redirect_to(location: str) -> RecordingTransport:
        return RecordingTransport(lambda req: httpx.Response(302, headers={"location": location}))

    resolver = resolver_of({"idp.example.com": [PUBLIC_IP], "localhost": ["127.0.0.1"],
                            "internal.example.com": ["10.0.0.7"]})
    for target in ("https://localhost/admin", "https://127.0.0.1:8443/x", "https://internal.example.com/md",
                   "http://idp.example.com/md", "file:///etc/passwd", "gopher://idp.example.com/"):
        t = redirect_to(target)
        with pytest.raises(MetadataInvalid) as exc:
            fetch_metadata("https://idp.example.com/md", demo=False, resolver=resolver, transport=t)
        assert exc.value.code in ("url_address", "url_scheme"), target
        assert len(t.seen) == 1  # the redirect target was never contacted

    hops = iter(range(100))
    loop = RecordingTransport(lambda req: httpx.Response(301, headers={"location": f"/hop{next(hops)}"}))
    with pytest.raises(MetadataInvalid) as exc:
        fetch_metadata("https://idp.example.com/md", demo=False, resolver=resolver, transport=loop)
    assert exc.value.code == "url_too_many_redirects" and len(loop.seen) == 4  # the first + 3 redirects

    ok_hops = iter(["/a", "/b", "/c"])

    def three(req: httpx.Request) -> httpx.Response:
        nxt = next(ok_hops, None)
        return httpx.Response(302, headers={"location": nxt}) if nxt else httpx.Response(200, content=METADATA)

    res = fetch_metadata("https://idp.example.com/md", demo=False, resolver=resolver,
                         transport=RecordingTransport(three))
    assert res.final_url == "https://idp.example.com/c" and len(res.hops) == 4


def test_https_only_outside_demo_and_http_only_for_loopback_in_demo() -> None:
    t = RecordingTransport()
    resolver = resolver_of({"idp.example.com": [PUBLIC_IP], "localhost": ["127.0.0.1"]})
    with pytest.raises(MetadataInvalid) as exc:
        fetch_metadata("http://idp.example.com/md", demo=False, resolver=resolver, transport=t)
    assert exc.value.code == "url_scheme"
    with pytest.raises(MetadataInvalid):
        fetch_metadata("http://idp.example.com/md", demo=True, resolver=resolver, transport=t)
    with pytest.raises(MetadataInvalid):
        fetch_metadata("http://127.0.0.1:8502/idp/bigcorp/metadata", demo=False, resolver=resolver, transport=t)
    assert t.seen == []
    res = fetch_metadata("http://127.0.0.1:8502/idp/bigcorp/metadata", demo=True, resolver=resolver, transport=t)
    assert res.body == METADATA and t.seen == [("127.0.0.1", "127.0.0.1:8502", None)]
    # Demo mode still refuses private (non-loopback) addresses.
    with pytest.raises(MetadataInvalid):
        fetch_metadata("https://10.0.0.1/md", demo=True, resolver=resolver, transport=t)


def test_size_limit_counts_decompressed_bytes_and_declared_length() -> None:
    resolver = resolver_of({"idp.example.com": [PUBLIC_IP]})
    big = RecordingTransport(lambda req: httpx.Response(200, content=b"x" * 2048))
    with pytest.raises(MetadataInvalid) as exc:
        fetch_metadata("https://idp.example.com/md", demo=False, resolver=resolver, transport=big, max_bytes=1024)
    assert exc.value.code == "url_too_large"
    bomb = gzip.compress(b"\0" * 200_000)
    gz = RecordingTransport(lambda req: httpx.Response(200, content=bomb, headers={"content-encoding": "gzip"}))
    with pytest.raises(MetadataInvalid) as exc:
        fetch_metadata("https://idp.example.com/md", demo=False, resolver=resolver, transport=gz, max_bytes=100_000)
    assert exc.value.code == "url_too_large" and len(bomb) < 100_000


def test_timeout_is_for_the_whole_fetch() -> None:
    ticks = iter([0.0, 0.0, 2.0, 6.0, 9.0, 12.0])
    resolver = resolver_of({"idp.example.com": [PUBLIC_IP]})
    slow = RecordingTransport(lambda req: httpx.Response(302, headers={"location": "/next"}))
    with pytest.raises(MetadataInvalid) as exc:
        fetch_metadata("https://idp.example.com/md", demo=False, resolver=resolver, transport=slow,
                       clock=lambda: next(ticks))
    assert exc.value.code == "url_timeout"

    def raise_timeout(req: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=req)

    with pytest.raises(MetadataInvalid) as exc:
        fetch_metadata("https://idp.example.com/md", demo=False, resolver=resolver,
                       transport=RecordingTransport(raise_timeout))
    assert exc.value.code == "url_timeout"


def test_address_rules() -> None:
    assert address_problem(PUBLIC_IP) is None and address_problem(OTHER_PUBLIC_IP) is None
    assert address_problem("2606:4700:4700::1111") is None
    assert address_problem("127.0.0.1", allow_loopback=True) is None
    assert address_problem("::ffff:127.0.0.1", allow_loopback=True) is None
    assert address_problem("::ffff:10.0.0.1", allow_loopback=True) == "a private address"


def test_pinning_keeps_the_host_name_for_host_and_sni_and_brackets_an_ipv6_literal():
    from core.netguard import pinned

    pin = pinned("https://idp.example.com:8443/md?x=1", "93.184.216.34")
    assert (pin.url, pin.host_header, pin.extensions) == (
        "https://93.184.216.34:8443/md?x=1", "idp.example.com:8443", {"sni_hostname": "idp.example.com"})
    v6 = pinned("https://[2001:db8::1]:8443/x", "2001:db8::1")
    assert v6.url == "https://[2001:db8::1]:8443/x" and v6.host_header == "[2001:db8::1]:8443"
