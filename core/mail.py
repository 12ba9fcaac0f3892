"""Every email CRM Bridge sends leaves through here: invitations, password resets, lockout notices
and alert deliveries.

``send_email`` speaks SMTP to ``CRMBRIDGE_SMTP_HOST``:``CRMBRIDGE_SMTP_PORT`` and upgrades to TLS
(STARTTLS) whenever the server offers it. Callers take an optional ``SmtpConfig`` so tests hand in
their own server; the default comes from settings. This module sits in the base layer, so console
accounts and alerts both use it without depending on each other.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from core.clock import utcnow
from core.errors import DeliveryFailed, InvalidInput
from core.settings import Settings, get_settings

log = logging.getLogger("crmbridge.mail")


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
