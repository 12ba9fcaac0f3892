"""posture_snapshot trend index: the adoption page's sampled days read from one covering index instead
of 90 days of full snapshot rows (issue 18: console cost flat as history grows).

Revision ID: c9d4e2a7f1b3
Revises: b7c3e1f0a9d2
Create Date: 2026-12-04 16:40:00
"""
from typing import Sequence, Union

from alembic import op


revision: str = 'c9d4e2a7f1b3'
down_revision: Union[str, Sequence[str], None] = 'b7c3e1f0a9d2'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index('ix_posture_snapshot_trend', 'posture_snapshot',
                    ['day', 'level', 'editions', 'sso_state', 'users_total', 'users_sso'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_posture_snapshot_trend', table_name='posture_snapshot')
