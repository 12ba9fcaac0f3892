"""How alerts (and account emails) leave the building: email over SMTP, and webhooks.

Email: ``send_email`` speaks SMTP to ``CRMBRIDGE_SMTP_HOST``:``CRMBRIDGE_SMTP_PORT`` and upgrades to
TLS (STARTTLS) whenever the server offers it.

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
import smtplib
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from urllib.parse import urlsplit

import httpx

from core.clock import utcnow
from core.errors import DeliveryFailed, InvalidInput
from core.netguard import address_problem, pinned
from core.settings import Settings, get_settings

log = logging.getLogger("crmbridge.alerts.channels")

SIGNATURE_HEADER = "X-CrmBridge-Signature"
DELIVERY_HEADER = "X-CrmBridge-Delivery"
EVENT_HEADER = "X-CrmBridge-Event"
SIGNATURE_TOLERANCE_S = 300
WEBHOOK_TIMEOUT_S = 10.0
MAX_URL = 2000

Resolver = Callable[[str, int], list[str]]


# --- email -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmtpConfig:
    host: str
    port: int
    sender: str
    timeout: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> SmtpConfig:
        s = settings or get_settings()
        return cls(host=s.smtp_host, port=s.smtp_port, sender=s.smtp_sender)


def parse_recipients(text: str) -> list[str]:
    """Addresses separated by commas, semicolons or new lines; each must look like an address."""
    out: list[str] = []
    for part in text.replace(";", ",").replace("\n", ",").split(","):
        addr = part.strip().lower()
        if not addr:
            continue
        local, _, domain = addr.partition("@")
        if not local or "." not in domain or len(addr) > 254 or any(c in addr for c in " <>\"'\r\t"):
            raise InvalidInput(f"{addr!r} is not an email address: enter addresses as name@company.com, "
                               "separated by commas.")
        if addr not in out:
            out.append(addr)
    if not out:
        raise InvalidInput("Enter at least one recipient address.")
    if len(out) > 50:
        raise InvalidInput("At most 50 recipients per channel: use a mailing list address instead.")
    return out


def send_email(smtp: SmtpConfig, *, to: Sequence[str], subject: str, body: str,
               now: datetime | None = None) -> None:
    """Send one plain-text message.

    Raises:
        DeliveryFailed: the server could not be reached or refused the message (the message names
            the server and the reason, never the body).
    """
    if not to:
        raise InvalidInput("The email has no recipient: add one.")
    msg = EmailMessage()
    msg["From"] = smtp.sender
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject.replace("\r", " ").replace("\n", " ")[:250]
    msg["Date"] = format_datetime(now or utcnow())
    msg["Message-ID"] = make_msgid(domain="crmbridge")
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(body)
    try:
        with smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout) as client:
            client.ehlo()
            if client.has_extn("starttls"):
                client.starttls(context=ssl.create_default_context())
                client.ehlo()
            refused = client.send_message(msg)
    except (OSError, smtplib.SMTPException) as exc:
        raise DeliveryFailed(
            f"Email could not be sent through {smtp.host}:{smtp.port} ({type(exc).__name__}: {_short(exc)})",
            fix="check CRMBRIDGE_SMTP_HOST and CRMBRIDGE_SMTP_PORT and that the mail server accepts mail from "
                "this host (alert deliveries are retried automatically)",
        ) from None
    if refused:
        raise DeliveryFailed(f"The mail server refused {len(refused)} of {len(to)} recipient(s): "
                             f"{', '.join(sorted(refused))}", fix="correct those addresses on the Alerts page")
    log.info("email sent to %d recipient(s): %s", len(to), msg["Subject"])


def _short(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ").strip()
    return text[:200] or "no detail"


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
