"""Run the Flower App in Flower's simulation runtime (Ray backend), in this process.

Sites are Flower virtual SuperNodes; each loads only its own partition of the built-in
benchmark, or its own imagefolder (``--site-data``, ``simulations.site_folders``). Each gets
its own settings as node config, as a deployed site does
(``simulations.simulated_sites``): the privacy policy the simulated sites share, written to
``<out>/site-policy.toml``; its privacy ledger in ``<out>/site-ledgers/``, so that
``--resume`` continues epsilon where it stopped. Sites report only their epsilon bound to the
coordinator; after the run this runner, which owns the simulated sites' ledgers, adds each
site's exact epsilon to ``summary.json`` and ``report.md``.

De-identification is on: the built-in captions carry synthetic personal data
(``common.data.synthetic_pii``), and every simulated site de-identifies its partition before
training under the policy ``<out>/site-deid-policy.toml``, each with its own site secret and
cache in ``<out>/site-deid/site-<id>/``.

Active-coordinator mode (run config ``secagg-active-coordinator``) needs a roster every site
signed: the simulation makes one for its sites in ``<out>/site-roster/``
(``simulations.simulated_roster``), pins its digest in the sites' shared policy and, unless
the run config names another, hands it to the coordinator as ``secagg-roster-file``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmm.common.federation_config import FederationConfig
from fedmm.simulations.simulated_roster import write_simulated_roster
from fedmm.simulations.simulated_sites import (
    DEID_POLICY_FILE,
    LEDGER_DIR,
    POLICY_FILE,
    SimulatedSiteNodeConfig,
    write_site_deid_policy,
    write_site_policy,
)

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp
    from flwr.clientapp.typing import Mod

#: Builds the sites' ClientApp around the given mods (``client.app.build_client_app``).
ClientAppFactory = Callable[..., "ClientApp"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulationSettings:
    num_sites: int
    site_max_epsilon: float | None = None  # None: the run's epsilon
    num_cpus_per_site: int = 2  # 2 on 2 cores = one Ray actor (each actor imports torch)
    torch_threads: int = 1
    #: Where the sites' updates wait between SecAgg+ stages (empty: the system temp dir).
    secagg_spill_dir: str = ""
    #: Each simulated site's own imagefolder (``--site-data``; empty: the benchmark).
    site_data: tuple[str, ...] = ()
    #: Active-coordinator mode: the sites pin the run's roster and demand the mode (False:
    #: they pin it only, so a benchmark can run rounds with and without it side by side).
    sites_require_active_coordinator: bool = True
    #: An existing Ray cluster to run the sites on (``--ray-address``; empty: a local Ray
    #: started and stopped by this run). Every node needs fedmm installed and the output
    #: folder and site data at the same paths (``simulations.ray_cluster``).
    ray_address: str = ""


def simulated_site_mods(
    out_dir: Path, settings: SimulationSettings, *, roster_dir: Path | None = None
) -> list[Mod]:
    """The mods that make a ClientApp's sites this simulation's sites (their node config);
    ``roster_dir``: the simulation's roster (active-coordinator mode)."""
    return [
        SimulatedSiteNodeConfig(
            out_dir=str(out_dir),
            torch_threads=settings.torch_threads,
            secagg_spill_dir=settings.secagg_spill_dir,
            site_data=settings.site_data,
            roster_dir="" if roster_dir is None else str(roster_dir),
        )
    ]


def run_local_simulation(
    config: FederationConfig,
    settings: SimulationSettings,
    *,
    client_app: ClientAppFactory | None = None,
    server_app: Any = None,
    client_mods: Sequence[Mod] = (),
) -> None:
    """Blocks until the run ends; Ray is shut down when it returns.

    The sites run ``client_app(mods=...)`` (default ``client.app.build_client_app``) with
    the simulated sites' node config mod first, then ``client_mods``; ``server_app``
    replaces the project's ServerApp (tests and benchmarks that wrap them).
    """
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from fedmm.client.app import build_client_app
    from fedmm.server.app import app as default_server_app

    out_dir = Path(config.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    max_epsilon = settings.site_max_epsilon
    run_config = {**config.to_run_config(), "out-dir": str(out_dir)}
    roster = None
    if config.secagg_active_coordinator:
        roster = write_simulated_roster(out_dir, num_sites=settings.num_sites, seed=config.seed)
        run_config["secagg-roster-file"] = config.secagg_roster_file or str(roster.roster_file)
    write_site_policy(
        out_dir / POLICY_FILE,
        max_epsilon=config.epsilon if max_epsilon is None else max_epsilon,
        delta=config.delta,
        roster_digest=b"" if roster is None else roster.digest,
        require_active_coordinator=settings.sites_require_active_coordinator,
    )
    write_site_deid_policy(out_dir / DEID_POLICY_FILE)
    factory = build_client_app if client_app is None else client_app
    roster_dir = None if roster is None else roster.directory
    mods = simulated_site_mods(out_dir, settings, roster_dir=roster_dir)
    sites = factory(mods=[*mods, *client_mods])
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    context = Context(
        run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    backend_config = {
        "client_resources": {"num_cpus": settings.num_cpus_per_site, "num_gpus": 0.0},
        "init_args": ray_init_args(settings.ray_address),
    }
    _run_simulation(
        num_supernodes=settings.num_sites,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=sites,
        server_app=default_server_app if server_app is None else server_app,
        backend_name="ray",
        backend_config=backend_config,
        server_app_context=context,
    )
    report_site_epsilons(out_dir, default_delta=config.delta)


def ray_init_args(ray_address: str) -> dict[str, Any]:
    """``ray.init`` arguments: a local Ray for this run, or the cluster at ``ray_address``
    (``simulations.ray_cluster``)."""
    if not ray_address:
        return {"include_dashboard": False, "log_to_driver": True}
    return {"address": ray_address, "log_to_driver": True}


def site_epsilons(ledger_dir: Path, *, default_delta: float) -> dict[str, tuple[float, float]]:
    """Each simulated site's exact lifetime epsilon and its delta, from its ledger file."""
    from fedmm.client.privacy_ledger import PrivacyLedger

    epsilons = {}
    for path in sorted(ledger_dir.glob("site-*.json")):
        ledger = PrivacyLedger.load(path)
        delta = ledger.delta or default_delta
        epsilons[path.stem] = (ledger.epsilon(delta), delta)
    return epsilons


def report_site_epsilons(out_dir: Path, *, default_delta: float) -> None:
    """Add the simulated sites' exact epsilons to the run's summary and report."""
    from fedmm.server.run_report import add_site_epsilons

    add_site_epsilons(out_dir, site_epsilons(out_dir / LEDGER_DIR, default_delta=default_delta))
