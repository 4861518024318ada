"""The deployment tests' process helpers: they live in ``simulations.loopback_daemons``
(the deployment benchmark uses them too)."""

from simulations.loopback_daemons import (
    Daemon,
    DaemonGroup,
    descendants,
    free_port,
    is_alive,
    orphans_of,
    port_is_free,
    wait_for_tls,
    wait_until,
)

__all__ = [
    "Daemon",
    "DaemonGroup",
    "descendants",
    "free_port",
    "is_alive",
    "orphans_of",
    "port_is_free",
    "wait_for_tls",
    "wait_until",
]
