"""The one provider class of the test-only Acme CRM (registered by the test: one registry line)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar

import httpx

from core.clock import utcnow
from core.errors import AuthenticationFailed, ProviderError, ProviderUnavailable
from core.providers.base import (
    ApiUsage,
    ConnectionReport,
    CrmUser,
    LicenseSnapshot,
    Opportunity,
    OpportunityChange,
    ProviderBase,
    PushResult,
    StepResult,
)
from core.providers.config import secret_value


class AcmeCrmProvider(ProviderBase):
    slug: ClassVar[str] = "acme-crm"
    max_write_batch: ClassVar[int] = 50
    max_page_size: ClassVar[int] = 500

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._http = self.transport.client()
        self._base = self.account.instance_url.rstrip("/") + "/api"
        self._token: str | None = None
        self._user_id: str | None = None

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        if self._token is None and path != "/login":
            self._login()
        try:
            resp = self._http.request(method, self._base + path, json=body,
                                      headers={"Authorization": f"Bearer {self._token}"} if self._token else {})
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"Acme CRM did not answer: {type(exc).__name__}",
                                      fix="Check the Acme API address.") from exc
        if resp.status_code == 401:
            raise self._auth_failed(AuthenticationFailed(resp.json().get("message", "Acme refused the login."),
                                                         fix="Enter your current Acme login.",
                                                         code=resp.json().get("error")))
        if resp.status_code >= 400:
            raise ProviderError(f"Acme CRM answered {resp.status_code}", code=str(resp.status_code))
        if path != "/login":
            self._calls += 1
        return resp.json()

    def _login(self) -> None:
        self._auth_calls += 1
        data = self._call("POST", "/login", {"username": secret_value(self._credential.get("username")),
                                             "password": secret_value(self._credential.get("password"))})
        self._token, self._user_id = data["token"], data["user_id"]

    def test_connection(self) -> ConnectionReport:
        report = ConnectionReport(ok=False, steps=[])
        steps: list[tuple[str, Any]] = [
            ("reach", self._reach),
            ("authenticate", lambda: self._login() or f"logged in as {self._user_id}"),
            ("licenses", lambda: setattr(report, "licenses", self.license_snapshot()) or "read"),
            ("quota", lambda: setattr(report, "api_usage", self.api_usage()) or "read"),
        ]
        for name, fn in steps:
            try:
                detail = fn()
            except ProviderError as exc:
                report.steps.append(StepResult(name, False, exc.message, exc.fix, code=exc.code, error=type(exc)))
                return report
            report.steps.append(StepResult(name, True, str(detail)))
        report.ok, report.identity, report.crm_user_id = True, self._user_id, self._user_id
        return report

    def _reach(self) -> str:
        try:
            self._http.get(self._base + "/")
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"Acme CRM did not answer: {type(exc).__name__}",
                                      fix="Check the Acme API address.") from exc
        return "Acme answered"

    def license_snapshot(self) -> LicenseSnapshot:
        lic = self._call("GET", "/limits")["licenses"]
        return LicenseSnapshot(total=lic["total"], used=lic["used"])

    def api_usage(self) -> ApiUsage | None:
        api = self._call("GET", "/limits")["api"]
        return ApiUsage(used=api["used"], limit=api["limit"], window="24h rolling", observed_at=utcnow())

    def list_users(self) -> list[CrmUser]:
        return [CrmUser(u["id"], u["email"], u["name"]) for u in self._call("GET", "/users")]

    def pull_opportunities(self, since: datetime | None) -> Iterator[Opportunity]:
        for r in self._call("GET", "/opportunities"):
            modified = datetime.fromisoformat(r["modified_at"])
            if since is None or modified >= since:
                yield Opportunity(r["id"], r.get("name") or "", r.get("stage"),
                                  Decimal(str(r["amount"])) if r.get("amount") is not None else None, None,
                                  r.get("last_modified_by"), modified, external_key=r.get("external_key"))

    def push_opportunities(self, changes: Sequence[OpportunityChange]) -> list[PushResult]:
        now = utcnow().isoformat()
        body = {"changes": [{"key": c.idempotency_key, "id": c.crm_id, "at": now,
                             "fields": {k: (str(v) if v is not None else None) for k, v in c.fields.items()}}
                            for c in changes]}
        results = self._call("POST", "/opportunities", body)["results"]
        return [PushResult(r["key"], True, crm_id=r["id"], created=r["created"]) for r in results]
