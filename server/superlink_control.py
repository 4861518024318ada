"""Starting the coordinator's SuperLink and registering sites with it (flwr 1.41).

``flower-superlink`` serves its Fleet API (SuperNodes), Control API (``flwr`` CLI) and
Runtime API (the ServerApp's processes) over HTTPS on one ``--host``/``--port``. The command
built here always turns on TLS and SuperNode authentication and turns off runtime
dependency installation (by flag and environment variable: otherwise the SuperLink runs
``uv sync`` per run and installs a multi-GB CUDA torch).

Sites are registered through the Control API with ``flwr supernode register PUBKEY
CONNECTION``, where CONNECTION names a ``[superlink.NAME]`` entry of
``$FLWR_HOME/config.toml`` (address and the CA certificate): :func:`add_connection`
writes one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from fedmm.common.flower_commands import flower_executable
from fedmm.common.key_files import check_private_file
from fedmm.server.certificate_authority import (
    CA_CERT,
    SERVER_CERT,
    SERVER_KEY,
    certificate_names,
)

DISABLE_DEPENDENCY_INSTALL_ENV = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"
DEFAULT_DATABASE = "superlink-state.db"


class DeploymentError(ValueError):
    """A deployment step cannot run as asked; the message names the fix."""


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) -> (host, port)."""
    host, sep, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise DeploymentError(f"address {address!r} is not HOST:PORT (e.g. 10.0.0.5:9093)")
    return host, int(port_text)


def _host_covered(host: str, names: tuple[str, ...]) -> bool:
    if host in ("0.0.0.0", "::"):  # the SuperLink's own SuperExec then uses loopback
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    try:
        return ipaddress.ip_address(host) in {ipaddress.ip_address(n) for n in names if _is_ip(n)}
    except ValueError:
        return host.lower() in {n.lower() for n in names if not _is_ip(n)}


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class SuperLinkLaunch:
    """The exact command and environment that start the SuperLink."""

    argv: list[str]
    env: dict[str, str]

    def shell_line(self) -> str:
        import shlex

        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"{prefix} {shlex.join(self.argv)}".strip()


def is_loopback(host: str) -> bool:
    """``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def superlink_launch(
    directory: Path,
    *,
    address: str,
    database: Path | None = None,
    log_file: Path | None = None,
    public_address: str | None = None,
    expose_control_api: bool = False,
) -> SuperLinkLaunch:
    """``flower-superlink`` with TLS from DIR (ca.crt, superlink.crt/.key) and node auth.

    ``database`` (default ``DIR/superlink-state.db``) keeps registered sites and runs
    across restarts; without it a restarted SuperLink forgets every registration.
    The SuperLink's port also serves the Control API, which has no authentication: it must
    bind to loopback, with the sites reaching ``public_address`` through the Fleet-only
    proxy (``server.fleet_proxy``), unless ``expose_control_api`` accepts the risk.
    """
    directory = Path(directory).resolve()
    host, port = split_address(address)
    if not is_loopback(host) and not expose_control_api:
        raise DeploymentError(
            f"--address {address}: the SuperLink's port also serves the Control API (flwr run, "
            "flwr supernode register), which has no authentication; bind it to loopback "
            "(--address 127.0.0.1:9092) and give the sites --public-address HOST:PORT, where "
            "a TLS proxy forwards only the Fleet API (or pass --expose-control-api to accept "
            "that anyone reaching the port can submit runs and register sites)"
        )
    if public_address is not None:
        public_host, public_port = split_address(public_address)
        if public_port == port and (is_loopback(public_host) or public_host in ("0.0.0.0", "::")):
            raise DeploymentError(
                f"--public-address {public_address} and --address {address} share port {port}: "
                "give the proxy and the SuperLink different ports"
            )
    ca, cert, key = directory / CA_CERT, directory / SERVER_CERT, directory / SERVER_KEY
    for path, fix in (
        (ca, f"fedmm coordinator init-ca {directory}"),
        (cert, f"fedmm coordinator issue-cert {directory} --san HOST"),
    ):
        if not path.exists():
            raise DeploymentError(f"{path} does not exist: run `{fix}` first")
    try:
        check_private_file(key, what="the SuperLink's TLS key")
    except ValueError as err:
        raise DeploymentError(str(err)) from err
    names = certificate_names(cert)
    needed = [host]
    if public_address is not None:
        public_host = split_address(public_address)[0]
        needed += ["localhost"] + ([] if public_host in ("0.0.0.0", "::") else [public_host])
    for name in needed:
        if not _host_covered(name, names):
            raise DeploymentError(
                f"the certificate {cert} is not valid for {name} (its names: "
                f"{', '.join(names)}); issue a new one with --san {name} (move the old "
                "superlink.* files away first)"
            )
    argv = [
        flower_executable("flower-superlink"),
        "--ssl-ca-certfile",
        str(ca),
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(Path(database).resolve() if database else directory / DEFAULT_DATABASE),
    ]
    if log_file is not None:
        argv += ["--log-file", str(Path(log_file).resolve())]
    return SuperLinkLaunch(argv=argv, env={DISABLE_DEPENDENCY_INSTALL_ENV: "1"})


def add_connection(name: str, *, address: str, root_certificates: Path) -> Path:
    """Add (or replace) ``[superlink.NAME]`` in ``$FLWR_HOME/config.toml``: the address of
    the SuperLink and the CA certificate the ``flwr`` CLI verifies it with."""
    from flwr.cli.flower_config import read_flower_config, write_flower_config

    split_address(address)
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise DeploymentError(f"connection name {name!r}: use letters, digits, - and _")
    ca = Path(root_certificates).resolve()
    if not ca.is_file():
        raise DeploymentError(f"CA certificate {ca} does not exist")
    config, _path = read_flower_config()
    config.setdefault("superlink", {})[name] = {
        "address": address,
        "root-certificates": str(ca),
    }
    return write_flower_config(config)


def register_site_argv(public_key: Path, *, connection: str, name: str | None = None) -> list[str]:
    """``flwr supernode register PUBKEY CONNECTION --format json`` for a site's key."""
    public_key = Path(public_key).resolve()
    if not public_key.is_file():
        raise DeploymentError(f"public key {public_key} does not exist")
    first = public_key.read_bytes()[:64]
    if b"PRIVATE KEY" in first:
        raise DeploymentError(
            f"{public_key} is a private key: register the site's .pub file, and ask the site "
            "to make a new key pair (a private key that left the site is no longer secret)"
        )
    if not first.startswith(b"ecdsa-sha2-nistp"):
        raise DeploymentError(
            f"{public_key} is not an OpenSSH EC public key (ecdsa-sha2-nistp384 ...): the "
            "site makes one with `fedmm site keygen DIR`"
        )
    argv = [flower_executable("flwr"), "supernode", "register", str(public_key), connection]
    if name:
        argv += ["--name", name]
    return [*argv, "--format", "json"]
