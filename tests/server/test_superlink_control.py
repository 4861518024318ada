"""The SuperLink command (TLS, node auth, no runtime installs), site registration argv,
and the ``flwr`` connection entry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedmm.client.site_keys import generate_site_key_pair
from fedmm.server.certificate_authority import init_ca, issue_server_certificate
from fedmm.server.superlink_control import (
    DeploymentError,
    add_connection,
    register_site_argv,
    split_address,
    superlink_launch,
)


@pytest.fixture()
def ca_dir(tmp_path: Path) -> Path:
    init_ca(tmp_path / "ca")
    issue_server_certificate(tmp_path / "ca", subject_alternative_names=["10.0.0.5"])
    return tmp_path / "ca"


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_superlink_command_turns_on_tls_and_node_auth_and_off_runtime_installs(
    ca_dir: Path,
) -> None:
    launch = superlink_launch(ca_dir, address="127.0.0.1:9092", public_address="10.0.0.5:9093")
    argv = launch.argv
    assert Path(argv[0]).name == "flower-superlink"
    assert _flag(argv, "--ssl-ca-certfile") == str(ca_dir.resolve() / "ca.crt")
    assert _flag(argv, "--ssl-certfile") == str(ca_dir.resolve() / "superlink.crt")
    assert _flag(argv, "--ssl-keyfile") == str(ca_dir.resolve() / "superlink.key")
    assert "--enable-supernode-auth" in argv
    assert "--disable-runtime-dependency-installation" in argv
    assert "--insecure" not in argv
    assert (_flag(argv, "--host"), _flag(argv, "--port")) == ("127.0.0.1", "9092")
    assert _flag(argv, "--database") == str(ca_dir.resolve() / "superlink-state.db")
    assert launch.env == {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in launch.shell_line()
    # Only with the risk accepted does the SuperLink's own port leave loopback.
    exposed = superlink_launch(ca_dir, address="0.0.0.0:9093", expose_control_api=True)
    assert _flag(exposed.argv, "--host") == "0.0.0.0"


def test_superlink_command_refuses_what_would_fail_later(ca_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DeploymentError, match="no authentication; bind it to loopback"):
        superlink_launch(ca_dir, address="10.0.0.5:9093")
    with pytest.raises(DeploymentError, match=r"--san 10\.9\.9\.9"):
        superlink_launch(ca_dir, address="127.0.0.1:9092", public_address="10.9.9.9:9093")
    with pytest.raises(DeploymentError, match=r"--san 10\.9\.9\.9"):
        superlink_launch(ca_dir, address="10.9.9.9:9093", expose_control_api=True)
    with pytest.raises(DeploymentError, match="different ports"):
        superlink_launch(ca_dir, address="127.0.0.1:9093", public_address="0.0.0.0:9093")
    with pytest.raises(DeploymentError, match="HOST:PORT"):
        superlink_launch(ca_dir, address="127.0.0.1")
    with pytest.raises(DeploymentError, match="init-ca"):
        superlink_launch(tmp_path / "empty", address="127.0.0.1:9093")
    os.chmod(ca_dir / "superlink.key", 0o644)
    with pytest.raises(DeploymentError, match="chmod 600"):
        superlink_launch(ca_dir, address="127.0.0.1:9092")


def test_split_address() -> None:
    assert split_address("127.0.0.1:9093") == ("127.0.0.1", 9093)
    assert split_address("[::1]:443") == ("::1", 443)
    for bad in ("host", "host:0", "host:x", ":9093", "host:70000"):
        with pytest.raises(DeploymentError):
            split_address(bad)


def test_register_site_takes_only_an_openssh_ec_public_key(tmp_path: Path) -> None:
    pair = generate_site_key_pair(tmp_path / "keys")
    argv = register_site_argv(pair.public_key, connection="coordinator", name="site-a")
    assert Path(argv[0]).name == "flwr"
    assert argv[1:] == [
        "supernode",
        "register",
        str(pair.public_key.resolve()),
        "coordinator",
        "--name",
        "site-a",
        "--format",
        "json",
    ]
    with pytest.raises(DeploymentError, match="is a private key"):
        register_site_argv(pair.private_key, connection="coordinator")
    other = tmp_path / "id_ed25519.pub"
    other.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI x\n")
    with pytest.raises(DeploymentError, match="fedmm site keygen"):
        register_site_argv(other, connection="coordinator")


def test_add_connection_writes_a_flwr_connection(
    ca_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    add_connection("coordinator", address="10.0.0.5:9093", root_certificates=ca_dir / "ca.crt")
    connection = read_superlink_connection("coordinator")
    assert connection.address == "10.0.0.5:9093"
    assert connection.root_certificates == str((ca_dir / "ca.crt").resolve())
    assert not connection.insecure
    with pytest.raises(DeploymentError, match="letters, digits"):
        add_connection("a b", address="10.0.0.5:9093", root_certificates=ca_dir / "ca.crt")
