"""The coordinator's CA and SuperLink certificate: file modes, no overwrite, a real TLS
handshake verified with the CA (Python's ssl, as uvicorn and httpx use it)."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedmm.common.key_files import KeyFileError
from fedmm.server.certificate_authority import (
    CertificateError,
    certificate_names,
    init_ca,
    issue_server_certificate,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def ca_dir(tmp_path: Path) -> Path:
    init_ca(tmp_path / "ca")
    return tmp_path / "ca"


def test_ca_is_a_p384_ca_with_a_private_key_only_its_owner_reads(ca_dir: Path) -> None:
    assert _mode(ca_dir / "ca.key") == 0o600
    assert _mode(ca_dir / "ca.crt") == 0o644
    cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    cert.verify_directly_issued_by(cert)


def test_existing_keys_are_never_overwritten(ca_dir: Path) -> None:
    before = (ca_dir / "ca.key").read_bytes()
    with pytest.raises(KeyFileError, match="never overwritten"):
        init_ca(ca_dir)
    assert (ca_dir / "ca.key").read_bytes() == before
    issue_server_certificate(ca_dir, subject_alternative_names=["10.0.0.5"])
    server_key = (ca_dir / "superlink.key").read_bytes()
    with pytest.raises(KeyFileError, match="move the old files away"):
        issue_server_certificate(ca_dir, subject_alternative_names=["10.0.0.5"])
    assert (ca_dir / "superlink.key").read_bytes() == server_key


def test_server_certificate_names_every_address_and_is_signed_by_the_ca(ca_dir: Path) -> None:
    issued = issue_server_certificate(
        ca_dir, subject_alternative_names=["10.0.0.5", "Coordinator.Example.org", "10.0.0.5"]
    )
    assert issued.subject_alternative_names == (
        "10.0.0.5",
        "Coordinator.Example.org",
        "127.0.0.1",
        "localhost",
    )
    assert set(certificate_names(issued.cert_file)) == {
        "10.0.0.5",
        "127.0.0.1",
        "coordinator.example.org",
        "localhost",
    }
    assert _mode(issued.key_file) == 0o600
    cert = x509.load_pem_x509_certificate(issued.cert_file.read_bytes())
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_bad_requests_name_the_fix(tmp_path: Path, ca_dir: Path) -> None:
    with pytest.raises(CertificateError, match="init-ca"):
        issue_server_certificate(tmp_path / "nothing", subject_alternative_names=["a.org"])
    with pytest.raises(CertificateError, match="--san"):
        issue_server_certificate(ca_dir, subject_alternative_names=["https://a.org:9093"])
    with pytest.raises(CertificateError, match="no subject alternative names"):
        issue_server_certificate(ca_dir, subject_alternative_names=[], include_loopback=False)
    assert not (ca_dir / "superlink.key").exists()


def _handshake(ca_dir: Path, server_hostname: str) -> str:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(ca_dir / "superlink.crt", ca_dir / "superlink.key")
    client_ctx = ssl.create_default_context(cafile=str(ca_dir / "ca.crt"))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                return tls.recv(2).decode() + " " + str(tls.version())
        finally:
            thread.join(timeout=5)


def test_tls_handshake_verifies_with_the_ca_for_named_hosts_only(ca_dir: Path) -> None:
    issue_server_certificate(ca_dir, subject_alternative_names=["coordinator.example.org"])
    assert _handshake(ca_dir, "127.0.0.1").startswith("ok TLSv1.")
    assert _handshake(ca_dir, "coordinator.example.org").startswith("ok ")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ca_dir, "other.example.org")
