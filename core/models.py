"""Imports every table so ``SQLModel.metadata`` is complete (Alembic, tests)."""

from sqlmodel import SQLModel

import core.accounts.models
import core.alerts.models
import core.connections.models
import core.onboarding
import core.posture.models
import core.scheduler.models
import core.sso.models
import core.sync.models
import core.tenants.models
import core.vault.models  # noqa: F401

metadata = SQLModel.metadata
