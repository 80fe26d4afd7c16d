"""The CA and certificates of ``parallax auth init`` (the cryptography package): P-256 keys, a CA, a
server certificate (server and client use: cluster routes and leaf links dial out with it too) and a
client certificate per role for mutual TLS. Imported only by ``auth init`` (cryptography takes a
while to import)."""

from __future__ import annotations

import datetime
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
CERT_DAYS = 825


def pem_files(names: tuple[str, ...], roles: tuple[str, ...]) -> dict[str, bytes]:
    """PEM files by name: ``ca.pem``, ``server-cert.pem`` for ``names``, ``<role>-cert.pem`` per role, and
    the private key of each (``ca-key.pem``, ``server-key.pem``, ``<role>-key.pem``), each its own P-256 key."""
    ca_key, ca_cert = _ca()
    files = {"ca.pem": _pem(ca_cert), "ca-key.pem": _key_pem(ca_key)}
    files.update(_issue("server", ca_key, ca_cert, names, (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)))
    for role in roles:
        files.update(_issue(role, ca_key, ca_cert, (), (ExtendedKeyUsageOID.CLIENT_AUTH,)))
    return files


def _ca():
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("Parallax-NATS CA")
    builder = _builder(name, name, key.public_key(), CA_DAYS)
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    builder = builder.add_extension(_usage(cert_sign=True), critical=True)
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    return key, _sign(builder, key)


def _issue(stem: str, ca_key, ca_cert, names: tuple[str, ...], usages) -> dict[str, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(_name(f"parallax-{stem}"), ca_cert.subject, key.public_key(), CERT_DAYS)
    builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    builder = builder.add_extension(_usage(cert_sign=False), critical=True)
    builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
    cert = _sign(builder, ca_key)
    return {f"{stem}-cert.pem": _pem(cert), f"{stem}-key.pem": _key_pem(key)}


def _name(common_name: str):
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Parallax-NATS"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject, issuer, public_key, days: int):
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


def _usage(cert_sign: bool):
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                         key_agreement=not cert_sign, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         encipher_only=False, decipher_only=False)


def _san(name: str):
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _sign(builder, key):
    return builder.sign(key, hashes.SHA256())


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
