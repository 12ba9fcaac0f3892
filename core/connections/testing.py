"""The real credential tester for connect links: one login at the CRM with a credential a user just
entered, before anything is stored.

    link form (link_routes) -> links.submit_link -> test_link_login -> service.check_credential
        -> the provider class's test_connection() (the CRM call, over the product's transport)

Failures come back as typed errors, never as step names: the provider's report carries the exception
class each failed step mapped the vendor's error to (``StepResult.error``; AuthenticationFailed for a
refused login).
"""

from __future__ import annotations

from pydantic import SecretStr

from core.connections.links import CredentialCheck
from core.connections.service import check_credential
from core.db import session_scope
from core.errors import ProviderError, ProviderRejected
from core.providers.config import HttpTransport
from core.tenants.access import Principal

LINK_PRINCIPAL = Principal.system("connect-link")


def test_link_login(check: CredentialCheck, *, transport: HttpTransport | None = None) -> str:
    """Log in at the CRM with ``check.login``; the CRM user id it logged in as.

    Raises:
        AuthenticationFailed: the CRM refused the login.
        ProviderError (its most specific class: ApiDisabled, ProviderUnavailable, …): the step that failed,
            as the provider mapped the vendor's answer; ProviderRejected when a step failed with no class.
    """
    fields: dict[str, SecretStr] = {"username": SecretStr(check.login.username), "password": check.login.password}
    if check.login.security_token.get_secret_value():
        fields["security_token"] = check.login.security_token
    with session_scope() as s:
        report = check_credential(session=s, principal=LINK_PRINCIPAL, account_id=check.crm_account_id,
                                  fields=fields, transport=transport)
    failed = report.failed_step
    if failed is None:
        return report.crm_user_id or report.identity or ""
    error: type[ProviderError] = failed.error if failed.error is not None else ProviderRejected
    raise error(failed.detail or "the CRM refused this login", fix=failed.fix, code=failed.code)


test_link_login.__test__ = False  # type: ignore[attr-defined]  # not a pytest test, despite its name
