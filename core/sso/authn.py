"""The SAML plumbing a login of any purpose shares: the tenant's cached validation settings, building
and remembering an AuthnRequest, and the SP keys' settings for decrypting an assertion."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from onelogin.saml2.settings import OneLogin_Saml2_Settings
from sqlmodel import Session

from core.errors import NotFound
from core.settings import get_settings
from core.sso.common import ACS_PRINCIPAL, PURPOSE_TEST, idp_config
from core.sso.keys import active_key, private_keys, published_keys
from core.sso.models import SsoConfig, SsoRequest
from core.sso.sp import (
    REQUEST_TTL,
    AuthnStart,
    build_authn_request,
    build_settings_dict,
    make_settings,
    sp_endpoints,
)
from core.tenants.models import Tenant

_settings_lock = threading.Lock()
_settings_cache: OrderedDict[tuple[Any, ...], OneLogin_Saml2_Settings] = OrderedDict()
_metadata_cache: dict[tuple[Any, ...], tuple[str, datetime]] = {}


def acs_settings(tenant: Tenant, config: SsoConfig) -> OneLogin_Saml2_Settings:
    """The tenant's validation settings (strict, no private key), cached per configuration version.

    Holds no secret, so sharing it between requests is safe."""
    assert tenant.id is not None and config.id is not None
    return cached_acs_settings(tenant.id, tenant.slug, config.id, config.version, lambda: config)


def cached_acs_settings(
    tenant_id: int, slug: str, config_id: int, version: int, load: Callable[[], SsoConfig]
) -> OneLogin_Saml2_Settings:
    key = (tenant_id, slug, config_id, version, get_settings().public_url)
    with _settings_lock:
        cached = _settings_cache.get(key)
        if cached is not None:
            _settings_cache.move_to_end(key)
            return cached
    config = load()
    d = build_settings_dict(sp=sp_endpoints(slug), idp=idp_config(config))
    d["security"]["authnRequestsSigned"] = False  # validation never signs
    s = make_settings(d)
    with _settings_lock:
        _settings_cache[key] = s
        while len(_settings_cache) > 512:
            _settings_cache.popitem(last=False)
    return s


def start_authn(
    session: Session, *, tenant: Tenant, config: SsoConfig, purpose: str, relay_state: str | None,
    started_by: str | None, now: datetime, send_relay: bool = True,
) -> AuthnStart:
    """Build and remember an AuthnRequest. ``relay_state`` is kept on the request row; it goes to the
    IdP too unless ``send_relay`` is False (a connect link's address stays with us)."""
    idp = idp_config(config)
    to_idp = relay_state if send_relay else None
    keys = published_keys(session, tenant.id)  # type: ignore[arg-type]
    active = active_key(keys)
    if idp.want_authn_requests_signed and active is None:  # the IdP would refuse an unsigned request
        raise NotFound(f"{tenant.name}'s IdP wants signed sign-in requests and there is no SP key to sign with.",
                       fix="A tenant admin generates them on the Single sign-on page (Generate SP keys).",
                       code="sp_keys_missing")
    d = build_settings_dict(sp=sp_endpoints(tenant.slug), idp=idp,
                            sp_cert_pem=active.cert_pem if active else None)
    if idp.want_authn_requests_signed and active is not None:
        with private_keys(session, [active], principal=ACS_PRINCIPAL, reason="sign SAML AuthnRequest",
                           now=now) as (pem,):
            d["sp"]["privateKey"] = pem
            start = build_authn_request(settings=make_settings(d), idp=idp, relay_state=to_idp,
                                        force_authn=purpose == PURPOSE_TEST, sign_key_pem=pem,
                                        sign_cert_pem=active.cert_pem, now=now)
            d["sp"]["privateKey"] = ""
    else:
        d["security"]["authnRequestsSigned"] = False
        start = build_authn_request(settings=make_settings(d), idp=idp, relay_state=to_idp,
                                    force_authn=purpose == PURPOSE_TEST, now=now)
    session.add(SsoRequest(
        request_id=start.request_id, tenant_id=tenant.id, purpose=purpose,  # type: ignore[arg-type]
        relay_state=relay_state, started_by=started_by, created_at=now, expires_at=now + REQUEST_TTL,
    ))
    session.flush()
    return start



@contextmanager
def sp_key_settings(
    session: Session, tenant_id: int, slug: str, load_config: Callable[[], SsoConfig], now: datetime
) -> Iterator[Any]:
    """A factory yielding settings with each published SP key (the vault releases them one block)."""

    @contextmanager
    def factory() -> Iterator[list[OneLogin_Saml2_Settings]]:
        keys = published_keys(session, tenant_id)
        if not keys:
            yield []
            return
        config = load_config()
        with private_keys(session, keys, principal=ACS_PRINCIPAL, reason="decrypt SAML assertion",
                           now=now) as pems:
            out = []
            for k, pem in zip(keys, pems, strict=True):
                d = build_settings_dict(sp=sp_endpoints(slug), idp=idp_config(config),
                                        sp_cert_pem=k.cert_pem, sp_key_pem=pem)
                d["security"]["authnRequestsSigned"] = False
                out.append(make_settings(d))
            yield out

    yield factory

