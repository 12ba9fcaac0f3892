"""The outbox: changes made in our app, each with its real actor, waiting to reach the CRM.

``record_change`` is how our app changes an opportunity: it updates the mirror at once (the user sees
their change), and appends an outbox row holding the actor, an idempotency key (a create becomes an
upsert on it, so a retried batch never duplicates a record), the fields to push and the values they
were based on (for the three-way merge when the CRM changed the same record meanwhile).

Values are kept in a canonical text form (``canonical``) so a value we wrote and the value the CRM
hands back compare equal whatever the wire format (``Decimal("10")`` vs ``10.0``, dates vs ISO text).
"""

from __future__ import annotations

import json
import uuid
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlmodel import Session, col, select

from core.clock import utcnow
from core.errors import InvalidInput, NotFound
from core.sync.models import (
    APP_OWNED_FIELDS,
    CRM_OWNED_FIELDS,
    OutboxStatus,
    SyncOpportunity,
    SyncOutbox,
)
from core.tenants.access import Principal, require_tenant
from core.tenants.models import AppUser, CrmAccount

ALL_FIELDS = CRM_OWNED_FIELDS + APP_OWNED_FIELDS
CENT = Decimal("0.01")


def canonical(field: str, value: Any) -> str | None:
    """One text form per value, for storage in JSON and for comparing ours with the CRM's."""
    if value is None or value == "":
        return None
    if field == "amount":
        try:
            return str(Decimal(str(value)).quantize(CENT))
        except InvalidOperation as exc:
            raise InvalidInput(f"Amount {value!r} is not a number: enter digits such as 12500.00.") from exc
    if field == "close_date":
        if isinstance(value, datetime):
            return value.date().isoformat()
        if isinstance(value, date):
            return value.isoformat()
        try:
            return date.fromisoformat(str(value)[:10]).isoformat()
        except ValueError as exc:
            raise InvalidInput(f"Close date {value!r} is not a date: use YYYY-MM-DD.") from exc
    return str(value)


def mirror_value(opp: SyncOpportunity, field: str) -> str | None:
    """The mirror's current value of ``field``, canonical."""
    if field == "owner_id":
        return canonical(field, opp.owner_crm_id)
    if field in CRM_OWNED_FIELDS:
        return canonical(field, getattr(opp, field))
    return canonical(field, app_fields(opp).get(field))


def set_mirror_value(opp: SyncOpportunity, field: str, value: str | None) -> None:
    if field == "name":
        opp.name = value or ""
    elif field == "stage":
        opp.stage = value
    elif field == "amount":
        opp.amount = Decimal(value) if value is not None else None
    elif field == "close_date":
        opp.close_date = date.fromisoformat(value) if value is not None else None
    elif field == "owner_id":
        opp.owner_crm_id = value
    else:
        fields = app_fields(opp)
        if value is None:
            fields.pop(field, None)
        else:
            fields[field] = value
        opp.app_fields_json = json.dumps(fields, sort_keys=True)


def app_fields(opp: SyncOpportunity) -> dict[str, str]:
    return dict(json.loads(opp.app_fields_json or "{}"))


def loads(text: str | None) -> dict[str, str | None]:
    return dict(json.loads(text or "{}"))


def new_idempotency_key() -> str:
    return f"crb-{uuid.uuid4().hex}"


def record_change(
    *,
    session: Session,
    principal: Principal,
    crm_account_id: int,
    actor_app_user_id: int,
    fields: dict[str, Any],
    opportunity_id: int | None = None,
    crm_id: str | None = None,
    idempotency_key: str | None = None,
    now: datetime | None = None,
) -> SyncOutbox:
    """Record a change made in our app by ``actor_app_user_id`` (a create when neither
    ``opportunity_id`` nor ``crm_id`` is given). Updates the mirror and appends the outbox row in the
    caller's transaction.

    Raises:
        AccessDenied, NotFound (unknown account, user or record), InvalidInput (unknown field, bad value,
        an idempotency key used twice).
    """
    now = now or utcnow()
    account = session.get(CrmAccount, crm_account_id)
    if account is None:
        raise NotFound(f"CRM account {crm_account_id} does not exist: pick an account on the tenant page.")
    assert account.id is not None
    require_tenant(principal, account.tenant_id)
    actor = session.get(AppUser, actor_app_user_id)
    if actor is None or actor.tenant_id != account.tenant_id:
        raise NotFound(f"App user {actor_app_user_id} is not a user of this tenant: the change needs its real actor.")
    unknown = set(fields) - set(ALL_FIELDS)
    if unknown:
        raise InvalidInput(f"Unknown opportunity field(s) {sorted(unknown)}: use {', '.join(ALL_FIELDS)}.")
    if not fields:
        raise InvalidInput("The change has no field: give at least one of " + ", ".join(ALL_FIELDS) + ".")
    values = {f: canonical(f, v) for f, v in fields.items()}
    key = idempotency_key or new_idempotency_key()
    if session.exec(select(SyncOutbox.id).where(SyncOutbox.idempotency_key == key)).first() is not None:
        raise InvalidInput(f"Idempotency key {key!r} was already used: each change needs its own key.")

    opp: SyncOpportunity | None = None
    if opportunity_id is not None:
        opp = session.get(SyncOpportunity, opportunity_id)
    elif crm_id is not None:
        opp = session.exec(select(SyncOpportunity).where(
            SyncOpportunity.crm_account_id == account.id, SyncOpportunity.crm_id == crm_id)).first()
    if (opportunity_id is not None or crm_id is not None) and (opp is None or opp.crm_account_id != account.id):
        raise NotFound(f"Opportunity {opportunity_id or crm_id} is not in the mirror of this CRM account: "
                       "pull it first (sync now) or create it.")
    if opp is None:
        if not values.get("name"):
            raise InvalidInput("A new opportunity needs a name.")
        opp = SyncOpportunity(tenant_id=account.tenant_id, crm_account_id=account.id, external_key=key,
                              created_at=now, updated_at=now)
        operation = "create"
        base: dict[str, str | None] = {}
    else:
        operation = "update"
        base = {f: mirror_value(opp, f) for f in values}
    for f, v in values.items():
        set_mirror_value(opp, f, v)
    opp.updated_at = now
    session.add(opp)
    session.flush()
    assert opp.id is not None

    settings = json.loads(account.settings_json or "{}")
    mapped = set((settings.get("app_field_map") or {}).keys())
    pushable = [f for f in values if f in CRM_OWNED_FIELDS or f in mapped]
    row = SyncOutbox(
        tenant_id=account.tenant_id, crm_account_id=account.id, opportunity_id=opp.id, idempotency_key=key,
        operation=operation, actor_app_user_id=actor_app_user_id, actor_label=actor.email,
        fields_json=json.dumps({f: values[f] for f in pushable}, sort_keys=True),
        base_json=json.dumps(base, sort_keys=True),
        status=OutboxStatus.pending.value if pushable or operation == "create" else OutboxStatus.local.value,
        created_at=now, updated_at=now, applied_at=None if pushable else now,
    )
    session.add(row)
    session.flush()
    return row


def pending_for(session: Session, *, crm_account_id: int, actor_app_user_id: int | None = None) -> list[SyncOutbox]:
    """Pending outbox rows of an account (of one actor for a per-user job), oldest first."""
    stmt = select(SyncOutbox).where(
        SyncOutbox.crm_account_id == crm_account_id, SyncOutbox.status == OutboxStatus.pending.value)
    if actor_app_user_id is not None:
        stmt = stmt.where(SyncOutbox.actor_app_user_id == actor_app_user_id)
    return list(session.exec(stmt.order_by(col(SyncOutbox.id))))


def retry_failed(
    *, session: Session, principal: Principal, outbox_id: int, now: datetime | None = None,
) -> SyncOutbox:
    """Put a rejected change back in the queue (after the record was fixed in the CRM)."""
    row = session.get(SyncOutbox, outbox_id)
    if row is None:
        raise NotFound(f"Outbox entry {outbox_id} does not exist.")
    require_tenant(principal, row.tenant_id)
    if row.status != OutboxStatus.failed:
        raise InvalidInput(f"Outbox entry {outbox_id} is {row.status}, not failed: only a rejected change is retried.")
    row.status = OutboxStatus.pending.value
    row.updated_at = now or utcnow()
    session.add(row)
    from core.tenants.audit import record_event

    record_event(session, principal=principal, action="sync.outbox.retry", tenant_id=row.tenant_id,
                 target=f"outbox:{row.id}", details={"idempotency_key": row.idempotency_key}, at=row.updated_at)
    return row
