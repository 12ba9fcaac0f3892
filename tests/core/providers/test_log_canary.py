"""Secrets never reach the logs, even with every logger at DEBUG (zeep logs whole SOAP envelopes there)."""

from __future__ import annotations

import logging

from tests.core.providers.test_salesforce import ana, api_user


def test_soap_login_and_oauth_secrets_stay_out_of_debug_logs(sandbox, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger().setLevel(logging.DEBUG)
    provider = ana(sandbox)
    report = provider.test_connection()
    assert report.ok, report
    session_id = getattr(provider, "_session", None)
    provider.close()
    oauth = api_user(sandbox)
    assert oauth.test_connection().ok
    oauth.close()
    logged = caplog.text
    assert logged, "nothing was logged at DEBUG: the test would prove nothing"
    for canary in ("Demo-Ana-2026", "TKNANA0001", "demo-bigcorp-emea-secret"):
        assert canary not in logged
    if isinstance(session_id, str) and len(session_id) > 8:
        assert session_id not in logged
