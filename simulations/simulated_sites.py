"""The simulated sites' own settings: each gets the node config a deployed site's SuperNode
gets from ``--node-config`` (``client.site_config.SiteConfig.node_config``).

A site's policy and paths are the site's, never the coordinator's: they reach the ClientApp
as node config, not as run config. In Flower's simulation the only node config is
``partition-id`` and ``num-partitions``; :class:`SimulatedSiteNodeConfig` is a Flower mod that
adds the rest for each simulated site from the simulation's own folder and the site's
partition id, before any other mod or handler reads it:

- ``policy-file``: ``<out>/site-policy.toml``, the privacy policy all simulated sites share;
- ``ledger-file``: ``<out>/site-ledgers/site-<id>.json``, so ``--resume`` continues epsilon;
- ``deid-policy``: ``<out>/site-deid-policy.toml``; ``site-secret`` and ``deid-cache-dir``:
  ``<out>/site-deid/site-<id>/site-secret`` and ``.../cache``;
- ``torch-threads`` and, when set, ``secagg-spill-dir``;
- ``imagefolder``, when the simulation runs on the user's own folders
  (``fedmm simulate --site-data``, ``simulations.site_folders``): site i reads the i-th
  folder, as a deployed site reads its own.
- in active-coordinator mode, ``secagg-roster-file`` and ``secagg-signing-key-file``: the
  simulation's roster and the site's roster signing key (``simulations.simulated_roster``),
  whose digest the shared policy file pins.

The mod is a frozen dataclass of plain values: Ray pickles it with the ClientApp for its
actors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedmm.client.secagg.site_identity import ROSTER_FILE_KEY, SIGNING_KEY_FILE_KEY
from fedmm.simulations.simulated_roster import ROSTER_FILE, SIGNING_KEY_FILE, site_name

POLICY_FILE = "site-policy.toml"
DEID_POLICY_FILE = "site-deid-policy.toml"
LEDGER_DIR = "site-ledgers"
DEID_DIR = "site-deid"


@dataclass(frozen=True)
class SimulatedSiteNodeConfig:
    """A Flower mod: fills each simulated site's node config from the simulation's folder."""

    out_dir: str
    torch_threads: int = 1
    secagg_spill_dir: str = ""
    #: The imagefolder of each simulated site, by partition id (empty: the benchmark).
    site_data: tuple[str, ...] = ()
    #: Active-coordinator mode: the simulation's roster folder (empty: no roster).
    roster_dir: str = ""

    def node_config(self, partition_id: int) -> dict[str, str | int]:
        """The node config of the simulated site with ``partition_id``."""
        out, site = Path(self.out_dir), f"site-{partition_id}"
        config: dict[str, str | int] = {
            "policy-file": str(out / POLICY_FILE),
            "ledger-file": str(out / LEDGER_DIR / f"{site}.json"),
            "deid-policy": str(out / DEID_POLICY_FILE),
            "site-secret": str(out / DEID_DIR / site / "site-secret"),
            "deid-cache-dir": str(out / DEID_DIR / site / "cache"),
            "torch-threads": self.torch_threads,
        }
        if self.secagg_spill_dir:
            config["secagg-spill-dir"] = self.secagg_spill_dir
        if self.site_data:
            if not 0 <= partition_id < len(self.site_data):
                raise ValueError(
                    f"simulated site {partition_id} has no folder: {len(self.site_data)} "
                    "--site-data folders for more simulated sites"
                )
            config["imagefolder"] = self.site_data[partition_id]
        if self.roster_dir:
            roster = Path(self.roster_dir)
            config[ROSTER_FILE_KEY] = str(roster / ROSTER_FILE)
            config[SIGNING_KEY_FILE_KEY] = str(roster / site_name(partition_id) / SIGNING_KEY_FILE)
        return config

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if "partition-id" not in context.node_config:
            raise ValueError(
                "a simulated site needs node config partition-id (Flower's simulation sets "
                "it): SimulatedSiteNodeConfig is for the local simulation only"
            )
        context.node_config.update(self.node_config(int(context.node_config["partition-id"])))
        return call_next(msg, context)


def write_site_policy(
    path: Path,
    *,
    max_epsilon: float,
    delta: float,
    roster_digest: bytes = b"",
    require_active_coordinator: bool = True,
) -> None:
    """The policy file the simulated sites share; with ``roster_digest``, every site pins
    that roster and (``require_active_coordinator``) refuses any round not in
    active-coordinator mode."""
    value = "inf" if math.isinf(max_epsilon) else repr(float(max_epsilon))
    text = (
        "# Privacy policy shared by the simulated sites (record-level DP at each site).\n"
        f"[privacy]\nmax-epsilon = {value}\ndelta = {delta!r}\n"
    )
    if roster_digest:
        text += (
            "\n# Active-coordinator mode: the simulation's roster, pinned by every site.\n"
            "[secure-aggregation]\n"
            f"require-active-coordinator = {str(require_active_coordinator).lower()}\n"
            f'roster-digest = "{roster_digest.hex()}"\n'
        )
    path.write_text(text)


def write_site_deid_policy(path: Path) -> None:
    path.write_text(
        "# De-identification policy shared by the simulated sites (client/deid/policy.py).\n"
        "# The defaults: every type of personal data pseudonymised with the site's key, and\n"
        "# faces looked for (none can be found in 28 px Fashion-MNIST items; it costs about\n"
        "# 10 us per image).\n"
        'text_action = "pseudonymise"\ndetect_faces = true\n'
    )
