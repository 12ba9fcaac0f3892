"""health_probe: the row /healthz rewrites to prove the database accepts a write (issue 14).

Revision ID: b7e3c1d9a2f4
Revises: 5d2e7a9c4b10
Create Date: 2026-12-04 15:30:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = 'b7e3c1d9a2f4'
down_revision: Union[str, Sequence[str], None] = '5d2e7a9c4b10'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'health_probe',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('checked_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('checks', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )


def downgrade() -> None:
    op.drop_table('health_probe')
