"""Seal the audit log's heads: a MAC on each chain head (chain, row count, last HMAC) and a global
seal row over the set of chains (how many, and a digest of their names), both keyed from the
server secret.

Existing heads are sealed here when the server secret is at hand (``CRMBRIDGE_SECRET_KEY``, or in
demo mode the secret file). Without it the migration cannot compute a MAC, so it seals nothing: the
log keeps working as before, and ``crmbridge audit verify`` reports it as UNSEALED until an operator
(with the secret set) runs ``crmbridge audit verify --seal-legacy`` — which seals only when every
chain verifies. Nothing is ever sealed silently by a later append: that would let someone who
strips the MACs have a truncated log sealed for them.

Self-contained: the key derivation below mirrors core.settings.Settings.server_secret and
core.tenants.audit.head_key / head_mac / chain_term / seal_mac (label strings included); do not change one
without the other.

Revision ID: b7c3e1f0a9d2
Revises: 270a8d7678df
Create Date: 2026-12-04 15:30:00
"""
import base64
import hashlib
import hmac
import os
import sys
from pathlib import Path
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import sqlmodel


revision: str = 'b7c3e1f0a9d2'
down_revision: Union[str, Sequence[str], None] = '270a8d7678df'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_heads = sa.table('audit_head', sa.column('chain', sa.String), sa.column('seq', sa.Integer),
                  sa.column('last_hmac', sa.String), sa.column('mac', sa.String))
_seal = sa.table('audit_seal', sa.column('id', sa.Integer), sa.column('chains', sa.Integer),
                 sa.column('digest', sa.String), sa.column('mac', sa.String))


def _server_secret() -> bytes | None:
    value = os.environ.get('CRMBRIDGE_SECRET_KEY', '')
    if value:
        try:
            raw = base64.urlsafe_b64decode(value + '=' * (-len(value) % 4))
            if len(raw) >= 16:
                return raw
        except ValueError:
            pass
        return value.encode()
    if os.environ.get('CRMBRIDGE_DEMO', '').lower() in ('1', 'true', 'yes', 'on'):
        path = Path(os.environ.get('CRMBRIDGE_SECRET_KEY_FILE') or Path(__file__).resolve().parents[2] / 'data' / 'secret.key')
        if path.exists():
            return base64.urlsafe_b64decode(path.read_text().strip() + '==')
    return None


def _mac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def upgrade() -> None:
    with op.batch_alter_table('audit_head', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mac', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
    op.create_table('audit_seal',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('chains', sa.Integer(), nullable=False),
    sa.Column('digest', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('mac', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )

    bind = op.get_bind()
    heads = bind.execute(sa.select(_heads.c.chain, _heads.c.seq, _heads.c.last_hmac)).all()
    if not heads:
        return  # a new log: the first append starts the seal
    secret = _server_secret()
    if secret is None:
        sys.stderr.write(
            f"audit log: {len(heads)} chain head(s) left unsealed (CRMBRIDGE_SECRET_KEY is not set here). "
            "With the secret set, run `crmbridge audit verify --seal-legacy` once.\n")
        return
    key = hmac.new(secret, b'crmbridge/audit-head/v1', hashlib.sha256).digest()
    digest = 0
    for chain, seq, last in heads:
        digest ^= int(_mac(key, f'chain|{chain}'), 16)
        bind.execute(_heads.update().where(_heads.c.chain == chain).values(mac=_mac(key, f'head|{chain}|{seq}|{last}')))
    hexdigest = f'{digest:064x}'
    bind.execute(_seal.insert().values(id=1, chains=len(heads), digest=hexdigest,
                                       mac=_mac(key, f'seal|{len(heads)}|{hexdigest}')))


def downgrade() -> None:
    op.drop_table('audit_seal')
    with op.batch_alter_table('audit_head', schema=None) as batch_op:
        batch_op.drop_column('mac')
