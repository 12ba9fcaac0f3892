"""Provider registry: catalog slug → provider class, imported lazily, never overwritten silently.

Shaped after fsspec's registry: ``known_implementations`` is a sorted table of dotted import paths
(with an install hint when the import fails); ``registry`` is a read-only view of the classes loaded
so far; ``register(name, cls, clobber=False)`` adds one (tests, plugins) and refuses to replace an
existing entry unless asked.

    cls = get_provider_class("salesforce")
    provider = cls(account=..., credential=..., transport=..., on_auth_failure=...)
    # or in one step:
    provider = create_provider(account=..., credential=..., transport=...)

The constructor contract every class follows is in ``core.providers.config`` (AccountConfig,
Credential, HttpTransport, the callbacks). One module per CRM under core/providers/ (snake_case,
e.g. ``dynamics-365`` lives in ``core.providers.dynamics``), and each class names its slug as
``slug: ClassVar[str]``, which must equal its registry key.

Adding a CRM: a catalog entry (catalog.yaml or catalog.<slug>.yaml), one class, one line in
``known_implementations`` below (keep it sorted), and its tests against the sandbox.
"""

from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from core.errors import ConfigurationError, NotFound

if TYPE_CHECKING:
    from core.providers.base import Provider
    from core.providers.config import AccountConfig

_registry: dict[str, type[Provider]] = {}
registry = MappingProxyType(_registry)
"""Read-only view of the provider classes imported or registered so far."""

known_implementations: dict[str, dict[str, str]] = {
    "dynamics-365": {
        "class": "core.providers.dynamics.Dynamics365Provider",
        "err": "The Dynamics 365 provider failed to import: check core/providers/dynamics.py "
        "and that httpx is installed (pip install -e .).",
    },
    "hubspot": {
        "class": "core.providers.hubspot.HubSpotProvider",
        "err": "The HubSpot provider failed to import: check core/providers/hubspot.py "
        "and that httpx is installed (pip install -e .).",
    },
    "salesforce": {
        "class": "core.providers.salesforce.SalesforceProvider",
        "err": "The Salesforce provider needs zeep and simple-salesforce: pip install -e . "
        "(zeep>=4.2, simple-salesforce>=1.12).",
    },
}

assert list(known_implementations) == sorted(known_implementations), "keep known_implementations sorted"


def register(name: str, cls: type[Provider] | str, clobber: bool = False) -> None:
    """Register ``cls`` (a class, or a dotted path imported on first use) under ``name``.

    Raises:
        ValueError: ``name`` is taken and ``clobber`` is False.
    """
    if isinstance(cls, str):
        if name in known_implementations and not clobber:
            raise ValueError(f"Name {name!r} already in the known_implementations table; pass clobber=True")
        known_implementations[name] = {"class": cls, "err": f"{cls} import failed for provider {name!r}"}
        if clobber:
            _registry.pop(name, None)
        return
    if name in _registry and not clobber and _registry[name] is not cls:
        raise ValueError(f"Name {name!r} is already registered to {_registry[name]!r}; pass clobber=True")
    slug = getattr(cls, "slug", None)
    if slug != name:
        raise ValueError(f"{cls.__name__}.slug is {slug!r}, not {name!r}: a class must name its own key")
    _registry[name] = cls


def unregister(name: str) -> None:
    """Remove a runtime registration (tests)."""
    _registry.pop(name, None)


def _import_class(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def get_provider_class(slug: str) -> type[Provider]:
    """The class for ``slug``, importing it on first use.

    Raises:
        NotFound: no provider has that slug.
        ConfigurationError: the provider's module cannot be imported (with the install hint).
    """
    if slug in _registry:
        return _registry[slug]
    entry = known_implementations.get(slug)
    if entry is None:
        raise NotFound(
            f"No provider for {slug!r}: available are {', '.join(available_providers())}."
        )
    try:
        cls = _import_class(entry["class"])
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(entry["err"], fix=str(exc)) from exc
    register(slug, cls)
    return cls


def available_providers() -> list[str]:
    return sorted(set(known_implementations) | set(_registry))


def create_provider(*, account: AccountConfig, **kwargs: Any) -> Provider:
    """``get_provider_class(account.provider)(account=account, **kwargs)`` (see core.providers.config)."""
    return get_provider_class(account.provider)(account=account, **kwargs)  # type: ignore[call-arg]
