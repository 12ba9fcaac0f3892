"""HTTP helpers shared by the Starlette routes beside the console (cookies, CSRF, client address).

Streamlit cannot set cookies, so only these routes set and clear the session cookie.
"""

from __future__ import annotations

import hmac
import html
import secrets

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from core.keys import CSRF, mac
from core.settings import get_settings

SESSION_COOKIE = "crmbridge_session"
CSRF_COOKIE = "crmbridge_csrf"


def _secure() -> bool:
    return get_settings().public_url.startswith("https://")


def set_session_cookie(response: Response, token: str) -> None:
    s = get_settings()
    response.set_cookie(
        SESSION_COOKIE, token, max_age=int(s.session_absolute_hours * 3600), httponly=True,
        samesite="lax", secure=_secure(), path="/",
    )


def clear_session_cookie(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax", secure=_secure())


def csrf_pair() -> tuple[str, str]:
    """A (cookie nonce, form token) pair for a form served before any session exists."""
    nonce = secrets.token_urlsafe(24)
    return nonce, csrf_token_for(nonce)


def csrf_token_for(binding: str) -> str:
    return mac(CSRF, binding.encode()).hex()


def csrf_ok(binding: str | None, token: str | None) -> bool:
    if not binding or not token:
        return False
    return hmac.compare_digest(csrf_token_for(binding), token)


def set_csrf_cookie(response: Response, nonce: str) -> None:
    response.set_cookie(CSRF_COOKIE, nonce, max_age=3600, httponly=True, samesite="lax",
                        secure=_secure(), path="/")


def cross_site(request: Request) -> bool:
    """True when the browser says another site started this request (``Sec-Fetch-Site: cross-site``).

    For GET routes that act for a signed-in user (the session cookie is SameSite=Lax, so a link on
    another site carries it): such a request is refused and the user starts again from the console."""
    return request.headers.get("sec-fetch-site", "").lower() == "cross-site"


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


PAGE_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;background:#f6f7fb;color:#1f2937;
margin:0;display:flex;justify-content:center}
main{background:#fff;margin:48px 16px;padding:32px 36px;border-radius:12px;max-width:520px;width:100%;
box-shadow:0 2px 12px rgba(0,0,0,.08)}
h1{font-size:1.4rem;margin-top:0} label{display:block;margin:14px 0 4px;font-weight:600}
input[type=email],input[type=password],input[type=text]{width:100%;padding:9px;border:1px solid #cbd5e1;
border-radius:6px;box-sizing:border-box;font-size:1rem}
button{margin-top:18px;background:#2563eb;color:#fff;border:0;border-radius:6px;padding:10px 18px;
font-size:1rem;cursor:pointer} .error{background:#fef2f2;color:#991b1b;padding:10px;border-radius:6px}
.note{color:#475569;font-size:.9rem} table{border-collapse:collapse;width:100%;font-size:.9rem}
td,th{border-bottom:1px solid #e2e8f0;padding:6px;text-align:left} code{background:#f1f5f9;padding:1px 4px}
"""


def html_page(title: str, body: str, status_code: int = 200) -> HTMLResponse:
    doc = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(title)} · CRM Bridge</title>"
        f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{PAGE_CSS}</style>"
        f"</head><body><main>{body}</main></body></html>"
    )
    resp = HTMLResponse(doc, status_code=status_code)
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Referrer-Policy"] = "no-referrer"
    return resp


def safe_next(value: str | None) -> str:
    """Only relative paths on this server (no scheme, no //host) may follow a sign-in."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value
