"""Seal alert webhook URLs: many receivers (Slack, Teams, Zapier) put their token in the URL, so the URL
is a secret. ``alert_channel.target`` keeps only its masked form (https://host/…); the full URL moves
behind ``url_ref``.

Existing rows are sealed here with the platform key (derived from the server secret, outside the
database), which ``core.accounts.secrets.read_secret`` opens like a vault reference; new tenant
channels keep their URL in the tenant's vault, and a tenant channel sealed here moves into its tenant's
vault at its next delivery (so a tenant's crypto-shred covers it). A downgrade restores the URLs
sealed here; a URL kept
in a tenant's vault needs the vault's keys and stays masked (re-enter it on the Alerts page).

Self-contained: the sealing format and the URL masking are written out below as they were when this
revision was made (frozen, so later changes to the app cannot change what this revision does); the
server secret comes from migrations/env.py (``config.attributes["server_secret"]``).

Revision ID: 5d2e7a9c4b10
Revises: 1c5417ed20b7
Create Date: 2026-12-02 20:40:00
"""
import base64
import os
from typing import Sequence, Union
from urllib.parse import urlsplit

from alembic import op
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
import sqlalchemy as sa
import sqlmodel


revision: str = '5d2e7a9c4b10'
down_revision: Union[str, Sequence[str], None] = '1c5417ed20b7'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_channels = sa.table('alert_channel', sa.column('id', sa.Integer), sa.column('kind', sa.String),
                     sa.column('target', sa.String), sa.column('url_ref', sa.String))


# The platform seal as core/accounts/secrets.py wrote it then: AES-256-GCM under
# HKDF-SHA256(server secret, info=_INFO), associated data binding owner and purpose,
# stored as "sealed:v1:" + urlsafe base64 of nonce + ciphertext.
SEALED_PREFIX = "sealed:v1:"
_INFO = b"crmbridge/accounts/platform-secret/v1"
_NONCE = 12


def _platform_key() -> bytes:
    secret = op.get_context().config.attributes["server_secret"]()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(secret)


def _aad(channel_id: int) -> bytes:
    return (f"crmbridge/accounts/sealed/v1|owner=alert_channel:{channel_id}"
            f"|purpose=alert-webhook-url-{channel_id}").encode()


def _seal(url: str, channel_id: int, key: bytes) -> str:
    nonce = os.urandom(_NONCE)
    blob = nonce + AESGCM(key).encrypt(nonce, url.encode(), _aad(channel_id))
    return SEALED_PREFIX + base64.urlsafe_b64encode(blob).decode()


def _open(ref: str, channel_id: int, key: bytes) -> str:
    blob = base64.urlsafe_b64decode(ref[len(SEALED_PREFIX):].encode())
    return AESGCM(key).decrypt(blob[:_NONCE], blob[_NONCE:], _aad(channel_id)).decode()


def _masked(url: str) -> str:
    """Scheme, host and port; the path (which may hold the receiver's token) becomes "…"."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    rest = "/…" if (parts.path.strip("/") or parts.query) else "/"
    return f"{parts.scheme}://{parts.hostname}{port}{rest}"


def upgrade() -> None:
    with op.batch_alter_table('alert_channel', schema=None) as batch_op:
        batch_op.add_column(sa.Column('url_ref', sqlmodel.sql.sqltypes.AutoString(length=4000), nullable=True))

    bind = op.get_bind()
    rows = bind.execute(sa.select(_channels.c.id, _channels.c.target)
                        .where(_channels.c.kind == 'webhook', _channels.c.url_ref.is_(None))).all()
    key = _platform_key() if rows else b""
    for channel_id, url in rows:
        bind.execute(_channels.update().where(_channels.c.id == channel_id)
                     .values(url_ref=_seal(url, channel_id, key), target=_masked(url)))


def downgrade() -> None:
    bind = op.get_bind()
    rows = bind.execute(sa.select(_channels.c.id, _channels.c.url_ref)
                        .where(_channels.c.kind == 'webhook', _channels.c.url_ref.is_not(None))).all()
    key = _platform_key() if any(ref.startswith(SEALED_PREFIX) for _, ref in rows) else b""
    for channel_id, ref in rows:
        if ref.startswith(SEALED_PREFIX):
            url = _open(ref, channel_id, key)
            bind.execute(_channels.update().where(_channels.c.id == channel_id).values(target=url))

    with op.batch_alter_table('alert_channel', schema=None) as batch_op:
        batch_op.drop_column('url_ref')
