"""The registry: lazy import by slug, no silent overwrite, install hints."""

from __future__ import annotations

import pytest

from core.errors import ConfigurationError, NotFound
from core.providers import registry
from core.providers.config import AccountConfig, HttpTransport


def test_table_is_sorted_and_names_the_three_crms() -> None:
    assert list(registry.known_implementations) == sorted(registry.known_implementations)
    assert {"salesforce", "dynamics-365", "hubspot"} <= set(registry.available_providers())


def test_salesforce_is_imported_on_first_use_and_builds_from_an_account() -> None:
    cls = registry.get_provider_class("salesforce")
    assert cls.slug == "salesforce" and registry.registry["salesforce"] is cls
    with pytest.raises(TypeError):
        registry.registry["x"] = cls  # type: ignore[index]  # read-only view
    account = AccountConfig(provider="salesforce", edition="enterprise", instance_url="https://a.my.salesforce.com",
                            auth_mode="oauth_client_credentials", settings={"client_id": "c"})
    p = registry.create_provider(account=account, credential={"client_secret": "zz-secret-zz"},
                                 transport=HttpTransport())
    assert p.max_write_batch == 200 and "zz-secret-zz" not in repr(p)


def test_no_silent_overwrite_and_unknown_slugs() -> None:
    cls = registry.get_provider_class("salesforce")

    class Other(cls):  # type: ignore[misc,valid-type]
        slug = "salesforce"

    with pytest.raises(ValueError, match="clobber"):
        registry.register("salesforce", Other)
    registry.register("salesforce", Other, clobber=True)
    try:
        assert registry.get_provider_class("salesforce") is Other
    finally:
        registry.register("salesforce", cls, clobber=True)
    with pytest.raises(ValueError, match="must name its own key"):
        registry.register("zoho", Other)
    with pytest.raises(NotFound, match="available are"):
        registry.get_provider_class("zoho")


def test_a_broken_import_gives_the_install_hint() -> None:
    registry.register("broken-crm", "core.providers.does_not_exist.Nope")
    try:
        with pytest.raises(ConfigurationError, match="import failed"):
            registry.get_provider_class("broken-crm")
    finally:
        registry.known_implementations.pop("broken-crm")
        registry.unregister("broken-crm")
