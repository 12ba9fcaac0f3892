"""A sync worker in its own process, for the fault tests: ``python -m tests.core.sync.worker_proc``.

    --db URL          the database (SQLite file or PostgreSQL)
    --now ISO         the injected clock (frozen: leases and backoff follow it, not the wall clock)
    --ca PATH         the sandbox CA: runs the real Salesforce provider with credentials from the vault
                      (the KEK ring comes from CRMBRIDGE_VAULT_KEYS)
    --fake FILE       instead, an in-memory CRM; every change key it applied is appended to FILE
    --concurrency N

It drains the due jobs once (``run_worker(once=True)``) and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--db", required=True)
    p.add_argument("--now", required=True)
    p.add_argument("--ca")
    p.add_argument("--fake")
    p.add_argument("--name", default="proc")
    p.add_argument("--concurrency", type=int, default=1)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import core.models  # noqa: F401
    from core.clock import FrozenClock
    from core.db import make_engine
    from core.sync.engine import SyncEngine, VaultCredentials
    from core.sync.worker import run_worker

    clock = FrozenClock(datetime.fromisoformat(a.now))
    engine = make_engine(a.db)
    if a.fake:
        from tests.fixtures.sync import FakeCredentials, FakeCrm, FakeProvider

        crms: dict[tuple[int, int | None], FakeCrm] = {}  # what each user sees (a private sharing model)

        def fake_factory(ctx, cred):  # type: ignore[no-untyped-def]
            return FakeProvider(crms.setdefault((ctx.crm_account_id, ctx.app_user_id), FakeCrm(clock)), cred)

        sync = SyncEngine(engine, clock=clock, credentials=FakeCredentials(), provider_factory=fake_factory)
    else:
        from core.providers.config import HttpTransport
        from core.providers.salesforce import SalesforceProvider
        from core.providers.transport import CrmUrlPolicy

        def sandbox_policy(url: str) -> CrmUrlPolicy:  # the test sandbox, named explicitly
            return CrmUrlPolicy.vendors(sandbox_url=url)

        def factory(ctx, cred):  # type: ignore[no-untyped-def]
            return SalesforceProvider(account=ctx.account, credential=cred,
                                      transport=HttpTransport(verify=a.ca, timeout=120, url_policy=sandbox_policy(
                                          ctx.account.instance_url)), clock=clock)

        sync = SyncEngine(engine, clock=clock, credentials=VaultCredentials(engine, clock=clock),
                          provider_factory=factory)
    stats = run_worker(engine=engine, concurrency=a.concurrency, once=True, clock=clock, sync_engine=sync,
                       schedule=False, name=a.name)
    if a.fake:
        with Path(a.fake).open("a") as fh:
            for crm in crms.values():
                for key, n in crm.applied.items():
                    fh.write(json.dumps({"worker": a.name, "key": key, "n": n}) + "\n")
    sys.stdout.write(f"WORKER DONE {stats.runs}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
