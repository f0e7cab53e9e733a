"""The dev PKI: certificates a strict verifier accepts, with the usages each
role needs, one year long, renewed on start when near their end."""

from __future__ import annotations

import datetime
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent import pki
from tests.conftest import require_tools

DAY = datetime.timedelta(days=1)


def _strict_verify(ca: Path, *certs: Path) -> None:
    """`openssl verify -x509_strict` of every cert against `ca` alone."""
    r = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(ca),
                        *map(str, certs)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(": OK") == len(certs), r.stdout


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_every_certificate_passes_openssl_x509_strict(tmp_path: Path) -> None:
    require_tools("openssl")
    d = tmp_path / "pki"
    assert pki.ensure_dev_pki(d) == ["ca", "server", "client"]
    _strict_verify(d / "ca.pem", d / "ca.pem", d / "server.pem", d / "client.pem")
    assert sorted(p.name for p in d.iterdir()) == sorted(pki.FILES)
    assert all((d / f).stat().st_mode & 0o077 == 0 for f in pki.FILES if f.endswith(".key"))


def test_usages_fit_each_role(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    pki.ensure_dev_pki(d)
    ca, server, client = (_cert(d / f"{n}.pem") for n in ("ca", "server", "client"))

    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature

    for leaf, eku in ((server, ExtendedKeyUsageOID.SERVER_AUTH),
                      (client, ExtendedKeyUsageOID.CLIENT_AUTH)):
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        assert ku.digital_signature and not ku.key_cert_sign
        assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) \
            == [eku]
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert aki.key_identifier == ski.digest

    for cert in (ca, server, client):
        lifespan = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert lifespan <= 366 * DAY, (cert.subject, lifespan)


def test_fresh_certificates_are_kept(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    pki.ensure_dev_pki(d)
    before = {f: (d / f).read_bytes() for f in pki.FILES}
    assert pki.ensure_dev_pki(d) == []
    assert {f: (d / f).read_bytes() for f in pki.FILES} == before


def test_near_expiry_renewed_and_clients_of_the_old_ca_keep_working(tmp_path: Path) -> None:
    """Made 340 days ago: everything ends within 30 days, so a start renews it
    all; the CA keeps its key and name, so the old ca.pem still verifies the
    new server certificate and the new CA the client certificate issued before."""
    require_tools("openssl")
    d = tmp_path / "pki"
    now = datetime.datetime.now(datetime.UTC)
    pki.ensure_dev_pki(d, now=now - 340 * DAY)
    old = tmp_path / "old"
    shutil.copytree(d, old)
    assert pki.ensure_dev_pki(d) == ["ca", "server", "client"]

    for name in ("ca", "server", "client"):
        assert _cert(d / f"{name}.pem").not_valid_after_utc > now + 360 * DAY
    assert (d / "ca.key").read_bytes() == (old / "ca.key").read_bytes()
    _strict_verify(d / "ca.pem", d / "server.pem", d / "client.pem", old / "client.pem")
    _strict_verify(old / "ca.pem", d / "server.pem", d / "client.pem")


def test_leaf_near_expiry_renewed_alone(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    now = datetime.datetime.now(datetime.UTC)
    pki.ensure_dev_pki(d)
    ca_key, ca = pki._load(d, "ca") or pytest.fail("no CA")
    key, cert = pki._issue(ca_key, ca, pki.SERVER_CN, server=True, now=now, days=20)
    pki._write_key(d / "server.key", key)
    pki._write_cert(d / "server.pem", cert)
    assert pki.ensure_dev_pki(d) == ["server"]


@pytest.mark.parametrize("broken", ["legacy", "mismatch", "other-ca", "missing"])
def test_certificates_a_strict_client_refuses_are_made_again(tmp_path: Path,
                                                             broken: str) -> None:
    """A dir from before (no key identifiers), a crash between a key and its
    certificate, a CA replaced under its leaves, a file removed."""
    require_tools("openssl")
    d = tmp_path / "pki"
    pki.ensure_dev_pki(d)
    if broken == "legacy":
        _write_legacy_client(d)
    elif broken == "mismatch":
        (d / "client.key").write_bytes((d / "server.key").read_bytes())
    elif broken == "other-ca":
        key, ca = pki.make_ca()
        pki._write_key(d / "ca.key", key)
        pki._write_cert(d / "ca.pem", ca)
    else:
        (d / "client.pem").unlink()
    assert pki.ensure_dev_pki(d)[-1] == "client"
    _strict_verify(d / "ca.pem", d / "ca.pem", d / "server.pem", d / "client.pem")


def _write_legacy_client(d: Path) -> None:
    """A client certificate as the agent made them before: no SKI/AKI."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key, ca = pki._load(d, "ca") or pytest.fail("no CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(pki._name(pki.CLIENT_CN))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - DAY).not_valid_after(now + 3650 * DAY)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pki._write_key(d / "client.key", key)
    pki._write_cert(d / "client.pem", cert)
