"""A throwaway CA and a 127.0.0.1 server certificate for the sandbox (cryptography).

    files = ensure_tls(Path("data/sandbox-tls"))   # ca.pem, ca.key, server.pem, server.key
    # clients trust files.ca_file; uvicorn serves files.cert_file / files.key_file

Keys are written 0600. The CA is made once per directory (tests make a fresh one per run); the server
certificate is re-issued when it is missing, expires within a day, or was not signed by this CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path
    ca_key_file: Path
    cert_file: Path
    key_file: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_ca(directory: Path, *, days: int = 30) -> tuple[Path, Path]:
    """Write ``ca.pem`` and ``ca.key`` into ``directory`` and return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CRM Bridge sandbox CA (test only)")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    ca_file, ca_key = directory / "ca.pem", directory / "ca.key"
    _write_key(ca_key, key)
    ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ca_file, ca_key


def make_server_cert(
    directory: Path, *, hosts: tuple[str, ...] = DEFAULT_HOSTS, days: int = 7
) -> tuple[Path, Path]:
    """Issue ``server.pem``/``server.key`` for ``hosts`` from the CA in ``directory``."""
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    _write_key(key_file, key)
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_file, key_file


def _server_cert_ok(directory: Path) -> bool:
    try:
        ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        cert = x509.load_pem_x509_certificate((directory / "server.pem").read_bytes())
        (directory / "server.key").stat()
    except (OSError, ValueError):
        return False
    if cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception):  # noqa: BLE001 - any failure means re-issue
        return False
    return cert.not_valid_after_utc > _now() + dt.timedelta(days=1)


def ensure_tls(directory: Path, *, hosts: tuple[str, ...] = DEFAULT_HOSTS) -> TlsFiles:
    """Reuse or make the CA and server certificate in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca_ok = (directory / "ca.pem").exists() and (directory / "ca.key").exists()
    if ca_ok:
        ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        ca_ok = ca.not_valid_after_utc > _now() + dt.timedelta(days=1)
    if not ca_ok:
        make_ca(directory)
        make_server_cert(directory, hosts=hosts)
    elif not _server_cert_ok(directory):
        make_server_cert(directory, hosts=hosts)
    return TlsFiles(
        ca_file=directory / "ca.pem", ca_key_file=directory / "ca.key",
        cert_file=directory / "server.pem", key_file=directory / "server.key",
    )
