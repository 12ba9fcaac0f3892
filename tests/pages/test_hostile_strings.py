"""Issue 14, medium 6: Markdown/HTML injection into staff pages. Every tenant-supplied string a page
renders (tenant name, CRM account label and instance URL, IdP entity id and SSO URL, user names and
emails, alert channel names, sync and IdP error texts, audit details…) is set to a hostile value that
carries a Markdown link, a Markdown image, raw HTML and bare autolinks; every page is rendered for each
role, and no live link, image or HTML built from those values may survive in any rendered Markdown
(before the fix the staff SSO page rendered the IdP SSO URL and the account label as live links and a
remote image)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from core.alerts.models import AlertChannel
from core.clock import utcnow
from core.demo import load_scenario, read_scenario
from core.sso.models import SsoConfig, SsoTrace
from core.tenants.access import Principal
from core.tenants.audit import record_event
from core.tenants.models import AppUser, ConsoleAccount, CrmAccount, Tenant
from tests.conftest import ROOT, run_page, unescape_md

# Each carries every construct that would make a live link, image or HTML out of tenant data.
HOSTILE = ("[x](https://evil.example/l) ![i](https://evil.example/i.png) <img src=https://evil.example/p> "
           "https://evil.example/u www.evil.example a@evil.example")
SHORT = "[x](https://evil.example/l)![i](//evil.example/i.png)<b>www.evil.example</b>"  # for 120-char fields
PAGES = sorted(p.name for p in (ROOT / "pages").glob("*.py") if not p.name.startswith("_"))


def _hostile_world(engine: Any) -> tuple[dict[str, int], dict[str, int]]:
    now = utcnow()
    with Session(engine) as s:
        slugs = load_scenario(s, read_scenario())
        s.commit()
        for i, t in enumerate(s.exec(select(Tenant)).all()):
            t.name = f"{HOSTILE} {i}"
            s.add(t)
        for i, a in enumerate(s.exec(select(CrmAccount)).all()):
            a.label = f"{SHORT}{i}"
            a.instance_url = f"https://evil.example/{i})[y](https://evil.example/z)"
            s.add(a)
        for u in s.exec(select(AppUser)).all():
            u.name = HOSTILE
            s.add(u)
        accounts = {a.email: a.id for a in s.exec(select(ConsoleAccount))}
        for a in s.exec(select(ConsoleAccount)).all():
            a.name = HOSTILE
            s.add(a)
        bigcorp = slugs["bigcorp"]
        s.add(SsoConfig(tenant_id=bigcorp, idp_entity_id=HOSTILE, sso_url=f"https://evil.example/sso`) {HOSTILE}",
                        sso_binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect", metadata_xml="<x/>",
                        metadata_sha256="0" * 64, source="url", source_url=HOSTILE, imported_by=HOSTILE,
                        imported_at=now))
        s.add(SsoTrace(tenant_id=bigcorp, source="test", ok=False, error=HOSTILE, name_id=HOSTILE,
                       checks_json='[{"name": "Signature", "ok": false, "detail": "x"}]', created_at=now))
        s.add(AlertChannel(tenant_id=bigcorp, kind="email", name=SHORT, target="ops@bigcorp.example",
                           last_status="failing", last_error=HOSTILE))
        s.add(AlertChannel(tenant_id=None, kind="email", name=SHORT, target="cs@crmbridge.example"))
        record_event(s, principal=HOSTILE[:200], action="crm_account.update", tenant_id=bigcorp, target=HOSTILE,
                     details={"label": HOSTILE})
        s.commit()
    return slugs, accounts  # type: ignore[return-value]


_CODE_SPAN = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
_ESCAPED = re.compile(r"\\[!-/:-@\[-`{-~]")
# What Markdown (CommonMark, GFM autolink literals) and raw HTML would turn into something live.
_LIVE = [
    re.compile(r"!?\[[^\]]*\]\([^)]*evil[^)]*\)"),  # [text](url) and ![alt](src)
    re.compile(r"<[a-zA-Z/!][^>]*>"),  # raw HTML, <https://autolinks>
    re.compile(r"https?://[^\s]*evil"),  # bare URL autolink
    re.compile(r"www\.evil"),  # www. autolink
    re.compile(r"[\w.+-]+@evil\.example"),  # email autolink
]


def live_constructs(markdown: str) -> list[str]:
    """Constructs in Markdown source that would render as a live link, image or HTML: code spans and
    backslash-escaped characters are literal text, so they are taken out first."""
    text = _ESCAPED.sub("\x00", _CODE_SPAN.sub("\x00", markdown))
    return [m.group(0) for rx in _LIVE for m in rx.finditer(text)]


def test_the_checker_sees_the_attack_and_passes_the_escaped_text() -> None:
    from pages._common import md, md_code

    assert len(live_constructs(HOSTILE)) >= 5
    assert live_constructs(f"IdP **{md(HOSTILE)}** · SSO endpoint {md_code(HOSTILE + ' ``x`')}") == []
    assert unescape_md(md(HOSTILE)) == HOSTILE


def _rendered_markdown(at: Any) -> list[str]:
    out: list[str] = []
    for name in ("title", "header", "subheader", "markdown", "caption", "error", "warning", "info", "success",
                 "toast"):
        out += [str(getattr(el, "value", "")) for el in getattr(at, name, [])]
    for name in ("expander", "tabs", "button", "metric", "selectbox", "radio", "checkbox", "toggle",
                 "text_input", "number_input"):
        out += [str(getattr(el, "label", "")) for el in getattr(at, name, [])]
    out += [str(m.value) for m in at.metric]
    return out


def _principals(slugs: dict[str, int], ids: dict[str, int]) -> dict[str, Principal]:
    return {
        "staff": Principal(role="staff", email="cs@crmbridge.example", account_id=ids["cs@crmbridge.example"]),
        "tenant_admin": Principal(role="tenant_admin", email="admin@bigcorp.example",
                                  account_id=ids["admin@bigcorp.example"], tenant_id=slugs["bigcorp"]),
        "leadership": Principal(role="leadership", email="vp.sales@crmbridge.example",
                                account_id=ids["vp.sales@crmbridge.example"]),
    }


@pytest.mark.usefixtures("vault_keys")
def test_no_page_renders_a_live_link_image_or_html_from_tenant_data(app_db: Any) -> None:
    slugs, ids = _hostile_world(app_db)
    shown_hostile: set[str] = set()
    problems: list[str] = []
    for role, who in _principals(slugs, ids).items():
        for page in PAGES:
            at = run_page(page, who, tenant_id=slugs["bigcorp"], onboarding_tenant=slugs["bigcorp"])
            assert not at.exception, (page, role, [e.value for e in at.exception])
            for text in _rendered_markdown(at):
                if "evil" in unescape_md(text):
                    shown_hostile.add(page)
                problems += [f"{page} as {role}: {c!r}" for c in live_constructs(text)]
    assert problems == []
    # the hostile values did reach the pages that show them (the test is not vacuous)
    assert {"sso.py", "tenant.py", "posture.py", "overview.py", "onboarding.py", "users_sync.py"} <= shown_hostile


def test_pages_use_the_one_escaping_helper() -> None:
    """No page builds Markdown from raw HTML: unsafe_allow_html appears nowhere under pages/."""
    for path in Path(ROOT / "pages").glob("*.py"):
        assert "unsafe_allow_html" not in path.read_text(), path.name
