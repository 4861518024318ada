"""Running the simulated sites on an existing Ray cluster (``fedmm simulate --ray-address``).

Flower's Ray backend connects to the cluster with ``ray.init(address=...)`` instead of
starting a Ray of its own; the sites become actors placed by Ray on any node with free CPUs
(``--cpus-per-site`` each). What the cluster must offer, since the sites' actors read and
write files as the local simulation does: fedmm installed on every node (the same version:
nothing is shipped to the nodes), the output folder and any ``--site-data`` folders at the
same paths on every node (a shared file system), and the Fashion-MNIST files for the
benchmark. The driver (this process) runs the coordinator.
"""

from __future__ import annotations

import socket

from fedmm.common.federation_config import ConfigError

#: The port ``ray start --head`` listens on by default.
DEFAULT_RAY_PORT = 6379


def split_ray_address(address: str) -> tuple[str, int]:
    """``HOST[:PORT]`` -> (host, port); ``ray://`` client addresses are refused (the Flower
    backend needs a driver on the cluster's network, not Ray Client)."""
    if "://" in address:
        raise ConfigError(
            f"--ray-address {address}: give the cluster's GCS address as HOST:PORT (what "
            "`ray start --head` prints after --address=), not a ray:// client address"
        )
    host, _, port = address.rpartition(":")
    if not host:
        return address, DEFAULT_RAY_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--ray-address {address}: the port must be a number from 1 to 65535")
    return host.strip("[]"), int(port)


def check_ray_address(address: str, *, timeout_s: float = 5.0) -> None:
    """Fail at once, naming the fix, when nothing answers at the cluster's address (Ray
    itself would retry for a minute before failing)."""
    host, port = split_ray_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        raise ConfigError(
            f"--ray-address {address}: no Ray cluster answers there ({err.strerror or err}); "
            f"start one with `ray start --head --port {port}` on that machine, or pass the "
            "address it prints"
        ) from None
