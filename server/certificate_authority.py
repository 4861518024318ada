"""The coordinator's certificate authority and the SuperLink's TLS certificate.

One directory holds them (``fedmm coordinator init-ca DIR``, ``issue-cert DIR``):

- ``ca.key`` (0600, secret: whoever has it can impersonate the SuperLink) and ``ca.crt``
  (public: every site gets a copy and verifies the SuperLink with it);
- ``superlink.key`` (0600, secret, needed on the SuperLink's machine) and ``superlink.crt``
  (public), with a subject alternative name for every address sites and the SuperLink's
  own processes use to reach it.

Keys are EC P-384 with ECDSA-SHA384 signatures: the SuperLink serves TLS through Python's
``ssl`` (uvicorn) and SuperNodes verify with ``httpx``/``ssl``, both of which accept them.
No file is ever overwritten; rotation means moving the old file away first.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmm.common.key_files import KeyFileError, write_private_file, write_public_file

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SERVER_KEY = "superlink.key"
SERVER_CERT = "superlink.crt"
CA_VALIDITY_DAYS = 3650
SERVER_VALIDITY_DAYS = 397  # the longest a public CA may issue today; rotate yearly
LOOPBACK_NAMES = ("127.0.0.1", "localhost")
_CURVE = ec.SECP384R1()
_HASH = hashes.SHA384()


class CertificateError(ValueError):
    """A CA or certificate request cannot be met; the message names the fix."""


@dataclass(frozen=True)
class IssuedCertificate:
    key_file: Path
    cert_file: Path
    subject_alternative_names: tuple[str, ...]
    not_valid_after: dt.datetime


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _refuse_existing(*paths: Path) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise KeyFileError(
            f"{', '.join(existing)} exist(s) already and is never overwritten; to replace "
            "it, move the old files away first (see docs/operator-guide.md, key rotation)"
        )


def init_ca(directory: Path, *, common_name: str = "fedmm coordinator CA") -> IssuedCertificate:
    """Create ``DIR/ca.key`` (0600) and the self-signed ``DIR/ca.crt``."""
    directory = Path(directory)
    key_file, cert_file = directory / CA_KEY, directory / CA_CERT
    _refuse_existing(key_file, cert_file)
    key = ec.generate_private_key(_CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, _HASH)
    )
    write_private_file(key_file, _private_key_pem(key))
    write_public_file(cert_file, cert.public_bytes(serialization.Encoding.PEM))
    return IssuedCertificate(key_file, cert_file, (), cert.not_valid_after_utc)


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    host = value.strip().rstrip(".")
    if not host or any(c.isspace() or c in "/:@" for c in host):
        raise CertificateError(
            f"--san {value!r} is neither an IP address nor a DNS name (give a host, no "
            "port or scheme, e.g. --san 10.0.0.5 --san coordinator.example.org)"
        )
    return x509.DNSName(host.lower())


def load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    directory = Path(directory)
    key_file, cert_file = directory / CA_KEY, directory / CA_CERT
    if not key_file.exists() or not cert_file.exists():
        raise CertificateError(
            f"{directory} holds no CA ({CA_KEY} and {CA_CERT}): run "
            f"`fedmm coordinator init-ca {directory}` first"
        )
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{key_file} is not an EC private key")
    return key, x509.load_pem_x509_certificate(cert_file.read_bytes())


def issue_server_certificate(
    directory: Path,
    *,
    subject_alternative_names: Iterable[str],
    include_loopback: bool = True,
    common_name: str = "fedmm superlink",
    days: int = SERVER_VALIDITY_DAYS,
) -> IssuedCertificate:
    """Create ``DIR/superlink.key`` (0600) and ``DIR/superlink.crt`` signed by the CA in DIR.

    ``include_loopback`` adds 127.0.0.1 and localhost: the SuperLink's own SuperExec reaches
    the SuperLink over TLS at its bind address (0.0.0.0 becomes 127.0.0.1).
    """
    directory = Path(directory)
    names = list(dict.fromkeys(s.strip() for s in subject_alternative_names if s.strip()))
    if include_loopback:
        names += [n for n in LOOPBACK_NAMES if n not in names]
    if not names:
        raise CertificateError(
            "no subject alternative names: pass --san for every address the sites use to "
            "reach the SuperLink (IP addresses and DNS names)"
        )
    if days < 1:
        raise CertificateError(f"--days must be at least 1, got {days}")
    general_names = [_general_name(n) for n in names]
    ca_key, ca_cert = load_ca(directory)
    key_file, cert_file = directory / SERVER_KEY, directory / SERVER_CERT
    _refuse_existing(key_file, cert_file)
    key = ec.generate_private_key(_CURVE)
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(general_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, _HASH)
    )
    write_private_file(key_file, _private_key_pem(key))
    write_public_file(cert_file, cert.public_bytes(serialization.Encoding.PEM))
    return IssuedCertificate(key_file, cert_file, tuple(names), cert.not_valid_after_utc)


def certificate_names(cert_file: Path) -> tuple[str, ...]:
    """The IP addresses and DNS names a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return (*ips, *san.get_values_for_type(x509.DNSName))
