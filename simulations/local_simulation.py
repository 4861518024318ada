"""Run the Flower App in Flower's simulation runtime (Ray backend), in this process.

Sites are Flower virtual SuperNodes; each loads only its own partition of the built-in
benchmark. Simulated sites share one privacy policy, written to ``<out>/site-policy.toml``
and named to the ClientApps by ``$FEDMM_SITE_POLICY``; their privacy ledgers persist in
``<out>/site-ledgers/`` so that ``--resume`` continues epsilon where it stopped. Sites report
only their epsilon bound to the coordinator; after the run this runner, which owns the
simulated sites' ledgers, adds each site's exact epsilon to ``summary.json`` and
``report.md``.

De-identification is on: the built-in captions carry synthetic personal data
(``common.data.synthetic_pii``), and every simulated site de-identifies its partition before
training under the policy ``<out>/site-deid-policy.toml`` (``$FEDMM_DEID_POLICY``), each
with its own site secret and cache in ``<out>/site-deid/site-<id>/`` (``$FEDMM_DEID_DIR``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.federation_config import FederationConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulationSettings:
    num_sites: int
    site_max_epsilon: float | None = None  # None: the run's epsilon
    num_cpus_per_site: int = 2  # 2 on 2 cores = one Ray actor (each actor imports torch)
    torch_threads: int = 1


def write_site_policy(path: Path, *, max_epsilon: float, delta: float) -> None:
    value = "inf" if math.isinf(max_epsilon) else repr(float(max_epsilon))
    path.write_text(
        "# Privacy policy shared by the simulated sites (record-level DP at each site).\n"
        f"[privacy]\nmax-epsilon = {value}\ndelta = {delta!r}\n"
    )


def write_site_deid_policy(path: Path) -> None:
    path.write_text(
        "# De-identification policy shared by the simulated sites (client/deid/policy.py).\n"
        "# The defaults: every type of personal data pseudonymised with the site's key, and\n"
        "# faces looked for (none can be found in 28 px Fashion-MNIST items; it costs about\n"
        "# 10 us per image).\n"
        'text_action = "pseudonymise"\ndetect_faces = true\n'
    )


def run_local_simulation(
    config: FederationConfig,
    settings: SimulationSettings,
    *,
    client_app: Any = None,
    server_app: Any = None,
) -> None:
    """Blocks until the run ends; Ray is shut down when it returns.

    ``client_app`` / ``server_app`` replace the project's apps (tests and benchmarks that wrap
    them); by default the apps of ``client.app`` and ``server.app`` run.
    """
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from client.app import LEDGER_DIR_ENV
    from client.app import app as default_client_app
    from client.privacy_policy import POLICY_FILE_ENV
    from client.site_data import DEID_DIR_ENV, DEID_POLICY_ENV
    from server.app import app as default_server_app

    out_dir = Path(config.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    policy_file = out_dir / "site-policy.toml"
    max_epsilon = settings.site_max_epsilon
    write_site_policy(
        policy_file,
        max_epsilon=config.epsilon if max_epsilon is None else max_epsilon,
        delta=config.delta,
    )
    os.environ[POLICY_FILE_ENV] = str(policy_file)
    os.environ[LEDGER_DIR_ENV] = str(out_dir / "site-ledgers")
    deid_policy_file = out_dir / "site-deid-policy.toml"
    write_site_deid_policy(deid_policy_file)
    os.environ[DEID_POLICY_ENV] = str(deid_policy_file)
    os.environ[DEID_DIR_ENV] = str(out_dir / "site-deid")
    os.environ["FEDMM_TORCH_THREADS"] = str(settings.torch_threads)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_config = {**config.to_run_config(), "out-dir": str(out_dir)}
    context = Context(
        run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    backend_config = {
        "client_resources": {"num_cpus": settings.num_cpus_per_site, "num_gpus": 0.0},
        "init_args": {"include_dashboard": False, "log_to_driver": True},
    }
    _run_simulation(
        num_supernodes=settings.num_sites,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=default_client_app if client_app is None else client_app,
        server_app=default_server_app if server_app is None else server_app,
        backend_name="ray",
        backend_config=backend_config,
        server_app_context=context,
    )
    report_site_epsilons(out_dir, default_delta=config.delta)


def site_epsilons(ledger_dir: Path, *, default_delta: float) -> dict[str, tuple[float, float]]:
    """Each simulated site's exact lifetime epsilon and its delta, from its ledger file."""
    from client.privacy_ledger import PrivacyLedger

    epsilons = {}
    for path in sorted(ledger_dir.glob("site-*.json")):
        ledger = PrivacyLedger.load(path)
        delta = ledger.delta or default_delta
        epsilons[path.stem] = (ledger.epsilon(delta), delta)
    return epsilons


def report_site_epsilons(out_dir: Path, *, default_delta: float) -> None:
    """Add the simulated sites' exact epsilons to the run's summary and report."""
    from server.run_report import add_site_epsilons

    add_site_epsilons(out_dir, site_epsilons(out_dir / "site-ledgers", default_delta=default_delta))
