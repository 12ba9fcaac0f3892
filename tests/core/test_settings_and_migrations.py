"""Settings refusals, and Alembic: migrations apply and agree with the models on both databases."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from core import migrate
from core.settings import Settings
from tests.conftest import PG_URL


def test_demo_mode_refused_off_loopback():
    with pytest.raises(ValueError, match="loopback"):
        Settings(demo=True, bind_address="0.0.0.0")


def test_placeholder_secret_refused_outside_demo():
    with pytest.raises(ValueError, match="placeholder"):
        Settings(demo=False, secret_key="changeme")


@pytest.mark.parametrize("weak", [
    "x",  # the reported 1-byte key
    "a" * 64,  # long but one symbol (also valid hex: 32 equal bytes)
    "00" * 32,
    "dGVzdC1zZXJ2ZXItc2VjcmV0LWZvci1jcm1icmlkZ2UtdGVzdHM",  # base64 of an English phrase
    "hunter2hunter2hunter2hunter2hunter2hunter2",
    "2mvjKMXogoGfFmFYmSzfNg",  # random, but only 16 bytes
])
def test_low_entropy_secret_refused_outside_demo_with_the_fix(weak):
    """Issue 14 (Low): a 1-byte CRMBRIDGE_SECRET_KEY was accepted outside demo (it keys the audit chain's
    HMAC, CSRF tokens and signed links)."""
    with pytest.raises(ValueError, match="too weak") as exc:
        Settings(demo=False, secret_key=weak)
    assert "secrets.token_urlsafe(32)" in str(exc.value) and "256" in str(exc.value)
    Settings(demo=True, secret_key=weak)  # demo mode keeps working with anything


@pytest.mark.parametrize("encode", [
    lambda b: __import__("base64").urlsafe_b64encode(b).decode().rstrip("="),
    lambda b: __import__("base64").b64encode(b).decode(),
    lambda b: b.hex(),
])
def test_random_32_byte_secret_accepted_in_every_encoding(encode):
    import secrets

    key = encode(secrets.token_bytes(32))
    assert Settings(demo=False, secret_key=key).server_secret()
    Settings(demo=False, secret_key="a long passphrase: seven quiet otters juggle forty-two amber lanterns at dusk")


def test_no_secret_outside_demo_stops_start_up(tmp_path):
    s = Settings(demo=False, secret_key="", secret_key_file=tmp_path / "k")
    with pytest.raises(RuntimeError, match="CRMBRIDGE_SECRET_KEY"):
        s.server_secret()
    demo = Settings(demo=True, secret_key="", secret_key_file=tmp_path / "k")
    assert len(demo.server_secret()) >= 16
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600


def test_public_url_builds_absolute_urls():
    s = Settings(public_url="https://console.example.com/")
    assert s.public("/sso/acme/acs") == "https://console.example.com/sso/acme/acs"


def _fresh_pg_db() -> str:
    from core.db import make_engine

    admin = make_engine(PG_URL)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("DROP DATABASE IF EXISTS crmbridge_migrations"))
        conn.execute(text("CREATE DATABASE crmbridge_migrations"))
    admin.dispose()
    return PG_URL.rsplit("/", 1)[0] + "/crmbridge_migrations"


def _round_trip(url: str) -> None:
    migrate.upgrade(url)
    migrate.check(url)  # raises when models and migrations disagree
    migrate.downgrade(url, "base")
    migrate.upgrade(url)


def test_alembic_upgrade_check_and_downgrade_sqlite(tmp_path):
    _round_trip(f"sqlite:///{tmp_path / 'mig.db'}")


@pytest.mark.postgres
def test_alembic_upgrade_check_and_downgrade_postgres():
    if not PG_URL:
        pytest.skip("postgres: CRMBRIDGE_TEST_DATABASE_URL is not set")
    _round_trip(_fresh_pg_db())


def test_upgrade_seals_existing_webhook_urls_and_downgrade_restores_them(tmp_path):
    """A webhook URL holds the receiver's token (Slack, Teams): the migration that introduced url_ref
    moves existing URLs out of clear text, and a downgrade brings back the ones it sealed."""
    from core.accounts.secrets import read_secret
    from core.alerts.engine import channel_owner, webhook_url_purpose
    from core.db import make_engine

    url = f"sqlite:///{tmp_path / 'mig.db'}"
    hook = "https://hooks.slack.example/services/T000/B000/canary-token-31337"
    migrate.upgrade(url, "1c5417ed20b7")
    eng = make_engine(url)
    with eng.begin() as conn:
        conn.execute(text("INSERT INTO alert_channel (id, kind, name, target, rules_json, enabled, created_at, "
                          "created_by) VALUES (7, 'webhook', 'Slack', :t, '[]', 1, '2026-12-01 00:00:00', 'x')"),
                     {"t": hook})
    migrate.upgrade(url)
    with eng.connect() as conn:
        target, ref = conn.execute(text("SELECT target, url_ref FROM alert_channel WHERE id = 7")).one()
    assert target == "https://hooks.slack.example/…" and "canary-token" not in ref
    assert read_secret(None, ref, principal="test", owner=channel_owner(7), purpose=webhook_url_purpose(7),  # type: ignore[arg-type]
                       reason="test") == hook
    migrate.downgrade(url, "1c5417ed20b7")
    with eng.connect() as conn:
        assert conn.execute(text("SELECT target FROM alert_channel WHERE id = 7")).scalar_one() == hook
    eng.dispose()


def test_revisions_import_no_app_code():
    """A revision runs as it was written: it may name core.db's column type (what autogenerate renders)
    but must not call app code, whose later changes would change what an old revision does."""
    import ast

    from tests.conftest import ROOT

    for path in sorted((ROOT / "migrations" / "versions").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("core.", "sandbox")) or name == "core.db", f"{path.name} imports {name}"
                assert name != "core", f"{path.name} imports core"
