"""Provider-route fixtures shared by the credentials-form and app-install tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine

from core.settings import get_settings


@pytest.fixture
def sandbox_app(app_db: Engine, sandbox, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:  # type: ignore[no-untyped-def]
    """The console's database plus the sandbox (its CA and URL configured), so a route's connection test
    reaches the sandbox."""
    monkeypatch.setenv("CRMBRIDGE_SANDBOX_CA_FILE", str(sandbox.ca_file))
    monkeypatch.setenv("CRMBRIDGE_SANDBOX_URL", sandbox.base_url)  # the one loopback origin CRM calls may use
    get_settings.cache_clear()
    yield sandbox
    get_settings.cache_clear()
