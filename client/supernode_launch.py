"""Starting a site's SuperNode (``fedmm site start CONFIG``) and showing its ledger
(``fedmm site status CONFIG``).

``flower-supernode`` (as ``fedmm-supernode``, with a prompt pull loop:
:mod:`client.supernode_polling`) connects out to the coordinator's SuperLink over TLS
(verified with the coordinator's CA certificate), signs every request with the site's
authentication key, and queues a task for every message. It runs with ``--isolation
process``: it starts no app process itself, so the ClientApp of the FAB a run ships never
runs here; the site's executor (:mod:`client.site_service`) runs the installed release for
each task instead. Its Runtime API (``--port``, on 127.0.0.1) is where the executor claims
the tasks: every SuperNode on one machine needs its own port. Runtime dependency
installation is off unless asked for; it stays off.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmm.client.site_config import SiteConfig, node_config_argument
from fedmm.common.flower_commands import flower_executable

#: How often the site's executor asks its SuperNode for a task (Flower's SuperExec asks every
#: second by default, so each message waited half a second on average before it ran); a
#: tenth of a second costs ten requests a second on loopback. A value the site sets itself
#: is kept.
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_SECONDS = "0.1"


def supernode_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """Variables ``flower-supernode`` gets on top of ``environ`` (its executor's poll)."""
    return {} if SUPEREXEC_POLL_ENV in environ else {SUPEREXEC_POLL_ENV: SUPEREXEC_POLL_SECONDS}


RUNTIME_API_HOST = "127.0.0.1"
PROMPT_SUPERNODE = "fedmm-supernode"  # client.supernode_polling
FLOWER_SUPERNODE = "flower-supernode"


def supernode_program() -> str:
    """``fedmm-supernode`` (Flower's SuperNode with a prompt pull loop) when the installed
    Flower is the version it was written for, else Flower's own ``flower-supernode``."""
    from fedmm.client.supernode_polling import pinned_flower_installed

    return PROMPT_SUPERNODE if pinned_flower_installed() else FLOWER_SUPERNODE


def runtime_api_address(port: int) -> str:
    """Where the site's executor reaches the SuperNode's Runtime API."""
    return f"{RUNTIME_API_HOST}:{port}"


class SiteLaunchError(ValueError):
    """The SuperNode cannot be started as asked; the message names the fix."""


def supernode_argv(
    config: SiteConfig,
    *,
    superlink: str,
    ca_cert: Path,
    port: int,
    max_wait_time: float | None = None,
) -> list[str]:
    """The exact ``flower-supernode`` command for this site."""
    host, sep, port_text = superlink.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise SiteLaunchError(f"--superlink {superlink!r} is not HOST:PORT")
    if not 0 < port < 65536:
        raise SiteLaunchError(f"--port {port} is not a TCP port")
    ca_cert = Path(ca_cert).resolve()
    if not ca_cert.is_file():
        raise SiteLaunchError(
            f"--ca-cert {ca_cert} does not exist: get the coordinator's ca.crt (the "
            "certificate only, never ca.key) over a channel you trust"
        )
    from fedmm.client.site_audit import (
        COORDINATOR_ADDRESS,
        COORDINATOR_CERTIFICATE,
        certificate_sha256,
    )

    try:
        fingerprint = certificate_sha256(ca_cert)
    except ValueError as error:
        raise SiteLaunchError(f"--ca-cert {error}: pass the coordinator's ca.crt") from None
    # What the site's audit log records of the coordinator of every run it serves.
    node_config = {
        **config.node_config(),
        COORDINATOR_ADDRESS: superlink,
        COORDINATOR_CERTIFICATE: fingerprint,
    }
    argv = [
        flower_executable(supernode_program()),
        "--superlink",
        superlink,
        "--root-certificates",
        str(ca_cert),
        "--auth-supernode-private-key",
        str(config.auth_private_key),
        "--isolation",
        "process",
        "--host",
        RUNTIME_API_HOST,
        "--port",
        str(port),
        "--node-config",
        node_config_argument(node_config),
    ]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(max_wait_time)]
    return argv


def shell_line(argv: list[str], env: Mapping[str, str] | None = None) -> str:
    """``argv`` (after ``env``'s assignments) as one line a shell would run."""
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted((env or {}).items()))
    return f"{prefix} {shlex.join(argv)}".strip()


@dataclass(frozen=True)
class LedgerStatus:
    ledger_file: Path
    exists: bool
    accountant: str
    delta: float | None
    epsilon: float
    noise_multiplier: float | None
    rounds: list[int]
    entries: int
    steps: int  # DP-SGD steps (noisy-count releases are counted apart)
    count_releases: int
    max_epsilon: float | None

    @property
    def remaining(self) -> float | None:
        if self.max_epsilon is None or not math.isfinite(self.max_epsilon):
            return None
        return max(0.0, self.max_epsilon - self.epsilon)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ledger_file": str(self.ledger_file),
            "exists": self.exists,
            "accountant": self.accountant,
            "delta": self.delta,
            "epsilon_spent": self.epsilon,
            "max_epsilon": self.max_epsilon,
            "epsilon_remaining": self.remaining,
            "noise_multiplier": self.noise_multiplier,
            "rounds": self.rounds,
            "accountant_entries": self.entries,
            "dp_sgd_steps": self.steps,
            "noisy_count_releases": self.count_releases,
        }


def ledger_status(config: SiteConfig) -> LedgerStatus:
    """What the site's ledger file says it has spent (RDP accountant, at the ledger's delta,
    else the policy's). Import-light: no torch (see :func:`ledger_epsilon`)."""
    from fedmm.client.privacy_ledger import ACCOUNTANT, PrivacyLedger, dp_sgd_history

    path = config.ledger_file
    ledger = PrivacyLedger.load(path)
    try:
        policy = config.privacy_policy()
    except ValueError:
        policy = None
    delta = ledger.delta if ledger.delta is not None else (policy.delta if policy else None)
    return LedgerStatus(
        ledger_file=path,
        exists=path.exists(),
        accountant=ACCOUNTANT,
        delta=delta,
        epsilon=ledger_epsilon(ledger, delta),
        noise_multiplier=ledger.noise_multiplier,
        rounds=list(ledger.rounds),
        entries=len(ledger.history),
        steps=sum(n for _s, _q, n in dp_sgd_history(ledger.history)),
        count_releases=len(ledger.history) - len(dp_sgd_history(ledger.history)),
        max_epsilon=policy.max_epsilon if policy else None,
    )


def ledger_epsilon(ledger: Any, delta: float | None) -> float:
    """The ledger's epsilon as :meth:`PrivacyLedger.epsilon` computes it, without importing
    torch for a site-local (sampled Gaussian) history: Opacus's ``RDPAccountant`` is a sum
    of ``compute_rdp`` over the history converted by ``get_privacy_spent`` at the ledger's
    orders (``privacy_ledger.RDP_ORDERS``), and those functions live in a module that needs
    only numpy and scipy, while importing the ``opacus`` package imports torch (seconds).
    Other histories use the ledger's own method."""
    if not ledger.history and not getattr(ledger, "distributed_history", None):
        return 0.0
    if getattr(ledger, "distributed_history", None):
        return float(ledger.epsilon(delta))
    from fedmm.client.privacy_ledger import RDP_ORDERS

    rdp_analysis = _opacus_rdp_analysis()
    orders = list(RDP_ORDERS)
    total = None
    for sigma, rate, steps in ledger.history:
        rdp = rdp_analysis.compute_rdp(q=rate, noise_multiplier=sigma, steps=steps, orders=orders)
        total = rdp if total is None else total + rdp
    epsilon, _order = rdp_analysis.get_privacy_spent(
        orders=orders,
        rdp=total,
        delta=delta if delta is not None else ledger.delta or 1e-5,
    )
    return float(epsilon)


def _opacus_rdp_analysis() -> Any:
    """``opacus/accountants/analysis/rdp.py`` loaded as a module of its own (numpy and scipy
    only), not through the ``opacus`` package, whose ``__init__`` imports torch."""
    import importlib.util
    import sys

    name = "_fedmm_opacus_rdp_analysis"
    if name in sys.modules:
        return sys.modules[name]
    package = importlib.util.find_spec("opacus")  # a top-level spec: nothing is imported
    if package is None or package.origin is None:
        raise ModuleNotFoundError("opacus is not installed")
    path = Path(package.origin).parent / "accountants" / "analysis" / "rdp.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module
