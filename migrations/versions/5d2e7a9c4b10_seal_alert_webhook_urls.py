"""Seal alert webhook URLs: many receivers (Slack, Teams, Zapier) put their token in the URL, so the URL
is a secret. ``alert_channel.target`` keeps only its masked form (https://host/…); the full URL moves
behind ``url_ref``.

Existing rows are sealed here with the platform key (derived from the server secret, outside the
database), which ``core.accounts.secrets.read_secret`` opens like a vault reference; new tenant
channels keep their URL in the tenant's vault, and a tenant channel sealed here moves into its tenant's
vault at its next delivery (so a tenant's crypto-shred covers it). A downgrade restores the URLs
sealed here; a URL kept
in a tenant's vault needs the vault's keys and stays masked (re-enter it on the Alerts page).

Revision ID: 5d2e7a9c4b10
Revises: 1c5417ed20b7
Create Date: 2026-12-02 20:40:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision: str = '5d2e7a9c4b10'
down_revision: Union[str, Sequence[str], None] = '1c5417ed20b7'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_channels = sa.table('alert_channel', sa.column('id', sa.Integer), sa.column('kind', sa.String),
                     sa.column('target', sa.String), sa.column('url_ref', sa.String))


def upgrade() -> None:
    with op.batch_alter_table('alert_channel', schema=None) as batch_op:
        batch_op.add_column(sa.Column('url_ref', sqlmodel.sql.sqltypes.AutoString(length=4000), nullable=True))

    from core.accounts.secrets import seal_platform
    from core.alerts.channels import masked_webhook_url

    bind = op.get_bind()
    rows = bind.execute(sa.select(_channels.c.id, _channels.c.target)
                        .where(_channels.c.kind == 'webhook', _channels.c.url_ref.is_(None))).all()
    for channel_id, url in rows:
        ref = seal_platform(url, owner=f"alert_channel:{channel_id}", purpose=f"alert-webhook-url-{channel_id}")
        bind.execute(_channels.update().where(_channels.c.id == channel_id)
                     .values(url_ref=ref, target=masked_webhook_url(url)))


def downgrade() -> None:
    from core.accounts.secrets import SEALED_PREFIX, open_platform

    bind = op.get_bind()
    rows = bind.execute(sa.select(_channels.c.id, _channels.c.url_ref)
                        .where(_channels.c.kind == 'webhook', _channels.c.url_ref.is_not(None))).all()
    for channel_id, ref in rows:
        if ref.startswith(SEALED_PREFIX):
            url = open_platform(ref, owner=f"alert_channel:{channel_id}", purpose=f"alert-webhook-url-{channel_id}")
            bind.execute(_channels.update().where(_channels.c.id == channel_id).values(target=url))

    with op.batch_alter_table('alert_channel', schema=None) as batch_op:
        batch_op.drop_column('url_ref')
