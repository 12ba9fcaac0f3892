"""Periodic jobs: one leased row per job (``periodic_job``) so each runs once per interval across any
number of schedulers, and the history of their runs (``periodic_run``). Self-contained: plain SQLAlchemy
types, no application import.

Revision ID: 270a8d7678df
Revises: e4a91c7d3b20
Create Date: 2026-12-04 15:21:06.452788
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '270a8d7678df'
down_revision: Union[str, Sequence[str], None] = 'e4a91c7d3b20'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('periodic_job',
    sa.Column('name', sa.String(length=40), nullable=False),
    sa.Column('interval_seconds', sa.Integer(), nullable=False),
    sa.Column('lease_owner', sa.String(length=120), nullable=True),
    sa.Column('lease_token', sa.String(length=40), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_window_start', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_outcome', sa.String(length=20), nullable=True),
    sa.Column('last_error', sa.String(length=1000), nullable=True),
    sa.Column('last_summary', sa.String(length=500), nullable=True),
    sa.Column('last_owner', sa.String(length=120), nullable=True),
    sa.Column('last_success_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('runs_total', sa.Integer(), nullable=False),
    sa.Column('failures_in_a_row', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('periodic_run',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job', sa.String(length=40), nullable=False),
    sa.Column('window_start', sa.DateTime(timezone=True), nullable=False),
    sa.Column('owner', sa.String(length=120), nullable=False),
    sa.Column('lease_token', sa.String(length=40), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('outcome', sa.String(length=20), nullable=False),
    sa.Column('error', sa.String(length=1000), nullable=True),
    sa.Column('summary', sa.String(length=500), nullable=True),
    sa.ForeignKeyConstraint(['job'], ['periodic_job.name'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('periodic_run', schema=None) as batch_op:
        batch_op.create_index('ix_periodic_run_job_started', ['job', 'started_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('periodic_run', schema=None) as batch_op:
        batch_op.drop_index('ix_periodic_run_job_started')

    op.drop_table('periodic_run')
    op.drop_table('periodic_job')
