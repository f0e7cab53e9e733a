"""Dev mode PKI: a throw-away CA with a server and a client certificate.

Created under DIR/pki on the first `--dev` start and checked on every start
after: a certificate that is missing, ends within RENEW_DAYS, does not match
its key or lacks what a strict verifier (`openssl verify -x509_strict`,
Python 3.13's VERIFY_X509_STRICT) needs is made again. Keys are ECDSA P-256
(fast handshakes), written 0600. Production certificates come from the
engine's CA and are only read, never made, by the agent.

The CA is renewed with its own key and name, so its key identifier stays
the same: a client still holding the previous ca.pem verifies the renewed
server certificate, and a client certificate from before verifies against
the renewed CA, until the previous CA certificate itself ends.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from storage.fileio import atomic_write

FILES = ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")
# Mozilla's profiles (and sslyze's check of them) allow at most 366 days.
VALID_DAYS = 365
# A certificate ending sooner than this is renewed on start.
RENEW_DAYS = 30
CA_CN = "hostagent dev CA"
SERVER_CN = "localhost"
CLIENT_CN = "hostagent-dev-client"
# Leaves sign (ECDHE handshakes); key agreement would be static ECDH.
_LEAF_USAGE = x509.KeyUsage(digital_signature=True, key_encipherment=False,
                            content_commitment=False, data_encipherment=False,
                            key_agreement=False, key_cert_sign=False, crl_sign=False,
                            encipher_only=False, decipher_only=False)
_CA_USAGE = x509.KeyUsage(digital_signature=False, key_encipherment=False,
                          content_commitment=False, data_encipherment=False,
                          key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hostagent dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    atomic_write(path, data, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    atomic_write(path, cert.public_bytes(serialization.Encoding.PEM))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, cn: str, *,
           server: bool, now: datetime.datetime | None = None,
           days: int = VALID_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = now or _now()
    # A leaf never outlives its CA: a strict verifier refuses the chain then.
    not_after = min(now + datetime.timedelta(days=days), _not_after(ca))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
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


def make_ca(cn: str = CA_CN, key: ec.EllipticCurvePrivateKey | None = None, *,
            subject: x509.Name | None = None, now: datetime.datetime | None = None,
            days: int = VALID_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA certificate; with `key` and `subject`, a renewal of that CA."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = subject or _name(cn)
    now = now or _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    try:
        return cert.not_valid_after_utc
    except AttributeError:      # cryptography < 42 (Debian 12 has 38)
        return cert.not_valid_after.replace(tzinfo=datetime.UTC)


def _public_der(key: Any) -> bytes:
    # public keys compare with == only since cryptography 39
    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def _load(pki_dir: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    """The key and certificate `name`, or None if either is missing or unreadable."""
    try:
        key = serialization.load_pem_private_key((pki_dir / f"{name}.key").read_bytes(), None)
        cert = x509.load_pem_x509_certificate((pki_dir / f"{name}.pem").read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    return key, cert


def _fresh(pair: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
           issuer: ec.EllipticCurvePublicKey, now: datetime.datetime) -> bool:
    """True if the certificate matches its key, is signed by `issuer`, has
    key identifiers and does not end within RENEW_DAYS."""
    key, cert = pair
    if _public_der(cert.public_key()) != _public_der(key.public_key()):
        return False
    if _not_after(cert) - now < datetime.timedelta(days=RENEW_DAYS):
        return False
    try:
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
        sig_hash = cert.signature_hash_algorithm
        assert sig_hash is not None
        issuer.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(sig_hash))
    except (x509.ExtensionNotFound, InvalidSignature):
        return False
    return True


def ensure_dev_pki(pki_dir: Path, now: datetime.datetime | None = None) -> list[str]:
    """Create or renew what the dev PKI needs; the names of the certificates
    made (empty if all were fresh)."""
    now = now or _now()
    pki_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(pki_dir, 0o700)
    made: list[str] = []
    ca = _load(pki_dir, "ca")
    if ca is None:
        ca = make_ca(now=now)
        made.append("ca")
    elif not _fresh(ca, ca[0].public_key(), now):
        ca = make_ca(key=ca[0], subject=ca[1].subject, now=now)
        made.append("ca")
    ca_key, ca_cert = ca
    leaves = {}
    for name, cn, server in (("server", SERVER_CN, True), ("client", CLIENT_CN, False)):
        pair = _load(pki_dir, name)
        if ("ca" in made or pair is None
                or not _fresh(pair, ca_key.public_key(), now)):
            leaves[name] = _issue(ca_key, ca_cert, cn, server=server, now=now)
            made.append(name)
    # Key before certificate, the CA last: a crash in between leaves a pair
    # that does not match (or a CA that does not sign them), redone next start.
    for name, (key, cert) in leaves.items():
        _write_key(pki_dir / f"{name}.key", key)
        _write_cert(pki_dir / f"{name}.pem", cert)
    if "ca" in made:
        _write_key(pki_dir / "ca.key", ca_key)
        _write_cert(pki_dir / "ca.pem", ca_cert)
    return made


def write_pki(pki_dir: Path, ca_cn: str = CA_CN) -> None:
    """Write a new CA plus server and client certificates into pki_dir."""
    ca_key, ca = make_ca(ca_cn)
    server_key, server = _issue(ca_key, ca, SERVER_CN, server=True)
    client_key, client = _issue(ca_key, ca, CLIENT_CN, server=False)
    # Certificates first, the CA last: a half-made dir is redone on next start.
    _write_key(pki_dir / "server.key", server_key)
    _write_cert(pki_dir / "server.pem", server)
    _write_key(pki_dir / "client.key", client_key)
    _write_cert(pki_dir / "client.pem", client)
    _write_key(pki_dir / "ca.key", ca_key)
    _write_cert(pki_dir / "ca.pem", ca)
