"""How alerts leave the building besides email (which is ``core.mail``): webhooks.

Webhooks: an HTTP POST of a JSON document, signed so the receiver can prove it came from us and is
fresh. The header is ``X-CrmBridge-Signature: t=<unix seconds>,v1=<hex>``, where ``v1`` is
HMAC-SHA256 over ``"<t>." + body`` with the channel's signing secret; receivers recompute it, compare
in constant time, and refuse a ``t`` more than 5 minutes away from their clock (``verify_signature``
does all three). ``X-CrmBridge-Delivery`` is the delivery id (the same on every retry, so a receiver
can de-duplicate) and ``X-CrmBridge-Event`` the event type.

A webhook URL must be https and resolve only to public addresses; http and loopback/private
addresses are accepted only where ``allow_private`` is set (demo mode, tests on 127.0.0.1).
Redirects are not followed and no proxy from the environment is used.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import socket
from collections.abc import Callable
from datetime import datetime
from urllib.parse import urlsplit

import httpx

from core.clock import utcnow
from core.errors import DeliveryFailed, InvalidInput
from core.netguard import address_problem, pinned

log = logging.getLogger("crmbridge.alerts.channels")

SIGNATURE_HEADER = "X-CrmBridge-Signature"
DELIVERY_HEADER = "X-CrmBridge-Delivery"
EVENT_HEADER = "X-CrmBridge-Event"
SIGNATURE_TOLERANCE_S = 300
WEBHOOK_TIMEOUT_S = 10.0
MAX_URL = 2000

Resolver = Callable[[str, int], list[str]]


# --- webhooks --------------------------------------------------------------------------------------


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(secret: str, header: str | None, body: bytes, *, now: datetime | None = None,
                     tolerance_s: int = SIGNATURE_TOLERANCE_S) -> bool:
    """What a receiver does: parse the header, check freshness, compare the MAC in constant time."""
    if not header:
        return False
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        t = int(parts.get("t", ""))
    except ValueError:
        return False
    if abs((now or utcnow()).timestamp() - t) > tolerance_s:
        return False
    expected = sign(secret, body, t).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DeliveryFailed(f"The webhook host {host!r} does not resolve ({exc.strerror}).",
                             fix="check the webhook URL on the Alerts page") from None
    return list(dict.fromkeys(str(i[4][0]).split("%", 1)[0] for i in infos))


def masked_webhook_url(url: str) -> str:
    """What the console shows of a webhook URL: scheme, host and port; the path (which may hold the
    receiver's token) becomes "…"."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    rest = "/…" if (parts.path.strip("/") or parts.query) else "/"
    return f"{parts.scheme}://{parts.hostname}{port}{rest}"


def check_webhook_url(url: str, *, allow_private: bool) -> str:
    """Validate a webhook URL's shape (at channel creation). Raises InvalidInput naming the fix."""
    url = (url or "").strip()
    if not url or len(url) > MAX_URL:
        raise InvalidInput(f"Enter the webhook URL (at most {MAX_URL} characters).")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise InvalidInput(f"{url!r} is not a web address: use https://host/path.")
    if parts.username or parts.password:
        raise InvalidInput("Put no user name or password in the webhook URL: the signature header proves the "
                           "sender instead.")
    if parts.scheme == "http" and not allow_private:
        raise InvalidInput("Webhooks are sent over https only: use an https:// URL.")
    try:
        literal = ipaddress.ip_address(parts.hostname)
    except ValueError:
        literal = None
    if literal is not None and not allow_private and address_problem(str(literal)):
        raise InvalidInput(f"{parts.hostname} is not a public address: use the receiver's public https URL.")
    return url


def post_webhook(
    url: str,
    *,
    body: bytes,
    secret: str,
    event: str,
    delivery_id: str,
    now: datetime | None = None,
    client: httpx.Client | None = None,
    allow_private: bool = False,
    resolver: Resolver | None = None,
) -> int:
    """POST a signed JSON body; returns the HTTP status (2xx).

    Raises:
        DeliveryFailed: refused address, transport error, timeout or a non-2xx answer.
    """
    check_webhook_url(url, allow_private=allow_private)
    parts = urlsplit(url)
    target, extensions = url, {}
    headers: dict[str, str] = {}
    if not allow_private:
        # Resolve once, check every address, and connect to the checked one (Host and SNI keep the
        # name), so a DNS answer that changes between check and connect cannot point us inward.
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = [str(ipaddress.ip_address(parts.hostname or ""))]
        except ValueError:
            addresses = (resolver or system_resolver)(parts.hostname or "", port)
        if not addresses:
            raise DeliveryFailed(f"The webhook host {parts.hostname} does not resolve.",
                                 fix="check the webhook URL on the Alerts page")
        for ip in addresses:
            problem = address_problem(ip)
            if problem:
                raise DeliveryFailed(f"The webhook host {parts.hostname} resolves to {problem} ({ip}).",
                                     fix="use a receiver reachable on a public address")
        pin = pinned(url, addresses[0])
        target, extensions, headers = pin.url, pin.extensions, {"Host": pin.host_header}
    ts = int((now or utcnow()).timestamp())
    headers |= {
        "Content-Type": "application/json",
        "User-Agent": "CRM-Bridge-Webhooks/1",
        SIGNATURE_HEADER: sign(secret, body, ts),
        DELIVERY_HEADER: delivery_id,
        EVENT_HEADER: event,
    }
    own = client is None
    http = client or httpx.Client(timeout=WEBHOOK_TIMEOUT_S, follow_redirects=False, trust_env=False)
    try:
        resp = http.post(target, content=body, headers=headers, extensions=extensions)
    except httpx.TimeoutException:
        raise DeliveryFailed(f"The webhook receiver at {parts.hostname} did not answer within "
                             f"{WEBHOOK_TIMEOUT_S:.0f} s.", fix="check the receiver; it is retried") from None
    except httpx.HTTPError as exc:
        raise DeliveryFailed(f"Could not reach the webhook receiver at {parts.hostname} ({type(exc).__name__}).",
                             fix="check the URL and that the receiver is up; it is retried") from None
    finally:
        if own:
            http.close()
    if not 200 <= resp.status_code < 300:
        raise DeliveryFailed(f"The webhook receiver answered HTTP {resp.status_code}.",
                             fix="check the receiver's logs (a 401 usually means it has an old signing secret)",
                             code=str(resp.status_code))
    return resp.status_code
