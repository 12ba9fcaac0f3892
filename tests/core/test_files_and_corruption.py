"""Issue 14, Low: the files that hold secrets are private, and a corrupted database is explained.

- The SQLite database and its WAL and SHM files, the vault key file and the demo secret file are
  created 0600 (before, the database and its WAL were world-readable under a 022 umask).
- A corrupted database file: `crmbridge` commands and the server start say which file is corrupt and
  how to restore it, instead of a raw traceback, and change nothing.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from core.cli import main
from core.db import make_engine
from core.settings import Settings
from core.vault.keys import FileKeyProvider
from tests.conftest import ROOT


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask():
    old = os.umask(0o022)  # what most servers run with: files readable by everyone unless made private
    yield
    os.umask(old)


def test_sqlite_database_wal_and_shm_are_created_0600(tmp_path, open_umask):
    db = tmp_path / "data" / "crmbridge.db"
    engine = make_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x TEXT)"))
        conn.execute(text("INSERT INTO t VALUES ('wrapped keys, ciphertexts, audit log')"))
    conn2 = engine.connect()  # keep a connection open: the -wal and -shm files exist meanwhile
    try:
        for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            assert path.exists(), path
            assert _mode(path) == 0o600, f"{path.name} is {_mode(path):04o}"
    finally:
        conn2.close()
        engine.dispose()


def test_an_existing_world_readable_database_is_tightened(tmp_path, open_umask):
    db = tmp_path / "old.db"
    make_engine(f"sqlite:///{db}").dispose()
    db.chmod(0o644)  # as an older version left it
    engine = make_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x TEXT)"))
    engine.dispose()
    assert _mode(db) == 0o600


def test_key_files_are_created_0600(tmp_path, open_umask):
    ring = tmp_path / "data" / "vault-keys.json"
    FileKeyProvider(ring, create=True).load()
    assert _mode(ring) == 0o600
    secret = tmp_path / "data" / "secret.key"
    Settings(demo=True, secret_key="", secret_key_file=secret).server_secret()
    assert _mode(secret) == 0o600
    secret.chmod(0o644)  # left readable by an older version: tightened on next read
    Settings(demo=True, secret_key="", secret_key_file=secret).server_secret()
    assert _mode(secret) == 0o600


def _corrupt(tmp_path: Path) -> Path:
    db = tmp_path / "crmbridge.db"
    db.write_bytes(b"this was a database until a disk failed\n" * 200)
    db.chmod(0o600)
    return db


@pytest.mark.parametrize("argv", [["vault", "status"], ["audit", "verify"], ["sync", "status"]])
def test_cli_on_a_corrupt_database_names_the_file_and_the_fix(tmp_path, monkeypatch, capsys, argv, vault_keys):
    from core.db import get_engine
    from core.settings import get_settings

    db = _corrupt(tmp_path)
    before = db.read_bytes()
    monkeypatch.setenv("CRMBRIDGE_DATABASE_URL", f"sqlite:///{db}")
    get_settings.cache_clear()
    get_engine.cache_clear()
    try:
        assert main(argv) == 1
    finally:
        get_engine.cache_clear()
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert f"The database file {db} is corrupt (file is not a database)" in err
    assert "restore your latest backup" in err and "Traceback" not in err
    assert db.read_bytes() == before


def test_server_start_on_a_corrupt_database_explains_and_exits_1(tmp_path):
    db = _corrupt(tmp_path)
    env = {**os.environ, "CRMBRIDGE_DATABASE_URL": f"sqlite:///{db}", "CRMBRIDGE_DEMO": "0",
           "CRMBRIDGE_VAULT_KEYS": '{"active": "k1", "keys": {"k1": "' + "A" * 43 + '="}}'}
    proc = subprocess.run([sys.executable, "server.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"refuses to start: The database file {db} is corrupt" in proc.stderr
    assert "Traceback" not in proc.stderr
