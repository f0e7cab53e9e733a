"""Dev mode PKI: a throw-away CA with a server and a client certificate.

Created once under DIR/pki on the first `--dev` start and reused after. Keys
are ECDSA P-256 (fast handshakes), written 0600. Production certificates come
from the engine's CA and are only read, never made, by the agent.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

FILES = ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")
VALID_DAYS = 3650


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hostagent dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca_name: x509.Name, cn: str, *,
           server: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                     content_commitment=False, data_encipherment=False,
                                     key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
    )
    if server:
        names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                          x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                          x509.IPAddress(ipaddress.ip_address("::1"))]
        host = socket.gethostname()
        if host and host != "localhost":
            names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_ca(cn: str = "hostagent dev CA") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                     content_commitment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def ensure_dev_pki(pki_dir: Path) -> bool:
    """Create the dev CA and certificates unless all exist. True if created."""
    if all((pki_dir / f).exists() for f in FILES):
        return False
    pki_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(pki_dir, 0o700)
    write_pki(pki_dir)
    return True


def write_pki(pki_dir: Path, ca_cn: str = "hostagent dev CA") -> None:
    """Write a new CA plus server and client certificates into pki_dir."""
    ca_key, ca = make_ca(ca_cn)
    server_key, server = _issue(ca_key, ca.subject, "localhost", server=True)
    client_key, client = _issue(ca_key, ca.subject, "hostagent-dev-client", server=False)
    # Certificates first, the CA last: a half-made dir is redone on next start.
    _write_key(pki_dir / "server.key", server_key)
    _write_cert(pki_dir / "server.pem", server)
    _write_key(pki_dir / "client.key", client_key)
    _write_cert(pki_dir / "client.pem", client)
    _write_key(pki_dir / "ca.key", ca_key)
    _write_cert(pki_dir / "ca.pem", ca)
