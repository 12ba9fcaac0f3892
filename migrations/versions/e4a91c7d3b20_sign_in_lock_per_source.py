"""Sign-in locks per (console account, client address) with backoff, instead of one lock per account
(five wrong passwords from anywhere used to lock the holder out everywhere).

Revision ID: e4a91c7d3b20
Revises: b7e3c1d9a2f4
Create Date: 2026-12-04 15:20:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = 'e4a91c7d3b20'
down_revision: Union[str, Sequence[str], None] = 'b7e3c1d9a2f4'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'console_sign_in_lock',
        sa.Column('account_id', sa.Integer(), nullable=False),
        sa.Column('address', sa.String(length=64), nullable=False),
        sa.Column('failures', sa.Integer(), nullable=False),
        sa.Column('locks', sa.Integer(), nullable=False),
        sa.Column('locked_until', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_failure_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['account_id'], ['console_account.id']),
        sa.PrimaryKeyConstraint('account_id', 'address'),
    )


def downgrade() -> None:
    op.drop_table('console_sign_in_lock')
