"""The connections services in one import, for pages, routes and workers. Each lives in the module
of its concern:

- ``accounts``     add a CRM account from the catalog, its settings, its credential mode (shreds
                   per-user passwords when it leaves them), the HTTP seam (``default_transport``)
- ``credentials``  the account's own secret fields (secure form), the app install's grant
- ``checks``       connection tests (stored credential; a just-entered one: ``check_credential``)
- ``quota``        API usage samples and the quota gauge with its forecast
"""

from __future__ import annotations

from core.connections.accounts import (  # noqa: F401
    CREDENTIAL_PURPOSE,
    CREDENTIALS_PATH,
    FORECAST_WINDOW,
    INSTALL_MODES,
    INSTALL_PRINCIPAL,
    KIND_BY_MODE,
    AccountSettingsForm,
    ProviderFactory,
    account_config,
    account_settings_form,
    add_crm_account,
    add_crm_account_settings,
    auth_mode_of,
    credential_fields,
    credentials_form_url,
    default_transport,
    set_credential_mode,
    update_crm_account_settings,
)
from core.connections.checks import (  # noqa: F401
    StoredTest,
    check_credential,
    last_connection_test,
    test_crm_account,
)
from core.connections.credentials import (  # noqa: F401
    NO_CREDENTIAL_STATES,
    USABLE_STATES,
    AccountCredentials,
    account_credentials,
    list_account_credentials,
    store_account_credentials,
    store_install_grant,
    tenant_slug_of,
)
from core.connections.quota import (  # noqa: F401
    QuotaGauge,
    quota_gauge,
    record_api_usage,
    window_terms,
)
